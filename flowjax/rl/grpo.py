"""Flow-GRPO and its relatives (CPS, MixGRPO, DanceGRPO) as one method: `config.method = "grpo"`.

The loss follows yifan123/flow_grpo `scripts/train_sd3.py` (ac4c86e, training loop, "grpo logic"),
per trained sampler step j:

    A      = clamp(advantages, -adv_clip_max, adv_clip_max)            adv_clip_max = 5
    ratio  = exp(log_prob - old_log_prob)
    policy = mean_B( max(-A * ratio, -A * clamp(ratio, 1 - e, 1 + e)) )  e = clip_range = 1e-4
    kl     = mean_B( mean_{C,H,W}((mean - ref_mean)^2) / (2 * std_dev_t^2) )
    loss   = policy + beta * kl       (beta 0.04 GenEval / OCR, 0.01 PickScore; KL only if beta > 0)

For the coefficients-preserving sampler the KL is the plain mean_B(mean_{C,H,W}((mean - ref_mean)^2)):
Flow-CPS removed the division by 2 std^2 (IamCreateAI/FlowCPS `scripts/train_sd3.py`, commit 814c359
"flow cps"), whose std (sigma_next sin(a pi/2)) would weight the last trained step thousands of times more.

`log_prob`, `mean`, `std_dev_t` come from the SDE step under the current policy (here
`flowjax.sampling.transition_log_prob(...)`: `.log_prob`, `.mean`, `.std_t`); `ref_mean` from the
same step with the LoRA disabled, under no_grad. std_dev_t is the step's noise scale WITHOUT
the sqrt(-dt) factor. The reference's per-step losses are averaged by gradient accumulation
over the batches and the trained steps; passing several steps at once ([T, B] log-probs) and
taking the mean over all of them is the same average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from flowjax import sampling
from flowjax.rl.common import f32, ppo_clipped, weighted_mean
from flowjax.rl.method import Method, RolloutSpec, accumulate, check_fraction, positions, row_keys, velocity


KL_MODES = ("std", "plain")


def _kl_term(mean, ref_mean, std_t, batch_ndim, mode="std", weights=None):
    """mean over the leading batch dims of mean_{rest}((mean - ref)^2) / (2 std_t^2) (mode "std", Flow-GRPO)
    or without the division (mode "plain", Flow-CPS); a weighted mean over the rows with `weights`."""
    mean = f32(mean)
    ref_mean = jax.lax.stop_gradient(f32(ref_mean))
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {mean.shape} and ref_mean {ref_mean.shape} must have the same shape")
    if mean.ndim < batch_ndim:
        raise ValueError(f"mean {mean.shape} must have the log_prob's {batch_ndim} batch dims first")
    event_axes = tuple(range(batch_ndim, mean.ndim))
    # Reduce first, then divide, as the reference (std_dev_t is constant over C,H,W).
    sq = jnp.mean((mean - ref_mean) ** 2, axis=event_axes)
    if mode == "plain":
        return weighted_mean(sq, weights)
    s = f32(std_t)
    if s.ndim > batch_ndim:
        # std_t broadcastable to the latents ([B,1,1,1] from the step kernels): one value per
        # sample, so take it from the first event element.
        s = s.reshape(s.shape[:batch_ndim] + (-1,))[..., 0]
    return weighted_mean(sq / (2.0 * s**2), weights)


def grpo_loss(
    log_prob,
    old_log_prob,
    advantages,
    *,
    clip_range: float = 1e-4,
    beta: float = 0.0,
    mean=None,
    ref_mean=None,
    std_t=None,
    adv_clip: float | None = 5.0,
    kl_mode: str = "std",
    weights=None,
):
    """Flow-GRPO loss (scalar float32) and metrics.

    log_prob: [B] (or [T, B]) log-probs of the stored transitions under the current policy.
    old_log_prob: same shape, from the rollout (treated as a constant).
    advantages: broadcastable to log_prob ([B]); clamped to [-adv_clip, adv_clip] as the
      reference's `train.adv_clip_max` (None: no clamp).
    clip_range: PPO epsilon (published 1e-4; 1e-5 in the "fast" CPS recipes).
    beta, mean, ref_mean, std_t: the KL term. mean / ref_mean are the step means [B, H, W, C]
      (leading dims those of log_prob), std_t the step's std_dev_t, broadcastable to them
      ([B, 1, 1, 1], [B] or a scalar). When mean is given the KL is computed (and logged);
      beta != 0 without it is an error. ref_mean is treated as a constant.
    kl_mode: "std" (Flow-GRPO's division by 2 std_t^2) or "plain" (Flow-CPS, no division; std_t unused).
    weights: per-row weights broadcastable to log_prob (the zero-advantage filter's mask): every mean
      over rows becomes sum(w x) / sum(w), so rows of weight 0 are left out as the reference drops them.

    Metrics (float32 scalars, no gradient): loss, policy_loss, kl_loss, clipfrac,
    clipfrac_gt_one, clipfrac_lt_one, approx_kl (= 0.5 * mean((logp - logp_old)^2), the
    reference's), ratio_mean, ratio_max, ratio_min.
    """
    lp = f32(log_prob)
    old = jax.lax.stop_gradient(f32(old_log_prob))
    if old.shape != lp.shape:
        raise ValueError(f"old_log_prob {old.shape} must have the shape of log_prob {lp.shape}")
    adv = f32(advantages)
    if adv_clip is not None:
        adv = jnp.clip(adv, -adv_clip, adv_clip)
    adv = jnp.broadcast_to(adv, lp.shape)

    log_ratio = lp - old
    ratio = jnp.exp(log_ratio)
    policy_loss = ppo_clipped(ratio, adv, clip_range, weights)

    if kl_mode not in KL_MODES:
        raise ValueError(f"kl_mode must be one of {KL_MODES}, got {kl_mode!r}")
    if mean is not None or ref_mean is not None:
        if mean is None or ref_mean is None or (std_t is None and kl_mode == "std"):
            raise ValueError("the KL term needs mean, ref_mean and (for kl_mode='std') std_t together")
        kl = _kl_term(mean, ref_mean, std_t, lp.ndim, kl_mode, weights)
        loss = policy_loss + beta * kl
    else:
        if isinstance(beta, (int, float)) and beta != 0:
            raise ValueError(
                f"beta={beta} needs mean=, ref_mean= and std_t= (the step means under the policy "
                "and the reference, from flowjax.sampling.transition_log_prob)"
            )
        kl = jnp.zeros((), jnp.float32)
        loss = policy_loss

    sg = jax.lax.stop_gradient
    r = sg(ratio)
    m = lambda x: weighted_mean(x, weights)  # statistics of the kept rows only
    kept = jnp.ones_like(r, bool) if weights is None else jnp.broadcast_to(f32(weights), r.shape) > 0
    metrics = {
        "loss": sg(loss),
        "policy_loss": sg(policy_loss),
        "kl_loss": sg(kl),
        "clipfrac": m((jnp.abs(r - 1.0) > clip_range).astype(jnp.float32)),
        "clipfrac_gt_one": m((r - 1.0 > clip_range).astype(jnp.float32)),
        "clipfrac_lt_one": m((1.0 - r > clip_range).astype(jnp.float32)),
        "approx_kl": 0.5 * m(sg(log_ratio) ** 2),
        "ratio_mean": m(r),
        "ratio_max": jnp.max(jnp.where(kept, r, -jnp.inf)),
        "ratio_min": jnp.min(jnp.where(kept, r, jnp.inf)),
    }
    return loss, metrics


# ------------------------------------------------------------------------------------ the zero-advantage filter


def zero_advantage_plan(advantages, key, minibatches: int):
    """Flow-GRPO's filter of the samples whose advantage is zero on every trained step, with static shapes.

    The reference (yifan123/flow_grpo `scripts/train_sd3.py`, ac4c86e, the block after the advantage
    gather) keeps the rows with a nonzero advantage, randomly re-admits dropped rows until the count is a
    multiple of the number of minibatches (`num_batches_per_epoch`; when nothing survives, the newer
    `scripts/train_sd3_fast.py`, 74db691, re-admits one row per minibatch), shuffles the survivors and splits
    them into equal minibatches, whose losses are means over their rows. Here every minibatch keeps its
    static size B / minibatches: the kept rows are spread evenly over the minibatches (round robin after a
    random order) and carry weight 1, the dropped rows fill the rest with weight 0, so each minibatch's
    weighted mean is the reference's mean over its kept rows.

    advantages: [B] or [B, T]. Returns (order [B] int32: minibatch i is order[i*m:(i+1)*m]; weights [B]
    float32 aligned with order). The reference filters per process; this filters the global batch (the same
    with one process).
    """
    a = jnp.asarray(advantages, jnp.float32)
    b = a.shape[0]
    if b % minibatches:
        raise ValueError(f"batch {b} is not divisible by {minibatches} minibatches")
    keep = jnp.any(a.reshape(b, -1) != 0, axis=1)
    k_fill, k_order = jax.random.split(key)
    n = keep.sum()
    need = jnp.where((n % minibatches == 0) & (n > 0), 0, minibatches - n % minibatches)
    # Re-admit `need` dropped rows chosen uniformly: the dropped rows with the smallest random keys.
    u = jax.random.uniform(k_fill, (b,))
    rank_dropped = jnp.argsort(jnp.argsort(jnp.where(keep, 2.0, u)))
    keep = keep | (rank_dropped < need)
    # Kept rows first in a random order, then the dropped ones; dealt round robin into the minibatches.
    order = jnp.argsort(jnp.where(keep, 0.0, 2.0) + jax.random.uniform(k_order, (b,)))
    order = order.reshape(b // minibatches, minibatches).T.reshape(-1)
    return order.astype(jnp.int32), keep[order].astype(jnp.float32)


def _take_steps(x, idx):
    """x [B, T, ...] at per-row step indices idx [B] -> [B, ...]."""
    return jnp.take_along_axis(x, idx.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


# ------------------------------------------------------------------------------------ the method


class FlowGRPO(Method):
    """Flow-GRPO (`kind="sde"`), Flow-CPS (`"cps"`), DanceGRPO (`"dance"`) and MixGRPO (`window`) training.

    Rollouts with the stochastic kernel of `kind` keep every transition and its log-prob; each minibatch
    recomputes the log-probs of the trained transitions under the policy (CFG `guidance` in rollout and in
    training, as `train.cfg=True` in the references) and takes the clipped PPO loss plus beta times the KL
    to the reference policy (`grpo_loss`). Which steps are trained:
      - the first int(num_steps * timestep_fraction) (Flow-GRPO, Flow-CPS: 9 of 10);
      - `random_steps`: per sample int((num_steps - 1) * timestep_fraction) random steps of all but the last
        (DanceGRPO, `fastvideo/train_grpo_flux.py`, XueZeyue/DanceGRPO 15cc71d: timestep_fraction 0.6);
      - with `window.size` > 0, only the window's steps, which are also the only stochastic ones (MixGRPO
        `progressive`, and flow_grpo's `*_fast_nocfg` recipes `random`); an empty window (MixGRPO's at its
        last position) trains nothing and makes no optimizer step.
    Published SD3.5-M defaults are Flow-GRPO's `config/grpo.py:geneval_sd3` (ac4c86e).
    """

    name = "grpo"
    metric_names = ("loss", "policy_loss", "kl_loss", "clipfrac", "clipfrac_gt_one", "clipfrac_lt_one",
                    "approx_kl", "ratio_mean", "ratio_max", "ratio_min")
    KINDS = ("sde", "cps", "dance")
    WINDOW_SCHEDULES = ("random", "progressive")
    SCHEDULES = ("sd3", "dance")

    @staticmethod
    def defaults():
        return ml_collections.ConfigDict(dict(
            kind="sde",  # sde (Flow-GRPO) | cps (Flow-CPS) | dance (DanceGRPO)
            noise_level=0.7,  # a of sde / cps, eta of dance
            guidance=4.5,  # CFG in rollouts and in the training forward
            clip_range=1e-4,
            beta=0.04,  # KL weight (0.01 PickScore)
            adv_clip=5.0,
            timestep_fraction=0.99,  # trained steps: int(num_steps * fraction)
            random_steps=False,  # DanceGRPO: a random subset of the steps per sample
            schedule="sd3",  # sd3: sampling.sigmas; dance: DanceGRPO's single-shift schedule
            filter_zero_advantage=True,  # drop rows whose advantage is 0 on every trained step
            integer_timesteps=False,  # the model sees floor(sigma * 1000), as DanceGRPO's does
            # MixGRPO / flow_grpo fast: SDE (and training) only inside a window of `size` steps. "random": start
            # uniform in [range[0], range[1] - size] each epoch; "progressive": MixGRPO's sliding window
            # (sampling.progressive_window: moves by `stride` every `shift_interval` epochs, rolls back).
            window=dict(size=0, schedule="random", range=(0, 0), shift_interval=25, stride=1, roll_back=True),
            # Flow-GRPO's EMA evaluation copy (scripts/train_sd3.py: decay 0.9, every 8, after each micro-batch).
            eval_ema=dict(decay=0.9, every=8, cadence="microbatch"),
        ))

    # ---------------------------------------------------------------- configuration

    @property
    def num_steps(self) -> int:
        return int(self.config.sample.num_steps)

    def window_bounds(self) -> tuple[int, int]:
        """[lo, hi): the steps a random window may cover; range (0, 0) means all but the final step."""
        lo, hi = (int(v) for v in self.cfg.window.range)
        return (0, self.num_steps - 1) if (lo, hi) == (0, 0) else (lo, hi)

    def validate(self) -> None:
        c, n = self.cfg, self.num_steps
        if c.kind not in self.KINDS:
            raise ValueError(f"config.grpo.kind must be one of {self.KINDS} (a stochastic sampler with "
                             f"log-probs), got {c.kind!r}")
        if not c.noise_level > 0:
            raise ValueError(f"config.grpo.noise_level must be > 0: GRPO needs a stochastic sampler "
                             f"(got {c.noise_level})")
        if c.kind == "cps" and c.noise_level > 1:
            raise ValueError(f"config.grpo.noise_level is an angle fraction in (0, 1] for cps, got {c.noise_level}")
        if c.guidance < 1.0:
            raise ValueError(f"config.grpo.guidance must be >= 1 (1 = no CFG), got {c.guidance}")
        if c.schedule not in self.SCHEDULES:
            raise ValueError(f"config.grpo.schedule must be one of {self.SCHEDULES}, got {c.schedule!r}")
        w = c.window
        if w.size:
            if w.schedule not in self.WINDOW_SCHEDULES:
                raise ValueError(f"config.grpo.window.schedule must be one of {self.WINDOW_SCHEDULES}, "
                                 f"got {w.schedule!r}")
            if c.random_steps:
                raise ValueError("config.grpo.random_steps (DanceGRPO) and a window (MixGRPO) exclude each other")
            if w.schedule == "progressive":  # MixGRPO's window stops 2 steps short of the end by construction
                sampling.progressive_window(0, n, window_size=w.size, shift_interval=w.shift_interval,
                                            stride=w.stride, roll_back=w.roll_back)
            else:
                lo, hi = self.window_bounds()
                if not 0 <= lo < hi <= n or hi - lo < w.size:
                    raise ValueError(f"config.grpo.window.range {tuple(w.range)} must satisfy 0 <= lo < hi <= "
                                     f"num_steps={n} with room for a window of {w.size} steps")
                if hi >= n:
                    raise ValueError(f"config.grpo.window: a window of {w.size} step(s) in range {tuple(w.range)} "
                                     f"could reach step {n - 1}, the final step of {n} (its transition is nearly "
                                     f"deterministic; the cps std is 0 there); end window.range at {n - 1} or below")
        elif c.random_steps:
            if sampling.dance_train_count(n, c.timestep_fraction) < 1:
                raise ValueError(f"config.grpo.timestep_fraction={c.timestep_fraction} of the {n - 1} trainable "
                                 "steps (DanceGRPO never trains the last) leaves none")
        else:
            k = check_fraction("config.grpo.timestep_fraction", c.timestep_fraction, n)
            if k > n:
                raise ValueError(f"config.grpo.timestep_fraction={c.timestep_fraction} must be <= 1")
            if c.kind == "cps" and k == n:
                raise ValueError("config.grpo.timestep_fraction trains the final cps step, whose std is 0; "
                                 "use a fraction below 1 (0.99 trains 9 of 10)")
        super().validate()

    # ---------------------------------------------------------------- rollouts

    def rollout_spec(self) -> RolloutSpec:
        c = self.cfg
        return RolloutSpec(kind=c.kind, noise_level=float(c.noise_level), guidance=float(c.guidance),
                           integer_timesteps=bool(c.integer_timesteps))

    def schedule(self, num_steps, shift):
        if self.cfg.schedule == "dance":
            if callable(shift):
                raise ValueError("config.grpo.schedule='dance' is DanceGRPO's own shifted linspace: give "
                                 "sample.shift as a number (DanceGRPO uses 3 on FLUX), not 'dynamic'")
            return sampling.dance_sigmas(num_steps, shift)
        return super().schedule(num_steps, shift)

    def window(self, epoch, key):
        """(start, end) int32 [2] of the epoch's SDE window; (0, 0) without one."""
        w = self.cfg.window
        if not w.size:
            return jnp.zeros((2,), jnp.int32)
        if w.schedule == "progressive":
            return jnp.stack(sampling.progressive_window(epoch, self.num_steps, window_size=w.size,
                                                         shift_interval=w.shift_interval, stride=w.stride,
                                                         roll_back=w.roll_back))
        lo, hi = self.window_bounds()
        start = jax.random.randint(key, (), lo, hi - w.size + 1, dtype=jnp.int32)
        return jnp.stack([start, start + w.size])

    def rollout_kwargs(self, window):
        return {"sde_window": (window[0], window[1])} if self.cfg.window.size else {}

    def keep(self, out, window):
        return {"latents": jnp.swapaxes(out.latents, 0, 1), "log_probs": out.log_probs.T}

    def plan(self, advantages, key, minibatches):
        if self.cfg.filter_zero_advantage:
            return zero_advantage_plan(advantages, key, minibatches)
        return super().plan(advantages, key, minibatches)

    # ---------------------------------------------------------------- training

    def train_steps(self, window, key, batch: int, pos=None):
        """(trained step of every (slot, row) [K, B] int32, slot in use [K] bool). Slots past a shrunken
        progressive window are out of use (their index is clipped to a valid step)."""
        c, n = self.cfg, self.num_steps
        if c.window.size:
            idx = window[0] + jnp.arange(c.window.size, dtype=jnp.int32)
            valid = idx < window[1]
            idx = jnp.minimum(idx, n - 1)
            return jnp.broadcast_to(idx[:, None], (c.window.size, batch)), valid
        if c.random_steps:  # each row's subset keyed by its position (micro-batching draws the same)
            pos = jnp.arange(batch, dtype=jnp.int32) if pos is None else pos
            draw = lambda k: sampling.dance_train_steps(k, 1, n, c.timestep_fraction)[0]
            idx = jax.vmap(draw)(row_keys(key, pos)).T.astype(jnp.int32)
        else:
            k = int(n * c.timestep_fraction)
            idx = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[:, None], (k, batch))
        return idx, jnp.ones((idx.shape[0],), bool)

    def train_nfes(self, batch):
        c, n = self.cfg, self.num_steps
        steps = c.window.size or (sampling.dance_train_count(n, c.timestep_fraction) if c.random_steps
                                  else int(n * c.timestep_fraction))
        return steps * batch * (2 if c.guidance != 1.0 else 1) * (2 if c.beta > 0 else 1)

    def grads(self, ctx, params, state, mb, window, key):
        c = self.cfg
        kind, level, beta, guidance = c.kind, float(c.noise_level), float(c.beta), float(c.guidance)
        integer = bool(c.integer_timesteps)
        kl_mode = "plain" if kind == "cps" else "std"
        latents, cond = mb["latents"], mb["cond"]
        sig_all = ctx.sigmas

        def loss_fn(p, idx):
            x, x_next = _take_steps(latents, idx), _take_steps(latents, idx + 1)
            sig, sig_next = sig_all[idx], sig_all[idx + 1]
            step = lambda q: sampling.transition_log_prob(
                kind, x, x_next, velocity(ctx.apply, q, x, sig, cond, guidance, integer), sig, sig_next, level,
                sig_max=sig_all[1])
            lp = step(p)
            adv = mb["advantages"]
            adv = adv if adv.ndim == 1 else _take_steps(adv, idx)
            ref_mean = jax.lax.stop_gradient(step(ctx.ref_params).mean) if beta > 0 else None
            return grpo_loss(
                lp.log_prob, _take_steps(mb["log_probs"], idx), adv, clip_range=float(c.clip_range), beta=beta,
                mean=lp.mean if beta > 0 else None, ref_mean=ref_mean, std_t=lp.std_t if beta > 0 else None,
                adv_clip=float(c.adv_clip), kl_mode=kl_mode, weights=mb["weights"])

        idx, valid = self.train_steps(window, key, latents.shape[0], positions(mb))
        grads, metrics = accumulate(loss_fn, params, idx, valid)
        return grads, {**metrics, "skip": ~jnp.any(valid)}
