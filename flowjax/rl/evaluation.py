"""Evaluation of a policy during training: ODE samples of the held-out prompts from fixed noise, scored by the
world, in `sample.micro_batch` calls; multi-host safe (every process joins each program, process 0 draws)."""

from __future__ import annotations

import jax
import numpy as np

from flowjax import plots


def eval_world(trainer):
    """Where evaluation prompts come from: the world's held-out split when it has one."""
    return getattr(trainer.world, "eval_world", None) or trainer.world


def eval_prompt_ids(trainer) -> tuple[np.ndarray, int]:
    """The fixed evaluation batch: the first `num_eval_prompts` prompts (0 = all), each
    `eval_samples_per_prompt` times, padded by repetition to a multiple of the devices (of the
    micro-batch, with `sample.micro_batch`); and the number of real (unpadded) rows, the only ones scored."""
    s, world = trainer.config.sample, eval_world(trainer)
    n = world.num_prompts if not s.num_eval_prompts else min(s.num_eval_prompts, world.num_prompts)
    ids = np.repeat(np.arange(n), s.get("eval_samples_per_prompt", 1))
    unit = trainer.micro_rows or trainer._dp()
    return np.resize(ids, -(-len(ids) // unit) * unit), len(ids)


def evaluate_params(trainer, params, prefix: str, grid_name: str | None) -> dict:
    """ODE samples of the trainer's evaluation prompts by `params` from fixed noise (any micro-batching
    draws the same): `<prefix>/reward_mean`, `<prefix>/accuracy` (per task too when the world names tasks) and
    the world's other scores; with `grid_name`, a captioned grid of the first samples under WORKDIR/samples/."""
    ids, n = eval_prompt_ids(trainer)
    world = eval_world(trainer)
    k_noise, samples, scores = jax.random.PRNGKey(10_000 + trainer.config.seed), [], []
    for rows in trainer._micro_batches(len(ids)):
        samples.append(trainer._evaluate(params, trainer.frozen, trainer._cond(ids[rows], world),
                                         trainer._global(rows.astype(np.int32)), k_noise))
        scores.append(jax.device_get(trainer._eval_scores(samples[-1], trainer._global(ids[rows].astype(np.int32)),
                                                          getattr(world, "state", None))))
    samples = samples[0]  # the grid shows the first micro-batch's samples
    scores = {k: np.concatenate([sc[k] for sc in scores]) for k in scores[0]}
    out = {f"{prefix}/{k}_mean" if k == "reward" else f"{prefix}/{k}": float(np.nanmean(v[:n]))
           for k, v in scores.items()}
    if "accuracy" in scores and hasattr(world, "task_names"):
        tasks = np.asarray(world.task_names(ids[:n]))
        for task in dict.fromkeys(tasks):
            out[f"{prefix}/accuracy_{task}"] = float(np.mean(scores["accuracy"][:n][tasks == task]))
    if grid_name and hasattr(world, "images"):
        g = min(trainer.config.get("grid_size", 32), len(samples))
        # Every process joins the replicated gather (multi-host); only process 0 draws.
        to_images = jax.jit(lambda x: world.images(x[:g]), out_shardings=trainer.replicated)
        images = np.asarray(jax.device_get(to_images(samples)))
        if trainer.is_main:
            correct = scores["accuracy"][:g] if "accuracy" in scores else None
            title = f"step {int(trainer.state.step)}" + (
                f": accuracy {out[f'{prefix}/accuracy']:.2f}" if f"{prefix}/accuracy" in out else "")
            plots.save_grid(images, world.captions(ids[:g]), trainer.workdir / "samples" / grid_name,
                            correct=correct, title=title)
    return out
