"""What the SD3 and FLUX pipelines share: reading a diffusers pipeline folder, host tokenization, the initial
noise, the jitted sampling loop (with classifier-free guidance) and the jitted VAE decode.

Tokenisation runs on the host with the `transformers` tokenizers (`pip install 'flowjax[pipeline]'`); the text
encoders, the denoising loop and the VAE decode each run as one jitted function. The models are split into graph
and state at every call, so an adapter attached to `pipe.transformer` (e.g. by `flowjax.convert.lora.load_lora`)
is used by the next call.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax import sampling
from flowjax.convert.safetensors_io import CheckpointError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'flowjax[pipeline]'"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
MAX_SEQUENCE_LENGTH = 512  # diffusers refuses longer T5 sequences (SD3 and FLUX alike)
NUM_TRAIN_TIMESTEPS = 1000


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "flowjax.pipeline tokenizes prompts with the `transformers` tokenizers, which are not installed; "
            f"install them with: {INSTALL_HINT}"
        ) from e
    return transformers


# --------------------------------------------------------------------------- reading a pipeline folder


@dataclasses.dataclass(frozen=True)
class PipelineKind:
    """A diffusers pipeline family flowjax loads: model_index.json's `_class_name` prefix and its components."""

    class_prefix: str  # e.g. "StableDiffusion3": StableDiffusion3Pipeline and its variants
    class_name: str  # the diffusers pipeline class, for messages
    loader: str  # the flowjax class that loads it
    description: str  # e.g. "Stable Diffusion 3 / 3.5"
    required: tuple[str, ...]  # component folders every such pipeline has
    example: str  # a model repository, for messages


KINDS: dict[str, PipelineKind] = {}


def register(kind: PipelineKind) -> PipelineKind:
    KINDS[kind.class_name] = kind
    return kind


def kind_of_index(index: dict) -> PipelineKind | None:
    cls = index.get("_class_name")
    return next((k for k in KINDS.values() if isinstance(cls, str) and cls.startswith(k.class_prefix)), None)


def read_model_index(path, kind: PipelineKind | None = None) -> dict:
    """The parsed `model_index.json` of a diffusers pipeline folder of `kind` (any flowjax loads when None);
    CheckpointError naming the fix otherwise."""
    root = Path(path)
    kinds = [kind] if kind is not None else list(KINDS.values())
    what = " / ".join(k.description for k in kinds)
    if not root.is_dir():
        raise CheckpointError(
            f"{root} is not a folder; give a diffusers {what} pipeline folder (the one holding {MODEL_INDEX}, "
            "transformer/, vae/, text_encoder*/, tokenizer*/ and scheduler/), e.g. a local download of "
            f"{' or '.join(k.example for k in kinds)}"
        )
    file = root / MODEL_INDEX
    if not file.is_file():
        hint = ""
        if (root / "config.json").is_file() or (root / SCHEDULER_CONFIG).is_file():
            what = "a single model"
            try:
                cls = json.loads((root / "config.json").read_text()).get("_class_name")
                what = f"a single {cls}" if cls else what
            except (OSError, ValueError, AttributeError):
                pass
            parent = root.parent
            where = f" ({parent} holds one)" if (parent / MODEL_INDEX).is_file() else ""
            hint = (f": this looks like {what} folder, a component of a pipeline; give the pipeline folder above it, "
                    f"the one with {MODEL_INDEX}{where}. Single models load with flowjax.convert's loaders "
                    "(load_transformer, load_vae, load_clip_text, load_t5)")
        elif any((root / c).is_dir() for k in kinds for c in k.required):
            hint = (f": the component folders are there but {MODEL_INDEX} is not; copy it from the model repository "
                    "(it is the small JSON file at its top level)")
        raise CheckpointError(f"no {MODEL_INDEX} in {root}{hint}")
    try:
        index = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    found = kind_of_index(index)
    if found is None or (kind is not None and found is not kind):
        other = f" (load it with flowjax.pipeline.{found.loader})" if found is not None else ""
        names = " or ".join(f"a {k.class_name}" for k in kinds)
        loaders = " / ".join(f"flowjax.pipeline.{k.loader}" for k in kinds)
        raise CheckpointError(
            f"{file} describes a {index.get('_class_name')!r}, not {names}{other}; {loaders} loads "
            f"{what} pipelines only"
        )
    return index


