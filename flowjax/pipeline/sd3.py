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

Reference: diffusers 0.42 `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`. Folder reading,
tokenization, the sampling loop and the decode are shared with the FLUX pipeline (`flowjax.pipeline.common`).
"""

from __future__ import annotations

import functools
import logging
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
from flowjax.models.mmdit import MMDiT
from flowjax.pipeline import common
from flowjax.pipeline.common import MODEL_INDEX, load_tokenizer

log = logging.getLogger(__name__)

# Folders every SD3 pipeline has; text_encoder_3 / tokenizer_3 are optional (diffusers runs without T5).
REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
KIND = common.register(common.PipelineKind(
    class_prefix="StableDiffusion3", class_name="StableDiffusion3Pipeline", loader="SD3Pipeline",
    description="Stable Diffusion 3 / 3.5", required=REQUIRED, example="stabilityai/stable-diffusion-3.5-medium"))
# Scheduler options that change the sigma schedule, which flowjax.sampling.sigmas does not implement.
_UNSUPPORTED_SCHEDULER = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                          "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


def read_model_index(path) -> dict:
    """The parsed `model_index.json` of a diffusers SD3 pipeline folder; CheckpointError naming the fix otherwise."""
    return common.read_model_index(path, KIND)


def read_scheduler_config(path) -> dict:
    """`{"shift": float}` from a FlowMatchEulerDiscreteScheduler folder; refuses schedules flowjax does not replay."""
    raw = common.read_scheduler_json(
        path, pipeline="SD3Pipeline", unsupported=_UNSUPPORTED_SCHEDULER,
        supported_text=f"the plain shifted schedule of SD3 / SD3.5 (num_train_timesteps "
                       f"{common.NUM_TRAIN_TIMESTEPS}, a fixed shift)")
    return {"shift": common.positive(raw, "shift", 1.0, Path(path) / common.SCHEDULER_CONFIG)}  # diffusers' default


# --------------------------------------------------------------------------- jitted prompt encoding

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



# --------------------------------------------------------------------------- the pipeline


class SD3Pipeline(common.TextToImagePipeline):
    """SD3 / SD3.5 text-to-image: the NNX models, the host tokenizers and the scheduler's shift.

    `transformer` an `MMDiT`, `vae` an `AutoencoderKL`, `text_encoder` / `text_encoder_2` the CLIP-L / OpenCLIP
    bigG `CLIPTextModel`s with projection, `text_encoder_3` a `T5Encoder` or None (its features are then zeros),
    the tokenizers `transformers` tokenizers (or anything called the same way), `shift` the sigma-schedule shift.
    `dtype` is the dtype of the returned prompt embeddings. Without any text encoder or tokenizer (all None, as
    diffusers' pipeline with `prompt_embeds=`), the pipeline samples and decodes from given embeddings
    (`denoise`, `decode`: what an RL rollout does) and `encode_prompt` says it cannot encode.
    """

    def __init__(self, *, transformer, vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                 tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, shift: float = 3.0, dtype=jnp.bfloat16):
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 go together: give both or neither")
        clip = (text_encoder, text_encoder_2, tokenizer, tokenizer_2)
        if any(x is None for x in clip) and any(x is not None for x in clip + (text_encoder_3,)):
            raise ValueError("SD3Pipeline encodes with both CLIP text encoders and their tokenizers (T5 optional): "
                             "give text_encoder, text_encoder_2, tokenizer and tokenizer_2, or no encoder at all "
                             "to sample from given embeddings")
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
        root, index = common.open_folder(path, KIND)
        with_t5 = bool(text_encoder_3) and common.listed(index, "text_encoder_3")
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
            **common.load_transformer_and_vae(root, attention_impl=attention_impl, remat=remat, **kw),
            text_encoder=load_clip_text(root / "text_encoder", with_projection=True, **kw),
            text_encoder_2=load_clip_text(root / "text_encoder_2", with_projection=True, **kw),
            text_encoder_3=load_t5(root / "text_encoder_3", **kw) if with_t5 else None,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
            shift=scheduler["shift"], dtype=dtype,
        )

    def _clip_encoders(self):
        if self.text_encoder is None:
            return ()
        return (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2))

    def _t5(self):
        return self.text_encoder_3

    def _component_problems(self) -> list[str]:
        if not isinstance(self.transformer, MMDiT):
            raise CheckpointError(f"the transformer is a {type(self.transformer).__name__}, not an SD3 MMDiT"
                                  " (a FLUX transformer goes in flowjax.pipeline.FluxPipeline)")
        t = self.transformer.config
        problems = []
        if self.text_encoder is None:
            return problems
        l_cfg, g_cfg = self.text_encoder.config, self.text_encoder_2.config
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
        return problems

    # ---------------------------------------------------------------- sizes

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    multiple_name = "patch_size"

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    @property
    def max_size(self) -> int:
        return self.transformer.config.pos_embed_max_size * self.size_multiple

    def sigmas(self, num_steps: int) -> jax.Array:
        """The sigma schedule [num_steps + 1] of the pipeline's scheduler."""
        return sampling.sigmas(num_steps, self.shift)

    # ---------------------------------------------------------------- the three stages

    def encode_prompt(self, prompts, negative_prompt="", max_sequence_length: int = 256, *,
                      do_classifier_free_guidance: bool = True):
        """(ctx [B, L, joint], pooled [B, P], neg_ctx, neg_pooled) as diffusers' `encode_prompt`.

        L = tokenizer_max_length (77) + max_sequence_length. `negative_prompt` is one string for every prompt or
        a list of len(prompts) (None means ""). With `do_classifier_free_guidance=False` the negative is not
        encoded and neg_ctx, neg_pooled are None. Prompts and negatives go through the encoders in one batch.
        """
        if self.text_encoder is None:
            raise ValueError("this SD3Pipeline has no text encoders: load one with them (from_pretrained), or give "
                             "prompt embeddings to denoise()")
        max_sequence_length = common.check_max_sequence_length(max_sequence_length)
        texts = common.with_negatives(prompts, negative_prompt, do_classifier_free_guidance)
        batch = len(texts) // 2 if do_classifier_free_guidance else len(texts)
        n = self.tokenizer_max_length
        ids_l = common.tokenize(self.tokenizer, texts, n, "CLIP")
        ids_g = common.tokenize(self.tokenizer_2, texts, n, "CLIP")
        ids_t5 = None
        if self.text_encoder_3 is not None:
            ids_t5 = common.tokenize(self.tokenizer_3, texts, max_sequence_length, "T5", add_special_tokens=True)
        graphdefs, states = common.split_states(self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        t5_shape = (max_sequence_length, self.transformer.config.joint_attention_dim)
        ctx, pooled = _encode(graphdefs, t5_shape, jnp.dtype(self.dtype), states, ids_l, ids_g, ids_t5)
        if not do_classifier_free_guidance:
            return ctx, pooled, None, None
        return ctx[:batch], pooled[:batch], ctx[batch:], pooled[batch:]

    def denoise(self, noise, ctx, pooled, neg_ctx=None, neg_pooled=None, *, num_steps: int = 40,
                guidance_scale: float = 4.5) -> jax.Array:
        """The ODE sample (float32 latents [B, h, w, C]) from `noise`, in one jitted lax.scan.

        CFG (one batched transformer call on [negative; positive]) when guidance_scale > 1, as diffusers.
        """
        if float(guidance_scale) > 1.0 and (neg_ctx is None or neg_pooled is None):
            raise ValueError("guidance_scale > 1 needs neg_ctx and neg_pooled (encode_prompt returns them)")
        return self._sample(noise, self.sigmas(num_steps), ctx, pooled, neg_ctx, neg_pooled, cfg_scale=guidance_scale)

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
        prompts = common.as_prompts(prompts)
        noise = self.prepare_latents(len(prompts), height, width, latents=latents, key=key)
        cfg = float(guidance_scale) > 1.0
        ctx, pooled, neg_ctx, neg_pooled = self.encode_prompt(
            prompts, negative_prompt, max_sequence_length, do_classifier_free_guidance=cfg)
        x = self.denoise(noise, ctx, pooled, neg_ctx, neg_pooled, num_steps=num_steps, guidance_scale=guidance_scale)
        return self.decode(x)


__all__ = ["SD3Pipeline", "load_tokenizer", "read_model_index", "read_scheduler_config"]
