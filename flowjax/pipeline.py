"""SD3 / SD3.5 text-to-image in JAX: prompt encoding (CLIP-L + CLIP-G + T5), CFG sampling, VAE decode.

    pipe = SD3Pipeline.from_pretrained("stable-diffusion-3.5-medium")   # a diffusers pipeline folder
    images = pipe(["a photo of a cat"], num_steps=40, guidance_scale=4.5)  # [B, H, W, 3] float in [0, 1]

It reproduces diffusers' `StableDiffusion3Pipeline` (no skip-layer guidance, no IP adapter, one image per
prompt, the same prompt for all three encoders):

- `encode_prompt`: each CLIP tokenises to `tokenizer.model_max_length` (77) with max-length padding and
  truncation; their penultimate hidden states are concatenated on the feature axis and zero-padded to the T5
  width (the transformer's `joint_attention_dim`); the T5 states of `max_sequence_length` tokens (padded to it,
  no attention mask, as diffusers) follow along the sequence, or zeros of that shape without a T5 encoder.
  The pooled vector is the concatenation of both CLIP projections. The negative prompt goes the same way.
- sampling: the Euler ODE over `flowjax.sampling.sigmas(num_steps, shift)` (the scheduler's shift), timesteps
  sigma * 1000, classifier-free guidance `uncond + g * (cond - uncond)` from one batched transformer call when
  `guidance_scale > 1`; the whole loop is one jitted `lax.scan` (`flowjax.sampling.rollout`).
- decode: `latents / scaling_factor + shift_factor` through the VAE decoder, mapped to [0, 1].

Tokenisation runs on the host with the `transformers` tokenizers (`pip install 'flowjax[pipeline]'`); the
text encoders, the denoising loop and the VAE decode each run as one jitted function. The models are split
into graph and state at every call, so an adapter attached to `pipe.transformer` (e.g. by
`flowjax.convert.lora.load_lora`) is used by the next call.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax import sampling
from flowjax import sharding as sharding_lib
from flowjax.convert.clip import load_clip_text
from flowjax.convert.safetensors_io import CheckpointError
from flowjax.convert.t5 import load_t5
from flowjax.convert.transformer import load_transformer
from flowjax.convert.vae import load_vae

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'flowjax[pipeline]'"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# Folders every SD3 pipeline has; text_encoder_3 / tokenizer_3 are optional (diffusers runs without T5).
REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MAX_SEQUENCE_LENGTH = 512  # diffusers refuses longer T5 sequences
NUM_TRAIN_TIMESTEPS = 1000
# Scheduler options that change the sigma schedule, which flowjax.sampling.sigmas does not implement.
_UNSUPPORTED_SCHEDULER = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                          "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


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


def read_model_index(path) -> dict:
    """The parsed `model_index.json` of a diffusers SD3 pipeline folder; CheckpointError naming the fix otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"{root} is not a folder; give a diffusers SD3 / SD3.5 pipeline folder (the one holding {MODEL_INDEX}, "
            "transformer/, vae/, text_encoder*/, tokenizer*/ and scheduler/), e.g. a local download of "
            "stabilityai/stable-diffusion-3.5-medium"
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
        elif any((root / c).is_dir() for c in REQUIRED):
            hint = (f": the component folders are there but {MODEL_INDEX} is not; copy it from the model repository "
                    "(it is the small JSON file at its top level)")
        raise CheckpointError(f"no {MODEL_INDEX} in {root}{hint}")
    try:
        index = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    cls = index.get("_class_name")
    if not (isinstance(cls, str) and cls.startswith("StableDiffusion3")):
        raise CheckpointError(
            f"{file} describes a {cls!r}, not a StableDiffusion3Pipeline; flowjax.pipeline.SD3Pipeline loads "
            "Stable Diffusion 3 / 3.5 pipelines only"
        )
    return index