def listed(index: dict, name: str) -> bool:
    """Whether model_index.json names a component (diffusers writes [null, null] for an absent one)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and any(e is not None for e in entry)


def check_components(root: Path, index: dict, kind: PipelineKind) -> None:
    """Every required component is listed in model_index.json and has its folder."""
    for name in kind.required:
        if not listed(index, name):
            raise CheckpointError(
                f"{root / MODEL_INDEX} lists no {name}; a {kind.description} pipeline needs {', '.join(kind.required)}"
            )
        if not (root / name).is_dir():
            raise CheckpointError(
                f"missing component folder {root / name} (listed in {MODEL_INDEX}); download the complete "
                f"pipeline folder, with all of {', '.join(kind.required)}"
            )


def open_folder(path, kind: PipelineKind) -> tuple[Path, dict]:
    """(root, parsed model_index.json) of a pipeline folder of `kind` whose required components are all there."""
    root = Path(path)
    index = read_model_index(root, kind)
    check_components(root, index, kind)
    return root, index


def load_transformer_and_vae(root: Path, *, attention_impl: str = "xla", remat: str = "none", **kw) -> dict:
    """The `transformer` (MMDiT or Flux, by its config) and `vae` of a pipeline folder, with the loaders' options;
    `attention_impl` and `remat` are the transformer's."""
    from flowjax.convert.transformer import load_transformer
    from flowjax.convert.vae import load_vae

    return dict(transformer=load_transformer(root / "transformer", attention_impl=attention_impl, remat=remat, **kw),
                vae=load_vae(root / "vae", **kw))


def read_scheduler_json(path, *, pipeline: str, unsupported: tuple[str, ...], supported_text: str) -> dict:
    """The raw `scheduler_config.json` of a FlowMatchEulerDiscreteScheduler folder, with every option that changes
    the schedule in a way flowjax does not replay (`unsupported`, or another num_train_timesteps) refused."""
    folder = Path(path)
    file = folder / SCHEDULER_CONFIG
    if not file.is_file():
        raise CheckpointError(
            f"no {SCHEDULER_CONFIG} in {folder}; the pipeline's scheduler folder is incomplete: copy it from the "
            "model repository"
        )
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    cls = raw.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if cls != "FlowMatchEulerDiscreteScheduler":
        raise CheckpointError(f"{file} describes a {cls}; {pipeline} samples with FlowMatchEulerDiscreteScheduler")
    bad = {k: raw[k] for k in unsupported if raw.get(k)}
    if raw.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        bad["num_train_timesteps"] = raw["num_train_timesteps"]
    if bad:
        raise CheckpointError(f"{file} sets {bad}; flowjax samples {supported_text}: remove these options")
    return raw


def positive(raw: dict, name: str, default: float, file) -> float:
    value = float(raw.get(name, default) if raw.get(name) is not None else default)
    if not value > 0:
        raise CheckpointError(f"{file}: {name} must be positive, got {value}")
    return value


# Files from which transformers can build each tokenizer.
_TOKENIZER_FILES = {
    "clip": ((("tokenizer.json",), ("vocab.json", "merges.txt")), "tokenizer.json, or vocab.json + merges.txt"),
    "t5": ((("tokenizer.json",), ("spiece.model",)), "tokenizer.json or spiece.model"),
}


