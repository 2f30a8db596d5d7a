"""The FLUX.1 transformer (diffusers' `FluxTransformer2DModel`, diffusers 0.42) as a Flax NNX module, NHWC.

Reference: diffusers 0.42 `models/transformers/transformer_flux.py` (FluxTransformer2DModel, FluxTransformerBlock,
FluxSingleTransformerBlock, FluxAttention + FluxAttnProcessor, FluxPosEmbed), `models/embeddings.py`
(CombinedTimestep[Guidance]TextProjEmbeddings, get_1d_rotary_pos_embed, apply_rotary_emb) and
`models/normalization.py` (AdaLayerNormZero[Single], AdaLayerNormContinuous); the 2x2 latent packing and the
position ids are those of `pipelines/flux/pipeline_flux.py` (`_pack_latents`, `_unpack_latents`,
`_prepare_latent_image_ids`, text ids all zero).

The face is the MMDiT's: `model(latents [B,H,W,C], timesteps [B] (sigma*1000), text [B,L,joint], pooled [B,P],
guidance=None [B]) -> velocity [B,H,W,C]`, with C = in_channels / 4. Inside:
- the latents are packed 2x2 into tokens of 4C channels (channel order c, dy, dx, as diffusers' pipeline)
  and the output unpacked the same way;
- the image-token ids are (0, row, col) of the packed grid, the text ids zero; the 3-axis RoPE
  (`axes_dims_rope`, theta 10000) rotates interleaved pairs of q and k, its cos / sin tables computed on the
  host in float64 as diffusers computes them, then rounded to float32;
- conditioning temb = MLP(sinusoid(t)) [+ MLP(sinusoid(1000*guidance)) when `guidance_embeds`, FLUX.1-dev]
  + MLP(pooled); the sinusoids are computed in float32 whatever `dtype` (diffusers first casts t / 1000 and
  the guidance to the compute dtype, which in bf16 rounds them to 8 significant bits: a deliberate difference);
- `num_layers` double-stream blocks (separate weights for the text and the image stream, joint attention over
  [text; image] with RMS qk-norm), then `num_single_layers` single-stream blocks over the joined sequence
  (parallel attention + MLP, one output projection), each kind one `layers.ScannedStack`;
- the final AdaLN-continuous norm and projection, on the image tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax.models import layers
from flowjax.models.layers import AdaLNModulation, Dense, FeedForward, RMSNorm, modulate

ROPE_THETA = 10000.0  # FluxPosEmbed(theta=10000)
QK_NORM_EPS = 1e-6  # FluxAttention(eps=1e-6) in both block kinds
MLP_RATIO = 4.0  # FluxSingleTransformerBlock(mlp_ratio=4.0); the double blocks' FeedForward(mult=4)
PACK = 2  # the pipeline packs 2x2 latent pixels into one token


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """The architecture, with diffusers' `FluxTransformer2DModel` config names and defaults (FLUX.1)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        problems = []
        if self.patch_size != 1:
            problems.append(f"patch_size={self.patch_size}: FLUX.1 transformers have patch_size 1 (the pipeline packs "
                            "2x2 latent pixels into each token), diffusers' model does not unpatchify other sizes")
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if value < PACK * PACK or value % (PACK * PACK):
                problems.append(f"{name}={value} must be a positive multiple of 4 (2x2-packed latent channels)")
        for name in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_layers", "num_single_layers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.axes_dims_rope) != 3 or any(d < 2 or d % 2 for d in self.axes_dims_rope):
            problems.append(f"axes_dims_rope={list(self.axes_dims_rope)} must be three positive even sizes "
                            "(one per position axis: 0, row, column)")
        elif sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(f"axes_dims_rope {list(self.axes_dims_rope)} must sum to attention_head_dim "
                            f"({self.attention_head_dim}): RoPE rotates every channel of a head")
        if problems:
            raise ValueError("invalid FLUX config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) NHWC latents the model takes: in_channels / 4."""
        return self.in_channels // (PACK * PACK)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "FluxConfig":
        """From a diffusers `config.json` dict; private `_...` keys are ignored, unknown ones refused."""
        return cls(**layers.diffusers_kwargs(cls, config, "FluxTransformer2DModel"))

    def to_diffusers(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "FluxTransformer2DModel", **d}


# --------------------------------------------------------------------------- packing and positions


def pack_latents(latents: jax.Array) -> jax.Array:
    """NHWC latents [B, H, W, C] -> tokens [B, (H/2)(W/2), 4C], channel order (c, dy, dx) (`_pack_latents`)."""
    return einops.rearrange(latents, "b (h p) (w q) c -> b (h w) (c p q)", p=PACK, q=PACK)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """The inverse of `pack_latents`: tokens [B, (H/2)(W/2), 4C] -> NHWC [B, H, W, C] (`_unpack_latents`)."""
    return einops.rearrange(tokens, "b (h w) (c p q) -> b (h p) (w q) c", h=height // PACK, w=width // PACK,
                            p=PACK, q=PACK)


def image_ids(h: int, w: int) -> np.ndarray:
    """[h*w, 3] ids (0, row, col) of a packed h x w token grid, row-major (`_prepare_latent_image_ids`)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(h * w, 3)


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float = ROPE_THETA
                ) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [S, sum(axes_dims)] float32 of FluxPosEmbed: per axis i, angles pos_i * theta^(-2j/d_i) in
    float64, each repeated twice (interleaved pairs), the axes concatenated."""
    cos, sin = [], []
    pos = np.asarray(ids, np.float32).astype(np.float64)  # diffusers: ids.float(), then float64 frequencies
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angles = np.outer(pos[:, i], freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return np.concatenate(cos, 1).astype(np.float32), np.concatenate(sin, 1).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the interleaved pairs (x[2j], x[2j+1]) of x [B, S, heads, D] by the angles of cos / sin [S, D],
    in float32 (apply_rotary_emb with use_real_unbind_dim=-1)."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


# --------------------------------------------------------------------------- blocks


def _split_heads(t: jax.Array, heads: int) -> jax.Array:
    return einops.rearrange(t, "b l (h d) -> b l h d", h=heads)


def _merge_heads(t: jax.Array) -> jax.Array:
    return einops.rearrange(t, "b l h d -> b l (h d)")


def _heads(x, proj, norm, heads):
    """proj(x) split into heads [B, L, heads, head_dim], RMS-normed per head when `norm` is given."""
    t = _split_heads(proj(x), heads)
    return norm(t) if norm is not None else t


class SelfAttention(nnx.Module):
    """q, k, v projections with RMS qk-norm per head and RoPE, softmax attention over one sequence: the
    single-stream blocks' attention (no output projection: the block's `proj_out` follows). Module names as
    diffusers' FluxAttention."""

    def __init__(self, cfg: FluxConfig, *, impl: str, dtype, param_dtype, rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.impl = cfg.num_attention_heads, impl
        self.to_q = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_k = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_v = Dense(d, d, axes=("embed", "heads"), **kw)
        self.norm_q = RMSNorm(hd, eps=QK_NORM_EPS, param_dtype=param_dtype, rngs=rngs)
        self.norm_k = RMSNorm(hd, eps=QK_NORM_EPS, param_dtype=param_dtype, rngs=rngs)

    def _attend(self, q, k, v, cos, sin):
        return _merge_heads(layers.attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.impl))

    def __call__(self, x, cos, sin):
        h = self.heads
        return self._attend(_heads(x, self.to_q, self.norm_q, h), _heads(x, self.to_k, self.norm_k, h),
                            _heads(x, self.to_v, None, h), cos, sin)


class JointAttention(SelfAttention):
    """The double-stream attention: image q/k/v (`to_*`), text q/k/v (`add_*_proj`, `norm_added_*`), attention over
    [text; image] with RoPE, outputs `to_out` (image) and `to_add_out` (text)."""

    def __init__(self, cfg: FluxConfig, *, impl: str, dtype, param_dtype, rngs):
        super().__init__(cfg, impl=impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.add_q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.add_k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.add_v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.norm_added_q = RMSNorm(hd, eps=QK_NORM_EPS, param_dtype=param_dtype, rngs=rngs)
        self.norm_added_k = RMSNorm(hd, eps=QK_NORM_EPS, param_dtype=param_dtype, rngs=rngs)
        self.to_out = Dense(d, d, axes=("heads", "embed"), **kw)
        self.to_add_out = Dense(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x, ctx, cos, sin):
        h = self.heads
        # Text tokens first, then image, as diffusers concatenates them (and as the RoPE ids are laid out).
        joint = lambda c, i: jnp.concatenate([c, i], axis=1)
        q = joint(_heads(ctx, self.add_q_proj, self.norm_added_q, h), _heads(x, self.to_q, self.norm_q, h))
        k = joint(_heads(ctx, self.add_k_proj, self.norm_added_k, h), _heads(x, self.to_k, self.norm_k, h))
        v = joint(_heads(ctx, self.add_v_proj, None, h), _heads(x, self.to_v, None, h))
        out = self._attend(q, k, v, cos, sin)
        n_txt = ctx.shape[1]
        return self.to_out(out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class DoubleStreamBlock(nnx.Module):
    """FluxTransformerBlock: AdaLN-Zero modulated joint attention + MLP, separate weights per stream."""

    def __init__(self, cfg: FluxConfig, *, impl: str, dtype, param_dtype, rngs):
        d = cfg.inner_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = AdaLNModulation(d, 6, **kw)
        self.norm1_context = AdaLNModulation(d, 6, **kw)
        self.attn = JointAttention(cfg, impl=impl, **kw)
        self.ff = FeedForward(d, int(d * MLP_RATIO), **kw)
        self.ff_context = FeedForward(d, int(d * MLP_RATIO), **kw)

    def __call__(self, streams, temb, cos, sin):
        x, ctx = streams
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        attn_out, ctx_attn = self.attn(modulate(x, shift_msa, scale_msa), modulate(ctx, c_shift_msa, c_scale_msa),
                                       cos, sin)
        x = x + gate_msa * attn_out
        x = x + gate_mlp * self.ff(modulate(x, shift_mlp, scale_mlp))
        ctx = ctx + c_gate_msa * ctx_attn
        ctx = ctx + c_gate_mlp * self.ff_context(modulate(ctx, c_shift_mlp, c_scale_mlp))
        return x, ctx


class SingleStreamBlock(nnx.Module):
    """FluxSingleTransformerBlock over the joined [text; image] sequence:
    x + gate * proj_out([attn(n); gelu_tanh(proj_mlp(n))]) with n = AdaLN(x)."""

    def __init__(self, cfg: FluxConfig, *, impl: str, dtype, param_dtype, rngs):
        d, mlp = cfg.inner_dim, int(cfg.inner_dim * MLP_RATIO)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = AdaLNModulation(d, 3, **kw)
        self.attn = SelfAttention(cfg, impl=impl, **kw)
        self.proj_mlp = Dense(d, mlp, axes=("embed", "mlp"), **kw)
        self.proj_out = Dense(d + mlp, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x, temb, cos, sin):
        shift, scale, gate = self.norm(temb)
        normed = modulate(x, shift, scale)
        mlp = jax.nn.gelu(self.proj_mlp(normed), approximate=True)
        return x + gate * self.proj_out(jnp.concatenate([self.attn(normed, cos, sin), mlp], axis=-1))


# --------------------------------------------------------------------------- the model


class _TimestepMLP(nnx.Module):
    """diffusers' TimestepEmbedding / PixArtAlphaTextProjection: linear_2(silu(linear_1(x)))."""

    def __init__(self, din: int, d: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Dense(din, d, axes=(None, "embed"), **kw)
        self.linear_2 = Dense(d, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class Flux(layers.ShardedModel):
    """velocity = model(latents [B,H,W,C], timesteps [B] (sigma*1000), text [B,L,joint], pooled [B,P], guidance [B]).

    `guidance` is the distilled guidance scale (e.g. 3.5) of a `guidance_embeds` model (FLUX.1-dev), embedded
    as 1000 * guidance like the timestep; models without it (FLUX.1-schnell) take none. H and W must be even
    (the 2x2 packing); C = config.latent_channels.
    """

    def __init__(
        self,
        config: FluxConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        remat: str = "none",
        activation_sharding=None,
    ):
        layers.check_build_args(attention_impl, remat)
        self._setup(config, dtype, activation_sharding)
        cfg, d = config, config.inner_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.x_embedder = Dense(cfg.in_channels, d, axes=(None, "embed"), **kw)
        self.context_embedder = Dense(cfg.joint_attention_dim, d, axes=(None, "embed"), **kw)
        self.timestep_embedder = _TimestepMLP(256, d, **kw)
        self.guidance_embedder = _TimestepMLP(256, d, **kw) if cfg.guidance_embeds else None
        self.text_embedder = _TimestepMLP(cfg.pooled_projection_dim, d, **kw)

        bkw = dict(impl=attention_impl, dtype=dtype, param_dtype=param_dtype)
        self.double_blocks = (
            layers.ScannedStack(lambda r: DoubleStreamBlock(cfg, rngs=r, **bkw), cfg.num_layers, remat=remat,
                                rngs=rngs) if cfg.num_layers else None)
        self.single_blocks = (
            layers.ScannedStack(lambda r: SingleStreamBlock(cfg, rngs=r, **bkw), cfg.num_single_layers,
                                remat=remat, rngs=rngs) if cfg.num_single_layers else None)
        self.norm_out = AdaLNModulation(d, 2, **kw)
        self.proj_out = Dense(d, cfg.patch_size ** 2 * cfg.out_channels, axes=("embed", None), **kw)

    def _check(self, latents, timesteps, encoder_hidden_states, pooled_projections, guidance):
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels or latents.shape[1] % PACK or \
                latents.shape[2] % PACK:
            raise ValueError(f"latents must be NHWC [B, H, W, {cfg.latent_channels}] with even H and W (the 2x2 "
                             f"packing; in_channels {cfg.in_channels} = 4 x {cfg.latent_channels}), got "
                             f"{latents.shape}")
        b = latents.shape[0]
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must have shape [B]=({b},), got {timesteps.shape}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b or \
                encoder_hidden_states.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [{b}, L, {cfg.joint_attention_dim}], got "
                             f"{encoder_hidden_states.shape}")
        if pooled_projections.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be [{b}, {cfg.pooled_projection_dim}], got "
                             f"{pooled_projections.shape}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this transformer embeds the guidance scale (guidance_embeds, FLUX.1-dev): pass "
                             "guidance=[B] (e.g. 3.5 per row)")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("this transformer has no guidance embedding (guidance_embeds=False, FLUX.1-schnell): "
                             "pass guidance=None")
        if guidance is not None and jnp.shape(guidance) != (b,):
            raise ValueError(f"guidance must have shape [B]=({b},), got {jnp.shape(guidance)}")

    def __call__(self, latents, timesteps, encoder_hidden_states, pooled_projections, guidance=None):
        self._check(latents, timesteps, encoder_hidden_states, pooled_projections, guidance)
        cfg = self.config
        _, height, width, _ = latents.shape
        h, w = height // PACK, width // PACK
        n_txt = encoder_hidden_states.shape[1]

        x = self._constrain(self.x_embedder(pack_latents(latents)))
        # diffusers' FluxPipeline hands its transformer t / 1000, which multiplies by 1000 again; we take t as it
        # is (XLA folds that round trip away under jit anyway).
        temb = self.timestep_embedder(layers.timestep_embedding(timesteps).astype(self.dtype))
        if self.guidance_embedder is not None:
            g = jnp.asarray(guidance, jnp.float32) * 1000.0
            temb = temb + self.guidance_embedder(layers.timestep_embedding(g).astype(self.dtype))
        temb = temb + self.text_embedder(pooled_projections)
        ctx = self._constrain(self.context_embedder(encoder_hidden_states))

        ids = np.concatenate([np.zeros((n_txt, 3), np.int64), image_ids(h, w)])  # text first, as diffusers
        cos, sin = (jnp.asarray(a) for a in rope_tables(ids, cfg.axes_dims_rope))
        if self.double_blocks is not None:
            (x, ctx), _ = self.double_blocks((x, ctx), temb, cos, sin)
        if self.single_blocks is not None:
            joint, _ = self.single_blocks(jnp.concatenate([ctx, x], axis=1), temb, cos, sin)
            x = joint[:, n_txt:]

        scale, shift = self.norm_out(temb)  # AdaLN-continuous: scale first
        out = self.proj_out(layers.layer_norm(x) * (1 + scale) + shift)
        return unpack_latents(out, height, width)
