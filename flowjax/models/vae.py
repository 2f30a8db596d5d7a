"""The SD3 / SD3.5 VAE (diffusers' `AutoencoderKL`) as a Flax NNX module, NHWC.

Encoder: conv_in -> down blocks (resnets, stride-2 conv) -> mid block (resnet, single-head attention,
resnet) -> GroupNorm, SiLU, conv_out -> [mean, logvar]. The decoder mirrors it with nearest-x2 + conv
upsamplers and one more resnet per level. Module and attribute names follow diffusers, so the key
table in `flowjax.convert.vae` is a plain rename plus the OIHW <-> HWIO kernel transpose.

Every parameter is replicated (`logical_axes` all None): the VAE is small (84M parameters for SD3)
and splitting conv channels over devices would turn every GroupNorm into a cross-device reduction.
Only the batch is sharded, through `activation_sharding`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flowjax.models import layers
from flowjax.models.layers import Dense

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D", "UNetResDownEncoderBlock2D")
UP_BLOCK_TYPES = ("UpDecoderBlock2D", "UNetResUpDecoderBlock2D")
GROUP_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture, with diffusers' `AutoencoderKL` config names and defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for f in ("down_block_types", "up_block_types", "block_out_channels", "sample_size",
                  "latents_mean", "latents_std"):
            object.__setattr__(self, f, _tuple(getattr(self, f)))
        problems = []
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        if bad:
            problems.append(f"down_block_types {bad} are not supported (only DownEncoderBlock2D)")
        bad = [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
        if bad:
            problems.append(f"up_block_types {bad} are not supported (only UpDecoderBlock2D)")
        n = len(self.block_out_channels)
        if n < 1 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(
                f"block_out_channels, down_block_types and up_block_types must have the same (non-zero) length, "
                f"got {n}, {len(self.down_block_types)}, {len(self.up_block_types)}"
            )
        if self.act_fn not in ("silu", "swish"):
            problems.append(f"act_fn={self.act_fn!r} is not supported (AutoencoderKL VAEs use 'silu')")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            problems.append(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            problems.append("layers_per_block must be at least 1")
        if problems:
            raise ValueError("invalid AutoencoderKL config: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD3)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """From a diffusers `config.json` dict; private `_...` keys are ignored, unknown ones refused."""
        return cls(**layers.diffusers_kwargs(cls, config, "AutoencoderKL"))

    def to_diffusers(self) -> dict[str, Any]:
        """Keyword arguments of `diffusers.AutoencoderKL` (lists where diffusers writes lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _params(init, rngs: nnx.Rngs, shape, param_dtype) -> nnx.Param:
    init = nnx.with_metadata(init, logical_axes=(None,) * len(shape))
    return nnx.Param(init(rngs.params(), shape, param_dtype))


class Conv2d(nnx.Module):
    """NHWC convolution, HWIO kernel [kh, kw, in, out] + bias; `padding` ((top, bottom), (left, right)), default k//2."""

    def __init__(self, in_features, out_features, kernel_size=3, *, stride=1, padding=None, dtype, param_dtype, rngs):
        k = kernel_size
        self.stride, self.dtype = stride, dtype
        self.padding = padding if padding is not None else ((k // 2, k // 2), (k // 2, k // 2))
        self.kernel = _params(nnx.initializers.lecun_normal(), rngs, (k, k, in_features, out_features), param_dtype)
        self.bias = _params(nnx.initializers.zeros_init(), rngs, (out_features,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over the channels (last axis) of [B, ..., C]; statistics in fp32."""

    def __init__(self, num_groups: int, channels: int, *, eps: float = GROUP_NORM_EPS, dtype, param_dtype, rngs):
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = _params(nnx.initializers.ones_init(), rngs, (channels,), param_dtype)
        self.bias = _params(nnx.initializers.zeros_init(), rngs, (channels,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        xg = x.astype(jnp.float32).reshape(*shape[:-1], self.num_groups, shape[-1] // self.num_groups)
        axes = (*range(1, xg.ndim - 2), xg.ndim - 1)  # everything but the batch and the group
        mean = xg.mean(axes, keepdims=True)
        var = jnp.square(xg - mean).mean(axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class ResnetBlock2D(nnx.Module):
    """x -> conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x); a 1x1 `conv_shortcut` when channels change."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(groups, cin, **kw)
        self.conv1 = Conv2d(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(groups, cout, **kw)
        self.conv2 = Conv2d(cout, cout, 3, **kw)
        self.conv_shortcut = Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions, with a GroupNorm in front and a residual.

    It runs at the latent resolution; with the portable `xla` kernel the [H*W, H*W] fp32 logits are
    materialised (1 GiB per image for SD3 at 1024x1024). The head is as wide as the block (512 for
    SD3), beyond what cuDNN's fused kernel takes, so `xla` is the default.
    """

    def __init__(self, channels: int, groups: int, *, impl: str, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.impl = impl
        self.group_norm = GroupNorm(groups, channels, **kw)
        self.to_q = Dense(channels, channels, **kw)
        self.to_k = Dense(channels, channels, **kw)
        self.to_v = Dense(channels, channels, **kw)
        self.to_out = Dense(channels, channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        n = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (proj(n).reshape(b, h * w, 1, c) for proj in (self.to_q, self.to_k, self.to_v))
        out = layers.attention(q, k, v, self.impl).reshape(b, h * w, c)
        return x + self.to_out(out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """resnet -> attention (unless `mid_block_add_attention` is False) -> resnet, at constant width."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, impl: str, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
        self.attention = AttentionBlock(channels, groups, impl=impl, **kw) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """`num_layers` resnets, then (except at the last level) a stride-2 3x3 conv padded (0, 1) on each axis."""

    def __init__(self, cin, cout, num_layers, groups, add_downsample, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)])
        # diffusers pads (left 0, right 1, top 0, bottom 1) and convolves with padding 0.
        self.downsampler = Conv2d(cout, cout, 3, stride=2, padding=((0, 1), (0, 1)), **kw) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsampler is None else self.downsampler(x)


def _upsample_nearest_2x(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class UpBlock(nnx.Module):
    """`num_layers` resnets, then (except at the last level) nearest x2 upsampling and a 3x3 conv."""

    def __init__(self, cin, cout, num_layers, groups, add_upsample, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)])
        self.upsampler = Conv2d(cout, cout, 3, **kw) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsampler is None else self.upsampler(_upsample_nearest_2x(x))


class Encoder(nnx.Module):
    """images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2*latent_channels] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig, *, impl: str, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, **kw) for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, impl=impl, **kw)
        self.conv_norm_out = GroupNorm(g, ch[-1], **kw)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """latents [B, h, w, latent_channels] (after post_quant_conv) -> images [B, h*f, w*f, out_channels]."""

    def __init__(self, cfg: VAEConfig, *, impl: str, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, **kw)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, impl=impl, **kw)
        # Widest level first; one resnet more per level than the encoder.
        self.up_blocks = nnx.List([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1, **kw)
            for i in range(len(ch))
        ])
        self.conv_norm_out = GroupNorm(g, ch[-1], **kw)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(layers.ShardedModel):
    """`encode(images [B,H,W,C] in [-1, 1]) -> (mean, logvar)`, `decode(z [B,h,w,latent]) -> images`.

    `latents_to_images` / `images_to_latents` add the SD3 pipeline's scaling, shift and [0, 1] mapping.
    Activations are computed in `dtype` (GroupNorm statistics and attention logits always in fp32).
    """

    def __init__(
        self,
        config: VAEConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        activation_sharding=None,
    ):
        layers.check_build_args(attention_impl, "none")
        self._setup(config, dtype, activation_sharding)
        kw = dict(impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ckw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lat = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = Conv2d(2 * lat, 2 * lat, 1, **ckw) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(lat, lat, 1, **ckw) if config.use_post_quant_conv else None

    def _constrain(self, x):
        return super()._constrain(x, ("activation_batch", None, None, None))

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) [B, H/f, W/f, latent_channels] in fp32 of the posterior; logvar clipped to [-30, 20]."""
        c = self.config.in_channels
        if images.ndim != 4 or images.shape[-1] != c:
            raise ValueError(f"images must be [B, H, W, {c}] (NHWC, values in [-1, 1]), got {images.shape}")
        moments = self.encoder(self._constrain(images))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = self._constrain(moments).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images [B, h*f, w*f, out_channels] in `dtype`, roughly in [-1, 1], from unscaled latents."""
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[-1] != c:
            raise ValueError(f"latents must be [B, h, w, {c}] (NHWC), got {z.shape}")
        z = self._constrain(z.astype(self.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self._constrain(self.decoder(z))

    @property
    def _shift(self) -> float:
        return self.config.shift_factor or 0.0

    def latents_to_images(self, latents: jax.Array) -> jax.Array:
        """Diffusion-space latents -> images [B, H, W, C] in [0, 1] (fp32), as the SD3 pipeline decodes."""
        x = self.decode(latents / self.config.scaling_factor + self._shift)
        return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    def images_to_latents(self, images01: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images in [0, 1] -> diffusion-space latents: (posterior sample with `key`, else mean - shift) * scaling."""
        mean, logvar = self.encode(images01 * 2.0 - 1.0)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return (z - self._shift) * self.config.scaling_factor
