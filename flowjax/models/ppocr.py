"""PP-OCRv4 text detection (DB) and recognition (SVTR-LCNet) as NNX modules, NHWC, inference form.

The modules follow the inference graphs that PaddleOCR exports (`ch_PP-OCRv4_det_infer`,
`ch_PP-OCRv4_rec_infer`; the ONNX files shipped in `rapidocr-onnxruntime` 1.4.4), i.e. PaddleOCR's
training modules after `LearnableRepLayer.rep()` folded each multi-branch block into one convolution:

- backbone `PPLCNetV3` (PaddleOCR `ppocr/modeling/backbones/rec_lcnetv3.py`): a stem ConvBN (no activation),
  then `LCNetV3Block`s of a depthwise k x k "rep" conv (conv + bias, learnable affine `s*x+b`, and unless
  the stride is the integer 2 a hardswish followed by a second learnable affine), an optional SE layer
  (avg-pool, 1x1 conv, ReLU, 1x1 conv, hardsigmoid(x/6 + 1/2), multiply) and a pointwise 1x1 rep conv.
  Detection (scale 0.75) returns the four stage outputs through 1x1 convs (`layer_list`); recognition
  (scale 0.95, strides (2,1) / (1,2)) ends with a 3x2 average pool.
- detection neck `RSEFPN` (`ppocr/modeling/necks/db_fpn.py`, shortcut=True): per level a 1x1 conv with a
  residual SE (`x + x * hardsigmoid(0.2*y + 0.5)`), top-down nearest x2 upsampling sums, a 3x3 conv with
  residual SE per level, nearest upsampling to 1/4 and concatenation [p5, p4, p3, p2].
- detection head `DBHead` (`ppocr/modeling/heads/det_db_head.py`), the binarize branch only (inference):
  3x3 conv, BN, ReLU, 2x2/2 transposed conv, BN, ReLU, 2x2/2 transposed conv, sigmoid -> probability map.
- recognition neck `EncoderWithSVTR` (`ppocr/modeling/necks/rnn.py`, dims 120, depth 2, hidden 120,
  kernel [1, 3], 8 heads, mlp ratio 2, Swish): conv1 / conv2 (ConvBN + Swish), two pre-norm transformer
  blocks (LayerNorm eps 1e-5, softmax attention with scale head_dim^-0.5), LayerNorm eps 1e-6, conv3,
  concatenation with the neck input, conv4, conv1x1.
- recognition head `CTCHead` (`ppocr/modeling/heads/rec_ctc_head.py`): a linear layer to the classes and,
  at inference, a softmax.

Variable text widths with fixed shapes: PaddleOCR / RapidOCR run the recogniser on a batch padded to its
own width. `TextRecognizer(x, valid_width)` takes inputs padded to a larger fixed width and a per-row valid
width, and reproduces the narrower network exactly: columns past the valid width are zeroed before every
layer that mixes columns (so they act as that network's zero padding), the SE means are taken over the
valid columns only and the attention ignores the padded time steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["DetConfig", "RecConfig", "TextDetector", "TextRecognizer", "DET_V4", "REC_V4"]

# (kernel, in, out, stride, SE) per block, before the width scale (rec_lcnetv3.py NET_CONFIG_det / _rec).
_NET_DET = (
    ((3, 16, 32, 1, False),),
    ((3, 32, 64, 2, False), (3, 64, 64, 1, False)),
    ((3, 64, 128, 2, False), (3, 128, 128, 1, False)),
    ((3, 128, 256, 2, False),) + ((5, 256, 256, 1, False),) * 4,
    ((5, 256, 512, 2, True), (5, 512, 512, 1, True), (5, 512, 512, 1, False), (5, 512, 512, 1, False)),
)
_NET_REC = (
    ((3, 16, 32, 1, False),),
    ((3, 32, 64, 1, False), (3, 64, 64, 1, False)),
    ((3, 64, 128, (2, 1), False), (3, 128, 128, 1, False)),
    ((3, 128, 256, (1, 2), False),) + ((5, 256, 256, 1, False),) * 4,
    ((5, 256, 512, (2, 1), True), (5, 512, 512, 1, True), (5, 512, 512, (2, 1), False), (5, 512, 512, 1, False)),
)
_DET_LAYER_LIST = (16, 24, 56, 480)  # rec_lcnetv3.py: mv_c, scaled by int(c * scale)

BN_EPS = 1e-5
HARDSIGMOID_BACKBONE = (np.float32(0.1666667), np.float32(0.5))  # paddle.nn.Hardsigmoid() (the graph's alpha)
HARDSIGMOID_NECK = (np.float32(0.2), np.float32(0.5))  # F.hardsigmoid(slope=0.2, offset=0.5) in db_fpn.py


def make_divisible(v: float, divisor: int = 16) -> int:
    """rec_lcnetv3.py's channel rounding."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


