"""Online RL for flow-matching models: advantages and pure loss functions.

Every function here is pure and jittable, computes in float32 whatever the input dtype, and
takes arrays with the batch on the leading axis (velocities NHWC or any [B, ...]). Under
`jax.jit` the trainer passes GLOBAL arrays (spanning all devices and hosts), so a batch-wide
statistic here (the per-prompt group mean, the global reward std) is already the statistic of
the gathered batch; XLA inserts the collectives.

  advantages  per-prompt (group) normalisation as Flow-GRPO's PerPromptStatTracker
  grpo        Flow-GRPO's clipped PPO objective + KL to the reference policy
  awm         Advantage Weighted Matching (AWM)
  nft         DiffusionNFT, its old-policy EMA schedule and a pytree EMA update
"""

from flowjax.rl.advantages import batch_advantages, group_advantages, group_reward_stats
from flowjax.rl.awm import (
    awm_advantages,
    awm_ema_decay,
    awm_log_prob,
    awm_loss,
    awm_noised,
    awm_timestep_indices,
    awm_timesteps,
)
from flowjax.rl.grpo import grpo_loss
from flowjax.rl.nft import (
    adaptive_x0_mse,
    ema_update,
    eval_ema_decay,
    nft_loss,
    nft_timesteps,
    old_policy_decay,
)

__all__ = [
    "adaptive_x0_mse",
    "awm_advantages",
    "awm_ema_decay",
    "awm_log_prob",
    "awm_loss",
    "awm_noised",
    "awm_timestep_indices",
    "awm_timesteps",
    "batch_advantages",
    "ema_update",
    "eval_ema_decay",
    "group_advantages",
    "group_reward_stats",
    "grpo_loss",
    "nft_loss",
    "nft_timesteps",
    "old_policy_decay",
]
