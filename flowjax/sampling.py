"""Sigma schedules, step kernels and `lax.scan` rollouts with log-probs.

Time convention (DESIGN.md): the flow runs from noise at sigma=1 to data at sigma=0,
x_sigma = (1 - sigma) * x0 + sigma * eps, velocity v = eps - x0, and a step goes from
`sig` to `sig_next < sig`, so `dt = sig_next - sig` is negative.

Kernels (`kind`):
  ode    Euler step of the probability-flow ODE.
  sde    Flow-GRPO's Euler-Maruyama step of the reverse SDE, noise level a (published 0.7).
  cps    Coefficients-Preserving Sampling, noise level a in [0, 1] (published 0.8).
  dance  DanceGRPO's reverse-SDE step, noise level eta (published 0.3).

Every kernel is a pure function of (x, v, sig, sig_next, noise) and is computed in float32
whatever the dtype of the model. With noise level 0 the sde, cps and dance kernels give the
ODE step bit for bit: each mean is written as the ODE step plus a correction that is an exact
zero at level 0, so a deterministic rollout and a stochastic one can be compared exactly.

This module knows nothing of models: `rollout` takes any `velocity_fn(x, sigma_batch) -> v`
(the caller does classifier-free guidance and the sigma * 1000 conversion for the MMDiT).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("ode", "sde", "cps", "dance")

# Noise levels of the published recipes (Flow-GRPO a, CPS a, DanceGRPO eta); the default of
# `rollout(..., noise_level=None)`.
DEFAULT_NOISE_LEVEL = {"ode": 0.0, "sde": 0.7, "cps": 0.8, "dance": 0.3}

_NUM_TRAIN_TIMESTEPS = 1000
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- schedule


def time_shift(s, shift: float):
    """SD3's resolution shift of sigmas in [0, 1] (numpy or JAX arrays): shift s / (1 + (shift - 1) s),
    which moves them towards the noise end for shift > 1."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sigmas(num_steps: int, shift: float = 3.0) -> jnp.ndarray:
    """The sigma schedule `[num_steps + 1]` (float32), ending in 0.

    Equal to diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift)` after
    `.set_timesteps(num_steps)`, `.sigmas` (default config, no dynamic shifting).
    """
    if isinstance(num_steps, bool) or not float(num_steps).is_integer() or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")

    # diffusers first builds its 1000-entry training table in float32 torch, already shifted,
    # and takes sigma_max / sigma_min from it; replay that in float32 so the end points match
    # to the bit.
    def shifted32(s):
        s = np.float32(s)
        return np.float32(np.float32(shift) * s) / np.float32(
            np.float32(1.0) + np.float32(np.float32(shift - 1.0) * s)
        )

    sigma_max = float(shifted32(np.float32(_NUM_TRAIN_TIMESTEPS) / np.float32(_NUM_TRAIN_TIMESTEPS)))
    sigma_min = float(shifted32(np.float32(1.0) / np.float32(_NUM_TRAIN_TIMESTEPS)))
    # set_timesteps then works in float64 numpy and shifts a second time (so the schedule is
    # the shift applied to an already shifted linspace, as DESIGN.md's reference maths says).
    t = np.linspace(sigma_max * _NUM_TRAIN_TIMESTEPS, sigma_min * _NUM_TRAIN_TIMESTEPS, num_steps)
    s = t / _NUM_TRAIN_TIMESTEPS
    s = time_shift(s, shift)
    return jnp.asarray(np.append(s.astype(np.float32), np.float32(0.0)))


# --------------------------------------------------------------------------- kernels


class Step(NamedTuple):
    """One transition x -> x_next = mean + std * noise (all float32)."""

    x_next: jax.Array
    mean: jax.Array
    std: jax.Array  # std of x_next given x, broadcastable to x
    # The kernel's noise scale before the sqrt(-dt) factor (Flow-GRPO's `std_dev_t`, which its
    # KL term divides by): std / sqrt(-dt) for sde, eta for dance, std itself for cps.
    std_t: jax.Array


class TransitionLogProb(NamedTuple):
    log_prob: jax.Array  # [B] float32
    mean: jax.Array
    std: jax.Array
    std_t: jax.Array


def _bcast(s, x):
    """A scalar or per-sample [B] sigma, shaped to broadcast against x [B, ...]."""
    s = jnp.asarray(s, jnp.float32)
    return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def _prep(x, v, sig, sig_next):
    x = jnp.asarray(x).astype(jnp.float32)
    v = jnp.asarray(v).astype(jnp.float32)
    sig = _bcast(sig, x)
    sig_next = _bcast(sig_next, x)
    return x, v, sig, sig_next, sig_next - sig


