"""Flow-GRPO's loss: PPO clipped policy gradient + KL to the reference policy.

Follows yifan123/flow_grpo `scripts/train_sd3.py` (training loop, "grpo logic"), per sampler
step j of the trained 90% of the steps:

    A      = clamp(advantages, -adv_clip_max, adv_clip_max)            adv_clip_max = 5
    ratio  = exp(log_prob - old_log_prob)
    policy = mean_B( max(-A * ratio, -A * clamp(ratio, 1 - e, 1 + e)) )  e = clip_range = 1e-4
    kl     = mean_B( mean_{C,H,W}((mean - ref_mean)^2) / (2 * std_dev_t^2) )
    loss   = policy + beta * kl       (beta 0.04 GenEval / OCR, 0.01 PickScore; KL only if beta > 0)

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

from flowjax.rl.common import f32, ppo_clipped


def _kl_term(mean, ref_mean, std_t, batch_ndim):
    """mean over the leading batch dims of mean_{rest}((mean - ref)^2) / (2 std_t^2)."""
    mean = f32(mean)
    ref_mean = jax.lax.stop_gradient(f32(ref_mean))
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {mean.shape} and ref_mean {ref_mean.shape} must have the same shape")
    if mean.ndim < batch_ndim:
        raise ValueError(f"mean {mean.shape} must have the log_prob's {batch_ndim} batch dims first")
    event_axes = tuple(range(batch_ndim, mean.ndim))
    # Reduce first, then divide, as the reference (std_dev_t is constant over C,H,W).
    sq = jnp.mean((mean - ref_mean) ** 2, axis=event_axes)
    s = f32(std_t)
    if s.ndim > batch_ndim:
        # std_t broadcastable to the latents ([B,1,1,1] from the step kernels): one value per
        # sample, so take it from the first event element.
        s = s.reshape(s.shape[:batch_ndim] + (-1,))[..., 0]
    return jnp.mean(sq / (2.0 * s**2))


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
    policy_loss = ppo_clipped(ratio, adv, clip_range)

    if mean is not None or ref_mean is not None:
        if mean is None or ref_mean is None or std_t is None:
            raise ValueError("the KL term needs mean, ref_mean and std_t together")
        kl = _kl_term(mean, ref_mean, std_t, lp.ndim)
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
    metrics = {
        "loss": sg(loss),
        "policy_loss": sg(policy_loss),
        "kl_loss": sg(kl),
        "clipfrac": jnp.mean((jnp.abs(r - 1.0) > clip_range).astype(jnp.float32)),
        "clipfrac_gt_one": jnp.mean((r - 1.0 > clip_range).astype(jnp.float32)),
        "clipfrac_lt_one": jnp.mean((1.0 - r > clip_range).astype(jnp.float32)),
        "approx_kl": 0.5 * jnp.mean(sg(log_ratio) ** 2),
        "ratio_mean": jnp.mean(r),
        "ratio_max": jnp.max(r),
        "ratio_min": jnp.min(r),
    }
    return loss, metrics
