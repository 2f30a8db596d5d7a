"""Small float32 helpers shared by the losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def per_sample_mean(x) -> jax.Array:
    """Mean over every axis but the first (C, H, W of a latent batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def bcast(t, x) -> jax.Array:
    """A per-sample [B] (or scalar) value shaped to broadcast against x [B, ...], in float32."""
    t = f32(t)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def weighted_mean(x, weights=None) -> jax.Array:
    """mean(x), or sum(w x) / sum(w) with per-row weights broadcastable to x (a masked mean)."""
    if weights is None:
        return jnp.mean(x)
    w = jnp.broadcast_to(f32(weights), x.shape)
    return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1e-12)


def velocity_kl(v, v_other, weights=None) -> jax.Array:
    """mean((v - v_other)^2), the velocity-space KL proxy of AWM and DiffusionNFT (a weighted mean over
    rows with `weights`); v_other is constant."""
    return weighted_mean(per_sample_mean((f32(v) - jax.lax.stop_gradient(f32(v_other))) ** 2), weights)


def ppo_clipped(ratio, advantages, clip_range, weights=None) -> jax.Array:
    """PPO's pessimistic objective as a loss: mean(max(-A*ratio, -A*clip(ratio, 1-e, 1+e))), the mean
    weighted by `weights` when given (rows of weight 0 are left out)."""
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return weighted_mean(jnp.maximum(unclipped, clipped), weights)