def _finish(mean, std, std_t, noise):
    if noise is None:
        return Step(mean, mean, std, std_t)
    return Step(mean + std * jnp.asarray(noise).astype(jnp.float32), mean, std, std_t)


def ode_step(x, v, sig, sig_next, noise=None, *, level=0.0) -> Step:
    """Euler step `x' = x + dt * v`; `noise` and `level` are accepted and ignored."""
    del level
    x, v, sig, sig_next, dt = _prep(x, v, sig, sig_next)
    mean = x + dt * v
    zero = jnp.zeros_like(dt)
    return Step(mean, mean, zero, zero)


def sde_step(x, v, sig, sig_next, noise, *, level, sig_max) -> Step:
    """Flow-GRPO step with noise level `level` (a); `sig_max` is the schedule's sigmas[1].

    std_t = a * sqrt(sig / (1 - sig)), x' = mean + std_t * sqrt(-dt) * noise. `noise=None`
    returns x_next = mean.
    """
    x, v, sig, sig_next, dt = _prep(x, v, sig, sig_next)
    # 1 - sig is 0 at the first step; like Flow-GRPO's code, only the denominator's sigma is
    # replaced by sigmas[1] there (the numerator keeps sig = 1).
    denom = 1.0 - jnp.where(sig == 1.0, jnp.asarray(sig_max, jnp.float32), sig)
    std_t = jnp.asarray(level, jnp.float32) * jnp.sqrt(sig / denom)
    # Flow-GRPO's mean x*(1 + std^2/(2 sig) dt) + v*(1 + std^2 (1-sig)/(2 sig)) dt, regrouped
    # as the ODE step plus a correction that is an exact 0 at level 0.
    mean = (x + dt * v) + (std_t**2 / (2.0 * sig) * dt) * (x + (1.0 - sig) * v)
    return _finish(mean, std_t * jnp.sqrt(-dt), std_t, noise)


def cps_step(x, v, sig, sig_next, noise, *, level) -> Step:
    """Coefficients-Preserving Sampling step with noise level `level` (a in [0, 1])."""
    x, v, sig, sig_next, dt = _prep(x, v, sig, sig_next)
    angle = jnp.asarray(level, jnp.float32) * (math.pi / 2)
    s = sig_next * jnp.sin(angle)
    # sqrt(sig_next^2 - s^2) == sig_next * cos(angle), without the cancellation and exactly
    # sig_next at a = 0.
    c = sig_next * jnp.cos(angle)
    x1 = x + (1.0 - sig) * v  # predicted noise; the predicted data is x0 = x - sig * v
    # (1 - sig_next) * x0 + sig_next * x1 is the ODE step, so the reference mean
    # (1 - sig_next) * x0 + c * x1 is that step plus (c - sig_next) * x1 (exact 0 at a = 0).
    mean = (x + dt * v) + (c - sig_next) * x1
    return _finish(mean, s, s, noise)


def dance_step(x, v, sig, sig_next, noise, *, level) -> Step:
    """DanceGRPO step with noise level `level` (eta): std = eta * sqrt(-dt)."""
    x, v, sig, sig_next, dt = _prep(x, v, sig, sig_next)
    eta = jnp.asarray(level, jnp.float32)
    # The reference score -(x - (1 - sig) * x0) / sig^2 with x0 = x - sig * v, simplified to
    # -(x + (1 - sig) * v) / sig, which does not cancel catastrophically at small sigma.
    score = -(x + (1.0 - sig) * v) / sig
    mean = (x + dt * v) - (0.5 * eta**2) * score * dt
    return _finish(mean, eta * jnp.sqrt(-dt), jnp.broadcast_to(eta, dt.shape), noise)


_KERNELS = {"ode": ode_step, "sde": sde_step, "cps": cps_step, "dance": dance_step}


def _check_kind(kind):
    if kind not in _KERNELS:
        raise ValueError(f"unknown sampler kind {kind!r}; expected one of {', '.join(KINDS)}")