def load_tokenizer(path, kind: str):
    """A transformers tokenizer from a pipeline's tokenizer folder; `kind` "clip" or "t5"."""
    folder = Path(path)
    options, need = _TOKENIZER_FILES[kind]
    if not folder.is_dir():
        raise CheckpointError(
            f"missing tokenizer folder {folder} (it should hold {need}); copy the pipeline's {folder.name}/ folder "
            "from the model repository"
        )
    present = {p.name for p in folder.iterdir()}
    if not any(all(f in present for f in group) for group in options):
        raise CheckpointError(
            f"no tokenizer files in {folder}: it holds {sorted(present) or 'nothing'} but needs {need}; copy the "
            f"pipeline's {folder.name}/ folder from the model repository"
        )
    transformers = _transformers()
    try:
        if (folder / "tokenizer_config.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(folder)
        cls = transformers.CLIPTokenizer if kind == "clip" else transformers.T5TokenizerFast
        return cls.from_pretrained(folder)
    except ImportError as e:  # e.g. only spiece.model and no sentencepiece
        raise ImportError(f"loading the tokenizer in {folder} needs a missing package ({e}); {INSTALL_HINT}") from e
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken folder
        raise CheckpointError(f"could not load the tokenizer in {folder}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- prompts


def as_prompts(prompts, what="prompts") -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{what} is empty; give at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be strings, got {bad[:3]}")
    return prompts


def with_negatives(prompts, negative_prompt, with_negative: bool) -> list[str]:
    """The prompts, followed (when `with_negative`) by one negative per prompt: `negative_prompt` is one string
    for all (None means "") or a list of len(prompts). Positives and negatives go through the encoders together."""
    prompts = as_prompts(prompts)
    if not with_negative:
        return prompts
    negative_prompt = "" if negative_prompt is None else negative_prompt
    negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
                 else as_prompts(negative_prompt, "negative_prompt"))
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries but there are {len(prompts)} prompts; "
                         "give one string, or one per prompt")
    return prompts + negatives


def check_max_sequence_length(max_sequence_length) -> int:
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) or not (
        1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH
    ):
        raise ValueError(f"max_sequence_length must be an integer in 1..{MAX_SEQUENCE_LENGTH}, "
                         f"got {max_sequence_length!r}")
    return int(max_sequence_length)


def tokenize(tokenizer, prompts, max_length: int, what: str, **kw) -> np.ndarray:
    """Token ids [B, max_length] int32, padded to and truncated at max_length as diffusers' pipelines do; a
    warning names truncated prompts."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np", **kw)["input_ids"]
    full = tokenizer(prompts, padding="longest", **kw)["input_ids"]
    if max(len(r) for r in full) > max_length:
        log.warning("prompts longer than %d %s tokens were truncated", max_length, what)
    return np.asarray(ids, np.int32)


def clip_max_length(tokenizer) -> int:
    """CLIP token count (diffusers: `tokenizer.model_max_length`, 77)."""
    n = getattr(tokenizer, "model_max_length", None)
    return 77 if n is None or n > 10_000 else int(n)  # transformers' "no limit" sentinel is huge


def split_states(*models):
    """(graphdefs, states) of models that may be None, for a jitted function taking graphdefs as static."""
    pairs = [nnx.split(m) if m is not None else (None, None) for m in models]
    return tuple(g for g, _ in pairs), tuple(s for _, s in pairs)


# --------------------------------------------------------------------------- jitted sampling and decode


@functools.partial(jax.jit, static_argnums=(0, 1))
def _denoise(graphdef, cfg, state, noise, sigmas, ctx, pooled, neg_ctx, neg_pooled, scale, model_guidance):
    """The ODE sample (float32) from `noise` at sigmas[0]: CFG `uncond + scale * (cond - uncond)` from one batched
    forward on [negative; positive] when `cfg`; `model_guidance` [B] is passed to the transformer when not None
    (FLUX.1-dev's distilled guidance)."""
    model = nnx.merge(graphdef, state)
    extra = () if model_guidance is None else (model_guidance,)

    def velocity(x, sigma):
        t = sigma * float(NUM_TRAIN_TIMESTEPS)  # the transformers take diffusers-unit timesteps
        if not cfg:
            return model(x, t, ctx, pooled, *extra).astype(jnp.float32)
        both = lambda a, b: jnp.concatenate([a, b], axis=0)
        v = model(both(x, x), both(t, t), both(neg_ctx, ctx), both(neg_pooled, pooled),
                  *(both(g, g) for g in extra)).astype(jnp.float32)
        v_uncond, v_cond = jnp.split(v, 2, axis=0)
        return v_uncond + scale * (v_cond - v_uncond)

    return sampling.rollout(velocity, noise, sigmas, None, kind="ode").latents[-1]


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, latents):
    return nnx.merge(graphdef, state).latents_to_images(latents)


