"""A weighted sum of named rewards, with every component kept for logging.

`MultiReward(weights, rewards)(images, prompts) = sum_i weights[i] * rewards[i](images, prompts)`.

Decisions:
- The weighted sum is not normalised (as Flow-GRPO's `multi_score`): weights {"a": 1, "b": 1}
  give a + b. Group-normalised advantages are invariant to a common scale anyway.
- A single weight may be negative (a penalty term) or zero (the component is computed and logged
  but not optimised). The total of the weights must be positive: a zero or negative total would
  make the combined reward vanish or train towards the opposite of what its parts ask, which is
  almost surely a configuration mistake. Weights must be finite.
- The names of `weights` and `rewards` must be the same set; the error lists what is missing on
  each side.
- Every component must return one score per image, shape [B]; a component that does not fails
  with its name and the shape it returned (at trace time under jit).

Two modes, chosen from the components:
- jittable (every component has a true `jittable` attribute): `__call__` and `components` are
  pure JAX, usable under jit; `self.jittable` is True.
- host (some component is a host reward, e.g. `RemoteReward`): `__call__` runs on the host and
  returns NumPy, `score(images, prompts) -> (total, metrics)` gives every component as a metric
  (`<name>`) next to their own metrics (`<name>/<metric>`), and `as_jax(prompt_table, metrics=...)`
  makes it callable inside jit through `jax.pure_callback` (see `flowjax.rewards.remote.as_jax`).
  Jittable components in a host-mode MultiReward are called eagerly on the host; inside `as_jax`
  keep to host components (JAX computations inside a callback are not supported on every backend).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from flowjax.rewards.remote import host_score, as_jax

__all__ = ["MultiReward"]


class MultiReward:
    """score = sum_i w_i * r_i over named components; `components` returns each r_i separately."""

    def __init__(self, weights: Mapping[str, float], rewards: Mapping[str, object]):
        weights, rewards = dict(weights), dict(rewards)
        if not rewards:
            raise ValueError("MultiReward needs at least one component reward")
        missing_w, missing_r = sorted(set(rewards) - set(weights)), sorted(set(weights) - set(rewards))
        if missing_w or missing_r:
            raise ValueError("MultiReward names of weights and rewards differ: "
                             + "; ".join(filter(None, [missing_w and f"no weight for {missing_w}",
                                                       missing_r and f"no reward for {missing_r}"]))
                             + f" (weights: {sorted(weights)}, rewards: {sorted(rewards)})")
        bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float, np.number)) or not math.isfinite(v)}
        if bad:
            raise ValueError(f"MultiReward weights must be finite numbers, got {bad}")
        total = float(sum(weights.values()))
        if total <= 0:
            raise ValueError(f"MultiReward weights sum to {total:g} (weights {weights}); the total must be positive: "
                             "a single weight may be negative (a penalty) or zero (logged only), but a zero or "
                             "negative total would cancel or invert the reward")
        for name, r in rewards.items():
            if not callable(r):
                raise TypeError(f"component {name!r} is not a reward (not callable): {type(r).__name__}")
        self.names = tuple(rewards)  # the order of `rewards`
        self.weights = {k: float(weights[k]) for k in self.names}
        self.rewards = rewards
        self.jittable = all(bool(getattr(r, "jittable", False)) for r in rewards.values())
        self.metrics: dict[str, np.ndarray] = {}

    def __repr__(self):
        terms = " + ".join(f"{w:g}*{k}" for k, w in self.weights.items())
        return f"MultiReward({terms}, jittable={self.jittable})"

    # ------------------------------------------------------------------ shared

    def _check(self, name, scores, n):
        if tuple(np.shape(scores)) != (n,):
            raise ValueError(f"reward component {name!r} returned shape {tuple(np.shape(scores))} for {n} images; "
                             f"each component must return one score per image, shape ({n},)")

    def combine(self, components: Mapping[str, object]):
        """The weighted sum of `components(...)`'s output (JAX or NumPy, as given)."""
        total = None
        for name in self.names:
            term = self.weights[name] * components[name]
            total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------ jittable or host

    def components(self, images, prompts) -> dict:
        """{name: scores [B]} of every component, unweighted (log them as reward/<name>)."""
        if self.jittable:
            import jax.numpy as jnp

            n = images.shape[0]
            out = {}
            for name in self.names:
                scores = self.rewards[name](images, prompts)
                self._check(name, scores, n)
                out[name] = jnp.asarray(scores, jnp.float32)
            return out
        return self._host_components(images, prompts)[0]

    def _host_components(self, images, prompts):
        n = np.shape(images)[0]
        comps, metrics = {}, {}
        for name in self.names:
            scores, extra = host_score(self.rewards[name], images, prompts)
            scores = np.asarray(scores, np.float32)
            self._check(name, scores, n)
            comps[name] = scores
            metrics.update({f"{name}/{k}": np.asarray(v, np.float32) for k, v in (extra or {}).items()})
        return comps, metrics

    def score(self, images, prompts) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total [B], metrics): the components by name and their own metrics as `<name>/<metric>` (host)."""
        comps, metrics = self._host_components(images, prompts)
        return self.combine(comps).astype(np.float32), {**comps, **metrics}

    def __call__(self, images, prompts):
        if self.jittable:
            return self.combine(self.components(images, prompts))
        total, metrics = self.score(images, prompts)
        self.metrics = metrics
        return total

    def as_jax(self, prompts, *, metrics: Sequence[str] = (), sharding=None):
        """Host mode inside jit: `(images, prompt_ids) -> total` or `{"reward", *metrics}` (e.g. metrics=self.names)."""
        if self.jittable:
            raise TypeError("this MultiReward is already jittable (every component is): call it directly under jit")
        return as_jax(self, prompts, metrics=metrics, sharding=sharding)
