"""Worlds: what the RL trainer trains in. A world joins a prompt set, the conditioning of its prompts and
a reward of the sampled latents; the trainer knows nothing else about text encoders, decoders or rewards.

  toy      a fixed random embedding per prompt, reward = closeness of the sample's channel means to a
           per-prompt colour (`flowjax.worlds.toy.ToyWorld`, configs/toy.py)
  shapes   the shipped tiny text-to-image base model, GenEval-style captions and the verifiable shapes
           reward (`flowjax.worlds.shapes.ShapesWorld`, configs/shapes.py)
  sd3      a diffusers SD3 / SD3.5 pipeline folder, a prompt set and any reward of `flowjax.rewards`
           (`flowjax.worlds.sd3.SD3World`, configs/geneval.py, ocr.py, pickscore.py)

The interface, written down once (`World` below is its checkable form). Prompt ids are integers indexing
the world's prompt list; `samples` are final latents [B, h, w, C] in the model's space.

Required:
  num_prompts -> int
  channels -> int                                   latent channels C
  encode(ids) -> (ctx [B, L, D], pooled [B, P])     conditioning of the prompts (host or device arrays)
  negative(B) -> (ctx [B, L, D], pooled [B, P])     the empty prompt's, for classifier-free guidance
  score(samples, ids, state=None) -> {"reward": [B], name: [B], ...}
      traceable (the trainer calls it inside jit on global arrays); "reward" is what advantages are
      computed from, every other key is logged as reward/<name> (e.g. a strict "accuracy", reward
      components). `state` is the pytree of arrays the score reads (VAE, reward weights, token tables),
      passed as a jit argument so that large weights are not baked into the program as constants.
Optional (the trainer checks with hasattr / getattr):
  state                      the default `state` above
  eval_world                 a world over the held-out prompts, used for evaluation
  images(samples)            images [B, H, W, 3] in [0, 1], for sample grids
  captions(ids)              prompt texts, for sample grids
  task_names(ids)            a task per prompt, for per-task evaluation accuracies
  cond_shapes                ([L, D], [P]) of one row's conditioning, for `flowjax.plan`
  model_guidance             a float passed to the transformer as `guidance` [B] (FLUX.1-dev), or None
  sigmas(num_steps)          the world's own schedule, used with `sample.shift = "dynamic"` (FLUX)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["World", "check_world"]


@runtime_checkable
class World(Protocol):
    """The members every world has (see the module docstring for their meaning)."""

    @property
    def num_prompts(self) -> int: ...

    @property
    def channels(self) -> int: ...

    def encode(self, prompt_ids) -> tuple[Any, Any]: ...

    def negative(self, batch: int) -> tuple[Any, Any]: ...

    def score(self, samples, prompt_ids, state=None) -> dict: ...


def check_world(world) -> None:
    """Raises a TypeError naming what a world lacks of the interface."""
    missing = [name for name in ("num_prompts", "channels", "encode", "negative", "score") if not hasattr(world, name)]
    if missing:
        raise TypeError(f"{type(world).__name__} is not a flowjax world: it lacks {', '.join(missing)} "
                        "(see flowjax.worlds for the interface)")
