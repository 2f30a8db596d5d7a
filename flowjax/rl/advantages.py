"""Per-prompt (group) advantages, as Flow-GRPO, AWM and DiffusionNFT compute them.

All three reference trainers (yifan123/flow_grpo `flow_grpo/stat_tracking.py`
PerPromptStatTracker, copied unchanged into scxue/advantage_weighted_matching and
NVlabs/DiffusionNFT) gather the rewards and prompts of the whole epoch across processes, then
for every prompt

    A = (r - mean(r of that prompt)) / (std + 1e-4)

with std = np.std(all gathered rewards) when `sample.global_std` (the published setting of all
three) or np.std(rewards of that prompt) otherwise. np.std is the POPULATION std (ddof=0) and,
for the global option, it is the std of the RAW rewards over the whole batch, not of the
centred ones. The tracker is `clear()`ed after every epoch's single `update`, so its "history"
is exactly the current batch: a per-prompt mean over this batch's group. The loss then clips A
to [-adv_clip_max, adv_clip_max] = [-5, 5] (done here too, and again, idempotently, in the
losses).

Global arrays: these functions are meant to run inside the trainer's `jax.jit` on GLOBAL
arrays (one logical batch spanning every device and host). A group's members may sit on any
device, in any order; the segment sums and `jnp.std` below then reduce over the whole global
batch, which is the reference's "gather across processes, then group by prompt", with XLA
inserting the collectives. Nothing here gathers to one host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_STD_MODES = ("global", "per_prompt")


def _segments(prompt_ids, num_groups):
    """Dense segment ids in [0, num_segments) and the static num_segments."""
    ids = jnp.asarray(prompt_ids)
    if ids.ndim != 1:
        raise ValueError(f"prompt_ids must be 1-D [N], got shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"prompt_ids must be integers (one id per prompt, e.g. the prompt's index in the "
            f"prompt set), got dtype {ids.dtype}"
        )
    if num_groups is None:
        # Any integer ids (e.g. hashes): renumber densely. size=N keeps the shape static, so
        # this stays jittable; the unused trailing segments are empty.
        n = ids.shape[0]
        _, inv = jnp.unique(ids, return_inverse=True, size=n)
        return inv.reshape(-1).astype(jnp.int32), n
    num_groups = int(num_groups)
    try:
        concrete = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if concrete is not None and concrete.size and (concrete.min() < 0 or concrete.max() >= num_groups):
        raise ValueError(
            f"prompt_ids must lie in [0, num_groups={num_groups}), got range "
            f"[{concrete.min()}, {concrete.max()}]; pass num_groups=None for arbitrary ids"
        )
    return ids.astype(jnp.int32), num_groups


def _group_moments(r, seg, num_segments):
    """Per-sample centred rewards r - mean_group(r), and per-segment count and variance."""
    count = jax.ops.segment_sum(jnp.ones_like(r), seg, num_segments)
    # Shift by the group's minimum before averaging: mathematically a no-op, but a constant
    # group then centres to exactly 0 (its shifted values are exact zeros) and the sum loses
    # less precision to a large common offset.
    lo = jax.ops.segment_min(r, seg, num_segments)
    d = r - lo[seg]
    mean_d = jax.ops.segment_sum(d, seg, num_segments) / jnp.maximum(count, 1.0)
    centred = d - mean_d[seg]
    var = jax.ops.segment_sum(centred**2, seg, num_segments) / jnp.maximum(count, 1.0)
    return centred, count, var


def group_advantages(
    rewards,
    prompt_ids,
    *,
    num_groups: int | None = None,
    std: str = "global",
    eps: float = 1e-4,
    ddof: int = 0,
    clip: float | None = 5.0,
) -> jax.Array:
    """Advantages [N] float32: per-prompt centred rewards over a std, plus eps, clipped.

    Follows Flow-GRPO's PerPromptStatTracker.update (type 'grpo') + the loss's clamp:
      A = (r - mean_{same prompt}(r)) / (s + eps),  A = clip(A, -clip, clip)
    std="global": s = population std of the raw rewards over the whole (global) batch
      (`sample.global_std=True`, published for Flow-GRPO, AWM and DiffusionNFT on SD3.5);
    std="per_prompt": s = population std of that prompt's rewards.
    ddof: 0 (np.std, the population std: Flow-GRPO, AWM, DiffusionNFT) or 1 (torch.std's unbiased std:
      DanceGRPO `fastvideo/train_grpo_flux.py`, XueZeyue/DanceGRPO 15cc71d, with eps = 1e-8 and
      std="per_prompt"). A group of one sample with ddof=1 has std 0 (not NaN).

    rewards: [N] (any float dtype). prompt_ids: [N] integers; members of a group may be
      anywhere in the batch. With num_groups (static int) the ids must lie in [0, num_groups);
      with None any integer ids work (renumbered with a size-N `jnp.unique`).
    clip: None skips the clipping. A group of equal rewards gets advantages of exactly 0.
    """
    if std not in _STD_MODES:
        raise ValueError(f"std must be one of {_STD_MODES}, got {std!r}")
    r = jnp.asarray(rewards).astype(jnp.float32)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {r.shape}")
    seg, n_seg = _segments(prompt_ids, num_groups)
    if seg.shape != r.shape:
        raise ValueError(f"prompt_ids shape {seg.shape} does not match rewards shape {r.shape}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (unbiased), got {ddof!r}")
    centred, count, var = _group_moments(r, seg, n_seg)
    if std == "global":
        n = r.shape[0]
        s = jnp.std(r) * (np.sqrt(n / (n - ddof)) if n > ddof else 0.0)  # np.std(rewards) in the tracker
    else:
        unbiased = var * count / jnp.maximum(count - ddof, 1.0)
        s = jnp.sqrt(jnp.where(count > ddof, unbiased, 0.0))[seg]
    adv = centred / (s + eps)
    if clip is not None:
        adv = jnp.clip(adv, -clip, clip)
    return adv


def batch_advantages(rewards, *, eps: float = 1e-4, clip: float | None = 5.0) -> jax.Array:
    """Advantages without grouping: (r - mean(r)) / (std(r) + eps) over the whole batch, clipped.

    The references' branch for `per_prompt_stat_tracking=False` (taken automatically when
    `num_image_per_prompt == 1`); population std.
    """
    r = jnp.asarray(rewards).astype(jnp.float32)
    adv = (r - r.mean()) / (r.std() + eps)
    if clip is not None:
        adv = jnp.clip(adv, -clip, clip)
    return adv


def group_reward_stats(rewards, prompt_ids, *, num_groups: int | None = None) -> dict:
    """Logging statistics of the groups, as the references' `calculate_zero_std_ratio`.

    Returns float32 scalars: `zero_std_ratio` (fraction of prompts whose rewards are all equal,
    i.e. whose advantages are all 0), `reward_std_mean` (mean over prompts of the per-prompt
    population std) and `group_size` (mean number of samples per prompt).
    """
    r = jnp.asarray(rewards).astype(jnp.float32)
    seg, n_seg = _segments(prompt_ids, num_groups)
    _, count, var = _group_moments(r, seg, n_seg)
    present = count > 0
    n_present = jnp.maximum(present.sum(), 1).astype(jnp.float32)
    std = jnp.sqrt(var)
    return {
        "zero_std_ratio": jnp.where(present & (std == 0), 1.0, 0.0).sum() / n_present,
        "reward_std_mean": jnp.where(present, std, 0.0).sum() / n_present,
        "group_size": count.sum() / n_present,
    }
