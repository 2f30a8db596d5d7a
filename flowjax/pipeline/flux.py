"""FLUX.1 text-to-image in JAX: prompt encoding (CLIP-L pooled + T5), the resolution-shifted schedule, distilled
guidance (dev) or none (schnell), optional true CFG, VAE decode.

    pipe = FluxPipeline.from_pretrained("FLUX.1-dev")                      # a diffusers pipeline folder
    images = pipe(["a photo of a cat"], num_steps=28, guidance_scale=3.5)  # [B, H, W, 3] float in [0, 1]

It reproduces diffusers' `FluxPipeline` (diffusers 0.42 `pipelines/flux/pipeline_flux.py`; no IP adapter, one
image per prompt, the same prompt for both encoders):

- `encode_prompt`: CLIP-L tokenises to 77 tokens (max-length padding, truncation) and gives only its pooled
  output (`pooler_output`, no projection); T5 (`text_encoder_2`) gives the sequence of `max_sequence_length`
  tokens (padded to it, no attention mask). The text position ids are zero (built inside `flowjax.models.flux`).
- the schedule: `flowjax.sampling.flux_sigmas`, the linspace(1, 1/N, N) shifted by mu = `flux_mu(image tokens,
  base_image_seq_len, max_image_seq_len, base_shift, max_shift)` from the scheduler config when it sets
  `use_dynamic_shifting` (FLUX.1-dev), else by its fixed `shift` (FLUX.1-schnell: 1); Euler ODE steps, timesteps
  sigma * 1000.
- guidance: a `guidance_embeds` transformer (dev) receives `guidance_scale` for every row, embedded as a timestep;
  otherwise (schnell) `guidance_scale` is ignored, as diffusers does. True classifier-free guidance
  `neg + true_cfg_scale * (pos - neg)` runs when `true_cfg_scale > 1` and a `negative_prompt` is given (one
  batched transformer call on [negative; positive]).
- decode: the (unpacked, NHWC) latents `/ scaling_factor + shift_factor` through the VAE decoder (FLUX's VAE:
  16 channels, 0.3611 / 0.1159 from its config), mapped to [0, 1].

Unlike diffusers, which silently rounds a height or width that is not a multiple of 2 * vae_scale_factor down,
such sizes are refused with the nearest valid size named.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flowjax import sampling
from flowjax import sharding as sharding_lib
from flowjax.convert.clip import load_clip_text
from flowjax.convert.safetensors_io import CheckpointError
from flowjax.convert.t5 import load_t5
from flowjax.models.flux import PACK, Flux, pack_latents, unpack_latents
from flowjax.pipeline import common
from flowjax.pipeline.common import load_tokenizer

REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
KIND = common.register(common.PipelineKind(
    class_prefix="Flux", class_name="FluxPipeline", loader="FluxPipeline", description="FLUX.1",
    required=REQUIRED, example="black-forest-labs/FLUX.1-dev"))
# Scheduler options whose schedule flowjax.sampling.flux_sigmas does not replay.
_UNSUPPORTED_SCHEDULER = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                          "use_beta_sigmas", "stochastic_sampling", "use_flow_sigmas")
# diffusers' FlowMatchEulerDiscreteScheduler / FluxPipeline defaults for what a scheduler config leaves out.
_SCHEDULE_DEFAULTS = dict(shift=1.0, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def read_scheduler_config(path) -> dict:
    """The FLUX schedule settings of a FlowMatchEulerDiscreteScheduler folder: `use_dynamic_shifting`,
    `time_shift_type`, `shift`, `base_shift`, `max_shift`, `base_image_seq_len`, `max_image_seq_len`."""
    file = Path(path) / common.SCHEDULER_CONFIG
    raw = common.read_scheduler_json(
        path, pipeline="FluxPipeline", unsupported=_UNSUPPORTED_SCHEDULER,
        supported_text="FluxPipeline's schedule (num_train_timesteps 1000; a fixed shift or the resolution-dependent "
                       "dynamic shift)")
    out = {name: common.positive(raw, name, default, file) for name, default in _SCHEDULE_DEFAULTS.items()}
    for name in ("base_image_seq_len", "max_image_seq_len"):
        out[name] = int(out[name])
    if out["max_image_seq_len"] == out["base_image_seq_len"]:
        raise CheckpointError(f"{file}: base_image_seq_len and max_image_seq_len must differ (mu is linear between)")
    out["use_dynamic_shifting"] = bool(raw.get("use_dynamic_shifting", False))
    out["time_shift_type"] = raw.get("time_shift_type") or "exponential"
    if out["time_shift_type"] not in ("exponential", "linear"):
        raise CheckpointError(f"{file}: time_shift_type must be 'exponential' or 'linear', got "
                              f"{out['time_shift_type']!r}")
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode(graphdefs, out_dtype, states, ids_clip, ids_t5):
    """(T5 states [B, L, joint], CLIP pooled [B, P]) as diffusers' FluxPipeline.encode_prompt builds them."""
    (g_clip, g_t5), (s_clip, s_t5) = graphdefs, states
    pooled = nnx.merge(g_clip, s_clip)(ids_clip).pooler_output
    ctx = nnx.merge(g_t5, s_t5)(ids_t5)  # no attention mask, as diffusers
    return ctx.astype(out_dtype), pooled.astype(out_dtype)