class TextToImagePipeline:
    """The parts of a flow-matching text-to-image pipeline that do not depend on the model family.

    Subclasses set `transformer`, `vae` and `dtype`, and define `latent_channels`, `size_multiple` (image pixels
    per transformer token a side, `vae_scale_factor * <multiple_name>`) and `max_size` (the largest image side,
    or None).
    """

    transformer: nnx.Module
    vae: nnx.Module

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def tokenizer_max_length(self) -> int:
        """CLIP token count (diffusers: `tokenizer.model_max_length`, 77), for every CLIP encoder."""
        return clip_max_length(self.tokenizer)

    def _check_compatible(self) -> None:
        """The components must fit together as diffusers' pipeline combines them: the subclass's
        `_component_problems()`, the T5 width (`_t5()`) and the VAE's channels, the CLIP tokenizer length within
        each CLIP encoder's positions (`_clip_encoders()`)."""
        problems = self._component_problems()
        t5, joint = self._t5(), self.transformer.config.joint_attention_dim
        if t5 is not None and t5.config.d_model != joint:
            problems.append(f"the T5 width {t5.config.d_model} differs from the transformer's joint_attention_dim "
                            f"{joint}")
        if self.vae.config.latent_channels != self.latent_channels:
            problems.append(f"the VAE's latent_channels {self.vae.config.latent_channels} differ from the "
                            f"transformer's latent channels {self.latent_channels}")
        for name, encoder in self._clip_encoders():
            if self.tokenizer_max_length > encoder.config.max_position_embeddings:
                problems.append(f"the tokenizer pads to {self.tokenizer_max_length} tokens but {name} has only "
                                f"{encoder.config.max_position_embeddings} positions")
        if problems:
            raise CheckpointError("the pipeline's components do not fit together: " + "; ".join(problems))

    @property
    def max_size(self) -> int | None:
        return None

    multiple_name = "2"

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent (h, w) of an image size; ValueError naming valid sizes otherwise."""
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if height % m or width % m:
            raise ValueError(
                f"height and width must be multiples of vae_scale_factor * {self.multiple_name} = {m}, got "
                f"{height}x{width}; use e.g. {max(m, height - height % m)}x{max(m, width - width % m)}"
            )
        limit = self.max_size
        if limit is not None and (height > limit or width > limit):
            raise ValueError(f"{height}x{width} exceeds the largest size this transformer's position table covers, "
                             f"{limit} pixels a side (pos_embed_max_size * {m})")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def prepare_latents(self, batch: int, height: int, width: int, *, latents=None, key=None) -> jax.Array:
        """Initial noise [B, h, w, C] float32: `latents` (NHWC) checked, or drawn from `key` (default key 0)."""
        h, w = self.check_size(height, width)
        shape = (batch, h, w, self.latent_channels)
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(
                    f"latents must be NHWC {shape} for {batch} prompts at {height}x{width} (vae_scale_factor "
                    f"{self.vae_scale_factor}), got {latents.shape}; diffusers' NCHW latents need "
                    ".transpose(0, 2, 3, 1)" + self._latents_hint
                )
            return latents
        key = jax.random.key(0) if key is None else key
        return jax.random.normal(key, shape, jnp.float32)

    _latents_hint = ""

    def _sample(self, noise, sigmas, ctx, pooled, neg_ctx, neg_pooled, *, cfg_scale: float, model_guidance=None):
        """The jitted ODE loop; classifier-free guidance with `cfg_scale` when it exceeds 1."""
        cfg = float(cfg_scale) > 1.0
        if cfg and (neg_ctx is None or neg_pooled is None):
            raise ValueError("classifier-free guidance needs neg_ctx and neg_pooled (encode_prompt returns them)")
        graphdef, state = nnx.split(self.transformer)
        return _denoise(graphdef, cfg, state, jnp.asarray(noise, jnp.float32), sigmas, ctx, pooled,
                        neg_ctx if cfg else None, neg_pooled if cfg else None, jnp.float32(cfg_scale), model_guidance)

    def decode(self, latents) -> jax.Array:
        """Latents [B, h, w, C] -> images [B, H, W, 3] float32 in [0, 1] (jitted VAE decode: latents / scaling_factor
        + shift_factor through the decoder, as diffusers)."""
        graphdef, state = nnx.split(self.vae)
        return _decode(graphdef, state, jnp.asarray(latents))
