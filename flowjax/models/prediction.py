"""What a transformer's output means, and the velocity the samplers and losses read from it.

SD3.5 predicts the velocity `v = eps - x0` directly ("velocity"). A model working on raw pixels with
large patches (the shapes world: one 12x12x3 = 432-value patch per 128-wide token) cannot: its output
is a linear map of the 128-wide token, so it can never carry the 432-dimensional noise that v
contains, and the unseen part of the noise stays in every sample. Predicting the clean sample x0
instead ("sample") needs no such capacity, because the noise is put back exactly by

    v = (x - x0_hat) / sigma        (x = (1 - sigma) x0 + sigma eps)

This is the x-prediction of Li & He, "Back to Basics: Let Denoising Generative Models Denoise"
(JiT, 2025), with their clamp of the denominator near the data end. Every sampler, log-prob and RL
loss in flowjax then works unchanged in velocity space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTIONS = ("velocity", "sample")
MIN_SIGMA = 0.05  # JiT's clamp: near sigma = 0 the division would amplify the model's error


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def to_velocity(output: jax.Array, x: jax.Array, sigma: jax.Array, prediction: str) -> jax.Array:
    """The velocity (float32) of a model `output` at noisy input `x` [B, ...] and `sigma` [B]."""
    output = output.astype(jnp.float32)
    if check_prediction(prediction) == "velocity":
        return output
    s = jnp.maximum(sigma.astype(jnp.float32), MIN_SIGMA).reshape(-1, *([1] * (x.ndim - 1)))
    return (x.astype(jnp.float32) - output) / s
