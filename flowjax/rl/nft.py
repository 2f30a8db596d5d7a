"""DiffusionNFT (negative-aware fine-tuning on the forward process), as pure functions.

Follows NVlabs/DiffusionNFT `scripts/train_nft_sd3.py` (training loop, `return_decay`) and
`config/nft.py` (read from its public forks, e.g. pkuhxy/DiffusionNFT, sebastian-stapf/DiffusionNFT):

- Rollouts CFG-free (guidance 1.0) with the OLD policy (a second LoRA adapter "old",
  initialised to the policy), deterministic "dpm2" solver, 10 steps; only x0 is kept.
- Training timesteps: each sample gets a random permutation of the sampler's 10 step indices and
  trains on the first int(10 * 0.99) = 9 of them, one per inner iteration (`nft_timesteps`);
  fresh eps, x_t = (1 - t) x0 + t eps.
- With b = `config.beta` (1.0 for GenEval / PickScore / HPSv2, 0.1 for OCR and multi-reward),
  A clamped to [-adv_clip_max, adv_clip_max] = [-5, 5]:
      r     = clamp(A / adv_clip_max / 2 + 0.5, 0, 1)
      v_pos = b v + (1 - b) v_old,   v_neg = (1 + b) v_old - b v     (v_old detached)
      x0_pos = x_t - t v_pos,        x0_neg = x_t - t v_neg
      L(x0_hat) = mean_{C,H,W}((x0_hat - x0)^2 / w),  w = max(mean_{C,H,W}|x0_hat - x0|, 1e-5)
                  per sample, w detached (computed in float64 under no_grad)
      policy = mean_B(adv_clip_max * (r L(x0_pos) / b + (1 - r) L(x0_neg) / b))
      loss   = policy + train.beta * mean_B(mean_{C,H,W}((v - v_ref)^2)),  train.beta = 1e-4
- After every epoch: old <- decay * old + (1 - decay) * policy with decay = return_decay(global_step),
  global_step the optimizer-step counter after the epoch's updates (`old_policy_decay`, decay_type 1 by
  default, 2 for OCR).
- Evaluation uses a separate EMA (`EMAModuleWrapper`, decay 0.9, stepped after every optimizer step:
  `flowjax.rl.ema`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from flowjax import sampling
from flowjax.rl.awm import awm_noised
from flowjax.rl.common import bcast, f32, per_sample_mean, velocity_kl, weighted_mean
from flowjax.rl.ema import ema_update
from flowjax.rl.method import Method, RolloutSpec, accumulate, check_fraction, positions, row_keys, velocity

_W_MIN = 1e-5  # the reference's clamp on the adaptive weight


def adaptive_x0_mse(pred, target) -> jax.Array:
    """Per-sample self-normalised squared error [B] (DiffusionNFT's adaptive weighting).

    mean over non-batch dims of (pred - target)^2 / w, w = max(mean |pred - target|, 1e-5) per
    sample, with no gradient through w (the reference computes w in float64 under no_grad;
    here float32).
    """
    pred, target = f32(pred), f32(target)
    err = pred - target
    w = jax.lax.stop_gradient(jnp.maximum(per_sample_mean(jnp.abs(err)), _W_MIN))
    return per_sample_mean(err**2) / w


def nft_loss(
    v,
    v_old,
    x_t,
    x0,
    t,
    advantages,
    *,
    mix: float = 1.0,
    v_ref=None,
    kl_beta: float = 0.0,
    adv_clip: float = 5.0,
    weights=None,
):
    """DiffusionNFT loss (scalar float32) and metrics.

    v: policy velocity at (x_t, t), [B, ...] any float dtype. v_old: old-policy velocity at the
      same point (treated as a constant). x_t, x0: [B, ...]. t: [B] sigma in [0, 1].
    advantages: [B] group advantages (clamped to [-adv_clip, adv_clip] here).
    mix: b, the reference's `config.beta` (published 1.0; 0.1 for OCR / multi-reward); > 0.
    v_ref / kl_beta: KL to the reference, the reference's `train.beta` (published 1e-4, always
      on there; here added when v_ref is given). v_ref is treated as a constant.
    adv_clip: the reference's `train.adv_clip_max` = 5; it also scales the policy term.
    weights: [B] per-row weights (padding rows 0): every mean over rows is a weighted mean.

    Metrics: loss, policy_loss, unweighted_policy_loss, kl_div, old_deviate
    (mean (v - v_old)^2), r_mean, positive_loss, negative_loss.
    """
    if isinstance(mix, (int, float)) and mix <= 0:
        raise ValueError(f"mix (DiffusionNFT's beta) must be > 0, got {mix}")
    if v_ref is None and isinstance(kl_beta, (int, float)) and kl_beta != 0:
        raise ValueError(f"kl_beta={kl_beta} needs v_ref (the reference policy's velocity)")
    v = f32(v)
    v_old = jax.lax.stop_gradient(f32(v_old))
    x_t, x0 = f32(x_t), f32(x0)
    tb = bcast(t, x0)

    a = jnp.clip(f32(advantages), -adv_clip, adv_clip)
    r = jnp.clip(a / adv_clip / 2.0 + 0.5, 0.0, 1.0)

    v_pos = mix * v + (1.0 - mix) * v_old
    v_neg = (1.0 + mix) * v_old - mix * v
    pos = adaptive_x0_mse(x_t - tb * v_pos, x0)
    neg = adaptive_x0_mse(x_t - tb * v_neg, x0)
    per_sample = r * pos / mix + (1.0 - r) * neg / mix
    m = lambda x: weighted_mean(x, weights)
    policy_loss = m(per_sample * adv_clip)
    loss = policy_loss

    kl = jnp.zeros((), jnp.float32)
    if v_ref is not None:
        kl = velocity_kl(v, v_ref, weights)
        loss = loss + kl_beta * kl

    sg = jax.lax.stop_gradient
    metrics = {
        "loss": sg(loss),
        "policy_loss": sg(policy_loss),
        "unweighted_policy_loss": sg(m(per_sample)),
        "kl_div": sg(kl),
        "old_deviate": sg(m(per_sample_mean((v - v_old) ** 2))),
        "r_mean": m(r),
        "positive_loss": sg(m(pos)),
        "negative_loss": sg(m(neg)),
    }
    return loss, metrics


def nft_timesteps(key, batch: int, sigmas, *, timestep_fraction: float = 0.99, keys=None) -> jax.Array:
    """Training t [K, batch] float32, K = int(num_steps * timestep_fraction).

    As the reference: every sample gets its own random permutation of the sampler's num_steps
    timesteps (sigmas[:-1]) and row j is used in the j-th inner iteration, so each sample
    trains on K distinct sampler timesteps in random order (with 10 steps and 0.99: 9 of the
    10, a random one left out).
    """
    sig = f32(sigmas)
    num_steps = sig.shape[0] - 1
    k = int(num_steps * timestep_fraction)
    if k < 1:
        raise ValueError(f"int(num_steps * timestep_fraction) = {k}: no timesteps to train on")
    keys = jax.random.split(key, batch) if keys is None else keys  # or one key per row (micro-batching)
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, num_steps))(keys)  # [batch, num_steps]
    return sig[perms[:, :k]].T


# Published `decay_type`s of `return_decay`: (flat, uprate, uphold).
_DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_policy_decay(step, decay_type: int = 1):
    """EMA decay of DiffusionNFT's old (sampling) policy after `step` optimizer steps.

    The reference's `return_decay`: 0 while step < flat, then min((step - flat) * uprate, uphold)
    with (flat, uprate, uphold) = (0, 0, 0) for type 0 (old = policy), (0, 0.001, 0.5) for type 1
    (published default), (75, 0.0075, 0.999) for type 2 (OCR). Applied once per epoch, after the
    epoch's updates: old <- decay * old + (1 - decay) * policy (`ema_update`). float32 scalar;
    `step` may be traced.
    """
    if decay_type not in _DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {sorted(_DECAY_TYPES)}, got {decay_type!r}")
    flat, uprate, uphold = _DECAY_TYPES[decay_type]
    s = jnp.asarray(step, jnp.float32)
    return jnp.where(s < flat, 0.0, jnp.minimum((s - flat) * uprate, uphold)).astype(jnp.float32)


# --------------------------------------------------------------------------- the method


class DiffusionNFT(Method):
    """DiffusionNFT, `config.method = "nft"` (NVlabs/DiffusionNFT 24af555, `scripts/train_nft_sd3.py`,
    `config/nft.py:sd3_geneval`).

    Rollouts CFG-free with the OLD policy by `solver` (the reference's "dpm2": 2nd-order multistep
    DPM-Solver++, first and last steps first order, on integer timesteps); only the final samples are kept. Each minibatch trains
    every row on its own random permutation of the sampler steps, the first int(num_steps * timestep_fraction)
    of them (`nft_timesteps`), at fresh noise (`nft_loss`). After the epoch the old policy follows the policy
    with decay `old_policy_decay(optimizer steps, decay_type)` (logged as old_policy/decay). The evaluation
    EMA is the reference's EMAModuleWrapper(decay=0.9, update_step_interval=1) stepped after every optimizer
    step.
    """

    name = "nft"
    metric_names = ("loss", "policy_loss", "unweighted_policy_loss", "kl_div", "old_deviate", "r_mean",
                    "positive_loss", "negative_loss")

    @staticmethod
    def defaults():
        return ml_collections.ConfigDict(dict(
            solver="dpm2",  # the rollout sampler (sampling.rollout kind): the reference's 2nd-order DPM-Solver++
            guidance=1.0,  # CFG-free, as the method intends (rollouts and training)
            integer_timesteps=True,  # rollouts pass floor(sigma * 1000) (pipeline_with_logprob.py); training floats
            mix=1.0,  # the reference's config.beta (0.1 for OCR)
            kl_beta=1e-4,  # the reference's train.beta
            adv_clip=5.0,
            decay_type=1,  # old-policy decay schedule (2 for OCR)
            timestep_fraction=0.99,
            eval_ema=dict(decay=0.9, every=1, cadence="update"),
        ))

    def validate(self) -> None:
        c = self.cfg
        if c.guidance != 1.0:
            raise ValueError("DiffusionNFT samples CFG-free: set config.nft.guidance=1.0")
        if c.solver not in sampling.KINDS + sampling.SOLVERS:
            raise ValueError(f"config.nft.solver must be one of {sampling.KINDS + sampling.SOLVERS}, got {c.solver!r}")
        if not c.mix > 0:
            raise ValueError(f"config.nft.mix (DiffusionNFT's beta) must be > 0, got {c.mix}")
        old_policy_decay(0, c.decay_type)
        check_fraction("config.nft.timestep_fraction", c.timestep_fraction, int(self.config.sample.num_steps))
        super().validate()

    def rollout_spec(self):
        return RolloutSpec(kind=self.cfg.solver, guidance=1.0, sampler="old",
                           integer_timesteps=bool(self.cfg.integer_timesteps))

    def init_state(self, params):
        return {"old": params}

    def train_nfes(self, batch):
        c = self.cfg
        return int(self.config.sample.num_steps * c.timestep_fraction) * batch * (2 + (c.kl_beta > 0))

    def grads(self, ctx, params, state, mb, window, key):
        c = self.cfg
        x0, pos = mb["x0"], positions(mb)
        t_all = nft_timesteps(key, x0.shape[0], ctx.sigmas, timestep_fraction=c.timestep_fraction,
                              keys=row_keys(key, pos))  # [K, B]
        eps_all = jnp.swapaxes(sampling.step_noise(jax.random.fold_in(key, 1), (x0.shape[0], t_all.shape[0],
                                                                                *x0.shape[1:]), pos), 0, 1)

        def loss_fn(p, inp):
            t, eps = inp
            x_t = awm_noised(x0, eps, t)
            v_of = lambda q: velocity(ctx.apply, q, x_t, t, mb["cond"], 1.0)
            v_old = jax.lax.stop_gradient(v_of(state["old"]))
            v_ref = jax.lax.stop_gradient(v_of(ctx.ref_params)) if c.kl_beta > 0 else None
            return nft_loss(v_of(p), v_old, x_t, x0, t, mb["advantages"], mix=c.mix, v_ref=v_ref,
                            kl_beta=c.kl_beta, adv_clip=c.adv_clip, weights=mb.get("weights"))

        return accumulate(loss_fn, params, (t_all, eps_all))

    def end_of_epoch(self, state, params, opt_step):
        decay = old_policy_decay(opt_step, self.cfg.decay_type)
        return {**state, "old": ema_update(state["old"], params, decay)}, {"old_policy/decay": decay}