class FluxPipeline(common.TextToImagePipeline):
    """FLUX.1 text-to-image: the NNX models, the host tokenizers and the scheduler's settings.

    `transformer` a `Flux`, `vae` an `AutoencoderKL`, `text_encoder` the CLIP-L `CLIPTextModel` (its pooled output
    is used), `text_encoder_2` the `T5Encoder`, the tokenizers `transformers` tokenizers (CLIP and T5), `scheduler`
    the dict of `read_scheduler_config` (default: FLUX.1-dev's dynamic shift). `dtype` is the dtype of the
    returned prompt embeddings.
    """

    multiple_name = "2 (the 2x2 latent packing)"

    def __init__(self, *, transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                 scheduler: dict | None = None, dtype=jnp.bfloat16):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler = {**_SCHEDULE_DEFAULTS, "use_dynamic_shifting": True, "time_shift_type": "exponential",
                          **(scheduler or {})}
        self.dtype = dtype
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
        progress: bool = False,
        attention_impl: str = "xla",
        remat: str = "none",
    ) -> "FluxPipeline":
        """Loads a diffusers FLUX.1 pipeline folder (dev or schnell) with flowjax's converters (no torch).

        `dtype` is what every model computes in, `param_dtype` what the weights are stored in; with `mesh`, each
        weight goes straight into its sharding under `rules`. `attention_impl` and `remat` are the transformer's
        (e.g. "chunked" and "full" to train within a chip's memory).
        """
        root, _ = common.open_folder(path, KIND)
        scheduler = read_scheduler_config(root / "scheduler")
        # Tokenizers first: cheap, and a missing file should fail before gigabytes of weights are read.
        tokenizer = load_tokenizer(root / "tokenizer", "clip")
        tokenizer_2 = load_tokenizer(root / "tokenizer_2", "t5")
        kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, progress=progress)
        return cls(
            **common.load_transformer_and_vae(root, attention_impl=attention_impl, remat=remat, **kw),
            text_encoder=load_clip_text(root / "text_encoder", with_projection=False, **kw),
            text_encoder_2=load_t5(root / "text_encoder_2", **kw),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler, dtype=dtype,
        )

    def _clip_encoders(self):
        return (("text_encoder", self.text_encoder),)

    def _t5(self):
        return self.text_encoder_2

    def _component_problems(self) -> list[str]:
        if not isinstance(self.transformer, Flux):
            raise CheckpointError(f"the transformer is a {type(self.transformer).__name__}, not a FLUX transformer"
                                  " (an SD3 MMDiT goes in flowjax.pipeline.SD3Pipeline)")
        t = self.transformer.config
        problems = []
        if self.text_encoder.config.hidden_size != t.pooled_projection_dim:
            problems.append(f"the CLIP hidden size {self.text_encoder.config.hidden_size} differs from the "
                            f"transformer's pooled_projection_dim {t.pooled_projection_dim}")
        return problems

    # ---------------------------------------------------------------- sizes and schedule

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.latent_channels

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * PACK

    _latents_hint = "; diffusers' packed FLUX latents [B, L, 4C] need flowjax.models.flux.unpack_latents(x, h, w)"

    def mu(self, height: int, width: int) -> float | None:
        """The resolution shift of an image size (None without `use_dynamic_shifting`)."""
        if not self.scheduler["use_dynamic_shifting"]:
            return None
        h, w = self.check_size(height, width)
        s = self.scheduler
        return sampling.flux_mu((h // PACK) * (w // PACK), s["base_image_seq_len"], s["max_image_seq_len"],
                                s["base_shift"], s["max_shift"])

    def sigmas(self, num_steps: int, height: int, width: int) -> jax.Array:
        """The sigma schedule [num_steps + 1] of the pipeline's scheduler at this image size."""
        return sampling.flux_sigmas(num_steps, mu=self.mu(height, width), shift=self.scheduler["shift"],
                                    time_shift_type=self.scheduler["time_shift_type"])

    def model_guidance(self, batch: int, guidance_scale: float) -> jax.Array | None:
        """The transformer's `guidance` argument: guidance_scale per row for FLUX.1-dev, None for schnell."""
        if not self.transformer.config.guidance_embeds:
            return None
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        return jnp.full((batch,), guidance_scale, jnp.float32)

    # ---------------------------------------------------------------- the three stages

    def encode_prompt(self, prompts, negative_prompt=None, max_sequence_length: int = 512, *,
                      do_true_cfg: bool = False):
        """(ctx [B, L, joint], pooled [B, P], neg_ctx, neg_pooled) as diffusers' `encode_prompt`, L =
        max_sequence_length. The negative (one string for all prompts, or one per prompt) is encoded only with
        `do_true_cfg`; otherwise neg_ctx, neg_pooled are None. Prompts and negatives go through the encoders in one
        batch."""
        max_sequence_length = common.check_max_sequence_length(max_sequence_length)
        texts = common.with_negatives(prompts, negative_prompt, do_true_cfg)
        ids_clip = common.tokenize(self.tokenizer, texts, self.tokenizer_max_length, "CLIP")
        ids_t5 = common.tokenize(self.tokenizer_2, texts, max_sequence_length, "T5")
        graphdefs, states = common.split_states(self.text_encoder, self.text_encoder_2)
        ctx, pooled = _encode(graphdefs, jnp.dtype(self.dtype), states, ids_clip, ids_t5)
        if not do_true_cfg:
            return ctx, pooled, None, None
        batch = len(texts) // 2
        return ctx[:batch], pooled[:batch], ctx[batch:], pooled[batch:]

    def denoise(self, noise, ctx, pooled, neg_ctx=None, neg_pooled=None, *, num_steps: int = 28,
                guidance_scale: float = 3.5, true_cfg_scale: float = 1.0) -> jax.Array:
        """The ODE sample (float32 NHWC latents [B, h, w, C]) from `noise`, in one jitted lax.scan: distilled
        guidance for a dev transformer, true CFG when true_cfg_scale > 1 (needs neg_ctx and neg_pooled)."""
        noise = jnp.asarray(noise, jnp.float32)
        if noise.ndim != 4:
            raise ValueError(f"noise must be NHWC [B, h, w, {self.latent_channels}], got {noise.shape}")
        height, width = noise.shape[1] * self.vae_scale_factor, noise.shape[2] * self.vae_scale_factor
        if float(true_cfg_scale) > 1.0 and (neg_ctx is None or neg_pooled is None):
            raise ValueError("true_cfg_scale > 1 needs neg_ctx and neg_pooled (encode_prompt(..., do_true_cfg=True))")
        return self._sample(noise, self.sigmas(num_steps, height, width), ctx, pooled, neg_ctx, neg_pooled,
                            cfg_scale=true_cfg_scale, model_guidance=self.model_guidance(len(noise), guidance_scale))

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        true_cfg_scale: float = 1.0,
        num_steps: int = 28,
        guidance_scale: float = 3.5,
        height: int = 1024,
        width: int = 1024,
        max_sequence_length: int = 512,
        latents=None,
        key=None,
    ) -> jax.Array:
        """Images [B, height, width, 3] float32 in [0, 1] for the prompts.

        `latents`: the initial noise NHWC [B, height/8, width/8, 16] (diffusers' FluxPipeline takes it packed:
        `flowjax.models.flux.pack_latents` / `unpack_latents` convert), else drawn from `key` (default
        `jax.random.key(0)`). `guidance_scale` is FLUX.1-dev's distilled guidance (ignored by schnell);
        `true_cfg_scale > 1` with a `negative_prompt` adds classifier-free guidance, as diffusers.
        """
        prompts = common.as_prompts(prompts)
        noise = self.prepare_latents(len(prompts), height, width, latents=latents, key=key)
        true_cfg = float(true_cfg_scale) > 1.0 and negative_prompt is not None
        ctx, pooled, neg_ctx, neg_pooled = self.encode_prompt(prompts, negative_prompt, max_sequence_length,
                                                              do_true_cfg=true_cfg)
        x = self.denoise(noise, ctx, pooled, neg_ctx, neg_pooled, num_steps=num_steps, guidance_scale=guidance_scale,
                         true_cfg_scale=true_cfg_scale if true_cfg else 1.0)
        return self.decode(x)


__all__ = ["FluxPipeline", "pack_latents", "read_scheduler_config", "unpack_latents"]