def _listed(index: dict, name: str) -> bool:
    """Whether model_index.json names a component (diffusers writes [null, null] for an absent one)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and any(e is not None for e in entry)


def read_scheduler_config(path) -> dict:
    """`{"shift": float}` from a FlowMatchEulerDiscreteScheduler folder; refuses schedules flowjax does not replay."""
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
        raise CheckpointError(f"{file} describes a {cls}; SD3Pipeline samples with FlowMatchEulerDiscreteScheduler")
    unsupported = {k: raw[k] for k in _UNSUPPORTED_SCHEDULER if raw.get(k)}
    if raw.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        unsupported["num_train_timesteps"] = raw["num_train_timesteps"]
    if unsupported:
        raise CheckpointError(
            f"{file} sets {unsupported}; flowjax samples the plain shifted schedule of SD3 / SD3.5 "
            f"(num_train_timesteps {NUM_TRAIN_TIMESTEPS}, a fixed shift): remove these options"
        )
    shift = float(raw.get("shift", 1.0))  # diffusers' default
    if not shift > 0:
        raise CheckpointError(f"{file}: shift must be positive, got {shift}")
    return {"shift": shift}


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


# --------------------------------------------------------------------------- jitted pieces


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _encode(graphdefs, t5_shape, out_dtype, states, ids_l, ids_g, ids_t5):
    """(ctx [B, L_clip + L_t5, joint], pooled [B, P_l + P_g]) as diffusers' encode_prompt builds them."""
    g_l, g_g, g_t5 = graphdefs
    s_l, s_g, s_t5 = states
    out_l = nnx.merge(g_l, s_l)(ids_l, output_hidden_states=True)
    out_g = nnx.merge(g_g, s_g)(ids_g, output_hidden_states=True)
    clip = jnp.concatenate([out_l.hidden_states[-2].astype(out_dtype), out_g.hidden_states[-2].astype(out_dtype)],
                           axis=-1)
    if g_t5 is not None:
        t5 = nnx.merge(g_t5, s_t5)(ids_t5).astype(out_dtype)  # no attention mask, as diffusers
    else:
        t5 = jnp.zeros((ids_l.shape[0], *t5_shape), out_dtype)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
    ctx = jnp.concatenate([clip, t5], axis=1)
    pooled = jnp.concatenate([out_l.text_embeds.astype(out_dtype), out_g.text_embeds.astype(out_dtype)], axis=-1)
    return ctx, pooled


@functools.partial(jax.jit, static_argnums=(0, 1))
def _denoise(graphdef, cfg, state, noise, sigmas, ctx, pooled, neg_ctx, neg_pooled, guidance):
    """The ODE sample (float32) from `noise` at sigmas[0]; CFG with one batched forward when `cfg`."""
    model = nnx.merge(graphdef, state)

    def velocity(x, sigma):
        t = sigma * float(NUM_TRAIN_TIMESTEPS)  # the MMDiT was trained on diffusers-unit timesteps
        if not cfg:
            return model(x, t, ctx, pooled).astype(jnp.float32)
        both = lambda a, b: jnp.concatenate([a, b], axis=0)
        v = model(both(x, x), both(t, t), both(neg_ctx, ctx), both(neg_pooled, pooled)).astype(jnp.float32)
        v_uncond, v_cond = jnp.split(v, 2, axis=0)
        return v_uncond + guidance * (v_cond - v_uncond)

    return sampling.rollout(velocity, noise, sigmas, None, kind="ode").latents[-1]


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, latents):
    return nnx.merge(graphdef, state).latents_to_images(latents)


# --------------------------------------------------------------------------- the pipeline


def _as_prompts(prompts, what="prompts") -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{what} is empty; give at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be strings, got {bad[:3]}")
    return prompts


