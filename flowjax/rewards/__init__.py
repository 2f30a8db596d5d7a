"""Rewards: `load(name, path=None, **options) -> reward`, `reward(images [B,H,W,3] in [0,1], prompts) -> scores [B]`.

`prompts` are strings or the metadata dicts of a prompt set. Names:

  shapes          the shapes world's verifiable reward (no path); options: metric="reward" | "accuracy",
                  detector=flowjax.rewards.shapes.Detector(...)
  pickscore       path = transformers CLIPModel folder (PickScore_v1); options: tokenizer, divisor (26),
                  preprocess={...}, dtype, param_dtype, mesh, attention_impl
  clipscore       path = transformers CLIPModel folder (CLIP-L/14); same options, divisor 30
  aesthetic       clip_path = CLIP-L/14 folder (path is taken as clip_path), head_path = LAION MLP .pth
  hpsv2           path = HPS_v2(.1)_compressed.pt; options: tokenizer, model_cfg, preprocess, ...
  ocr             Flow-GRPO's OCR reward on PP-OCRv4 (flowjax.rewards.ocr.OCRReward); path = a folder with the
                  detection and recognition ONNX files, None = those of an installed rapidocr-onnxruntime;
                  options: preset ("paddleocr" | "rapidocr"), max_boxes, max_width, rec_widths, chunk,
                  max_target_chars, workers, dict_path
  remote          flowjax.rewards.remote.RemoteReward(url=..., **options) (path is taken as url)
  geneval_remote  flowjax.rewards.remote.GenEvalRemoteReward(url=..., **options)
  callback        flowjax.rewards.remote.CallbackReward(fn=..., **options)
  multi           flowjax.rewards.multi.MultiReward(weights={name: w}, rewards={name: reward or
                  {"name": ..., "path": ..., **options}}) - a dict component is loaded with `load`

The Flax rewards (shapes, pickscore, clipscore, aesthetic, hpsv2, ocr) are jittable:
`reward.tokenize(prompts)` turns prompts into an int32 array on the host (CLIP token ids; the shapes
world's specs; the OCR targets' code points), and
`reward.score(reward.params, images, tokens)` is a pure JAX function to call inside a jitted step
(pass `reward.params` as an argument, so the weights are not baked into the program as constants).
`reward(images, tokens)` with such an int array in place of the prompts is jittable too. A jittable
reward with per-sample metrics names them in `reward.metric_names` and returns them, with the reward, from
`reward.evaluate(params, images, tokens) -> {"reward": [B], name: [B]}` (ocr: "accuracy"). Modules
are imported when their name is loaded, so a missing optional dependency only matters when used.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["NAMES", "load", "ShapesReward"]

NAMES = ("shapes", "pickscore", "clipscore", "aesthetic", "hpsv2", "ocr", "remote", "geneval_remote", "callback",
         "multi")


class ShapesReward:
    """The shapes world's reward (`flowjax.rewards.shapes.score`) behind the common reward interface.

    prompts: `flowjax.data.shapes.Prompt`s, their captions, metadata dicts with a "spec" (or a
    caption under "prompt" / "text"), or an int array of specs [B, 8] (jittable).
    """

    name = "shapes"
    jittable = True
    params = None

    def __init__(self, metric: str = "reward", detector=None):
        from flowjax.rewards import shapes as shapes_reward

        if metric not in ("reward", "accuracy"):
            raise ValueError(f"metric must be 'reward' (partial credit) or 'accuracy' (strict), got {metric!r}")
        self.metric = metric
        self.detector = detector if detector is not None else shapes_reward.Detector()
        self._by_text = None

    def tokenize(self, prompts: Sequence[Any]) -> np.ndarray:
        """int32 specs [B, 8] (see `flowjax.data.shapes.Prompt.spec`)."""
        from flowjax.data import shapes as world

        if isinstance(prompts, np.ndarray) and prompts.dtype.kind in "iu":
            return prompts.astype(np.int32)
        specs = []
        for p in prompts:
            if isinstance(p, world.Prompt):
                specs.append(p.spec())
                continue
            if isinstance(p, dict) and "spec" in p:
                specs.append(np.asarray(p["spec"], np.int32))
                continue
            text = p if isinstance(p, str) else (p.get("prompt") or p.get("text")) if isinstance(p, dict) else None
            if not isinstance(text, str):
                raise TypeError(f"a shapes prompt must be a Prompt, a caption, or a dict with 'spec' / 'prompt'; "
                                f"got {p!r}")
            if self._by_text is None:
                self._by_text = {q.text: q for q in world.all_prompts()}
            if text not in self._by_text:
                raise ValueError(f"{text!r} is not a caption of the shapes world (flowjax.data.shapes.all_prompts())")
            specs.append(self._by_text[text].spec())
        return np.stack(specs).astype(np.int32)

    def score(self, params, images, specs):
        """Scores [B] of images [B, H, W, 3] in [0, 1] against specs [B, 8]; pure JAX (params: None)."""
        del params
        return _shapes_score(images, specs, self.detector)[self.metric]

    def __call__(self, images, prompts):
        import jax

        specs = prompts if isinstance(prompts, jax.Array) else self.tokenize(prompts)
        return self.score(None, images, specs)


def _shapes_score(images, specs, detector):
    """flowjax.rewards.shapes.score, jitted once per detector (shared by every ShapesReward)."""
    global _SHAPES_JIT
    if _SHAPES_JIT is None:
        import jax

        from flowjax.rewards import shapes as shapes_reward

        _SHAPES_JIT = jax.jit(shapes_reward.score, static_argnums=2)
    return _SHAPES_JIT(images, specs, detector)


_SHAPES_JIT = None


def _clip_rewards():
    from flowjax.rewards import clip_rewards

    return clip_rewards


def _remote(cls: str):
    try:
        from flowjax.rewards import remote
    except ImportError as e:
        raise ImportError(f"reward {cls} needs flowjax.rewards.remote, which failed to import: {e}") from e
    return getattr(remote, cls)


def _load_aesthetic(path, **options):
    if path is not None and options.get("clip_path") is not None:
        raise TypeError("aesthetic: give the CLIP folder as path or as clip_path, not both")
    clip_path = options.pop("clip_path", path)
    return _clip_rewards().load_aesthetic(clip_path, options.pop("head_path", None), **options)


def _load_url(cls: str, default_url=None):
    def build(path, **options):
        if path is not None and options.get("url") is not None:
            raise TypeError(f"{cls}: give the server address as path or as url, not both")
        url = options.pop("url", path if path is not None else default_url)
        if url is None:
            raise ValueError(f"{cls} needs url='http://host:port/...' (the reward server's address)")
        return _remote(cls)(url=url, **options)
    return build


def _load_geneval(path, **options):
    url = options.pop("url", path)
    cls = _remote("GenEvalRemoteReward")
    return cls(url=url, **options) if url is not None else cls(**options)


def _load_callback(path, **options):
    if path is not None:
        raise TypeError("callback takes no path; pass fn=<callable(images, prompts) -> scores>")
    if "fn" not in options:
        raise ValueError("callback needs fn=<callable(images float32 [B,H,W,3] in [0,1], prompts) -> scores [B]>")
    return _remote("CallbackReward")(**options)


def _load_multi(path, **options):
    if path is not None:
        raise TypeError("multi takes no path; pass weights={name: w} and rewards={name: reward or spec dict}")
    try:
        from flowjax.rewards.multi import MultiReward
    except ImportError as e:
        raise ImportError(f"reward 'multi' needs flowjax.rewards.multi, which failed to import: {e}") from e
    if "weights" not in options or "rewards" not in options:
        raise ValueError("multi needs weights={name: weight} and rewards={name: reward or "
                         "{'name': ..., 'path': ..., **options}}")
    rewards = {}
    for key, value in dict(options.pop("rewards")).items():
        if isinstance(value, Mapping):  # a spec: loaded by name (default: the component's key)
            spec = dict(value)
            rewards[key] = load(spec.pop("name", key), spec.pop("path", None), **spec)
        else:
            rewards[key] = value
    return MultiReward(weights=options.pop("weights"), rewards=rewards, **options)


def _load_ocr(path, **options):
    from flowjax.rewards.ocr import OCRReward

    return OCRReward(path, **options)


def _load_shapes(path, **options):
    if path is not None:
        raise TypeError("shapes takes no path (its reward is computed from the pixels)")
    return ShapesReward(**options)


def _with_path(fn_name: str):
    return lambda path, **options: getattr(_clip_rewards(), fn_name)(path, **options)


_LOADERS: dict[str, Callable] = {
    "shapes": _load_shapes,
    "pickscore": _with_path("load_pickscore"),
    "clipscore": _with_path("load_clipscore"),
    "aesthetic": _load_aesthetic,
    "hpsv2": _with_path("load_hpsv2"),
    "ocr": _load_ocr,
    "remote": _load_url("RemoteReward"),
    "geneval_remote": _load_geneval,
    "callback": _load_callback,
    "multi": _load_multi,
}
assert tuple(_LOADERS) == NAMES


def load(name: str, path=None, **options):
    """The reward called `name` (see the module doc for names, paths and options)."""
    if not isinstance(name, str) or name.lower() not in _LOADERS:
        raise ValueError(f"unknown reward {name!r}; the rewards are {', '.join(NAMES)}")
    name = name.lower()
    try:
        return _LOADERS[name](path, **options)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise TypeError(f"reward {name!r}: {e}; see flowjax.rewards.load's documentation for its options"
                        + _signature_hint(name)) from None


def _signature_hint(name: str) -> str:
    target = {"pickscore": "load_pickscore", "clipscore": "load_clipscore", "aesthetic": "load_aesthetic",
              "hpsv2": "load_hpsv2"}.get(name)
    if target is None:
        return ""
    try:
        return f" ({target}{inspect.signature(getattr(_clip_rewards(), target))})"
    except Exception:  # noqa: BLE001 - only a hint
        return ""
