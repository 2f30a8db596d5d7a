"""A fixed rollout dataset on disk, for offline methods (`Method.offline_batches`, GDRO's offline mode).

WORKDIR/rollouts/ holds `meta.json` (what the dataset was sampled with: a resumed or restarted run must match
it) and one `batch_NNNNNN.npz` per sampled batch with the batch's prompt ids, group ids (0..P-1 within the
batch), the method's kept arrays (`keep/<name>`) and the world's scores (`scores/<name>`, "reward" among them).
Each file is written whole (a temporary name, then renamed), so a run killed while sampling keeps the batches it
finished and samples only the missing ones when resumed.

An epoch of offline training takes `prompts_per_batch` of the stored groups: all groups once per pass over the
dataset, in a random order per pass that is a pure function of (seed, pass), so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np


class RolloutStore:
    """The files of one fixed rollout dataset (see the module docstring)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = Path(path), dict(meta)
        self.num_batches = int(meta["num_batches"])

    def file(self, i: int) -> Path:
        return self.path / f"batch_{i:06d}.npz"

    def check_meta(self) -> None:
        """Writes meta.json on first use; refuses a dataset sampled with other settings."""
        self.path.mkdir(parents=True, exist_ok=True)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            _atomic_write_text(meta_file, json.dumps(self.meta, indent=1, sort_keys=True))
            return
        stored = json.loads(meta_file.read_text())
        diff = {k: (stored.get(k), v) for k, v in self.meta.items() if stored.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"the rollout dataset in {self.path} was sampled with other settings ({lines}); "
                             "delete that folder to sample a new one, or use another workdir")

    def missing(self) -> list[int]:
        return [i for i in range(self.num_batches) if not self.file(i).exists()]

    def write(self, i: int, prompt_ids, group_ids, keep: dict, scores: dict) -> None:
        arrays = {"prompt_ids": np.asarray(prompt_ids, np.int32), "group_ids": np.asarray(group_ids, np.int32)}
        arrays.update({f"keep/{k}": np.asarray(v) for k, v in keep.items()})
        arrays.update({f"scores/{k}": np.asarray(v) for k, v in scores.items()})
        tmp = self.file(i).with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.file(i))

    def load(self) -> "StoredRollouts":
        missing = self.missing()
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {self.num_batches} batches of {self.path} are missing "
                                    f"(first: {self.file(missing[0]).name})")
        parts = []
        for i in range(self.num_batches):
            with np.load(self.file(i)) as f:
                parts.append({k: f[k] for k in f.files})
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        batch_of_row = np.repeat(np.arange(self.num_batches), [len(p["prompt_ids"]) for p in parts])
        return StoredRollouts(cat, batch_of_row, int(self.meta["prompts_per_batch"]), int(self.meta["group_size"]),
                              int(self.meta["seed"]))


