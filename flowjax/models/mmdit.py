"""The SD3 / SD3.5 MMDiT (diffusers' `SD3Transformer2DModel`) as a Flax NNX module, NHWC.

Consecutive blocks of the same kind (dual-attention or not, context kept or "pre-only") are stacked
into one `layers.ScannedStack` whose parameters have a leading `layers` axis and which runs under
`jax.lax.scan`: SD3.5-Medium is three stacks (13 dual, 10 plain, the last block), SD3.5-Large two.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from flowjax.models import layers
from flowjax.models.layers import AdaLNModulation, Dense, FeedForward, RMSNorm, modulate


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The architecture, with diffusers' `SD3Transformer2DModel` config names and defaults."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        inner = self.inner_dim
        problems = []
        if self.qk_norm not in (None, "rms_norm"):
            problems.append(f"qk_norm={self.qk_norm!r} is not supported (SD3 uses None, SD3.5 'rms_norm')")
        if self.caption_projection_dim != inner:
            problems.append(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads*attention_head_dim ({inner}): the joint attention mixes both streams"
            )
        if inner % 4:
            problems.append(f"the inner dim {inner} must be divisible by 4 for the 2D sin-cos table")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            problems.append(f"dual_attention_layers {bad} lie outside 0..{self.num_layers - 1}")
        if self.num_layers < 1:
            problems.append("num_layers must be at least 1")
        if problems:
            raise ValueError("invalid MMDiT config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "MMDiTConfig":
        """From a diffusers `config.json` dict; private `_...` keys are ignored, unknown ones refused."""
        kwargs = layers.diffusers_kwargs(cls, config, "SD3Transformer2DModel")
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": "SD3Transformer2DModel", **d}

    def block_kinds(self) -> list[tuple[bool, bool]]:
        """(dual_attention, context_pre_only) of each block, in order."""
        return [(i in self.dual_attention_layers, i == self.num_layers - 1) for i in range(self.num_layers)]

    def stack_layout(self) -> list[tuple[int, int, bool, bool]]:
        """Maximal runs of identical blocks: (first_layer, count, dual, pre_only) each."""
        out, start = [], 0
        for (dual, pre_only), run in itertools.groupby(self.block_kinds()):
            n = len(list(run))
            out.append((start, n, dual, pre_only))
            start += n
        return out


class Attention(nnx.Module):
    """Multi-head attention of one stream, optionally joint with a context stream (`add_*` projections)."""

    def __init__(self, cfg: MMDiTConfig, *, joint: bool, context_out: bool, impl: str, dtype, param_dtype, rngs):
        d, h, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.impl = h, impl
        self.to_q = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_k = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_v = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_out = Dense(d, d, axes=("heads", "embed"), **kw)
        qk = cfg.qk_norm == "rms_norm"
        nkw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm_q = RMSNorm(hd, **nkw) if qk else None
        self.norm_k = RMSNorm(hd, **nkw) if qk else None
        if joint:
            self.add_q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
            self.add_k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
            self.add_v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
            self.norm_added_q = RMSNorm(hd, **nkw) if qk else None
            self.norm_added_k = RMSNorm(hd, **nkw) if qk else None
            self.to_add_out = Dense(d, d, axes=("heads", "embed"), **kw) if context_out else None
        self.joint = joint

    def _qkv(self, x, q_proj, k_proj, v_proj, q_norm, k_norm):
        split = lambda t: einops.rearrange(t, "b l (h d) -> b l h d", h=self.heads)
        q, k, v = split(q_proj(x)), split(k_proj(x)), split(v_proj(x))
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return q, k, v

    def __call__(self, x: jax.Array, ctx: jax.Array | None = None):
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if ctx is not None:
            cq, ck, cv = self._qkv(
                ctx, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
            )
            # Image tokens first, then text, as diffusers concatenates them.
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))
        out = einops.rearrange(layers.attention(q, k, v, self.impl), "b l h d -> b l (h d)")
        if ctx is None:
            return self.to_out(out)
        n = x.shape[1]
        ctx_out = out[:, n:]
        return self.to_out(out[:, :n]), (self.to_add_out(ctx_out) if self.to_add_out is not None else None)


class JointBlock(nnx.Module):
    """One MMDiT block: AdaLN-Zero modulated joint attention + MLP on both streams.

    `dual`: SD3.5's extra self-attention over image tokens (`attn2`, 9 modulation vectors).
    `pre_only`: the last block, whose context stream is only read (no context output).
    """

    def __init__(self, cfg: MMDiTConfig, *, dual: bool, pre_only: bool, impl: str, dtype, param_dtype, rngs):
        d = cfg.inner_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dual, self.pre_only = dual, pre_only
        self.norm1 = AdaLNModulation(d, 9 if dual else 6, **kw)
        self.norm1_context = AdaLNModulation(d, 2 if pre_only else 6, **kw)
        self.attn = Attention(cfg, joint=True, context_out=not pre_only, impl=impl, **kw)
        self.attn2 = Attention(cfg, joint=False, context_out=False, impl=impl, **kw) if dual else None
        self.ff = FeedForward(d, 4 * d, **kw)
        self.ff_context = None if pre_only else FeedForward(d, 4 * d, **kw)

    def __call__(self, streams, temb):
        x, ctx = streams
        mods = self.norm1(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = layers.layer_norm(x)
        if self.pre_only:
            c_scale, c_shift = self.norm1_context(temb)  # AdaLN-continuous: scale first
            ctx_in = layers.layer_norm(ctx) * (1 + c_scale) + c_shift
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            ctx_in = modulate(ctx, c_shift_msa, c_scale_msa)

        attn_out, ctx_attn = self.attn(normed * (1 + scale_msa) + shift_msa, ctx_in)
        x = x + gate_msa * attn_out
        if self.dual:
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2 * self.attn2(normed * (1 + scale2) + shift2)
        x = x + gate_mlp * self.ff(modulate(x, shift_mlp, scale_mlp))

        if self.pre_only:
            return x, ctx
        ctx = ctx + c_gate_msa * ctx_attn
        ctx = ctx + c_gate_mlp * self.ff_context(modulate(ctx, c_shift_mlp, c_scale_mlp))
        return x, ctx


class MMDiT(layers.ShardedModel):
    """velocity = model(latents [B,H,W,C], timesteps [B] (sigma*1000), text [B,L,joint_dim], pooled [B,P])."""

    def __init__(
        self,
        config: MMDiTConfig,
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
        cfg, d, p = config, config.inner_dim, config.patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        # Patch embedding: a p x p stride-p conv, stored HWIO [p, p, C, D].
        conv_init = nnx.with_metadata(nnx.initializers.lecun_normal(), logical_axes=(None, None, None, "embed"))
        self.patch_kernel = nnx.Param(conv_init(rngs.params(), (p, p, cfg.in_channels, d), param_dtype))
        self.patch_bias = nnx.Param(
            nnx.with_metadata(nnx.initializers.zeros_init(), logical_axes=("embed",))(rngs.params(), (d,), param_dtype)
        )
        grid = cfg.pos_embed_max_size
        table = layers.sincos_2d_table(d, grid, base_size=cfg.sample_size // p)
        self.pos_embed = layers.Buffer(jnp.asarray(table[None], dtype=param_dtype), logical_axes=(None, None, "embed"))

        self.timestep_linear_1 = Dense(256, d, axes=(None, "embed"), **kw)
        self.timestep_linear_2 = Dense(d, d, axes=("mlp", "embed"), **kw)
        self.text_linear_1 = Dense(cfg.pooled_projection_dim, d, axes=(None, "embed"), **kw)
        self.text_linear_2 = Dense(d, d, axes=("mlp", "embed"), **kw)
        self.context_embedder = Dense(cfg.joint_attention_dim, d, axes=(None, "embed"), **kw)

        def block_maker(dual, pre_only):
            return lambda r: JointBlock(cfg, dual=dual, pre_only=pre_only, impl=attention_impl, dtype=dtype,
                                        param_dtype=param_dtype, rngs=r)

        self.stacks = nnx.List(
            [layers.ScannedStack(block_maker(dual, pre), n, remat=remat, rngs=rngs)
             for _, n, dual, pre in cfg.stack_layout()]
        )
        self.norm_out = AdaLNModulation(d, 2, **kw)
        self.proj_out = Dense(d, p * p * cfg.out_channels, axes=("embed", None), **kw)

    def _positional(self, h: int, w: int) -> jax.Array:
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(
                f"latent grid {h}x{w} patches exceeds pos_embed_max_size={m} "
                f"(at most {m * self.config.patch_size} latent pixels a side)"
            )
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed[...].reshape(m, m, -1)[top : top + h, left : left + w]
        return table.reshape(1, h * w, -1)

    def __call__(self, latents, timesteps, encoder_hidden_states, pooled_projections):
        cfg, p = self.config, self.config.patch_size
        b, height, width, c = latents.shape
        if c != cfg.in_channels or height % p or width % p:
            raise ValueError(
                f"latents must be [B, H, W, {cfg.in_channels}] with H and W divisible by patch_size={p}, "
                f"got {latents.shape}"
            )
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must have shape [B]=({b},), got {timesteps.shape}")
        h, w = height // p, width // p

        patches = einops.rearrange(latents.astype(self.dtype), "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
        kernel = self.patch_kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        x = patches @ kernel + self.patch_bias[...].astype(self.dtype)
        x = x + self._positional(h, w).astype(self.dtype)
        x = self._constrain(x)

        t_emb = layers.timestep_embedding(timesteps).astype(self.dtype)
        temb = self.timestep_linear_2(jax.nn.silu(self.timestep_linear_1(t_emb)))
        temb = temb + self.text_linear_2(jax.nn.silu(self.text_linear_1(pooled_projections)))
        ctx = self.context_embedder(encoder_hidden_states)
        ctx = self._constrain(ctx)

        for stack in self.stacks:
            (x, ctx), _ = stack((x, ctx), temb)

        scale, shift = self.norm_out(temb)  # AdaLN-continuous: scale first
        x = layers.layer_norm(x) * (1 + scale) + shift
        x = self.proj_out(x)
        return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=p, q=p)
