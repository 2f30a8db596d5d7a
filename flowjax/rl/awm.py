"""Advantage Weighted Matching (AWM), as pure functions.

Follows scxue/advantage_weighted_matching, `advantage_weighted_matching/scripts/train_sd3_awm.py`
(`compute_log_prob_awm`, the training loop) with the published SD3.5-M configs
`config/dgx_awm.py:{geneval,ocr,pickscore}_sd3_no_cfg_*`:

- Rollouts by any solver, CFG-free (guidance 1.0, `train.cfg=False`); only the final clean latent
  x0, the prompt embedding and the advantage are kept.
- Training timesteps (`time_type="discrete_wo_init"` for GenEval / OCR, `"discrete"` for
  PickScore): `train_timesteps`=6 stratified draws over the sampler's step indices
  [1 (or 0), int(num_steps * 0.9)), the SAME 6 timesteps for every sample of the micro-batch,
  t = sampler sigma at that index (num_steps 14). Fresh eps per (timestep, sample);
  x_t = (1 - t) x0 + t eps.
- "ghuber" log-likelihood surrogate, p = `ghuber_power` = 0.25:
      mse = mean_{C,H,W}(v_theta(x_t, t) - (eps - x0))^2
      lp  = -((mse + 1e-10)^p - (1e-10)^p) * t / p
- PPO-style ratio on lp (`loss_type="exp_first"`, one ratio per (timestep, sample)),
  ratio = exp(lp - lp_old), clip_range = 1 (so clamp(ratio, 0, 2)), with
  A = clamp(A, -5, 5) / 5 * `advantage_max` (= 1), i.e. clip(A / 5, -1, 1):
      policy = mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))
  In the published configs gradient_accumulation_steps == the number of micro-batches of the
  epoch, so every micro-batch uses lp_old = lp.detach(): ratio == 1 exactly and the gradient
  is that of mean(-A * lp).
- KL to the reference (LoRA off), `kl_weight="Uniform"`: beta * mean(mean_{C,H,W}(v - v_ref)^2),
  beta = 0.003 (GenEval, OCR), 1e-4 (PickScore).
- KL to an EMA copy of the policy (a second LoRA adapter, initialised to the policy),
  `kl_ema_weight="Uniform"`, ema_beta = 1: mean(mean_{C,H,W}(v - v_ema)^2). The EMA adapter is
  updated once per epoch, after the epoch's optimizer steps:
  ema <- decay * ema + (1 - decay) * policy, decay = min(0.3, 0.001 * global_step), global_step the
  optimizer-step counter after the epoch (`kl_ema_decay_type="linear"`, `kl_ema_decay=0.3`); see
  `awm_ema_decay` and `flowjax.rl.ema.ema_update`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowjax import sampling
from flowjax.rl.common import bcast, f32, per_sample_mean, ppo_clipped, velocity_kl, weighted_mean
from flowjax.rl.ema import ema_update
from flowjax.rl.method import Method, RolloutSpec, accumulate, as_options, positions, row_keys, velocity

_TINY = 1e-10  # the reference's offset inside the power


def awm_noised(x0, eps, t) -> jax.Array:
    """x_t = (1 - t) x0 + t eps (float32); t [B] (or scalar) broadcast over the rest."""
    x0, eps = f32(x0), f32(eps)
    t = bcast(t, x0)
    return (1.0 - t) * x0 + t * eps


def awm_log_prob(v_theta, x0, eps, t, *, p: float = 0.25) -> jax.Array:
    """AWM's per-sample log-likelihood surrogate [B] (reference weighting "ghuber").

    -((mse + 1e-10)^p - (1e-10)^p) * t / p, mse = mean over non-batch dims of
    (v_theta - (eps - x0))^2. The reference computes it in float64; here float32.
    """
    v, x0, eps = f32(v_theta), f32(x0), f32(eps)
    mse = per_sample_mean((v - (eps - x0)) ** 2)
    t = f32(t).reshape(-1) if jnp.ndim(t) else f32(t)
    return -((mse + _TINY) ** p - _TINY**p) * t / p


def awm_advantages(advantages, *, adv_scale: float = 5.0, adv_clip: float | None = 1.0) -> jax.Array:
    """clamp(A, -adv_scale, adv_scale) / adv_scale * adv_clip (float32).

    adv_scale is the reference's `train.adv_clip_max` (5), adv_clip its `train.advantage_max` (1):
    with the defaults this is clip(A / 5, -1, 1). adv_clip=None: only the clamp (the reference
    with advantage_max=None).
    """
    a = jnp.clip(f32(advantages), -adv_scale, adv_scale)
    if adv_clip is not None:
        a = a / adv_scale * adv_clip
    return a


def _check_term(name, coef, v):
    if v is None and isinstance(coef, (int, float)) and coef != 0:
        raise ValueError(f"{name}={coef} needs its velocity (v_ref for beta, v_ema for ema_beta)")


def awm_loss(
    v_theta,
    x0,
    eps,
    t,
    advantages,
    *,
    p: float = 0.25,
    old_log_prob=None,
    clip_range: float = 1.0,
    v_ref=None,
    beta: float = 0.0,
    v_ema=None,
    ema_beta: float = 0.0,
    adv_scale: float = 5.0,
    adv_clip: float | None = 1.0,
    weights=None,
):
    """AWM loss (scalar float32) and metrics, over N = (timesteps x samples) rows.

    v_theta: policy velocity at x_t = awm_noised(x0, eps, t), [N, ...] (any float dtype).
    x0, eps: [N, ...] clean latents (repeated per timestep) and the fresh noise. t: [N].
    advantages: [N] raw group advantages (repeated per timestep), transformed by
      `awm_advantages(adv_scale, adv_clip)`.
    old_log_prob: None (on-policy, the published recipe: ratio == 1 exactly) or the [N]
      `awm_log_prob` of the policy before this epoch's updates at the same (x_t, t).
    clip_range: PPO clip on the ratio (published 1).
    v_ref / beta: KL to the reference (published beta 0.003 GenEval/OCR, 1e-4 PickScore).
    v_ema / ema_beta: KL to the EMA policy (published ema_beta 1). Each term is added when its
      velocity is given (the reference only adds the EMA term inside its beta > 0 branch; the
      published configs have both > 0). v_ref and v_ema are treated as constants.
    weights: [N] per-row weights (padding rows 0): every mean over rows is a weighted mean.

    Metrics: loss, policy_loss, kl_loss, ema_kl_loss, clipfrac, ratio_mean, log_prob_mean, mse.
    """
    _check_term("beta", beta, v_ref)
    _check_term("ema_beta", ema_beta, v_ema)
    v = f32(v_theta)
    x0, eps = f32(x0), f32(eps)
    lp = awm_log_prob(v, x0, eps, t, p=p)
    old = jax.lax.stop_gradient(lp if old_log_prob is None else f32(old_log_prob))
    adv = jnp.broadcast_to(awm_advantages(advantages, adv_scale=adv_scale, adv_clip=adv_clip), lp.shape)

    ratio = jnp.exp(lp - old)
    policy_loss = ppo_clipped(ratio, adv, clip_range, weights)
    loss = policy_loss

    zero = jnp.zeros((), jnp.float32)
    kl = ema_kl = zero
    if v_ref is not None:
        kl = velocity_kl(v, v_ref, weights)
        loss = loss + beta * kl
    if v_ema is not None:
        ema_kl = velocity_kl(v, v_ema, weights)
        loss = loss + ema_beta * ema_kl

    sg = jax.lax.stop_gradient
    r = sg(ratio)
    metrics = {
        "loss": sg(loss),
        "policy_loss": sg(policy_loss),
        "kl_loss": sg(kl),
        "ema_kl_loss": sg(ema_kl),
        "clipfrac": weighted_mean((jnp.abs(r - 1.0) > clip_range).astype(jnp.float32), weights),
        "ratio_mean": weighted_mean(r, weights),
        "log_prob_mean": weighted_mean(sg(lp), weights),
        "mse": weighted_mean(sg(per_sample_mean((v - (eps - x0)) ** 2)), weights),
    }
    return loss, metrics


# --------------------------------------------------------------------------- timesteps


def awm_timestep_indices(
    key,
    num_steps: int,
    *,
    num_train_timesteps: int = 6,
    timestep_fraction: float = 0.9,
    skip_first: bool = True,
) -> jax.Array:
    """Stratified sampler-step indices [num_train_timesteps] int32 (AWM `time_type="discrete*"`).

    boundaries = linspace(start, int(num_steps * timestep_fraction), T + 1) truncated to
    integers (start 1 for "discrete_wo_init", the published GenEval / OCR setting, skip_first=True;
    0 for "discrete", PickScore); index k is lower_k + floor(u_k * (upper_k - lower_k)),
    u_k ~ U[0, 1), so it lies in [lower_k, upper_k) (= lower_k when the stratum is empty).
    The boundaries are computed in exact integer arithmetic (the reference truncates a float
    linspace, which only differs where a float rounding lands just below an integer).
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    hi = int(num_steps * timestep_fraction)
    lo = 1 if skip_first else 0
    if hi <= lo:
        raise ValueError(
            f"int(num_steps * timestep_fraction) = {hi} leaves no steps to train on "
            f"(num_steps={num_steps}, timestep_fraction={timestep_fraction}, skip_first={skip_first})"
        )
    n = num_train_timesteps
    bounds = np.array([(lo * n + i * (hi - lo)) // n for i in range(n + 1)], np.int32)
    lower, upper = jnp.asarray(bounds[:-1]), jnp.asarray(bounds[1:])
    u = jax.random.uniform(key, (n,), jnp.float32)
    return lower + jnp.floor(u * (upper - lower).astype(jnp.float32)).astype(jnp.int32)


def awm_timesteps(
    key,
    batch: int,
    sigmas,
    *,
    num_train_timesteps: int = 6,
    timestep_fraction: float = 0.9,
    skip_first: bool = True,
) -> jax.Array:
    """Training t [num_train_timesteps * batch] float32, timestep-major like the reference.

    sigmas: the sampler's schedule [num_steps + 1] (flowjax.sampling.sigmas). Row k * batch + b
    is sample b at the k-th stratified timestep (the reference concatenates x0 and the prompt
    embeddings num_train_timesteps times and `repeat_interleave`s t over the batch).
    t = sigmas[index] (the reference's scheduler.timesteps[index] / 1000).
    """
    sig = f32(sigmas)
    idx = awm_timestep_indices(
        key,
        sig.shape[0] - 1,
        num_train_timesteps=num_train_timesteps,
        timestep_fraction=timestep_fraction,
        skip_first=skip_first,
    )
    return jnp.repeat(sig[idx], batch)


def awm_ema_decay(step, *, max_decay: float = 0.3, rate: float = 1e-3, schedule: str = "linear"):
    """Decay of AWM's EMA policy after `step` optimizer steps (float32 scalar; step may be traced).

    schedule="linear" (published): min(max_decay, rate * step), max_decay=`kl_ema_decay`=0.3;
    "constant": max_decay. Applied once per epoch as ema <- decay * ema + (1 - decay) * policy.
    """
    if schedule == "constant":
        return jnp.asarray(max_decay, jnp.float32)
    if schedule != "linear":
        raise ValueError(f"schedule must be 'linear' or 'constant', got {schedule!r}")
    return jnp.minimum(jnp.float32(max_decay), jnp.float32(rate) * jnp.asarray(step, jnp.float32))


# --------------------------------------------------------------------------- the method


class AWM(Method):
    """Advantage Weighted Matching, `config.method = "awm"` (scxue/advantage_weighted_matching be51372,
    `scripts/train_sd3_awm.py`, `config/dgx_awm.py:geneval_sd3_no_cfg_4nodes`).

    Rollouts CFG-free by `solver` (the reference's SA-Solver: predictor-corrector of order 2, PEC, its own
    grid, tau = noise_level on steps with sigma in [0.3, 0.9]; `flowjax.sampling`); only the final samples
    are kept. Each minibatch draws, per group of
    `rows_per_draw` rows (the reference's per-device micro-batch, train.batch_size = 3), its own
    `num_train_timesteps` stratified sampler steps (`awm_timestep_indices`, time_type "discrete_wo_init" or
    "discrete"), fresh noise per (timestep, row), and takes `awm_loss` (on-policy: ratio 1). The KL-EMA policy
    follows the policy after every epoch with decay min(max_decay, rate * optimizer steps) (`awm_ema_decay`,
    logged as ema/decay); the evaluation EMA (decay 0.99, once per epoch) is the reference's
    EMAModuleWrapper(ema_decay=0.99, ema_update_step_interval=1).
    """

    name = "awm"
    metric_names = ("loss", "policy_loss", "kl_loss", "ema_kl_loss", "clipfrac", "ratio_mean", "log_prob_mean",
                    "mse")
    TIME_TYPES = ("discrete_wo_init", "discrete")

    @staticmethod
    def defaults():
        return ml_collections.ConfigDict(dict(
            solver="sa_solver",  # the rollout sampler (sampling.rollout kind): AWM's SA-Solver (use_sa_solver)
            noise_level=0.4,  # the SA-Solver's tau (0.0 for PickScore: deterministic)
            tau_interval=(0.3, 0.9),  # tau applies to steps whose target sigma lies in this interval
            guidance=1.0,  # CFG-free rollouts; training is always CFG-free
            p=0.25,  # ghuber_power
            beta=0.001,  # KL to the reference (GenEval be51372; OCR 0.003, PickScore 1e-4)
            ema_beta=1.0,  # KL to the KL-EMA policy
            clip_range=1.0,
            adv_scale=5.0,  # adv_clip_max
            adv_clip=1.0,  # advantage_max
            num_train_timesteps=6,
            timestep_fraction=0.9,
            time_type="discrete_wo_init",  # GenEval / OCR; "discrete" (PickScore) may draw the first step
            rows_per_draw=3,  # rows sharing one draw of training timesteps (0 = the whole minibatch)
            kl_ema=dict(max_decay=0.3, rate=1e-3, schedule="linear"),
            eval_ema=dict(decay=0.99, every=1, cadence="epoch"),
        ))

    def validate(self) -> None:
        c, t = self.cfg, self.config.train
        if c.time_type not in self.TIME_TYPES:
            raise ValueError(f"config.awm.time_type must be one of {self.TIME_TYPES}, got {c.time_type!r}")
        if c.num_train_timesteps < 1:
            raise ValueError(f"config.awm.num_train_timesteps must be >= 1, got {c.num_train_timesteps}")
        lo = 1 if c.time_type == "discrete_wo_init" else 0
        if int(self.config.sample.num_steps * c.timestep_fraction) <= lo:
            raise ValueError(f"config.awm.timestep_fraction={c.timestep_fraction} x sample.num_steps="
                             f"{self.config.sample.num_steps} leaves no step to train with time_type={c.time_type!r}")
        rows = t.prompts_per_batch * t.group_size // t.minibatches
        if c.rows_per_draw and rows % c.rows_per_draw:
            raise ValueError(f"config.awm.rows_per_draw={c.rows_per_draw} must divide the minibatch of {rows} rows")
        if c.guidance < 1.0:
            raise ValueError(f"config.awm.guidance must be >= 1, got {c.guidance}")
        if c.solver not in sampling.KINDS + sampling.SOLVERS:
            raise ValueError(f"config.awm.solver must be one of {sampling.KINDS + sampling.SOLVERS}, got {c.solver!r}")
        awm_ema_decay(0, max_decay=c.kl_ema.max_decay, rate=c.kl_ema.rate, schedule=c.kl_ema.schedule)
        super().validate()

    def rollout_spec(self):
        c = self.cfg
        options = as_options(sa_tau_interval=tuple(c.tau_interval)) if c.solver == "sa_solver" else ()
        return RolloutSpec(kind=c.solver, noise_level=float(c.noise_level), guidance=float(c.guidance),
                           options=options)

    def rollout_sigmas(self, num_steps, shift):
        """The SA-Solver runs on its own grid (sampling.sa_solver_sigmas); training t are drawn from the
        standard schedule (`pipeline.scheduler.timesteps / 1000` in train_sd3_awm.py, be51372)."""
        if self.cfg.solver == "sa_solver":
            if callable(shift):  # a world's own schedule (FLUX): the same two edits of the grid
                t = jnp.asarray(shift(num_steps), jnp.float32)
                return t.at[-2].set(t[-3] / 2.0).at[0].set(1.0 - 1e-3)
            return sampling.sa_solver_sigmas(num_steps, shift)
        return super().rollout_sigmas(num_steps, shift)

    def init_state(self, params):
        return {"kl_ema": params} if self.cfg.ema_beta > 0 else {}

    def train_timesteps(self, key, batch: int, sigmas, pos=None) -> jax.Array:
        """Training t [K, B]: one stratified draw of K sampler steps per group of `rows_per_draw` rows (the
        reference draws per device micro-batch: `train_sd3_awm.py`, the time_type branches, be51372). A row's
        group is its position in the minibatch // rows_per_draw, and the group's draw is keyed by the group."""
        c = self.cfg
        pos = jnp.arange(batch, dtype=jnp.int32) if pos is None else pos
        group = pos // c.rows_per_draw if c.rows_per_draw else jnp.zeros_like(pos)
        draw = lambda k: awm_timestep_indices(k, sigmas.shape[0] - 1, num_train_timesteps=c.num_train_timesteps,
                                              timestep_fraction=c.timestep_fraction,
                                              skip_first=c.time_type == "discrete_wo_init")
        idx = jax.vmap(draw)(row_keys(key, group))  # [B, K]
        return f32(sigmas)[idx.T]

    def train_nfes(self, batch):
        c = self.cfg
        return c.num_train_timesteps * batch * (1 + (c.beta > 0) + (c.ema_beta > 0))

    def grads(self, ctx, params, state, mb, window, key):
        c = self.cfg
        x0, pos = mb["x0"], positions(mb)
        t_all = self.train_timesteps(key, x0.shape[0], ctx.sigmas, pos)  # [K, B]
        eps_all = jnp.swapaxes(sampling.step_noise(jax.random.fold_in(key, 1), (x0.shape[0], t_all.shape[0],
                                                                                *x0.shape[1:]), pos), 0, 1)
        ema = state.get("kl_ema")

        def loss_fn(p, inp):
            t, eps = inp
            x_t = awm_noised(x0, eps, t)
            v_of = lambda q: velocity(ctx.apply, q, x_t, t, mb["cond"], 1.0)  # no CFG in training
            v_ref = jax.lax.stop_gradient(v_of(ctx.ref_params)) if c.beta > 0 else None
            v_ema = jax.lax.stop_gradient(v_of(ema)) if c.ema_beta > 0 else None
            return awm_loss(v_of(p), x0, eps, t, mb["advantages"], p=c.p, clip_range=c.clip_range, v_ref=v_ref,
                            beta=c.beta, v_ema=v_ema, ema_beta=c.ema_beta, adv_scale=c.adv_scale,
                            adv_clip=c.adv_clip, weights=mb.get("weights"))

        return accumulate(loss_fn, params, (t_all, eps_all))

    def end_of_epoch(self, state, params, opt_step):
        k = self.cfg.kl_ema
        decay = awm_ema_decay(opt_step, max_decay=k.max_decay, rate=k.rate, schedule=k.schedule)
        if "kl_ema" in state:
            state = {**state, "kl_ema": ema_update(state["kl_ema"], params, decay)}
        return state, {"ema/decay": decay}
