"""The SD3 / SD3.5 (and FLUX.1) world as the RL trainer sees it: prompts, their conditioning, and the reward
of a latent.

    pipe = SD3Pipeline.from_pretrained("stable-diffusion-3.5-medium")
    world = SD3World(pipe, load_prompt_folder("dataset/geneval", "train"), flowjax.rewards.load("geneval_remote"),
                     eval_prompts=load_prompt_folder("dataset/geneval", "test"))
    trainer = Trainer(config, workdir, model=pipe.transformer, world=world)

With a `FluxPipeline` the same world runs FLUX.1: CLIP-L pooled + T5 conditioning (`FluxPipeline.encode_prompt`),
the FLUX VAE, FLUX.1-dev's embedded guidance (`model_guidance`, passed to the transformer by the trainer) and the
pipeline's resolution-dependent schedule (`sigmas(num_steps)`, used with `sample.shift = "dynamic"`).

The trainer's world interface, and what this world does for each part:

- `num_prompts`, `channels` (the latent channels), `latent_size` (of `resolution`), `captions(ids)`,
  `task_names(ids)` (GenEval prompts: their `tag`), `eval_world` (the held-out split, when given).
- `encode(ids) -> (ctx, pooled)`: the prompts through `pipe.encode_prompt` on the host (CLIP-L + CLIP-G + T5,
  `max_sequence_length` T5 tokens; Flow-GRPO uses 128). A set of at most `precompute_limit` prompts is
  encoded once, up front; a larger one per batch (only the batch's distinct prompts), so memory stays
  bounded whatever the size of the prompt file. Encoder calls have fixed shapes (chunks of
  `encode_batch_size`, the last one padded), so they compile once.
- `negative(B)`: the empty prompt's embedding (as Flow-GRPO's `neg_prompt_embed`), computed once.
- `reward(samples, ids)`: traceable; called inside the trainer's jitted `score`. The latents go through the
  VAE decoder (`latents / scaling_factor + shift_factor`) to images in [0, 1], then the reward:
    * a jittable Flax reward (`flowjax.rewards.load("pickscore", ...)`: `tokenize` / `score(params, images,
      tokens)` / `params`): the prompts are tokenised once on the host into a table, and
      `score(params, images, table[ids])` runs inside the jitted step; one that names per-sample
      `metric_names` (the OCR reward's `accuracy`) is called as `evaluate(params, images, tokens) ->
      {"reward": [B], name: [B], ...}` instead;
    * a host reward (`geneval_remote`, `remote`, `callback`): through its `as_jax` bridge
      (`jax.pure_callback`) over this world's prompt table;
    * a `MultiReward`: each component by its own route, then the weighted sum; every component is
      returned by `score` as `<name>` (unweighted) so it can be logged as `reward/<name>`.
  Each reward sees a prompt as a dict: `{"prompt": text, **metadata}` (the GenEval record itself for
  GenEval prompts; `{"prompt", "text": target}` for OCR lines), so the GenEval server gets its records, a
  JSON server both the prompt and the metadata, and a CLIP reward the prompt text.
- `score(samples, ids, state=None) -> {"reward": [B], name: [B], ...}`: the reward and every named
  quantity the reward provides (multi-reward components, host metrics such as GenEval's `accuracy` =
  strict_rewards, the OCR reward's `accuracy`). `accuracy(samples, ids)` exists only when the reward
  provides an `accuracy` metric (GenEval, OCR); a host reward's single server call serves both `reward`
  and `accuracy` of the same samples (the last results are kept, keyed by a fingerprint of images and
  prompts).
- `state`: the arrays `reward`/`score`/`accuracy` read (VAE decoder weights, Flax reward weights, token
  tables). Called as `reward(samples, ids)` they are closed over, i.e. baked into the jitted program as
  constants; a trainer that passes `world.state` as a jitted argument, `reward(samples, ids, state=...)`,
  avoids that (and the copies it makes), which matters at SD3.5 scale (a 1 GB PickScore model).
- `images(samples)`: decoded images in [0, 1] (host, for sample grids).

`flowjax.data.prompts.load_prompts(...)` reads the train / test splits of a prompt folder (GenEval metadata JSONL, OCR or plain
line files) or, for GenEval without a folder, generates GenEval-style prompts.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax.data.prompts import PromptSet, reward_prompts

__all__ = ["SD3World"]


# ----------------------------------------------------------------------------------------------- rewards


def _fingerprint(images: np.ndarray, prompts: Sequence) -> bytes:
    """A cheap key of a host reward call: shape, about 64k strided pixels, the prompts."""
    flat = np.ascontiguousarray(images).reshape(-1)
    step = max(1, flat.size // 65536)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(images.shape).encode())
    h.update(np.ascontiguousarray(flat[::step]).tobytes())
    h.update(repr(list(prompts)).encode())
    return h.digest()


class _Remembering:
    """A host reward that keeps its last results: `reward` and `accuracy` of the same samples (separate
    callbacks in one jitted function) cost one server call."""

    def __init__(self, reward, size: int = 64):
        from flowjax.rewards.remote import host_score

        self.reward, self._score, self.size = reward, host_score, size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def score(self, images, prompts):
        images = np.asarray(images)
        key = _fingerprint(images, prompts)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = self._score(self.reward, images, prompts)
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return value


def _is_jittable(reward) -> bool:
    return bool(getattr(reward, "jittable", False)) and hasattr(reward, "score") and hasattr(reward, "tokenize")


def _host_metric_names(reward, extra: Sequence[str]) -> tuple[str, ...]:
    """Per-sample metrics a host reward is known to return (plus the configured ones)."""
    from flowjax.rewards.remote import GenEvalRemoteReward

    names = list(getattr(reward, "metric_names", ()) or ())
    if isinstance(reward, GenEvalRemoteReward):
        names.append("accuracy")  # strict_rewards
        if not reward.only_strict:
            names.append("geneval_accuracy")  # the original GenEval rule
    names += list(extra)
    return tuple(dict.fromkeys(names))


class _Component:
    """One reward term: jittable (token table + params) or host (an `as_jax` bridge over the prompt table)."""

    def __init__(self, name: str, reward, weight: float, table: list[dict], metrics: Sequence[str], sharding):
        self.name, self.reward, self.weight = name, reward, float(weight)
        self.jittable = _is_jittable(reward)
        if self.jittable:
            tokens = reward.tokenize(table)
            self.tokens = None if tokens is None else jnp.asarray(np.asarray(tokens))
            self.params = getattr(reward, "params", None)
            # a jittable reward with per-sample metrics (the OCR reward's accuracy) returns them from `evaluate`
            self.metrics: tuple[str, ...] = tuple(getattr(reward, "metric_names", ()) or ())
        elif callable(reward) or hasattr(reward, "score"):
            from flowjax.rewards.remote import as_jax

            self.tokens = self.params = None
            self.metrics = _host_metric_names(reward, metrics)
            self.bridge = as_jax(_Remembering(reward), table, metrics=self.metrics, sharding=sharding)
        else:
            raise TypeError(f"reward {name!r} is neither a jittable Flax reward (tokenize / score / params) nor a host "
                            f"reward (callable on images and prompts): {type(reward).__name__}")

    def __call__(self, images, ids, params, tokens) -> dict:
        """{"reward": [B], metric: [B], ...} of this component."""
        if self.jittable:
            toks = None if tokens is None else tokens[ids]
            if self.metrics:
                out = self.reward.evaluate(params, images, toks)
                return {k: jnp.asarray(out[k], jnp.float32) for k in ("reward", *self.metrics)}
            return {"reward": jnp.asarray(self.reward.score(params, images, toks), jnp.float32)}
        out = self.bridge(images, ids)
        return dict(out) if isinstance(out, Mapping) else {"reward": out}


# ----------------------------------------------------------------------------------------------- the world


class SD3World:
    """Prompts, conditioning and reward of an `SD3Pipeline` for the RL trainer (see the module docstring).

    Args:
      pipe: the `SD3Pipeline` (its transformer is the trainer's model; the world uses the text encoders and
        the VAE).
      prompts: the training `PromptSet`; prompt ids index it.
      reward: a reward from `flowjax.rewards.load` (jittable Flax, host, or MultiReward).
      eval_prompts: the held-out `PromptSet` (-> `eval_world`), or None.
      resolution: image side in pixels (the latent side is resolution / vae_scale_factor).
      max_sequence_length: T5 tokens (Flow-GRPO: 128).
      precompute_limit: encode every prompt up front when there are at most this many, else per batch.
      encode_batch_size: prompts per text-encoder call.
      metrics: more per-sample metric names of a host reward to return from `score` (e.g. the extra keys
        of a JSON reward server's reply).
      sharding: a NamedSharding of the batch (the trainer's); when given, a host reward is called per
        shard (each host scores its own rows: needed in multi-process runs).
    """

    def __init__(self, pipe, prompts: PromptSet, reward, *, eval_prompts: PromptSet | None = None,
                 resolution: int = 512, max_sequence_length: int = 128, precompute_limit: int = 256,
                 encode_batch_size: int = 32, metrics: Sequence[str] = (), sharding=None, guidance: float = 3.5,
                 _shared=None):
        if len(prompts) == 0:
            raise ValueError("the SD3 world needs at least one prompt")
        self.pipe, self.prompts, self.reward_fn = pipe, prompts, reward
        from flowjax.pipeline import FluxPipeline

        self.flux = isinstance(pipe, FluxPipeline)
        # FLUX.1-dev's distilled guidance, an input of its transformer (None: SD3, FLUX.1-schnell).
        self.model_guidance = float(guidance) if self.flux and pipe.transformer.config.guidance_embeds else None
        self.resolution = int(resolution)
        self.latent_size = pipe.check_size(self.resolution, self.resolution)
        self.max_sequence_length = int(max_sequence_length)
        self.encode_batch_size = max(1, int(encode_batch_size))
        self._texts = prompts.texts()
        self._table = reward_prompts(prompts)
        tags = [r.metadata.get("tag") for r in prompts]
        self._tags = tags if all(isinstance(t, str) for t in tags) else None

        # The reward: one component, or every component of a MultiReward, each by its own route.
        from flowjax.rewards.multi import MultiReward

        if isinstance(reward, MultiReward):
            named = [(n, reward.rewards[n], reward.weights[n]) for n in reward.names]
            self.multi = True
        else:
            named = [(getattr(reward, "name", None) or type(reward).__name__.lower(), reward, 1.0)]
            self.multi = False
        self.components = [_Component(n, r, w, self._table, metrics, sharding) for n, r, w in named]

        # Shared with the eval world: the VAE decoder, the negative embedding.
        if _shared is None:
            vae_graphdef, vae_state = nnx.split(pipe.vae)
            neg_ctx, neg_pooled = self._encode_texts([""])
            _shared = dict(vae_graphdef=vae_graphdef, vae_state=vae_state, neg=(neg_ctx[0], neg_pooled[0]))
        else:
            _shared = {**_shared, "owner": False}
        self._shared = _shared
        self._vae_graphdef = _shared["vae_graphdef"]
        self.neg_ctx, self.neg_pooled = _shared["neg"]
        self.state = {
            "vae": _shared["vae_state"],
            "reward": {c.name: c.params for c in self.components},
            "tokens": {c.name: c.tokens for c in self.components},
        }

        self._table_ctx = self._table_pooled = None
        if len(prompts) <= int(precompute_limit):
            self._table_ctx, self._table_pooled = self._encode_texts(self._texts)

        # accuracy / task names only where they exist (the trainer checks with hasattr).
        if self._accuracy_key() is not None:
            self.accuracy = self._accuracy
        if self._tags is not None:
            self.task_names = self._task_names

        self.eval_world = None
        if eval_prompts is not None and len(eval_prompts):
            self.eval_world = SD3World(pipe, eval_prompts, reward, resolution=resolution,
                                       max_sequence_length=max_sequence_length, precompute_limit=precompute_limit,
                                       encode_batch_size=encode_batch_size, metrics=metrics, sharding=sharding,
                                       guidance=guidance, _shared=_shared)
        # When every prompt this world (and its eval world) will see is encoded, the text encoders (T5-XXL alone
        # is 9.5 GB in bf16) leave device memory: training never runs them again.
        tables = [w for w in (self, self.eval_world) if w is not None]
        if _shared.get("owner", True) and all(w._table_ctx is not None for w in tables):
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                setattr(pipe, name, None)
            self.encoders_released = True

    # ------------------------------------------------------------------ sizes and text

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def sigmas(self, num_steps: int):
        """The pipeline's own schedule at this world's resolution (FLUX: the resolution-dependent shift)."""
        if not self.flux:
            raise ValueError("sample.shift='dynamic' needs a FLUX pipeline; SD3 configs give a number (3.0)")
        return self.pipe.sigmas(num_steps, self.resolution, self.resolution)

    @property
    def channels(self) -> int:
        return self.pipe.latent_channels

    def captions(self, prompt_ids) -> list[str]:
        return [self._texts[int(i)] for i in np.asarray(prompt_ids).reshape(-1)]

    def _task_names(self, prompt_ids) -> list[str]:
        return [self._tags[int(i)] for i in np.asarray(prompt_ids).reshape(-1)]

    # ------------------------------------------------------------------ conditioning (host)

    encoders_released = False

    def _encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ctx [N, L, D], pooled [N, P]) host arrays in the pipeline's dtype, in fixed-size encoder calls."""
        if self.encoders_released:
            raise RuntimeError("this SD3 world released its text encoders after encoding its prompt tables")
        n = min(self.encode_batch_size, len(texts))
        ctxs, pooleds = [], []
        for i in range(0, len(texts), n):
            chunk = texts[i:i + n]
            padded = chunk + [chunk[-1]] * (n - len(chunk))
            kw = {} if self.flux else {"do_classifier_free_guidance": False}
            ctx, pooled, _, _ = self.pipe.encode_prompt(padded, max_sequence_length=self.max_sequence_length, **kw)
            ctx, pooled = jax.device_get((ctx, pooled))
            ctxs.append(np.asarray(ctx)[:len(chunk)])
            pooleds.append(np.asarray(pooled)[:len(chunk)])
        return np.concatenate(ctxs), np.concatenate(pooleds)

    def encode(self, prompt_ids):
        """(ctx [B, L, D], pooled [B, P]) of the prompts (host arrays)."""
        ids = np.asarray(prompt_ids).reshape(-1).astype(np.int64)
        if self._table_ctx is not None:
            return self._table_ctx[ids], self._table_pooled[ids]
        unique, inverse = np.unique(ids, return_inverse=True)
        ctx, pooled = self._encode_texts([self._texts[int(i)] for i in unique])
        return ctx[inverse], pooled[inverse]

    def negative(self, batch: int):
        """The empty prompt's (ctx, pooled), repeated `batch` times."""
        return (np.broadcast_to(self.neg_ctx, (batch, *self.neg_ctx.shape)),
                np.broadcast_to(self.neg_pooled, (batch, *self.neg_pooled.shape)))

    # ------------------------------------------------------------------ images and rewards (traceable)

    def decode(self, samples, state=None) -> jax.Array:
        """Latents [B, h, w, C] -> images [B, H, W, 3] float32 in [0, 1] (traceable)."""
        vae_state = self.state["vae"] if state is None else state["vae"]
        return nnx.merge(self._vae_graphdef, vae_state).latents_to_images(samples).astype(jnp.float32)

    def images(self, samples) -> jax.Array:
        """Decoded images in [0, 1] (the pipeline's jitted VAE decode; for sample grids)."""
        return self.pipe.decode(samples)

    def score(self, samples, prompt_ids, state=None) -> dict[str, jax.Array]:
        """{"reward": [B] (the weighted total), plus every named quantity: for a MultiReward each component
        (unweighted) as `<name>` and its metrics as `<name>/<metric>`; for a single host reward its metrics
        (GenEval: `accuracy`, `geneval_accuracy`)}."""
        state = self.state if state is None else state
        ids = jnp.asarray(prompt_ids).astype(jnp.int32)
        images = self.decode(samples, state)
        out, total = {}, None
        for c in self.components:
            part = c(images, ids, state["reward"][c.name], state["tokens"][c.name])
            term = c.weight * part["reward"] if self.multi else part["reward"]
            total = term if total is None else total + term
            if self.multi:
                out[c.name] = part["reward"]
                out.update({f"{c.name}/{k}": v for k, v in part.items() if k != "reward"})
            else:
                out.update({k: v for k, v in part.items() if k != "reward"})
        return {"reward": total.astype(jnp.float32), **out}

    def reward(self, samples, prompt_ids, state=None) -> jax.Array:
        """Rewards [B] float32 of latent samples (traceable; see the module docstring)."""
        return self.score(samples, prompt_ids, state)["reward"]

    def _accuracy_key(self) -> str | None:
        for c in self.components:
            if "accuracy" in c.metrics:
                return f"{c.name}/accuracy" if self.multi else "accuracy"
        return None

    def _accuracy(self, samples, prompt_ids, state=None) -> jax.Array:
        """Strict accuracy [B] (GenEval: strict_rewards), where the reward provides one."""
        return self.score(samples, prompt_ids, state)[self._accuracy_key()]

    @property
    def score_names(self) -> tuple[str, ...]:
        """The keys `score` returns besides "reward" (what a trainer can log as reward/<name>)."""
        names = []
        for c in self.components:
            if self.multi:
                names += [c.name] + [f"{c.name}/{m}" for m in c.metrics]
            else:
                names += list(c.metrics)
        return tuple(names)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{c.name}{'' if c.jittable else ' (host)'}" for c in self.components)
        return (f"SD3World({self.num_prompts} prompts, {self.resolution}px -> latent {self.latent_size} x "
                f"{self.channels}, reward: {kinds}, eval: {self.eval_world.num_prompts if self.eval_world else 0})")