def step(kind, x, v, sig, sig_next, noise, *, level, sig_max=None) -> Step:
    """Dispatch to the `kind` kernel. `sig_max` (sigmas[1]) is required for kind="sde"."""
    _check_kind(kind)
    if kind == "sde":
        if sig_max is None:
            raise ValueError("kind='sde' needs sig_max=sigmas[1] (the std is infinite at sigma=1)")
        return sde_step(x, v, sig, sig_next, noise, level=level, sig_max=sig_max)
    return _KERNELS[kind](x, v, sig, sig_next, noise, level=level)


def _reduce(lp):
    return lp.mean(axis=tuple(range(1, lp.ndim)))


def _log_prob(kind, x_next, st: Step):
    x_next = jnp.asarray(x_next).astype(jnp.float32)
    if kind == "ode":
        return jnp.zeros(x_next.shape[:1], jnp.float32)
    if kind == "cps":
        # The CPS reference drops the Gaussian constants and the 1/(2 std^2) scale.
        return -_reduce((x_next - st.mean) ** 2)
    # A zero-std step (noise level 0) is deterministic: log-prob 0 like an ODE step. The double
    # `where` keeps gradients finite there.
    pos = st.std > 0
    std = jnp.where(pos, st.std, 1.0)
    lp = -((x_next - st.mean) ** 2) / (2.0 * std**2) - jnp.log(std) - _LOG_SQRT_2PI
    return _reduce(jnp.where(pos, lp, 0.0))


def transition_log_prob(kind, x, x_next, v, sig, sig_next, level, *, sig_max=None) -> TransitionLogProb:
    """Log-prob [B] (float32) of the transition x -> x_next under the `kind` kernel given v.

    sde / dance: mean over all non-batch dims of the Gaussian log-density of x_next (constants
    included); cps: -mean of (x_next - mean)^2, constants dropped as the reference does;
    ode: zeros. Also returns the kernel's mean, std and std_t (for the PPO ratio and the KL).
    """
    st = step(kind, x, v, sig, sig_next, None, level=level, sig_max=sig_max)
    return TransitionLogProb(_log_prob(kind, x_next, st), st.mean, st.std, st.std_t)


# --------------------------------------------------------------------------- rollouts


class Rollout(NamedTuple):
    """Result of `rollout` (a NamedTuple, hence a pytree)."""

    latents: jax.Array  # [T+1, B, ...] float32; latents[0] = noise, latents[-1] = sample
    log_probs: jax.Array  # [T, B] float32; 0 on ODE steps
    sigmas: jax.Array  # [T+1] float32


