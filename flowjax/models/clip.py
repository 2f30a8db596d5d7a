"""CLIP text and vision towers (transformers' `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`).

One pre-LayerNorm transformer encoder serves both towers: the text tower runs it causally over token
+ position embeddings and pools the EOS token; the vision tower runs it over [CLS] + patch embeddings
(NHWC pixels) and pools the CLS token. OpenAI CLIP-L (`quick_gelu`) and OpenCLIP bigG (`gelu`) differ
only by config. The encoder layers are stacked (leading `layers` axis) and applied with `lax.scan`;
per-layer hidden states come out as the scan's outputs when asked for (SD3 reads the penultimate).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from flowjax.models import layers
from flowjax.models.layers import Dense

HIDDEN_ACTS = ("quick_gelu", "gelu")


def _activation(name: str):
    if name == "quick_gelu":  # OpenAI CLIP
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":  # OpenCLIP (exact erf GELU, torch's default)
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"hidden_act={name!r} is not supported; CLIP uses one of {HIDDEN_ACTS}")


def _check_common(cfg) -> list[str]:
    problems = []
    if cfg.hidden_act not in HIDDEN_ACTS:
        problems.append(f"hidden_act={cfg.hidden_act!r} is not supported (one of {HIDDEN_ACTS}: "
                        "'quick_gelu' for OpenAI CLIP, 'gelu' for OpenCLIP)")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if not problems and cfg.hidden_size % cfg.num_attention_heads:
        problems.append(f"hidden_size ({cfg.hidden_size}) must be divisible by num_attention_heads "
                        f"({cfg.num_attention_heads})")
    if cfg.projection_dim is not None and (not isinstance(cfg.projection_dim, int) or cfg.projection_dim < 1):
        problems.append(f"projection_dim must be a positive integer or None, got {cfg.projection_dim!r}")
    return problems


def _from_dict(cls, config: Mapping[str, Any], model_type: str, required: tuple[str, ...]):
    """Our fields from a transformers config dict; the rest (dropout, pad/bos ids, dtype, labels...) is ignored."""
    what = cls.__name__
    if not isinstance(config, Mapping):
        raise TypeError(f"{what}.from_transformers takes a config.json dict, got {type(config).__name__}")
    found = config.get("model_type", model_type)
    if found != model_type:
        hint = (" (a full CLIPModel config: take its 'text_config' / 'vision_config' part)" if found == "clip" else "")
        raise ValueError(f"model_type is {found!r}, expected {model_type!r}{hint}")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"the {what} config lacks the required keys {missing}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in names}
    return cls(**kwargs)


def _to_dict(cfg, architecture: str, model_type: str) -> dict[str, Any]:
    return {"architectures": [architecture], "model_type": model_type, **dataclasses.asdict(cfg)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower, with transformers' `CLIPTextConfig` names (and its defaults where it has one)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    projection_dim: int | None = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Pooling: 2 = legacy rule (argmax of the ids, i.e. the highest id, OpenAI's EOT); otherwise the
    # first position holding this id (transformers PR #24773).
    eos_token_id: int = 49407

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")

    def __post_init__(self):
        problems = _check_common(self)
        for name in ("vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            problems.append(f"eos_token_id must be one integer, got {self.eos_token_id!r}")
        if problems:
            raise ValueError("invalid CLIPTextConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a `CLIPTextConfig` / `CLIPTextModelWithProjection` config.json dict."""
        return _from_dict(cls, config, "clip_text_model", cls.REQUIRED)

    def to_transformers(self) -> dict[str, Any]:
        """A dict `transformers.CLIPTextConfig(**d)` accepts (and a config.json for from_pretrained)."""
        return _to_dict(self, "CLIPTextModelWithProjection", "clip_text_model")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower, with transformers' `CLIPVisionConfig` names (and its defaults where it has one)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    projection_dim: int | None = 512
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size")

    def __post_init__(self):
        problems = _check_common(self)
        for name in ("image_size", "patch_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.image_size % self.patch_size:
            problems.append(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if problems:
            raise ValueError("invalid CLIPVisionConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a `CLIPVisionConfig` / `CLIPVisionModelWithProjection` config.json dict."""
        return _from_dict(cls, config, "clip_vision_model", cls.REQUIRED)

    def to_transformers(self) -> dict[str, Any]:
        """A dict `transformers.CLIPVisionConfig(**d)` accepts (and a config.json for from_pretrained)."""
        return _to_dict(self, "CLIPVisionModelWithProjection", "clip_vision_model")


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, D], after final_layer_norm
    pooler_output: jax.Array  # [B, D], the EOS token of last_hidden_state
    text_embeds: jax.Array | None  # [B, P] = text_projection(pooler_output)
    hidden_states: jax.Array | None  # [layers+1, B, L, D]: embeddings, then each layer (last one un-normed)


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, 1+patches, D], NOT post-normed (as transformers)
    pooler_output: jax.Array  # [B, D] = post_layernorm(CLS token)
    image_embeds: jax.Array | None  # [B, P] = visual_projection(pooler_output)
    hidden_states: jax.Array | None  # [layers+1, B, 1+patches, D]: pre_layrnorm output, then each layer


class LayerNorm(nnx.Module):
    """LayerNorm with a learnt scale and bias; statistics in fp32 whatever the compute dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        init = lambda f: nnx.with_metadata(f, logical_axes=("embed",))
        self.scale = nnx.Param(init(nnx.initializers.ones_init())(rngs.params(), (dim,), param_dtype))
        self.bias = nnx.Param(init(nnx.initializers.zeros_init())(rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layers.layer_norm(x.astype(jnp.float32), self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg, *, causal: bool, impl: str, dtype, param_dtype, rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.causal, self.impl = cfg.num_attention_heads, causal, impl
        self.q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        split = lambda t: einops.rearrange(t, "b l (h d) -> b l h d", h=self.heads)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = layers.attention(q, k, v, self.impl, is_causal=self.causal)
        return self.out_proj(einops.rearrange(out, "b l h d -> b l (h d)"))


class MLP(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = cfg.hidden_act
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_activation(self.act)(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg, *, causal: bool, impl: str, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **nkw)
        self.self_attn = Attention(cfg, causal=causal, impl=impl, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **nkw)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def _encoder(cfg, *, causal: bool, impl: str, remat: str, dtype, param_dtype, rngs) -> layers.ScannedStack:
    """`num_hidden_layers` EncoderLayers with stacked params; `encoder(x, collect=True)` also returns each
    layer's output (the hidden states transformers reports)."""
    return layers.ScannedStack(
        lambda r: EncoderLayer(cfg, causal=causal, impl=impl, dtype=dtype, param_dtype=param_dtype, rngs=r),
        cfg.num_hidden_layers, remat=remat, rngs=rngs)


def _check_build_args(attention_impl: str, remat: str, with_projection: bool, projection_dim):
    layers.check_build_args(attention_impl, remat)
    if with_projection and projection_dim is None:
        raise ValueError("with_projection=True needs the config's projection_dim (it is None)")


def _param(initializer, axes, rngs, shape, param_dtype):
    return nnx.Param(nnx.with_metadata(initializer, logical_axes=axes)(rngs.params(), shape, param_dtype))


def _hidden_stack(first: jax.Array, per_layer: jax.Array | None) -> jax.Array | None:
    return None if per_layer is None else jnp.concatenate([first[None], per_layer], axis=0)


class CLIPTextModel(layers.ShardedModel):
    """`model(input_ids [B, L]) -> CLIPTextOutput`, L <= max_position_embeddings, causal attention."""

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        with_projection: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        remat: str = "none",
        activation_sharding=None,
    ):
        _check_build_args(attention_impl, remat, with_projection, config.projection_dim)
        cfg, d = config, config.hidden_size
        self._setup(config, dtype, activation_sharding)
        embed_init = nnx.initializers.normal(0.02)
        self.token_embedding = _param(embed_init, ("vocab", "embed"), rngs, (cfg.vocab_size, d), param_dtype)
        self.position_embedding = _param(embed_init, (None, "embed"), rngs, (cfg.max_position_embeddings, d),
                                         param_dtype)
        self.encoder = _encoder(cfg, causal=True, impl=attention_impl, remat=remat, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = (
            Dense(d, cfg.projection_dim, axes=("embed", None), use_bias=False, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
            if with_projection else None
        )

    @property
    def with_projection(self) -> bool:
        return self.text_projection is not None

    def pool(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
        """The EOS token's state, by transformers' rule (legacy argmax of the ids when eos_token_id == 2)."""
        eos = self.config.eos_token_id
        if eos == 2:
            index = jnp.argmax(input_ids, axis=-1)
        else:
            index = jnp.argmax((input_ids == eos).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"text length {length} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        x = jnp.take(self.token_embedding[...], input_ids, axis=0) + self.position_embedding[...][:length][None]
        x = self._constrain(x.astype(self.dtype))
        last, per_layer = self.encoder(x, collect=output_hidden_states)
        last_hidden_state = self.final_layer_norm(last)
        pooled = self.pool(last_hidden_state, input_ids)
        embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(last_hidden_state, pooled, embeds, _hidden_stack(x, per_layer))


class CLIPVisionModel(layers.ShardedModel):
    """`model(pixel_values [B, S, S, C] NHWC, normalised) -> CLIPVisionOutput`, S = config.image_size."""

    def __init__(
        self,
        config: CLIPVisionConfig,
        *,
        with_projection: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        remat: str = "none",
        activation_sharding=None,
    ):
        _check_build_args(attention_impl, remat, with_projection, config.projection_dim)
        cfg, d, p = config, config.hidden_size, config.patch_size
        self._setup(config, dtype, activation_sharding)
        # Patch embedding: a p x p stride-p conv without bias, stored HWIO [p, p, C, D].
        self.patch_embedding = _param(nnx.initializers.lecun_normal(), (None, None, None, "embed"), rngs,
                                      (p, p, cfg.num_channels, d), param_dtype)
        self.class_embedding = _param(nnx.initializers.normal(d ** -0.5), ("embed",), rngs, (d,), param_dtype)
        self.position_embedding = _param(nnx.initializers.normal(0.02), (None, "embed"), rngs,
                                         (cfg.num_patches + 1, d), param_dtype)
        nkw = dict(eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(d, **nkw)  # sic: transformers' spelling
        self.encoder = _encoder(cfg, causal=False, impl=attention_impl, remat=remat, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(d, **nkw)
        self.visual_projection = (
            Dense(d, cfg.projection_dim, axes=("embed", None), use_bias=False, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
            if with_projection else None
        )

    @property
    def with_projection(self) -> bool:
        return self.visual_projection is not None

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        cfg, p = self.config, self.config.patch_size
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be NHWC [B, {want[0]}, {want[1]}, {want[2]}] "
                             f"(resize to image_size first), got shape {pixel_values.shape}")
        b = pixel_values.shape[0]
        patches = einops.rearrange(pixel_values.astype(self.dtype), "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
        kernel = self.patch_embedding[...].reshape(p * p * cfg.num_channels, -1).astype(self.dtype)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches @ kernel], axis=1) + self.position_embedding[...].astype(self.dtype)[None]
        x = self.pre_layrnorm(x)
        x = self._constrain(x)
        last, per_layer = self.encoder(x, collect=output_hidden_states)
        pooled = self.post_layernorm(last[:, 0])
        embeds = self.visual_projection(pooled) if self.visual_projection is not None else None
        return CLIPVisionOutput(last, pooled, embeds, _hidden_stack(x, per_layer))
