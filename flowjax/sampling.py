"""Sigma schedules, step kernels, multistep solvers and `lax.scan` rollouts with log-probs.

Time convention (DESIGN.md): the flow runs from noise at sigma=1 to data at sigma=0,
x_sigma = (1 - sigma) * x0 + sigma * eps, velocity v = eps - x0 (data prediction x - sigma * v), and a
step goes from `sig` to `sig_next < sig`, so `dt = sig_next - sig` is negative.

Kernels (`kind` in `KINDS`: one-step transitions with a log-prob, usable by the GRPO family):
  ode    Euler step of the probability-flow ODE.
  sde    Flow-GRPO's Euler-Maruyama step of the reverse SDE, noise level a (published 0.7).
  cps    Coefficients-Preserving Sampling, noise level a in [0, 1] (published 0.8).
  dance  DanceGRPO's reverse-SDE step, noise level eta (published 0.3).

Solvers (`kind` in `SOLVERS`: multistep samplers without log-probs, for the methods that keep only the
final sample - AWM and DiffusionNFT; `rollout` returns zero log-probs for them):
  dpm2       DiffusionNFT's 2nd-order multistep DPM-Solver++ ("2M"), deterministic.
  sa_solver  AWM's SA-Solver: stochastic Adams predictor-corrector (orders 2 / 2, PEC), noise tau
             (`noise_level`, published 0.4 on GenEval / OCR, 0 on PickScore) inside a sigma window.

Schedules and step choices of the recipes:
  sigmas(num_steps, shift)            diffusers' FlowMatchEulerDiscreteScheduler (SD3.5; Flow-GRPO, NFT, AWM).
  sa_solver_sigmas(num_steps, shift)  AWM's grid for kind="sa_solver" (two entries of `sigmas` moved).
  dance_sigmas(num_steps, shift)      DanceGRPO / MixGRPO: the shift applied once to linspace(1, 0, N + 1).
  dance_train_steps(key, ...)         DanceGRPO's random per-sample subset of steps to train on.
  sample_window / progressive_window  MixGRPO's SDE window: random, or its progressive sliding rule.

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

# One-step kernels with a transition log-prob (what GRPO-style methods can train on).
KINDS = ("ode", "sde", "cps", "dance")
# Multistep solvers: `rollout` runs them, their log-probs are zeros (only the final sample is used).
SOLVERS = ("dpm2", "sa_solver")

# Noise levels of the published recipes (Flow-GRPO a, CPS a, DanceGRPO eta, AWM's SA-Solver tau on
# GenEval / OCR); the default of `rollout(..., noise_level=None)`. dpm2 is deterministic.
DEFAULT_NOISE_LEVEL = {"ode": 0.0, "sde": 0.7, "cps": 0.8, "dance": 0.3, "dpm2": 0.0, "sa_solver": 0.4}

# AWM's SA-Solver adds noise (tau = noise_level) only on steps whose target sigma lies in this closed
# interval (sd3_pipeline_with_logprob.py: `noise_level if 0.3 <= t <= 0.9 else 0`).
SA_TAU_INTERVAL = (0.3, 0.9)

_NUM_TRAIN_TIMESTEPS = 1000
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- schedule


def time_shift(s, shift: float):
    """SD3's resolution shift of sigmas in [0, 1] (numpy or JAX arrays): shift s / (1 + (shift - 1) s),
    which moves them towards the noise end for shift > 1."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def _check_schedule_args(num_steps, shift, min_steps=1):
    if isinstance(num_steps, bool) or not float(num_steps).is_integer() or num_steps < min_steps:
        raise ValueError(f"num_steps must be an integer >= {min_steps}, got {num_steps!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    return int(num_steps)


def _check_int(name, value, low, why=""):
    """A static Python / NumPy integer >= low, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{why}, got {value!r}")
    return int(value)


def sigmas(num_steps: int, shift: float = 3.0) -> jnp.ndarray:
    """The sigma schedule `[num_steps + 1]` (float32), ending in 0.

    Equal to diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift)` after
    `.set_timesteps(num_steps)`, `.sigmas` (default config, no dynamic shifting).
    """
    return jnp.asarray(_sigmas_np(_check_schedule_args(num_steps, shift), shift))


def _sigmas_np(num_steps: int, shift: float) -> np.ndarray:
    """`sigmas` as a NumPy float32 array (usable while tracing)."""
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
    return np.append(s.astype(np.float32), np.float32(0.0))


def sa_solver_sigmas(num_steps: int, shift: float = 3.0) -> jnp.ndarray:
    """AWM's time grid for kind="sa_solver" `[num_steps + 1]` (float32): `sigmas(num_steps, shift)`
    with its last nonzero entry replaced by half the one before it, then its first entry by 0.999.

    Follows scxue/advantage_weighted_matching@be51372,
    advantage_weighted_matching/flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py (`use_sa_solver`):
    `t = scheduler.sigmas.float(); t[-2] = t[-3] / 2; t[0] = 1 - 1e-3` (in that order, float32).
    sigma = 1 would put the SA-Solver's lambda = log((1 - sigma) / sigma) at -inf, and diffusers' last
    nonzero sigma (~0.009 for SD3.5) would make a last step that the solver skips anyway (its last step
    returns the data prediction at t[-2]), so the reference moves both; the noise is fed in as x at 0.999.

    Training timesteps: AWM's trainer (scripts/train_sd3_awm.py) draws its training t from
    `sample["timesteps"] = pipeline.scheduler.timesteps / 1000`, the STANDARD grid `sigmas(num_steps,
    shift)[:-1]`, not this one (the in-place edit above changes `scheduler.sigmas`, which aliases `t`, but
    not `scheduler.timesteps`, a separate tensor). The two grids differ only at index 0 (1.0 vs 0.999)
    and index num_steps - 1, which its `discrete*` draws (indices below int(num_steps * 0.9)) never reach.
    """
    num_steps = _check_schedule_args(num_steps, shift, min_steps=2)
    t = _sigmas_np(num_steps, shift)
    t[-2] = t[-3] / np.float32(2.0)
    t[0] = np.float32(1.0 - 1e-3)
    return jnp.asarray(t)


def dance_sigmas(num_steps: int, shift: float = 3.0) -> jnp.ndarray:
    """DanceGRPO's schedule `[num_steps + 1]` (float32): `time_shift(linspace(1, 0, num_steps + 1), shift)`.

    Follows XueZeyue/DanceGRPO@15cc71d, fastvideo/train_grpo_flux.py (`sample_reference_model`):
    `sd3_time_shift(args.shift, torch.linspace(1, 0, args.sampling_steps + 1))`, in float32; the FLUX
    scripts use shift 3 with 16 steps (MixGRPO, Tencent-Hunyuan/MixGRPO@e5cdd6a, the same with 25 steps).
    Unlike `sigmas`, the shift is applied once and the grid runs from exactly 1 to exactly 0.
    """
    num_steps = _check_schedule_args(num_steps, shift)
    lin = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
    return jnp.asarray(time_shift(lin, np.float32(shift)).astype(np.float32))


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX.1's resolution-dependent shift mu: linear in the number of packed image tokens, base_shift at
    base_seq_len and max_shift at max_seq_len (diffusers 0.42 `pipelines/flux/pipeline_flux.py`,
    `calculate_shift`; the defaults are its, the pipeline reads them from the scheduler config)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_sigmas(num_steps: int, *, mu: float | None = None, shift: float = 1.0,
                time_shift_type: str = "exponential") -> jnp.ndarray:
    """FluxPipeline's sigma schedule `[num_steps + 1]` (float32), ending in 0.

    Equal to diffusers' `FlowMatchEulerDiscreteScheduler(...).set_timesteps(sigmas=np.linspace(1, 1/N, N), mu=mu)`
    `.sigmas` (diffusers 0.42 `schedulers/scheduling_flow_match_euler_discrete.py`): the linspace in float32,
    then with `mu` (the scheduler's `use_dynamic_shifting`, FLUX.1-dev) the resolution shift
    e^mu / (e^mu + 1/s - 1) ("exponential", its default) or mu / (mu + 1/s - 1) ("linear"), else the fixed
    `time_shift(s, shift)` (FLUX.1-schnell: shift 1, the plain linspace). Computed in float32 as numpy does there.
    """
    num_steps = _check_schedule_args(num_steps, shift)
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if mu is None:
        out = time_shift(s, float(shift))  # a Python float with a float32 array: float32 arithmetic, as there
    else:
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        if not math.isfinite(mu) or (time_shift_type == "linear" and mu <= 0):
            raise ValueError(f"mu must be finite (and positive for the linear shift), got {mu!r}")
        a = np.float32(math.exp(mu) if time_shift_type == "exponential" else mu)
        out = a / (a + (np.float32(1.0) / s - np.float32(1.0)))
    return jnp.asarray(np.append(out.astype(np.float32), np.float32(0.0)))


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


def _check_kind(kind, solvers_too=False):
    if kind in _KERNELS or (solvers_too and kind in SOLVERS):
        return
    if kind in SOLVERS:
        raise ValueError(
            f"kind {kind!r} is a multistep solver without per-step transitions or log-probs; "
            f"run it with rollout(..., kind={kind!r}); step kernels are {', '.join(KINDS)}"
        )
    allowed = KINDS + SOLVERS if solvers_too else KINDS
    raise ValueError(f"unknown sampler kind {kind!r}; expected one of {', '.join(allowed)}")


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


# --------------------------------------------------------------------------- multistep solvers


def step_noise(key, shape, rows=None) -> jax.Array:
    """Standard normal noise [B, ...] for one step: `normal(key, shape)`, or with `rows` ([B] int, each
    row's index in the whole batch) `normal(fold_in(key, row), shape[1:])` per row, so that a row's noise
    does not depend on which other rows share the call (micro-batched rollouts draw what whole-batch ones do)."""
    if rows is None:
        return jax.random.normal(key, shape, jnp.float32)
    rows = jnp.asarray(rows, jnp.int32)
    if rows.shape != (shape[0],):
        raise ValueError(f"rows must be [{shape[0]}] (one index per batch row), got shape {rows.shape}")
    return jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), shape[1:], jnp.float32))(rows)


def _half_log_snr(sig):
    """lambda = log(alpha / sigma) with alpha = 1 - sigma: -inf at sigma = 1, +inf at sigma = 0."""
    return jnp.log1p(-sig) - jnp.log(sig)


def _scalar_sigmas(sig, idx):
    """sig[idx] with the negative indices (steps before the first) clamped to sig[0]."""
    return sig[jnp.maximum(idx, 0)]


def _dpm2_rollout(velocity_fn, x0, sig):
    """DiffusionNFT's `dpm2` solver in one `lax.scan`, carrying the previous data prediction.

    Follows NVlabs/DiffusionNFT@24af555, flow_grpo/diffusers_patch/solver.py (`run_sampling(...,
    solver="dpm2", determistic=True)` -> `dpm_step(order=2)`), as called by
    flow_grpo/diffusers_patch/pipeline_with_logprob.py over `scheduler.sigmas` (our `sigmas()`):
      - step 0 (`lower_order_nums < 1`) and the last step (`lower_order_final`) are first order
        (`ddim_update` with eta 0, which is exactly the Euler step; the last one lands on the data
        prediction x - sig * v);
      - every other step is `multistep_dpm_solver_second_order_update` on data predictions
        m_i = x_i - sig_i * v_i, with lambda = log((1 - sig) / sig), h = lambda_{i+1} - lambda_i,
        h0 = lambda_i - lambda_{i-1}, D1 = (h / h0) (m_i - m_{i-1}):
          x_{i+1} = (sig_{i+1} / sig_i) x_i - alpha_{i+1} (e^-h - 1) (m_i + D1 / 2),
        rewritten with alpha_{i+1} (e^-h - 1) = sig_{i+1} / sig_i - 1 as the Euler step plus
        (1 - sig_{i+1} / sig_i) * D1 / 2.
    With sigmas[0] = 1, lambda_0 = -inf makes D1 = 0 at step 1 (as in the reference's float64 maths), so
    steps 0, 1 and the last are Euler steps and the 2nd-order formula acts from step 2 on.
    """
    num_steps = sig.shape[0] - 1
    batch = x0.shape[0]
    idx = jnp.arange(num_steps, dtype=jnp.int32)

    def body(carry, inp):
        x, m_prev = carry
        i, s_prev, s, s_next = inp
        v = velocity_fn(x, jnp.full((batch,), s, jnp.float32)).astype(jnp.float32)
        m = x - s * v
        second = (i > 0) & (i < num_steps - 1)
        h = _half_log_snr(s_next) - _half_log_snr(s)
        h0 = _half_log_snr(s) - _half_log_snr(s_prev)
        # h / h0 is 0 where s_prev = 1 (h0 = inf); first-order steps take 0 (their h or h0 may be inf / 0).
        ratio = jnp.where(second, h / jnp.where(second, h0, 1.0), 0.0)
        x_next = ode_step(x, v, s, s_next).x_next + ((1.0 - s_next / s) * 0.5 * ratio) * (m - m_prev)
        return (x_next, m), x_next

    xs = (idx, _scalar_sigmas(sig, idx - 1), sig[:-1], sig[1:])
    _, traj = jax.lax.scan(body, (x0, jnp.zeros_like(x0)), xs)
    return traj


def _sa_solver_rollout(velocity_fn, x0, sig, key, tau, tau_interval, rows=None):
    """AWM's SA-Solver in one `lax.scan` of num_steps model evaluations.

    Follows scxue/advantage_weighted_matching@be51372, advantage_weighted_matching/flow_grpo/
    diffusers_patch/sa_solver.py (`SASolver.sample`, data prediction, the "few steps" updates) as called
    by sd3_pipeline_with_logprob.py: `predictor_order=2, corrector_order=2, pc_mode='PEC'`, on
    `sa_solver_sigmas` t_0..t_N, tau(t) = tau inside `tau_interval` (closed) else 0, evaluated at each
    step's target t_k. With lambda = log((1 - t) / t), h = lambda_k - lambda_{k-1}, c = 1 + tau^2,
    alpha = 1 - t, data predictions m_j = x - t_j v(x, t_j) and one noise draw eps_k per step,
      common_k = e^(-tau^2 h) (t_k / t_{k-1}) x_{k-1} + alpha_k (1 - e^(-c h)) m_{k-1}
                 + t_k sqrt(1 - e^(-2 tau^2 h)) eps_k,
      predictor (stochastic Adams-Bashforth) x^p_k = common_k + alpha_k c h^2 / (2 h') (m_{k-1} - m_{k-2}),
                 h' = lambda_{k-1} - lambda_{k-2} (order 1, without the last term, at k = 1),
      evaluation m_k = D(x^p_k, t_k)   (PEC: the model output at the predicted point is the one kept),
      corrector (stochastic Adams-Moulton, same eps_k) x_k = common_k + alpha_k (c h / 2) (m_k - m_{k-1}),
                 skipped at k = 1 (`disable_first_corrector`),
      last step (`skip_final_step`): x_N = m_{N-1}, no evaluation (`denoise_to_zero`).
    The reference computes the Adams coefficients as Lagrange-basis integrals of e^((1+tau^2) lambda)
    and adds, for order 2, its "few steps" O(h^3) terms; summed, they reduce exactly to the two
    closed forms above (tests/test_solvers.py checks them against that reference maths in float64).
    tau = 0 gives zero noise terms, so the solver is then exactly deterministic.

    Returns x_0..x_{N-1} [N, B, ...] (x_0 = the input noise) and the final sample m_{N-1}.
    """
    num_steps = sig.shape[0] - 1
    batch = x0.shape[0]
    idx = jnp.arange(num_steps, dtype=jnp.int32)
    keys = jax.random.split(key, num_steps) if key is not None else jnp.zeros((num_steps,), jnp.uint32)
    lo, hi = tau_interval

    def body(carry, inp):
        x, m1, m2 = carry  # x_{k-1}, m_{k-1}, m_{k-2}
        k, s2, s1, t, kk = inp  # t_{k-2}, t_{k-1}, t_k, the step's key
        tau_k = jnp.where((t >= lo) & (t <= hi), tau, 0.0)
        tau2 = tau_k * tau_k
        c = 1.0 + tau2
        h = _half_log_snr(t) - _half_log_snr(s1)
        two = k >= 2
        h_prev = jnp.where(two, _half_log_snr(s1) - _half_log_snr(s2), 1.0)
        alpha = 1.0 - t
        if key is None:  # tau is 0: no noise term to draw
            noise = jnp.zeros_like(x)
        else:
            noise = step_noise(kk, x.shape, rows)
        common = (
            (jnp.exp(-tau2 * h) * (t / s1)) * x
            + (alpha * -jnp.expm1(-c * h)) * m1
            + (t * jnp.sqrt(-jnp.expm1(-2.0 * tau2 * h))) * noise
        )
        x_p = common + jnp.where(two, alpha * c * h * h / (2.0 * h_prev), 0.0) * (m1 - m2)
        x_p = jnp.where(k == 0, x, x_p)  # step 0 only evaluates the model at the noise
        v = velocity_fn(x_p, jnp.full((batch,), t, jnp.float32)).astype(jnp.float32)
        m = x_p - t * v
        x_c = common + (alpha * c * h / 2.0) * (m - m1)
        x_new = jnp.where(two, x_c, x_p)
        return (x_new, m, m1), x_new

    xs = (idx, _scalar_sigmas(sig, idx - 2), _scalar_sigmas(sig, idx - 1), sig[:-1], keys)
    zeros = jnp.zeros_like(x0)
    (_, final, _), traj = jax.lax.scan(body, (x0, zeros, zeros), xs)
    return traj, final


def _check_solver_args(kind, sig, level, key, sde_window, tau_interval):
    """Validate the arguments of a `SOLVERS` rollout; returns the tau interval (sa_solver) or None."""
    if sde_window is not None:
        raise ValueError(f"sde_window (MixGRPO) applies to the kernels {', '.join(KINDS)}, not kind={kind!r}")
    lv = _concrete(level)
    if kind == "dpm2":
        if tau_interval is not None:
            raise ValueError("sa_tau_interval applies to kind='sa_solver' only")
        if lv is None or lv != 0:
            raise ValueError(
                f"kind='dpm2' is deterministic (DiffusionNFT runs it with determistic=True): leave "
                f"noise_level out or pass 0.0, got {level!r}"
            )
        return None
    num_steps = sig.shape[0] - 1
    if num_steps < 2:
        raise ValueError(f"kind='sa_solver' needs num_steps >= 2 (its predictor is 2nd order), got {num_steps}")
    s = _concrete(sig)
    if s is not None and not (s[0] < 1.0 and s[-1] == 0.0):
        raise ValueError(
            "kind='sa_solver' needs sigmas[0] < 1 (lambda = log((1 - s) / s) is -inf at s = 1) and "
            f"sigmas[-1] = 0, got first {s[0]} and last {s[-1]}; build the grid with "
            "flowjax.sampling.sa_solver_sigmas(num_steps, shift)"
        )
    if key is None and (lv is None or lv != 0):
        raise ValueError("kind='sa_solver' with noise_level (tau) > 0 draws noise: pass a PRNG key")
    interval = SA_TAU_INTERVAL if tau_interval is None else tau_interval
    try:
        lo, hi = (float(b) for b in interval)
    except (TypeError, ValueError):
        raise ValueError(f"sa_tau_interval must be a pair (low, high) of sigmas, got {tau_interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"sa_tau_interval must satisfy 0 <= low <= high <= 1, got {tau_interval!r}")
    return lo, hi


def rollout(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    noise,
    sigmas,
    key=None,
    *,
    kind: str = "ode",
    noise_level=None,
    sde_window=None,
    sa_tau_interval=None,
    rows=None,
) -> Rollout:
    """Sample from `noise` (x at sigmas[0]) to sigmas[-1] in one `jax.lax.scan`.

    velocity_fn(x, sigma_batch) -> v, with x float32 [B, ...] and sigma_batch [B] float32; it is traced
      once (one scan body).
    kind: "ode" | "sde" | "cps" | "dance" (`KINDS`), or a multistep solver "dpm2" | "sa_solver"
      (`SOLVERS`, zero log-probs) (static).
    noise_level: the kernel's a / eta, or sa_solver's tau; None (default) takes the published level of
      the kind (sde 0.7, cps 0.8, dance 0.3, sa_solver 0.4), so `kind="sde"` alone is never silently
      deterministic. 0.0 makes every kernel reproduce "ode" bit for bit and sa_solver deterministic.
      Ignored for "ode"; "dpm2" accepts only None or 0. May be traced.
    sde_window: (start, end) for MixGRPO: stochastic steps only for step indices in
      [start, end), ODE steps and log-prob 0 elsewhere. Either bound may be a traced int, so a
      window can be drawn per batch inside jit (see `sample_window`, `progressive_window`).
      Kernels only.
    sa_tau_interval: (low, high), sa_solver only: tau applies on steps whose target sigma is in
      [low, high], 0 elsewhere; default `SA_TAU_INTERVAL` = AWM's (0.3, 0.9).
    key: PRNG key for the step noise; may be None for "ode", "dpm2" and "sa_solver" with tau 0. Step i
      draws `jax.random.normal(jax.random.split(key, T)[i], x.shape)`, or with `rows` ([B] int: each row's
      index in the whole batch) the row's own `step_noise`, so a micro-batched rollout equals the whole one.

    Returns Rollout(latents [T+1, B, ...], log_probs [T, B], sigmas [T+1]), all float32, T = len(sigmas) - 1,
    latents[0] = noise and latents[-1] = the final sample for every kind. Kernels and dpm2: latents[i] is
    x at sigmas[i]. sa_solver (use `sa_solver_sigmas`): latents[i] for 0 < i < T is the solver's x at
    sigmas[i] (the predictor's at i = 1, the corrector's after it; the predicted points where the model
    is evaluated are not stored) and latents[T] is the data prediction at sigmas[T - 1], the solver's
    output (its last step evaluates no model).
    """
    _check_kind(kind, solvers_too=True)
    sig = _check_sigmas(sigmas)
    num_steps = sig.shape[0] - 1
    level = DEFAULT_NOISE_LEVEL[kind] if noise_level is None else noise_level
    _check_level(kind, level)
    x0 = jnp.asarray(noise).astype(jnp.float32)
    batch = x0.shape[0]

    if kind in SOLVERS:
        interval = _check_solver_args(kind, sig, level, key, sde_window, sa_tau_interval)
        zero_log_probs = jnp.zeros((num_steps, batch), jnp.float32)
        if kind == "dpm2":
            traj = _dpm2_rollout(velocity_fn, x0, sig)
            return Rollout(jnp.concatenate([x0[None], traj], axis=0), zero_log_probs, sig)
        traj, final = _sa_solver_rollout(velocity_fn, x0, sig, key, jnp.asarray(level, jnp.float32), interval, rows)
        return Rollout(jnp.concatenate([traj, final[None]], axis=0), zero_log_probs, sig)

    if sa_tau_interval is not None:
        raise ValueError("sa_tau_interval applies to kind='sa_solver' only")
    window = None if sde_window is None else _check_window(sde_window, num_steps)
    if kind != "ode" and key is None:
        raise ValueError(f"kind={kind!r} draws noise: pass a PRNG key")

    level = jnp.asarray(level, jnp.float32)
    sig_max = sig[1]
    keys = jax.random.split(key, num_steps) if kind != "ode" else jnp.zeros((num_steps,), jnp.uint32)

    def body(x, inp):
        i, s, s_next, k = inp
        v = velocity_fn(x, jnp.full((batch,), s, jnp.float32)).astype(jnp.float32)
        if kind == "ode":
            x_next = ode_step(x, v, s, s_next).x_next
            return x_next, (x_next, jnp.zeros((batch,), jnp.float32))
        eps = step_noise(k, x.shape, rows)
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


def progressive_window(
    iteration,
    num_steps: int,
    *,
    window_size: int = 4,
    shift_interval: int = 25,
    stride: int = 1,
    roll_back: bool = True,
):
    """MixGRPO's "progressive" SDE window (start, end) at training iteration `iteration` (0-based).

    Follows Tencent-Hunyuan/MixGRPO@e5cdd6a, fastvideo/utils/grpo_states.py (`GRPOTrainingStates`,
    sample_strategy="progressive") as fastvideo/train_grpo_flux.py drives it: before each iteration the
    window is `range(cur, min(cur + group_size, max_timesteps))` with `max_timesteps = sampling_steps - 2`,
    then `update_iteration()` counts the iteration and, every `iters_per_group`-th one, moves `cur` by
    `prog_overlap_step` (or by `group_size` without `--prog_overlap`); a `cur` past `max_timesteps` rolls
    back to 0 (`--roll_back`) or is clipped to it. Closed form: with M = num_steps - 2 and
    K = shift_interval, start = stride * ((iteration mod P) // K), P = K * (M // stride + 1) with roll
    back, else start = min(stride * (iteration // K), M); end = min(start + window_size, M).

    The published scripts (scripts/finetune/finetune_flux_grpo_MixGRPO*.sh): 25 steps, window (group_size)
    4, shift_interval (iters_per_group) 25 (20 for MixGRPO-Flash), stride (prog_overlap_step) 1 (0 for
    Flash*: the window stays at 0), roll back on, 300 iterations (so start only reaches 11 there).
    The window never includes the last two steps (num_steps - 2, num_steps - 1); it shrinks near the end
    and is empty (end == start == M, an all-ODE rollout with nothing to train) for the K iterations
    at start M before the roll back. Python ints or traced ints in, int32 arrays out, ready for
    `rollout(..., sde_window=(start, end))`.
    """
    window_size = _check_int("window_size", window_size, 1)
    shift_interval = _check_int("shift_interval", shift_interval, 1)
    stride = _check_int("stride", stride, 0)
    num_steps = _check_int("num_steps", num_steps, 3, " (the window stops 2 steps short of the end)")
    it = _concrete(iteration)
    if it is not None and (it.ndim != 0 or not np.issubdtype(it.dtype, np.integer) or it < 0):
        raise ValueError(f"iteration must be an integer scalar >= 0, got {iteration!r}")
    last = num_steps - 2  # the reference's max_timesteps
    it = jnp.asarray(iteration, jnp.int32)
    if stride == 0:
        start = jnp.zeros((), jnp.int32)
    elif roll_back:
        period = shift_interval * (last // stride + 1)
        start = stride * ((it % period) // shift_interval)
    else:
        start = jnp.minimum(stride * (it // shift_interval), last)
    return start, jnp.minimum(start + window_size, last)


def dance_train_count(num_steps: int, fraction: float = 0.6) -> int:
    """How many steps DanceGRPO trains per sample: int((num_steps - 1) * fraction) (Python float maths).

    XueZeyue/DanceGRPO@15cc71d, fastvideo/train_grpo_flux.py: `train_timesteps =
    int(len(samples["timesteps"][0]) * args.timestep_fraction)`, where the stored timesteps are
    `timesteps[:, :-1]`: the last step is never trained. 16 steps x 0.6 (the FLUX scripts) -> 9.
    """
    num_steps = _check_int("num_steps", num_steps, 2, " (DanceGRPO never trains the last step)")
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    count = int((num_steps - 1) * float(fraction))
    if count < 1:
        raise ValueError(
            f"int((num_steps - 1) * fraction) = int({num_steps - 1} * {fraction}) = 0 steps to train; "
            "raise fraction or num_steps"
        )
    return count


def dance_train_steps(key, batch: int, num_steps: int, fraction: float = 0.6) -> jax.Array:
    """DanceGRPO's training steps: per sample, `dance_train_count(num_steps, fraction)` distinct step
    indices drawn uniformly without replacement from [0, num_steps - 2], in random order; int32 [batch, count].

    Follows XueZeyue/DanceGRPO@15cc71d, fastvideo/train_grpo_flux.py (`train_one_step`): one
    `torch.randperm(num_steps - 1)` per sample (a row of `perms` each), of which the first
    `train_timesteps` entries are trained; the same rule in train_grpo_{flux_lora,hunyuan,qwenimage,wan_2_1}.py.
    """
    batch = _check_int("batch", batch, 1)
    count = dance_train_count(num_steps, fraction)
    steps = jnp.broadcast_to(jnp.arange(num_steps - 1, dtype=jnp.int32), (batch, num_steps - 1))
    return jax.random.permutation(key, steps, axis=1, independent=True)[:, :count]


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
