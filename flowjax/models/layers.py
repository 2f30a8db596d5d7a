"""Shared building blocks of the flowjax models.

Every parameter carries `logical_axes` metadata (e.g. ``("embed", "heads")``); `flowjax.sharding`
turns those names into mesh shardings through the rules of the config. We keep them under our own
metadata key rather than NNX's ``out_sharding`` so that a model can be built (or `eval_shape`d)
without any mesh in scope; sharding is applied once, when weights are placed.
"""

from __future__ import annotations

import math
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ATTENTION_IMPLS = ("xla", "cudnn", "auto", "chunked")
ATTENTION_CHUNK = 256  # query rows per block of the "chunked" kernel
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def check_build_args(attention_impl: str, remat: str) -> None:
    """The attention kernel and remat policy names every model constructor takes; ValueError naming the choices."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")


def diffusers_kwargs(cls, config: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    """The fields of the config dataclass `cls` from a diffusers `config.json` dict; private `_...` keys are
    ignored, unknown ones refused (ValueError naming them)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
    if unknown:
        raise ValueError(f"unknown {class_name} config keys {unknown}; known: {sorted(fields)}")
    return {k: v for k, v in config.items() if k in fields}


SEQUENCE_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


class ShardedModel(nnx.Module):
    """A top-level model: its config, compute dtype, and the optional callable (x, logical names) -> x that adds
    sharding constraints to activations (see `flowjax.sharding.ActivationSharding`)."""

    def _setup(self, config, dtype, activation_sharding) -> None:
        self.config, self.dtype = config, dtype
        self.activation_sharding = activation_sharding

    def _constrain(self, x: jax.Array, names: Sequence[str | None] = SEQUENCE_ACTIVATION) -> jax.Array:
        return x if self.activation_sharding is None else self.activation_sharding(x, tuple(names))


class Buffer(nnx.Variable):
    """A non-trainable array that travels with the weights (e.g. SD3's positional table)."""


