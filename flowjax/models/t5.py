"""The T5 (v1.1) text encoder, transformers' `T5EncoderModel` (SD3's `text_encoder_3`), in Flax NNX.

T5 differs from the usual transformer in a few exact details, all reproduced here:
- relative position bias: bidirectional log-spaced buckets of `key_pos - query_pos`, one learnt
  [buckets, heads] table (transformers keeps it in block 0) whose bias is computed once and added to
  the logits of every layer;
- no 1/sqrt(d) scaling of the attention logits;
- RMS layer norm (no mean subtraction, no bias), statistics in fp32;
- pre-norm residual blocks; the feed-forward is gated (`wo(act(wi_0 x) * wi_1 x)`, "gated-gelu" =
  tanh-approximate GELU for v1.1) or plain (`wo(act(wi x))`, original T5's "relu");
- the attention width num_heads*d_kv may differ from d_model.

The identical blocks are stacked (leading `layers` axis) and run under `jax.lax.scan`. Matmuls run in
`dtype`; the residual stream and the norms stay in fp32 (transformers keeps T5's `wo` in fp32 for the
same reason, so its half-precision residual is effectively fp32 too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax.models import layers
from flowjax.models.layers import Dense, RMSNorm

# transformers' activation names (ACT2FN) that a T5 `feed_forward_proj` can resolve to.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf) GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder architecture, with transformers' `T5Config` names. Defaults: T5 v1.1 XXL (SD3)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        problems = []
        try:
            self.activation
        except ValueError as e:
            problems.append(str(e))
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4:
            problems.append(
                f"relative_attention_num_buckets must be at least 4 (half per direction, half of those exact), "
                f"got {self.relative_attention_num_buckets}"
            )
        elif self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            problems.append(
                f"relative_attention_max_distance ({self.relative_attention_max_distance}) must exceed "
                f"relative_attention_num_buckets // 4 ({self.relative_attention_num_buckets // 4})"
            )
        if problems:
            raise ValueError("invalid T5 config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        """The transformers activation name, parsed as `T5Config.__post_init__` does."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT' (e.g. 'gated-gelu', 'relu')"
            )
        # transformers maps "gated-gelu" (T5 v1.1, SD3) to the tanh approximation for backwards compatibility.
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r}: activation {act!r} is not supported; "
                f"supported: {sorted(ACTIVATIONS)} (plain or 'gated-')"
            )
        return act

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "T5Config":
        """From a transformers `config.json` dict; the generic / decoder-only keys are ignored.

        A config that is not a T5 (other `model_type`), or whose saved `dense_act_fn` / `is_gated_act`
        contradict `feed_forward_proj`, is refused.
        """
        model_type = config.get("model_type", "t5")
        if model_type != "t5":
            raise ValueError(f"model_type is {model_type!r}, not 't5'")
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in fields})
        saved_act, saved_gated = config.get("dense_act_fn"), config.get("is_gated_act")
        if saved_act is not None and saved_act != cfg.activation:
            raise ValueError(f"dense_act_fn={saved_act!r} contradicts feed_forward_proj={cfg.feed_forward_proj!r}")
        if saved_gated is not None and bool(saved_gated) != cfg.is_gated:
            raise ValueError(f"is_gated_act={saved_gated!r} contradicts feed_forward_proj={cfg.feed_forward_proj!r}")
        return cfg

    def to_transformers(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.T5Config(**d)` / `T5EncoderModel.from_pretrained` accept."""
        return {
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            **dataclasses.asdict(self),
            "dense_act_fn": self.activation,
            "is_gated_act": self.is_gated,
            "is_encoder_decoder": False,
            "use_cache": False,
            "num_decoder_layers": self.num_layers,
            "dropout_rate": 0.0,
        }


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[Lq, Lk] int32 bucket of `key_pos - query_pos`, bidirectional, exactly as transformers' T5.

    Half the buckets per direction; of those, half are exact distances and half log-spaced up to
    `max_distance` (beyond it, the last bucket). Computed on the host from the static lengths, in
    float32 with transformers' operation order so the truncations at bucket edges agree.
    """
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    logs = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
    scaled = logs / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + scaled.astype(np.int64)  # truncation, as torch's .to(long)
    large = np.minimum(large, half - 1)
    return (out + np.where(dist < max_exact, dist, large)).astype(np.int32)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, impl: str, dtype, param_dtype, rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, inner = cfg.d_model, cfg.inner_dim
        self.heads, self.impl = cfg.num_heads, impl
        self.q = Dense(d, inner, axes=("embed", "heads"), **kw)
        self.k = Dense(d, inner, axes=("embed", "heads"), **kw)
        self.v = Dense(d, inner, axes=("embed", "heads"), **kw)
        self.o = Dense(inner, d, axes=("heads", "embed"), **kw)

    def __call__(self, x, bias, mask):
        split = lambda t: einops.rearrange(t, "b l (h d) -> b l h d", h=self.heads)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        out = layers.attention(q, k, v, self.impl, bias=bias, mask=mask, scale=1.0)
        return self.o(einops.rearrange(out, "b l h d -> b l (h d)"))


class FeedForward(nnx.Module):
    """`wo(act(wi_0 x) * wi_1 x)` when gated, else `wo(act(wi x))` (transformers' DenseReluDense)."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = cfg.d_model, cfg.d_ff
        self.activation = cfg.activation
        if cfg.is_gated:
            self.wi_0 = Dense(d, f, axes=("embed", "mlp"), **kw)
            self.wi_1 = Dense(d, f, axes=("embed", "mlp"), **kw)
            self.wi = None
        else:
            self.wi = Dense(d, f, axes=("embed", "mlp"), **kw)
            self.wi_0 = self.wi_1 = None
        self.wo = Dense(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        h = act(self.wi(x)) if self.wi is not None else act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h)


class Block(nnx.Module):
    """Pre-norm self-attention then pre-norm feed-forward, each added to the fp32 residual."""

    def __init__(self, cfg: T5Config, *, impl: str, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)
        self.attn = SelfAttention(cfg, impl=impl, **kw)
        self.ff_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)
        self.ff = FeedForward(cfg, **kw)

    def __call__(self, x, bias, mask):
        x = x + self.attn(self.attn_norm(x).astype(self.dtype), bias, mask).astype(jnp.float32)
        return x + self.ff(self.ff_norm(x).astype(self.dtype)).astype(jnp.float32)


class T5Encoder(layers.ShardedModel):
    """last_hidden_state [B, L, d_model] = encoder(input_ids [B, L] int, attention_mask [B, L] 1 keep / 0 pad).

    The output is taken after the final RMS norm, as `T5EncoderModel(...).last_hidden_state`; padded
    positions get values too (they attend to the kept tokens), as in transformers. Token ids outside
    the vocabulary make that sequence NaN (JAX's gather fills with NaN) where torch would raise.
    """

    def __init__(
        self,
        config: T5Config,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        remat: str = "none",
        activation_sharding=None,
    ):
        layers.check_build_args(attention_impl, remat)
        self._setup(config, dtype, activation_sharding)
        cfg = config
        embed_init = nnx.with_metadata(nnx.initializers.normal(1.0), logical_axes=("vocab", "embed"))
        self.shared = nnx.Param(embed_init(rngs.params(), (cfg.vocab_size, cfg.d_model), param_dtype))
        bias_init = nnx.with_metadata(nnx.initializers.normal(cfg.d_model**-0.5), logical_axes=(None, "heads"))
        self.relative_attention_bias = nnx.Param(
            bias_init(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), param_dtype)
        )
        self.stack = layers.ScannedStack(
            lambda r: Block(cfg, impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=r),
            cfg.num_layers, remat=remat, rngs=rngs,
        )
        self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)

    def position_bias(self, length: int) -> jax.Array:
        """[1, heads, L, L] bias added to every layer's logits (computed once, shared by all layers)."""
        cfg = self.config
        buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        values = jnp.take(self.relative_attention_bias[...], jnp.asarray(buckets), axis=0)  # [L, L, heads]
        return jnp.transpose(values, (2, 0, 1))[None].astype(self.dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array [B, L], got {input_ids.dtype} {input_ids.shape}")
        b, length = input_ids.shape
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, length):
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {(b, length)}, got {attention_mask.shape}"
                )
            mask = (attention_mask != 0)[:, None, None, :]  # [B, 1, 1, Lk]: padded keys are never attended

        x = jnp.take(self.shared[...], input_ids, axis=0).astype(jnp.float32)
        x = self._constrain(x)
        x, _ = self.stack(x, self.position_bias(length), mask)
        return self.final_layer_norm(x).astype(self.dtype)
