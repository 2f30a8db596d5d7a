"""Online RL for flow-matching models: the method layer, advantages and pure loss functions.

Every loss function here is pure and jittable, computes in float32 whatever the input dtype, and
takes arrays with the batch on the leading axis (velocities NHWC or any [B, ...]). Under
`jax.jit` the trainer passes GLOBAL arrays (spanning all devices and hosts), so a batch-wide
statistic here (the per-prompt group mean, the global reward std) is already the statistic of
the gathered batch; XLA inserts the collectives.

  method      what a method is to the trainer (`Method`), the registry (`build_method`, `register`)
  advantages  per-prompt (group) normalisation as Flow-GRPO's PerPromptStatTracker
  grpo        Flow-GRPO / CPS / DanceGRPO / MixGRPO: clipped PPO objective + KL to the reference policy
  awm         Advantage Weighted Matching (AWM)
  nft         DiffusionNFT and its old-policy EMA schedule
  ema         parameter EMAs: old / KL-EMA policies and the EMA evaluation copies
  trainer     rollout -> reward -> advantages -> updates, for any registered method
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
from flowjax.rl.ema import ema_update, eval_ema_decay, eval_ema_step
from flowjax.rl.grpo import grpo_loss, zero_advantage_plan
from flowjax.rl.method import Method, build_method, method_class, method_names, register
from flowjax.rl.nft import adaptive_x0_mse, nft_loss, nft_timesteps, old_policy_decay

__all__ = [
    "Method",
    "adaptive_x0_mse",
    "awm_advantages",
    "awm_ema_decay",
    "awm_log_prob",
    "awm_loss",
    "awm_noised",
    "awm_timestep_indices",
    "awm_timesteps",
    "batch_advantages",
    "build_method",
    "ema_update",
    "eval_ema_decay",
    "eval_ema_step",
    "group_advantages",
    "group_reward_stats",
    "grpo_loss",
    "method_class",
    "method_names",
    "nft_loss",
    "nft_timesteps",
    "old_policy_decay",
    "register",
    "zero_advantage_plan",
]
