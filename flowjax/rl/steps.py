"""The jitted pieces of one RL iteration: rollout and the per-method gradient of a minibatch.

Everything here is a pure function of pytrees: `apply(params, x, t, ctx, pooled)` is the model with
the trainable `params` merged into the frozen rest, and the methods differ only in how they turn a
stored rollout into a loss. Gradients are accumulated over the trained timesteps with `lax.scan`, so
memory holds one timestep's activations at a time, as the references' accumulation loops do.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from flowjax import sampling
from flowjax.rl import awm, grpo, nft

Apply = Callable[..., jax.Array]  # apply(params, x, timesteps, ctx, pooled) -> v


class Cond(NamedTuple):
    """Conditioning of a batch: text and pooled embeddings, and the negative ones for CFG."""

    ctx: jax.Array
    pooled: jax.Array
    neg_ctx: jax.Array
    neg_pooled: jax.Array

    def rows(self, idx):
        return Cond(*(a[idx] for a in self))


def velocity(apply: Apply, params, x, sigma, cond: Cond, guidance: float):
    """The (CFG) velocity at sigma [B]: uncond + g * (cond - uncond), one batched forward for both."""
    t = sigma * 1000.0  # the MMDiT's sinusoidal embedding was trained on diffusers-unit timesteps
    if guidance == 1.0:
        return apply(params, x, t, cond.ctx, cond.pooled).astype(jnp.float32)
    both = lambda a, b: jnp.concatenate([a, b], axis=0)
    v = apply(params, both(x, x), both(t, t), both(cond.neg_ctx, cond.ctx), both(cond.neg_pooled, cond.pooled))
    v_uncond, v_cond = jnp.split(v.astype(jnp.float32), 2, axis=0)
    return v_uncond + guidance * (v_cond - v_uncond)


def rollout(apply: Apply, params, cond: Cond, noise, key, *, sigmas, kind, noise_level, guidance, window=None):
    fn = lambda x, s: velocity(apply, params, x, s, cond, guidance)
    return sampling.rollout(fn, noise, sigmas, key, kind=kind, noise_level=noise_level, sde_window=window)


def _accumulate(loss_fn, params, steps):
    """Mean gradient and metrics of `loss_fn(params, step_input)` over `steps` (scanned)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(acc, s):
        (_, metrics), g = grad_fn(params, s)
        return jax.tree.map(jnp.add, acc, g), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, metrics = jax.lax.scan(body, zeros, steps)
    n = jax.tree.leaves(steps)[0].shape[0]
    return jax.tree.map(lambda g: g / n, grads), jax.tree.map(jnp.mean, metrics)


class Minibatch(NamedTuple):
    cond: Cond
    latents: jax.Array  # [T+1, B, ...] (grpo) or the final samples [B, ...] (awm, nft)
    log_probs: jax.Array  # [T, B] (grpo) or unused zeros
    advantages: jax.Array  # [B]


def grpo_grads(apply, params, ref_params, mb: Minibatch, train_steps, key, *, cfg, sigmas):
    """Flow-GRPO / CPS / MixGRPO: PPO-clipped ratio of each stored transition + KL to the reference."""
    del key
    kind, level, beta = cfg.kind, cfg.noise_level, cfg.beta

    def loss_fn(p, j):
        x, x_next = mb.latents[j], mb.latents[j + 1]
        s = jnp.full(x.shape[:1], sigmas[j])
        lp = sampling.transition_log_prob(
            kind, x, x_next, velocity(apply, p, x, s, mb.cond, cfg.guidance), sigmas[j], sigmas[j + 1], level,
            sig_max=sigmas[1],
        )
        ref_mean = None
        if beta > 0:
            v_ref = jax.lax.stop_gradient(velocity(apply, ref_params, x, s, mb.cond, cfg.guidance))
            ref_mean = sampling.transition_log_prob(
                kind, x, x_next, v_ref, sigmas[j], sigmas[j + 1], level, sig_max=sigmas[1]
            ).mean
        return grpo.grpo_loss(
            lp.log_prob, mb.log_probs[j], mb.advantages, clip_range=cfg.clip_range, beta=beta,
            mean=lp.mean if beta > 0 else None, ref_mean=ref_mean, std_t=lp.std_t if beta > 0 else None,
            adv_clip=cfg.adv_clip,
        )

    return _accumulate(loss_fn, params, train_steps)


def awm_grads(apply, params, ref_params, ema_params, mb: Minibatch, key, *, cfg, sigmas):
    """AWM: advantage-weighted flow-matching likelihood at fresh noise, stratified over the schedule."""
    x0 = mb.latents
    batch = x0.shape[0]
    t_all = awm.awm_timesteps(key, batch, sigmas, num_train_timesteps=cfg.num_train_timesteps,
                              timestep_fraction=cfg.timestep_fraction).reshape(-1, batch)
    eps_all = jax.random.normal(jax.random.fold_in(key, 1), (t_all.shape[0], *x0.shape), jnp.float32)

    def loss_fn(p, inp):
        t, eps = inp
        x_t = awm.awm_noised(x0, eps, t)
        v_of = lambda q: velocity(apply, q, x_t, t, mb.cond, 1.0)  # no CFG in training
        v_ref = jax.lax.stop_gradient(v_of(ref_params)) if cfg.beta > 0 else None
        v_ema = jax.lax.stop_gradient(v_of(ema_params)) if cfg.ema_beta > 0 else None
        return awm.awm_loss(v_of(p), x0, eps, t, mb.advantages, p=cfg.p, v_ref=v_ref, beta=cfg.beta,
                            v_ema=v_ema, ema_beta=cfg.ema_beta, adv_scale=cfg.adv_scale, adv_clip=cfg.adv_clip)

    return _accumulate(loss_fn, params, (t_all, eps_all))


def nft_grads(apply, params, ref_params, old_params, mb: Minibatch, key, *, cfg, sigmas):
    """DiffusionNFT: implicit positive/negative policies around the old policy, at fresh noise."""
    x0 = mb.latents
    batch = x0.shape[0]
    t_all = nft.nft_timesteps(key, batch, sigmas, timestep_fraction=cfg.timestep_fraction)  # [K, B]
    eps_all = jax.random.normal(jax.random.fold_in(key, 1), (t_all.shape[0], *x0.shape), jnp.float32)

    def loss_fn(p, inp):
        t, eps = inp
        x_t = awm.awm_noised(x0, eps, t)
        v_of = lambda q: velocity(apply, q, x_t, t, mb.cond, 1.0)  # CFG-free, as the method intends
        v_old = jax.lax.stop_gradient(v_of(old_params))
        v_ref = jax.lax.stop_gradient(v_of(ref_params)) if cfg.kl_beta > 0 else None
        return nft.nft_loss(v_of(p), v_old, x_t, x0, t, mb.advantages, mix=cfg.mix, v_ref=v_ref,
                            kl_beta=cfg.kl_beta, adv_clip=cfg.adv_clip)

    return _accumulate(loss_fn, params, (t_all, eps_all))
