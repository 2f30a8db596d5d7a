"""Gaussian data with a closed-form velocity, shared by the sampler and solver tests.

With x0 ~ N(MU, S0^2) per dim, x_sigma = (1 - sigma) x0 + sigma eps is Gaussian with mean
m = (1 - sigma) MU and variance V = (1 - sigma)^2 S0^2 + sigma^2, and the exact velocity
E[eps - x0 | x_sigma] is linear:
    Cov(eps, x) = sigma, Cov(x0, x) = (1 - sigma) S0^2
    v(x) = (sigma - (1 - sigma) S0^2) / V * (x - m) - MU.
The probability-flow ODE maps each dim's quantiles, so x at sigma = 0 is exactly
MU + S0 * (x_t - (1 - t) MU) / sqrt(V(t)) from x_t at sigma = t (`ode_solution`).
"""

import jax.numpy as jnp
import numpy as np

MU = np.array([0.5, -1.0, 2.0, 0.0]).reshape(2, 2, 1)
S0 = np.array([0.5, 1.5, 0.8, 1.0]).reshape(2, 2, 1)


def velocity_gain(sig):
    """k(sigma) in v = k (x - (1 - sigma) MU) - MU (numpy or JAX sigma)."""
    var = (1 - sig) ** 2 * S0**2 + sig**2
    return (sig - (1 - sig) * S0**2) / var


def velocity_np(x, sig):
    """Exact velocity, numpy float64; sig scalar or [B]."""
    sig = np.asarray(sig, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    return velocity_gain(sig) * (x - (1 - sig) * MU) - MU


def velocity_jax(x, sig_b):
    """Exact velocity in JAX float32; sig_b [B] (the `rollout` velocity_fn signature)."""
    sig = sig_b.reshape((-1, 1, 1, 1))
    return (velocity_gain(sig) * (x - (1 - sig) * MU) - MU).astype(jnp.float32)


def true_moments(sig):
    return (1 - sig) * MU, (1 - sig) ** 2 * S0**2 + sig**2


def ode_solution(x_t, t):
    """The exact probability-flow ODE solution at sigma = 0 from x_t at sigma = t (float64)."""
    mean, var = true_moments(t)
    return MU + S0 * (np.asarray(x_t, np.float64) - mean) / np.sqrt(var)