@dataclasses.dataclass(frozen=True)
class DetConfig:
    scale: float = 0.75
    neck_channels: int = 96


@dataclasses.dataclass(frozen=True)
class RecConfig:
    scale: float = 0.95
    num_classes: int = 6625  # the dictionary + CTC blank (0) + space (last)
    dims: int = 120
    hidden_dims: int = 120
    depth: int = 2
    num_heads: int = 8
    mlp_ratio: float = 2.0


DET_V4, REC_V4 = DetConfig(), RecConfig()


# ----------------------------------------------------------------------------- width masks


def _mask(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Zero the columns (axis 2 of NHWC) at or past each row's valid width."""
    if valid is None:
        return x
    keep = jnp.arange(x.shape[2])[None, :] < valid[:, None]
    return jnp.where(keep[:, None, :, None], x, 0).astype(x.dtype)


def _strided_width(valid: jax.Array | None, stride, kernel: int) -> jax.Array | None:
    """Output width of a conv with padding (k-1)//2 and this stride along W, for an input `valid` wide."""
    sw = stride[1] if isinstance(stride, tuple) else stride
    if valid is None or sw == 1:
        return valid
    pad = (kernel - 1) // 2
    return (valid + 2 * pad - kernel) // sw + 1


def _mean_hw(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Mean over H and W (over the valid columns only), keepdims, in float32."""
    xf = x.astype(jnp.float32)
    if valid is None:
        return xf.mean((1, 2), keepdims=True)
    total = _mask(xf, valid).sum((1, 2), keepdims=True)
    return total / (x.shape[1] * valid.astype(jnp.float32))[:, None, None, None]


# ----------------------------------------------------------------------------- layers


def _param(shape, fill: float = 0.0) -> nnx.Param:
    """A float32 parameter filled with a constant: these modules exist to receive converted weights."""
    return nnx.Param(jax.device_put(np.full(shape, fill, np.float32)), logical_axes=(None,) * len(shape))


class Conv(nnx.Module):
    """NHWC conv with an HWIO kernel [kh, kw, in/groups, out], PaddleOCR's padding (k-1)//2 unless given."""

    def __init__(self, cin: int, cout: int, kernel=1, *, stride=1, groups: int = 1, padding=None, bias: bool = True,
                 dtype=jnp.float32):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.padding = padding if padding is not None else (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)
        self.groups, self.dtype = groups, dtype
        self.kernel = _param((kh, kw, cin // groups, cout))
        self.bias = _param((cout,)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.groups > 1 and self.groups == x.shape[-1] == self.kernel.shape[-1]:
            y = self._depthwise(x.astype(self.dtype))
            return y if self.bias is None else y + self.bias[...].astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
            precision=jax.lax.Precision.HIGHEST)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)

    def _depthwise(self, x: jax.Array) -> jax.Array:
        """A depthwise conv as a sum of kh * kw shifted, scaled copies: the same result as a grouped
        `conv_general_dilated`, 10-50x faster on XLA:CPU (whose grouped convolutions are slow) and a
        single fused loop elsewhere."""
        kh, kw = self.kernel.shape[:2]
        (pt, pb), (pl, pr) = self.padding
        sh, sw = self.stride
        xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
        kernel = self.kernel[...].astype(self.dtype)
        out = None
        for i in range(kh):
            for j in range(kw):
                tap = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out


class BatchNorm(nnx.Module):
    """Inference batch norm `(x - mean) / sqrt(var + eps) * scale + bias` (ONNX BatchNormalization)."""

    def __init__(self, channels: int, *, eps: float = BN_EPS):
        self.eps = eps
        self.scale = _param((channels,), 1.0)
        self.bias = _param((channels,))
        self.mean = _param((channels,))
        self.var = _param((channels,), 1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.var[...] + self.eps)
        return ((x - self.mean[...]) * inv * self.scale[...] + self.bias[...]).astype(x.dtype)


class Affine(nnx.Module):
    """PPLCNetV3's LearnableAffineBlock: `scale * x + bias` with one scalar each."""

    def __init__(self):
        self.scale = _param((1,), 1.0)
        self.bias = _param((1,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.scale[...] * x + self.bias[...]


class Dense(nnx.Module):
    def __init__(self, cin: int, cout: int):
        self.kernel = _param((cin, cout))
        self.bias = _param((cout,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.kernel[...], precision=jax.lax.Precision.HIGHEST) + self.bias[...]


class LayerNorm(nnx.Module):
    def __init__(self, channels: int, *, eps: float):
        self.eps = eps
        self.scale = _param((channels,), 1.0)
        self.bias = _param((channels,))

    def __call__(self, x: jax.Array) -> jax.Array:
        centred = x - x.mean(-1, keepdims=True)
        var = jnp.square(centred).mean(-1, keepdims=True)
        return centred / jnp.sqrt(var + self.eps) * self.scale[...] + self.bias[...]


def hardswish(x: jax.Array) -> jax.Array:
    """x * relu6(x + 3) / 6, in the graph's order of operations."""
    return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hardsigmoid(x: jax.Array, slope_offset) -> jax.Array:
    slope, offset = slope_offset
    return jnp.clip(x * slope + offset, 0.0, 1.0)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
    """Nearest upsampling by an integer factor (ONNX Resize nearest, asymmetric, floor)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


# ----------------------------------------------------------------------------- backbone


class ConvBN(nnx.Module):
    """Conv (no bias) + BN."""

    def __init__(self, cin, cout, kernel, *, stride=1, padding=None):
        self.conv = Conv(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = BatchNorm(cout)

    def __call__(self, x):
        return self.bn(self.conv(x))


class RepLayer(nnx.Module):
    """A folded LearnableRepLayer: conv + bias, affine, and (unless stride == 2) hardswish + affine."""

    def __init__(self, cin, cout, kernel, stride, *, groups=1):
        self.kernel_size, self.stride = kernel, stride
        self.conv = Conv(cin, cout, kernel, stride=stride, groups=groups)
        self.lab = Affine()
        self.act_lab = None if stride == 2 else Affine()  # rec_lcnetv3.py: `if self.stride != 2`

    def __call__(self, x):
        x = self.lab(self.conv(x))
        return x if self.act_lab is None else self.act_lab(hardswish(x))


class SE(nnx.Module):
    """x * hardsigmoid(conv2(relu(conv1(mean(x))))) with reduction 4."""

    def __init__(self, channels: int, slope_offset):
        self.slope_offset = slope_offset
        self.conv1 = Conv(channels, channels // 4, 1)
        self.conv2 = Conv(channels // 4, channels, 1)

    def gate(self, x, valid=None):
        s = self.conv2(jax.nn.relu(self.conv1(_mean_hw(x, valid))))
        return hardsigmoid(s, self.slope_offset)

    def __call__(self, x, valid=None):
        return x * self.gate(x, valid)


class LCNetV3Block(nnx.Module):
    def __init__(self, cin, cout, kernel, stride, use_se):
        self.dw_conv = RepLayer(cin, cin, kernel, stride, groups=cin)
        self.se = SE(cin, HARDSIGMOID_BACKBONE) if use_se else None
        self.pw_conv = RepLayer(cin, cout, 1, 1)

    def __call__(self, x, valid=None):
        valid = _strided_width(valid, self.dw_conv.stride, self.dw_conv.kernel_size)
        x = _mask(self.dw_conv(x), valid)
        if self.se is not None:
            x = self.se(x, valid)
        return _mask(self.pw_conv(x), valid), valid


class PPLCNetV3(nnx.Module):
    """The backbone; `det=True` returns the four stage features through `layer_list`, else the pooled map."""

    def __init__(self, scale: float, det: bool):
        self.det = det
        net = _NET_DET if det else _NET_REC
        self.conv1 = ConvBN(3, make_divisible(16 * scale), 3, stride=2)
        width = lambda c: make_divisible(c * scale)
        self.stages = nnx.List([
            nnx.List([LCNetV3Block(width(cin), width(cout), k, s, se) for k, cin, cout, s, se in blocks])
            for blocks in net])
        if det:
            outs = [make_divisible(blocks[-1][2] * scale) for blocks in net[1:]]
            self.layer_list = nnx.List([Conv(c, int(m * scale), 1) for c, m in zip(outs, _DET_LAYER_LIST)])
        self.out_channels = make_divisible(512 * scale)

    def __call__(self, x, valid=None):
        x = _mask(x, valid)  # the reference pads its inputs with zeros
        valid = _strided_width(valid, 2, 3)
        x = _mask(self.conv1(x), valid)
        features = []
        for i, stage in enumerate(self.stages):
            for block in stage:
                x, valid = block(x, valid)
            if i >= 1:
                features.append(x)
        if self.det:
            return [conv(f) for conv, f in zip(self.layer_list, features)]
        # F.avg_pool2d(x, [3, 2]) (stride = kernel, no padding, floor)
        b, h, w, c = x.shape
        x = x[:, : h // 3 * 3, : w // 2 * 2].reshape(b, h // 3, 3, w // 2, 2, c).mean((2, 4))
        return x, None if valid is None else valid // 2


# ----------------------------------------------------------------------------- detection


class RSELayer(nnx.Module):
    def __init__(self, cin, cout, kernel):
        self.in_conv = Conv(cin, cout, kernel, bias=False)
        self.se = SE(cout, HARDSIGMOID_NECK)

    def __call__(self, x):
        x = self.in_conv(x)
        return x + self.se(x)


class RSEFPN(nnx.Module):
    def __init__(self, in_channels, out_channels: int):
        self.ins_conv = nnx.List([RSELayer(c, out_channels, 1) for c in in_channels])
        self.inp_conv = nnx.List([RSELayer(out_channels, out_channels // 4, 3) for _ in in_channels])

    def __call__(self, features):
        c2, c3, c4, c5 = features
        in5, in4, in3, in2 = (self.ins_conv[i](c) for i, c in ((3, c5), (2, c4), (1, c3), (0, c2)))
        out4 = in4 + upsample_nearest(in5, 2)
        out3 = in3 + upsample_nearest(out4, 2)
        out2 = in2 + upsample_nearest(out3, 2)
        p5, p4, p3, p2 = (self.inp_conv[i](f) for i, f in ((3, in5), (2, out4), (1, out3), (0, out2)))
        return jnp.concatenate([upsample_nearest(p5, 8), upsample_nearest(p4, 4), upsample_nearest(p3, 2), p2], -1)


class ConvTranspose2x2(nnx.Module):
    """Transposed conv, kernel 2, stride 2, no padding; kernel stored [in, kh, kw, out]."""

    def __init__(self, cin, cout):
        self.kernel = _param((cin, 2, 2, cout))
        self.bias = _param((cout,))

    def __call__(self, x):
        b, h, w, _ = x.shape
        y = jnp.einsum("bhwc,ckld->bhkwld", x, self.kernel[...], precision=jax.lax.Precision.HIGHEST)
        return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...]


class DBHead(nnx.Module):
    def __init__(self, channels: int):
        mid = channels // 4
        self.conv1 = Conv(channels, mid, 3, bias=False)
        self.bn1 = BatchNorm(mid)
        self.conv2 = ConvTranspose2x2(mid, mid)
        self.bn2 = BatchNorm(mid)
        self.conv3 = ConvTranspose2x2(mid, 1)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        return jax.nn.sigmoid(self.conv3(x))[..., 0]


class TextDetector(nnx.Module):
    """Normalised images [B, H, W, 3] (H, W multiples of 32) -> text probability map [B, H, W]."""

    def __init__(self, config: DetConfig = DET_V4):
        self.config = config
        self.backbone = PPLCNetV3(config.scale, det=True)
        chans = [int(m * config.scale) for m in _DET_LAYER_LIST]
        self.neck = RSEFPN(chans, config.neck_channels)
        self.head = DBHead(config.neck_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % 32 or x.shape[2] % 32:
            raise ValueError(f"the detector takes [B, H, W, 3] with H, W multiples of 32, got {x.shape}")
        return self.head(self.neck(self.backbone(x.astype(jnp.float32))))


# ----------------------------------------------------------------------------- recognition


class ConvBNSwish(nnx.Module):
    def __init__(self, cin, cout, kernel, *, padding=None):
        self.conv = Conv(cin, cout, kernel, padding=padding, bias=False)
        self.bn = BatchNorm(cout)

    def __call__(self, x):
        return swish(self.bn(self.conv(x)))


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int):
        self.heads = heads
        self.qkv = Dense(dim, 3 * dim)
        self.proj = Dense(dim, dim)

    def __call__(self, x, valid=None):
        b, n, c = x.shape
        hd = c // self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * hd ** -0.5, k, precision=jax.lax.Precision.HIGHEST)
        if valid is not None:
            keep = jnp.arange(n)[None, :] < valid[:, None]
            logits = jnp.where(keep[:, None, None, :], logits, -jnp.inf)
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bqhd", attn, v, precision=jax.lax.Precision.HIGHEST).reshape(b, n, c)
        return self.proj(out)


class SVTRBlock(nnx.Module):
    def __init__(self, dim, heads, mlp_ratio):
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.fc1 = Dense(dim, int(dim * mlp_ratio))
        self.fc2 = Dense(int(dim * mlp_ratio), dim)

    def __call__(self, x, valid=None):
        x = x + self.attn(self.norm1(x), valid)
        return x + self.fc2(swish(self.fc1(self.norm2(x))))


class EncoderWithSVTR(nnx.Module):
    def __init__(self, cin: int, config: RecConfig):
        pad = ((0, 0), (1, 1))  # kernel [1, 3], padding [0, 1]
        self.conv1 = ConvBNSwish(cin, cin // 8, (1, 3), padding=pad)
        self.conv2 = ConvBNSwish(cin // 8, config.hidden_dims, 1)
        self.svtr_block = nnx.List([SVTRBlock(config.hidden_dims, config.num_heads, config.mlp_ratio)
                                    for _ in range(config.depth)])
        self.norm = LayerNorm(config.hidden_dims, eps=1e-6)
        self.conv3 = ConvBNSwish(config.hidden_dims, cin, 1)
        self.conv4 = ConvBNSwish(2 * cin, cin // 8, (1, 3), padding=pad)
        self.conv1x1 = ConvBNSwish(cin // 8, config.dims, 1)

    def __call__(self, x, valid=None):
        h = _mask(x, valid)
        z = self.conv2(self.conv1(h))
        b, hh, w, c = z.shape
        z = z.reshape(b, hh * w, c)
        for block in self.svtr_block:
            z = block(z, valid)
        z = self.conv3(self.norm(z).reshape(b, hh, w, c))
        z = _mask(jnp.concatenate([h, z], -1), valid)
        return self.conv1x1(self.conv4(z))


class TextRecognizer(nnx.Module):
    """Normalised text crops [B, 48, W, 3] (+ per-row valid widths) -> CTC logits [B, W/8, num_classes].

    `valid_width` [B] (optional): row b is computed as PaddleOCR's network on a [48, valid_width[b]] input;
    the logits at time steps >= that network's length (`output_length(valid_width)`) are undefined.
    """

    def __init__(self, config: RecConfig = REC_V4):
        self.config = config
        self.backbone = PPLCNetV3(config.scale, det=False)
        self.neck = EncoderWithSVTR(self.backbone.out_channels, config)
        self.head = Dense(config.dims, config.num_classes)

    @staticmethod
    def output_length(valid_width):
        """Time steps of the network on an input `valid_width` wide (stem /2, one (1, 2) stride, pool /2)."""
        w = (valid_width - 1) // 2 + 1
        return ((w - 1) // 2 + 1) // 2

    def __call__(self, x: jax.Array, valid_width: jax.Array | None = None) -> jax.Array:
        if x.ndim != 4 or x.shape[1] != 48 or x.shape[-1] != 3:
            raise ValueError(f"the recogniser takes [B, 48, W, 3], got {x.shape}")
        valid = None if valid_width is None else jnp.asarray(valid_width, jnp.int32)
        feats, valid = self.backbone(x.astype(jnp.float32), valid)
        seq = self.neck(feats, valid)  # [B, 1, T, dims]
        return self.head(seq[:, 0])