class StoredRollouts:
    """The loaded dataset and the per-epoch selection of its groups."""

    def __init__(self, arrays: dict, batch_of_row, prompts_per_batch: int, group_size: int, seed: int):
        self.arrays, self.prompts_per_batch, self.group_size, self.seed = arrays, prompts_per_batch, group_size, seed
        # A dataset-wide group id per row: (batch, group within the batch).
        gid = np.asarray(batch_of_row, np.int64) * prompts_per_batch + arrays["group_ids"]
        counts = np.bincount(gid)
        if np.any(counts != group_size):
            raise ValueError(f"every stored group must have {group_size} rows; found sizes {sorted(set(counts))}")
        self.rows_of_group = np.argsort(gid, kind="stable").reshape(-1, group_size)  # [groups, k]
        self.num_groups = self.rows_of_group.shape[0]
        self.steps_per_pass = self.num_groups // prompts_per_batch

    def epoch(self, step: int) -> tuple[np.ndarray, np.ndarray, dict, dict]:
        """(prompt ids [B], group ids [B] in 0..P-1, keep {name: [B, ...]}, scores {name: [B]}) of epoch `step`:
        the groups at positions (step % S) * P .. + P of pass step // S's random order of all stored groups,
        S = groups // P (a pass covers every group once when P divides the number of groups)."""
        p = self.prompts_per_batch
        pass_, pos = divmod(step, self.steps_per_pass)
        order = np.random.default_rng([self.seed, pass_]).permutation(self.num_groups)
        rows = self.rows_of_group[order[pos * p:(pos + 1) * p]].reshape(-1)
        keep = {k[len("keep/"):]: v[rows] for k, v in self.arrays.items() if k.startswith("keep/")}
        scores = {k[len("scores/"):]: v[rows] for k, v in self.arrays.items() if k.startswith("scores/")}
        groups = np.repeat(np.arange(p, dtype=np.int32), self.group_size)
        return self.arrays["prompt_ids"][rows], groups, keep, scores


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sample_dataset(trainer) -> tuple[StoredRollouts, dict]:
    """Offline methods (`Method.offline_batches`): samples the fixed dataset's missing batches with the
    REFERENCE policy (the method's rollout of the batches of epochs 0..n-1, from the keys an online run would
    use for them, in `sample.micro_batch` calls like any rollout: per-row noise makes the dataset independent
    of the micro-batching), scores them and writes them to WORKDIR/rollouts/ (process 0; a shared filesystem
    on several hosts), then loads the dataset once. Batches already there (a resumed run, or one killed while
    sampling) are not sampled again. Returns the one-time cost to log (nfe/dataset, time/dataset_s,
    images/sampled; 0 images once the dataset is there) with the loaded dataset."""
    t = trainer.config.train
    spec = trainer.method.rollout_spec()
    store = RolloutStore(trainer.workdir / "rollouts", dict(
        num_batches=trainer.offline_batches, prompts_per_batch=t.prompts_per_batch, group_size=t.group_size,
        seed=int(trainer.config.seed), num_prompts=int(trainer.world.num_prompts), method=trainer.config.method,
        rollout=repr(spec), num_steps=int(trainer.config.sample.num_steps),
        latent_shape=[*trainer.config.sample.latent_size, int(trainer.world.channels)],
        # recorded only when set, so that datasets sampled before it was recorded still match
        **({"same_noise_per_group": True} if trainer.config.sample.get("same_noise_per_group") else {})))
    if trainer.is_main:
        store.check_meta()
    todo = np.asarray(store.missing(), np.int32)
    if jax.process_count() > 1:  # every process must join the same rollouts: take process 0's view
        from jax.experimental import multihost_utils

        flags = np.zeros(trainer.offline_batches, np.int32)
        flags[todo] = 1
        todo = np.flatnonzero(multihost_utils.broadcast_one_to_all(flags)).astype(np.int32)
    t0 = time.perf_counter()
    for i in todo:
        i = int(i)
        prompt_ids, group_ids = trainer.sampler.batch(i)
        k_noise, k_sample, k_window, _, _ = jax.random.split(jax.random.fold_in(trainer.state.key, i), 5)
        window = trainer.method.window(i, k_window)
        _, keep, scores, source = trainer._sample_batch(trainer.ref_params, prompt_ids, group_ids, k_noise, k_sample,
                                                     window)
        if len(source) != len(prompt_ids) or np.any(source != np.arange(len(prompt_ids))):
            raise ValueError(f"{trainer.config.method}: offline datasets keep one row per batch row; a rollout "
                             "that scores its own rows (keep['source']) cannot be stored")
        keep, scores = jax.device_get(trainer._replicate((keep, scores)))
        if trainer.is_main:
            store.write(i, prompt_ids, group_ids, keep, scores)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("flowjax rollout dataset written")
    stored = store.load()
    if not len(todo):
        return stored, {"images/sampled": 0}
    return stored, {"nfe/dataset": len(todo) * trainer.dataset_nfes_per_batch, "time/dataset_s": time.perf_counter() - t0,
            "images/sampled": len(todo) * trainer.batch_size}