def _init(initializer, axes: Sequence[str | None]):
    return nnx.with_metadata(initializer, logical_axes=tuple(axes))


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] in `param_dtype`, computed in `dtype`.

    `flowjax.models.lora.apply` may attach a low-rank adapter: y += scale * (x @ lora_a) @ lora_b,
    skipped once the adapter is merged into the kernel.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None] = (None, None),
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        kernel_init = _init(nnx.initializers.lecun_normal(), axes)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        if use_bias:
            bias_init = _init(nnx.initializers.zeros_init(), axes[1:])
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = None
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)  # filled by lora.apply
        self.lora_scale, self.lora_merged = 0.0, False

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None and not self.lora_merged:
            down = jnp.dot(x, self.lora_a[...].astype(self.dtype))
            y = y + self.lora_scale * jnp.dot(down, self.lora_b[...].astype(self.dtype))
        return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters; statistics in fp32 whatever the compute dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learnt scale (the qk-norm of SD3.5); the mean square is taken in fp32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(_init(nnx.initializers.ones_init(), (None,))(rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class FeedForward(nnx.Module):
    """Linear -> GELU (tanh approximation) -> Linear, as diffusers' FeedForward("gelu-approximate")."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.proj_out = Dense(hidden, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


class AdaLNModulation(nnx.Module):
    """Linear(silu(temb)) split into `chunks` vectors of the model width (the AdaLN(-Zero) parameters of
    diffusers' AdaLayerNormZero / AdaLayerNormContinuous), each shaped [B, 1, D] to broadcast over tokens."""

    def __init__(self, dim: int, chunks: int, *, dtype, param_dtype, rngs):
        self.chunks = chunks
        self.linear = Dense(dim, chunks * dim, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        out = self.linear(jax.nn.silu(temb))
        return [c[:, None, :] for c in jnp.split(out, self.chunks, axis=-1)]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """AdaLN: LayerNorm(x) (no affine, eps 1e-6) * (1 + scale) + shift."""
    return layer_norm(x) * (1 + scale) + shift


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    impl: str = "xla",
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention over [B, L, heads, head_dim] tensors, one entry point for every kernel.

    `xla` is portable (CPU, TPU, GPU); `cudnn` is the fused flash kernel on NVIDIA GPUs (bf16/fp16
    only); `auto` lets JAX pick; `chunked` is memory-efficient anywhere: queries in blocks of
    `ATTENTION_CHUNK` rows, each block's attention recomputed in the backward pass (`jax.checkpoint`), so a
    training step keeps no [heads, L, L] probability tensor (Rabe & Staats, "Self-attention does not need
    O(n^2) memory", 2021); it equals `xla` up to float rounding. `bias` ([B|1, heads|1, Lq, Lk], added to the
    logits, e.g. T5's relative positions), `mask` (boolean, True = attend) and `is_causal` (CLIP's text tower)
    are passed through; `scale` defaults to 1/sqrt(head_dim) (T5 uses 1).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "chunked":
        return _chunked_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale,
        implementation=None if impl == "auto" else impl,
    )


def _chunked_attention(q, k, v, *, bias, mask, is_causal, scale, chunk: int = ATTENTION_CHUNK):
    """`attention(impl="chunked")`: query blocks under `lax.map`, each block rematerialised."""
    b, lq = q.shape[0], q.shape[1]
    if lq <= chunk:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale)
    n = -(-lq // chunk)
    pad = n * chunk - lq
    causal = None
    if is_causal:  # query row i may attend to keys j <= i: an explicit mask, as the blocks shift the rows
        causal = jnp.arange(lq)[:, None] >= jnp.arange(k.shape[1])[None, :]
        mask = causal[None, None] if mask is None else mask & causal[None, None]

    def rows(x):  # [..., Lq, Lk] or [B, Lq, H, D] -> blocks along the query axis, first
        if x is None:
            return None
        axis = 1 if x.ndim == 4 and x is q else x.ndim - 2
        if x.shape[axis] == 1:  # broadcast along the queries
            return None
        x = jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])
        x = x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    q_blocks, bias_blocks, mask_blocks = rows(q), rows(bias), rows(mask)

    @jax.checkpoint
    def block(inp):
        qb, bb, mb = inp
        return jax.nn.dot_product_attention(qb, k, v, scale=scale,
                                            bias=bias if bb is None and bias is not None else bb,
                                            mask=mask if mb is None and mask is not None else mb)

    out = jax.lax.map(block, (q_blocks, bias_blocks, mask_blocks))  # [n, B, chunk, H, D]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *q.shape[2:])[:, :lq]


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of diffusers-unit timesteps, cos half first (flip_sin_to_cos, shift 0), as diffusers'
    `get_timestep_embedding`.

    The frequencies exp(-ln(max_period) * j / half) take their float32 exponent as diffusers computes it and the
    exponential in float64 on the host, rounded once: the arguments t * freq reach 1000 (and 1000 * guidance
    in FLUX.1-dev), which magnifies any last-bit difference of a float32 exp.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def sincos_2d_table(embed_dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """SD3's 2D sin-cos positional table [grid_size**2, embed_dim] (row-major over (h, w)).

    Half the channels encode the column, half the row, each as [sin, cos] of geometric frequencies.
    """
    if embed_dim % 4:
        raise ValueError(f"the 2D sin-cos table needs embed_dim divisible by 4, got {embed_dim}")
    pos = np.arange(grid_size, dtype=np.float32) / (grid_size / base_size) / interpolation_scale
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))

    def one_axis(p):
        out = np.outer(p.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(pos, pos, indexing="xy")  # cols varies along w
    table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
    return table.astype(np.float32)


class ScannedStack(nnx.Module):
    """`count` identical blocks with stacked params (a leading `layers` axis), run under `jax.lax.scan`.

    `make_block(rngs)` builds one block; each block is called as `block(carry, *args) -> carry`, where
    `carry` (an array or a tuple of arrays) flows from block to block and `args` (e.g. the time
    embedding, a RoPE table, an attention bias) are the same for every block. `remat` names a policy
    of `REMAT_POLICIES`: the body is rematerialised in the backward pass ("none" keeps everything).
    The blocks live under the attribute `blocks`, so parameter paths read `<stack>.blocks.<module>...`.
    """

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], count: int, *, remat: str = "none",
                 rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        self.count, self.remat = count, remat

        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"})
        def make(r):
            return make_block(r)

        self.blocks = make(rngs)

    def __call__(self, carry, *args, collect: bool = False):
        """(the last block's carry, each block's carry stacked on a leading axis when `collect`, else None)."""
        graphdef, params = nnx.split(self.blocks)

        def body(c, p):
            c = nnx.merge(graphdef, p)(c, *args)
            return c, (c if collect else None)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        return jax.lax.scan(body, carry, params)