class SD3Pipeline:
    """SD3 / SD3.5 text-to-image: the NNX models, the host tokenizers and the scheduler's shift.

    `transformer` an `MMDiT`, `vae` an `AutoencoderKL`, `text_encoder` / `text_encoder_2` the CLIP-L / OpenCLIP
    bigG `CLIPTextModel`s with projection, `text_encoder_3` a `T5Encoder` or None (its features are then zeros),
    the tokenizers `transformers` tokenizers (or anything called the same way), `shift` the sigma-schedule shift.
    `dtype` is the dtype of the returned prompt embeddings.
    """

    def __init__(self, *, transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, shift: float = 3.0, dtype=jnp.bfloat16):
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 go together: give both or neither")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.shift, self.dtype = float(shift), dtype
        self._check_compatible()

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        mesh=None,
        rules=sharding_lib.DEFAULT_RULES,
        text_encoder_3: bool = True,
        progress: bool = False,
        attention_impl: str = "xla",
        remat: str = "none",
    ) -> "SD3Pipeline":
        """Loads a diffusers SD3 / SD3.5 pipeline folder with flowjax's converters (no torch).

        `dtype` is what every model computes in, `param_dtype` what the weights are stored in; with `mesh`,
        each weight goes straight into its sharding under `rules`. `text_encoder_3=False` skips T5 (its
        features become zeros, as diffusers with `text_encoder_3=None`); a folder whose model_index.json lists
        no T5 runs that way too. `attention_impl` and `remat` are the transformer's (the RL trainer uses
        `attention_impl="chunked"` and `remat="full"` to train within a chip's memory).
        """
        root = Path(path)
        index = read_model_index(root)
        for name in REQUIRED:
            if not _listed(index, name):
                raise CheckpointError(
                    f"{root / MODEL_INDEX} lists no {name}; an SD3 pipeline needs {', '.join(REQUIRED)}"
                )
            if not (root / name).is_dir():
                raise CheckpointError(
                    f"missing component folder {root / name} (listed in {MODEL_INDEX}); download the complete "
                    f"pipeline folder, with all of {', '.join(REQUIRED)}"
                )
        with_t5 = bool(text_encoder_3) and _listed(index, "text_encoder_3")
        if text_encoder_3 and not with_t5:
            log.info("%s lists no text_encoder_3: running without T5 (zero features)", root / MODEL_INDEX)
        if with_t5:
            for name in ("text_encoder_3", "tokenizer_3"):
                if not (root / name).is_dir():
                    raise CheckpointError(
                        f"missing component folder {root / name} (listed in {MODEL_INDEX}); download it, or pass "
                        "text_encoder_3=False to run without T5 (zero T5 features, as diffusers does without it)"
                    )
        scheduler = read_scheduler_config(root / "scheduler")
        # Tokenizers first: cheap, and a missing file should fail before gigabytes of weights are read.
        tokenizer = load_tokenizer(root / "tokenizer", "clip")
        tokenizer_2 = load_tokenizer(root / "tokenizer_2", "clip")
        tokenizer_3 = load_tokenizer(root / "tokenizer_3", "t5") if with_t5 else None

        kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, progress=progress)
        return cls(
            transformer=load_transformer(root / "transformer", attention_impl=attention_impl, remat=remat, **kw),
            vae=load_vae(root / "vae", **kw),
            text_encoder=load_clip_text(root / "text_encoder", with_projection=True, **kw),
            text_encoder_2=load_clip_text(root / "text_encoder_2", with_projection=True, **kw),
            text_encoder_3=load_t5(root / "text_encoder_3", **kw) if with_t5 else None,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
            shift=scheduler["shift"], dtype=dtype,
        )

    def _check_compatible(self):
        """The components must fit together as diffusers' pipeline combines them."""
        t = self.transformer.config
        l_cfg, g_cfg = self.text_encoder.config, self.text_encoder_2.config
        problems = []
        if not (self.text_encoder.with_projection and self.text_encoder_2.with_projection):
            problems.append("both CLIP text encoders need their text_projection (CLIPTextModelWithProjection)")
        else:
            pooled = l_cfg.projection_dim + g_cfg.projection_dim
            if pooled != t.pooled_projection_dim:
                problems.append(f"the CLIP projections {l_cfg.projection_dim} + {g_cfg.projection_dim} = {pooled} "
                                f"differ from the transformer's pooled_projection_dim {t.pooled_projection_dim}")
        clip_width = l_cfg.hidden_size + g_cfg.hidden_size
        if clip_width > t.joint_attention_dim:
            problems.append(f"the CLIP hidden sizes {l_cfg.hidden_size} + {g_cfg.hidden_size} exceed the "
                            f"transformer's joint_attention_dim {t.joint_attention_dim}")
        if self.text_encoder_3 is not None and self.text_encoder_3.config.d_model != t.joint_attention_dim:
            problems.append(f"the T5 width {self.text_encoder_3.config.d_model} differs from the transformer's "
                            f"joint_attention_dim {t.joint_attention_dim}")
        if self.vae.config.latent_channels != t.in_channels:
            problems.append(f"the VAE's latent_channels {self.vae.config.latent_channels} differ from the "
                            f"transformer's in_channels {t.in_channels}")
        for name, enc in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)):
            if self.tokenizer_max_length > enc.config.max_position_embeddings:
                problems.append(f"the tokenizer pads to {self.tokenizer_max_length} tokens but {name} has only "
                                f"{enc.config.max_position_embeddings} positions")
        if problems:
            raise CheckpointError("the pipeline's components do not fit together: " + "; ".join(problems))

    # ---------------------------------------------------------------- sizes

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def tokenizer_max_length(self) -> int:
        """CLIP token count (diffusers: `tokenizer.model_max_length`, 77), used for both CLIP encoders."""
        n = getattr(self.tokenizer, "model_max_length", None)
        return 77 if n is None or n > 10_000 else int(n)  # transformers' "no limit" sentinel is huge

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent (h, w) of an image size; ValueError naming valid sizes otherwise."""
        m = self.vae_scale_factor * self.patch_size
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if height % m or width % m:
            raise ValueError(
                f"height and width must be multiples of vae_scale_factor * patch_size = {m}, got {height}x{width}; "
                f"use e.g. {max(m, height - height % m)}x{max(m, width - width % m)}"
            )
        limit = self.transformer.config.pos_embed_max_size * m
        if height > limit or width > limit:
            raise ValueError(f"{height}x{width} exceeds the largest size this transformer's position table covers, "
                             f"{limit} pixels a side (pos_embed_max_size * {m})")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def sigmas(self, num_steps: int) -> jax.Array:
        """The sigma schedule [num_steps + 1] of the pipeline's scheduler."""
        return sampling.sigmas(num_steps, self.shift)

    # ---------------------------------------------------------------- the three stages

    def _tokenize(self, tokenizer, prompts, max_length, what, **kw) -> np.ndarray:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="np", **kw)["input_ids"]
        full = tokenizer(prompts, padding="longest", **kw)["input_ids"]
        if max(len(r) for r in full) > max_length:
            log.warning("prompts longer than %d %s tokens were truncated", max_length, what)
        return np.asarray(ids, np.int32)

    def encode_prompt(self, prompts, negative_prompt="", max_sequence_length: int = 256, *,
                      do_classifier_free_guidance: bool = True):
        """(ctx [B, L, joint], pooled [B, P], neg_ctx, neg_pooled) as diffusers' `encode_prompt`.

        L = tokenizer_max_length (77) + max_sequence_length. `negative_prompt` is one string for every prompt or
        a list of len(prompts) (None means ""). With `do_classifier_free_guidance=False` the negative is not
        encoded and neg_ctx, neg_pooled are None. Prompts and negatives go through the encoders in one batch.
        """
        prompts = _as_prompts(prompts)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) or not (
            1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH
        ):
            raise ValueError(f"max_sequence_length must be an integer in 1..{MAX_SEQUENCE_LENGTH}, "
                             f"got {max_sequence_length!r}")
        batch = len(prompts)
        texts = prompts
        if do_classifier_free_guidance:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else _as_prompts(
                negative_prompt, "negative_prompt")
            if len(negatives) != batch:
                raise ValueError(f"negative_prompt has {len(negatives)} entries but there are {batch} prompts; "
                                 "give one string, or one per prompt")
            texts = prompts + negatives
        n = self.tokenizer_max_length
        ids_l = self._tokenize(self.tokenizer, texts, n, "CLIP")
        ids_g = self._tokenize(self.tokenizer_2, texts, n, "CLIP")
        ids_t5 = None
        if self.text_encoder_3 is not None:
            ids_t5 = self._tokenize(self.tokenizer_3, texts, int(max_sequence_length), "T5", add_special_tokens=True)
        graphdefs, states = [], []
        for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            g, s = nnx.split(m) if m is not None else (None, None)
            graphdefs.append(g)
            states.append(s)
        t5_shape = (int(max_sequence_length), self.transformer.config.joint_attention_dim)
        ctx, pooled = _encode(tuple(graphdefs), t5_shape, jnp.dtype(self.dtype), tuple(states), ids_l, ids_g, ids_t5)
        if not do_classifier_free_guidance:
            return ctx, pooled, None, None
        return ctx[:batch], pooled[:batch], ctx[batch:], pooled[batch:]

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
                    ".transpose(0, 2, 3, 1)"
                )
            return latents
        key = jax.random.key(0) if key is None else key
        return jax.random.normal(key, shape, jnp.float32)

    def denoise(self, noise, ctx, pooled, neg_ctx=None, neg_pooled=None, *, num_steps: int = 40,
                guidance_scale: float = 4.5) -> jax.Array:
        """The ODE sample (float32 latents [B, h, w, C]) from `noise`, in one jitted lax.scan.

        CFG (one batched transformer call on [negative; positive]) when guidance_scale > 1, as diffusers.
        """
        cfg = float(guidance_scale) > 1.0
        if cfg and (neg_ctx is None or neg_pooled is None):
            raise ValueError("guidance_scale > 1 needs neg_ctx and neg_pooled (encode_prompt returns them)")
        graphdef, state = nnx.split(self.transformer)
        return _denoise(graphdef, cfg, state, jnp.asarray(noise, jnp.float32), self.sigmas(num_steps), ctx, pooled,
                        neg_ctx if cfg else None, neg_pooled if cfg else None, jnp.float32(guidance_scale))

    def decode(self, latents) -> jax.Array:
        """Latents [B, h, w, C] -> images [B, H, W, 3] float32 in [0, 1] (jitted VAE decode)."""
        graphdef, state = nnx.split(self.vae)
        return _decode(graphdef, state, jnp.asarray(latents))

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = "",
        num_steps: int = 40,
        guidance_scale: float = 4.5,
        height: int = 512,
        width: int = 512,
        max_sequence_length: int = 256,
        latents=None,
        key=None,
    ) -> jax.Array:
        """Images [B, height, width, 3] float32 in [0, 1] for the prompts.

        `latents`: the initial noise NHWC [B, height/8, width/8, C] (diffusers' `latents=` transposed from
        NCHW), else drawn from `key` (default `jax.random.key(0)`).
        """
        prompts = _as_prompts(prompts)
        noise = self.prepare_latents(len(prompts), height, width, latents=latents, key=key)
        cfg = float(guidance_scale) > 1.0
        ctx, pooled, neg_ctx, neg_pooled = self.encode_prompt(
            prompts, negative_prompt, max_sequence_length, do_classifier_free_guidance=cfg)
        x = self.denoise(noise, ctx, pooled, neg_ctx, neg_pooled, num_steps=num_steps, guidance_scale=guidance_scale)
        return self.decode(x)


__all__ = ["SD3Pipeline", "load_tokenizer", "read_model_index", "read_scheduler_config"]