def _concrete(x):
    """x as numpy, or None when it is traced (its value is unknown until run time)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_sigmas(sig):
    sig = jnp.asarray(sig, jnp.float32)
    if sig.ndim != 1 or sig.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D array of num_steps + 1 >= 2 values, got shape {sig.shape}")
    s = _concrete(sig)
    if s is not None:
        if not np.all(np.isfinite(s)):
            raise ValueError("sigmas contains non-finite values")
        if not np.all(np.diff(s) < 0):
            raise ValueError(
                "sigmas must be strictly decreasing (noise at sigma=1 to data at sigma=0), "
                f"got {s.tolist()}; build it with flowjax.sampling.sigmas(num_steps, shift)"
            )
        if s[0] > 1.0 or s[-1] < 0.0:
            raise ValueError(f"sigmas must lie in [0, 1], got first {s[0]} and last {s[-1]}")
    return sig


def _check_level(kind, level):
    lv = _concrete(level)
    if lv is None:
        return
    if lv.ndim != 0 or not np.isfinite(lv) or lv < 0:
        raise ValueError(f"noise_level must be a finite scalar >= 0, got {level!r}")
    if kind == "cps" and lv > 1:
        raise ValueError(f"cps noise_level is an angle fraction in [0, 1], got {level!r}")


def _check_window(window, num_steps):
    try:
        start, end = window
    except (TypeError, ValueError):
        raise ValueError(f"sde_window must be a pair (start, end), got {window!r}") from None
    cs, ce = _concrete(start), _concrete(end)
    for name, c in (("start", cs), ("end", ce)):
        if c is not None and (c.ndim != 0 or not np.issubdtype(c.dtype, np.integer)):
            raise ValueError(f"sde_window {name} must be an integer scalar, got {c!r}")
    lo = 0 if cs is None else int(cs)
    hi = num_steps if ce is None else int(ce)
    if not (0 <= lo <= hi <= num_steps):
        raise ValueError(
            f"sde_window {tuple(window)!r} must satisfy 0 <= start <= end <= num_steps={num_steps}"
        )
    return jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32)


def rollout(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    noise,
    sigmas,
    key=None,
    *,
    kind: str = "ode",
    noise_level=None,
    sde_window=None,
) -> Rollout:
    """Sample from `noise` (x at sigmas[0]) to sigmas[-1] in one `jax.lax.scan`.

    velocity_fn(x, sigma_batch) -> v, with x float32 [B, ...] and sigma_batch [B] float32.
    kind: "ode" | "sde" | "cps" | "dance" (static).
    noise_level: the kernel's a / eta; None (default) takes the published level of the kind
      (sde 0.7, cps 0.8, dance 0.3), so `kind="sde"` alone is never silently deterministic.
      0.0 makes every kind reproduce "ode" bit for bit. Ignored for "ode". May be traced.
    sde_window: (start, end) for MixGRPO: stochastic steps only for step indices in
      [start, end), ODE steps and log-prob 0 elsewhere. Either bound may be a traced int, so a
      window can be drawn per batch inside jit (see `sample_window`).
    key: PRNG key for the step noise; may be None for kind="ode".

    Returns Rollout(latents [T+1, B, ...], log_probs [T, B], sigmas [T+1]), all float32.
    """
    _check_kind(kind)
    sig = _check_sigmas(sigmas)
    num_steps = sig.shape[0] - 1
    level = DEFAULT_NOISE_LEVEL[kind] if noise_level is None else noise_level
    _check_level(kind, level)
    window = None if sde_window is None else _check_window(sde_window, num_steps)
    if kind != "ode" and key is None:
        raise ValueError(f"kind={kind!r} draws noise: pass a PRNG key")

    x0 = jnp.asarray(noise).astype(jnp.float32)
    batch = x0.shape[0]
    level = jnp.asarray(level, jnp.float32)
    sig_max = sig[1]
    keys = jax.random.split(key, num_steps) if kind != "ode" else jnp.zeros((num_steps,), jnp.uint32)

    def body(x, inp):
        i, s, s_next, k = inp
        v = velocity_fn(x, jnp.full((batch,), s, jnp.float32)).astype(jnp.float32)
        if kind == "ode":
            x_next = ode_step(x, v, s, s_next).x_next
            return x_next, (x_next, jnp.zeros((batch,), jnp.float32))
        eps = jax.random.normal(k, x.shape, jnp.float32)
        st = step(kind, x, v, s, s_next, eps, level=level, sig_max=sig_max)
        x_next, lp = st.x_next, _log_prob(kind, st.x_next, st)
        if window is not None:
            inside = (i >= window[0]) & (i < window[1])
            x_next = jnp.where(inside, x_next, ode_step(x, v, s, s_next).x_next)
            lp = jnp.where(inside, lp, 0.0)
        return x_next, (x_next, lp)

    xs = (jnp.arange(num_steps, dtype=jnp.int32), sig[:-1], sig[1:], keys)
    _, (traj, log_probs) = jax.lax.scan(body, x0, xs)
    return Rollout(jnp.concatenate([x0[None], traj], axis=0), log_probs, sig)


def sample_window(key, num_steps: int, window_size: int, *, max_start: int | None = None):
    """A MixGRPO window (start, start + window_size) with start uniform in [0, max_start].

    max_start defaults to num_steps - window_size (the window stays inside the schedule). The
    bounds are traced int32, ready for `rollout(..., sde_window=...)` inside jit.
    """
    if not 1 <= window_size <= num_steps:
        raise ValueError(f"window_size must be in [1, num_steps={num_steps}], got {window_size}")
    if max_start is None:
        max_start = num_steps - window_size
    if not 0 <= max_start <= num_steps - window_size:
        raise ValueError(
            f"max_start must be in [0, num_steps - window_size = {num_steps - window_size}], got {max_start}"
        )
    start = jax.random.randint(key, (), 0, max_start + 1, dtype=jnp.int32)
    return start, start + window_size


def shared_noise(key, batch: int, group_size: int, shape, dtype=jnp.float32) -> jax.Array:
    """Initial noise [batch, *shape] where each run of `group_size` consecutive samples shares one
    draw (one prompt's group starting from the same latent)."""
    if group_size < 1 or batch % group_size:
        raise ValueError(
            f"batch {batch} is not divisible by group_size {group_size}; "
            "choose a batch that is a multiple of the group size"
        )
    groups = jax.random.normal(key, (batch // group_size, *tuple(shape)), dtype)
    return jnp.repeat(groups, group_size, axis=0)
