"""T5 encoder: transformers `T5EncoderModel` folder (SD3's `text_encoder_3`) <-> flowjax `T5Encoder`.

The folder holds `config.json` and `model.safetensors` (or shards + `model.safetensors.index.json`).
The token embedding is tied in transformers (`encoder.embed_tokens.weight` is `shared.weight`):
transformers 5 writes only `shared.weight`, older files may hold both copies or only the encoder's.
Exactly one copy is read; a second copy is accepted only as that tied duplicate (same shape, and
transformers itself overwrites it with `shared.weight` when it ties them). Every other key must
match the table exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax import sharding as sharding_lib
from flowjax.convert import mapping, model_io
from flowjax.convert.mapping import IDENTITY, LINEAR, WeightsMismatchError
from flowjax.convert.safetensors_io import SafetensorsReader
from flowjax.models.t5 import T5Config, T5Encoder

WEIGHTS_NAME = "model"
SHARED = "shared.weight"
ENCODER_EMBED = "encoder.embed_tokens.weight"
WHAT = "T5EncoderModel"


def t5_table(cfg: T5Config, embedding_key: str = SHARED) -> list[mapping.KeyMap]:
    """The flowjax <-> transformers key table of a T5EncoderModel with this config.

    `embedding_key` is the checkpoint name of the token embedding: `shared.weight` (what transformers
    writes) or `encoder.embed_tokens.weight` (files that hold only the encoder's tied copy).
    """
    if embedding_key not in (SHARED, ENCODER_EMBED):
        raise ValueError(f"embedding_key must be {SHARED!r} or {ENCODER_EMBED!r}, got {embedding_key!r}")
    top = [
        ("shared", embedding_key, IDENTITY),
        ("relative_attention_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", IDENTITY),
        ("final_layer_norm.scale", "encoder.final_layer_norm.weight", IDENTITY),
    ]
    b = "encoder.block.{i}.layer"
    block = [("attn_norm.scale", f"{b}.0.layer_norm.weight", IDENTITY)]
    block += [(f"attn.{p}.kernel", f"{b}.0.SelfAttention.{p}.weight", LINEAR) for p in ("q", "k", "v", "o")]
    block += [("ff_norm.scale", f"{b}.1.layer_norm.weight", IDENTITY)]
    ffn = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
    block += [(f"ff.{p}.kernel", f"{b}.1.DenseReluDense.{p}.weight", LINEAR) for p in ffn]
    return mapping.build_table(top, [("stack.blocks", range(cfg.num_layers), block)])


class _Without:
    """A tensor source with some keys hidden (the tied duplicate, once it has been recognised)."""

    def __init__(self, source, hidden: set[str]):
        self._source, self._hidden = source, hidden

    def keys(self) -> list[str]:
        return [k for k in self._source.keys() if k not in self._hidden]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._source[key]


def resolve_embedding(source) -> tuple[object, str]:
    """(source to check against the table, the embedding key to read) for a T5 encoder checkpoint."""
    keys = set(source.keys())
    decoder = sorted(k for k in keys if k.startswith(("decoder.", "lm_head.")))
    if decoder:
        raise WeightsMismatchError(
            f"this checkpoint holds a whole encoder-decoder T5 ({len(decoder)} decoder / lm_head tensors, e.g. "
            f"{decoder[0]}); flowjax reads encoder-only folders: save "
            "`transformers.T5EncoderModel.from_pretrained(path)` with `save_pretrained` and load that"
        )
    if SHARED in keys and ENCODER_EMBED in keys:
        a, b = source.shape(SHARED), source.shape(ENCODER_EMBED)
        if a != b:
            raise WeightsMismatchError(
                f"{ENCODER_EMBED} {b} and {SHARED} {a} should be the tied copies of one embedding but differ in "
                "shape; the checkpoint is inconsistent"
            )
        return _Without(source, {ENCODER_EMBED}), SHARED
    if ENCODER_EMBED in keys:
        return source, ENCODER_EMBED
    return source, SHARED  # when absent too, the table check reports shared.weight as missing


def _not_t5(raw) -> str | None:
    if raw.get("model_type") == "t5":
        return None
    return f"is not a T5 config (model_type {raw.get('model_type') or raw.get('_class_name')!r}, expected 't5')"


def read_t5_config(path: str | os.PathLike) -> T5Config:
    return model_io.read_model_config(
        path, T5Config.from_transformers,
        folder="the T5 encoder folder (config.json + model.safetensors), e.g. an SD3 pipeline's text_encoder_3",
        subfolders=("text_encoder_3",), pipeline="SD3 pipeline", wrong_kind=_not_t5)


def load_t5(
    path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
    attention_impl: str = "xla",
    remat: str = "none",
    progress: bool = False,
) -> T5Encoder:
    """A `T5Encoder` with the weights of a transformers T5EncoderModel folder (SD3's `text_encoder_3`, FLUX's
    `text_encoder_2`).

    `param_dtype` is what the weights are stored in, `dtype` what the matmuls compute in. With `mesh`,
    every weight goes straight into its sharding under `rules`.
    """
    cfg = read_t5_config(path)
    source, embedding_key = resolve_embedding(SafetensorsReader(path, WEIGHTS_NAME))
    return model_io.load_model(
        lambda act: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                              attention_impl=attention_impl, remat=remat, activation_sharding=act),
        t5_table(cfg, embedding_key), source, what=WHAT, path=path, mesh=mesh, rules=rules, progress=progress)


def save_t5(model: T5Encoder, path, dtype=None, *, max_shard_bytes: int | None = None) -> Path:
    """Writes `config.json` + `model.safetensors` that `transformers.T5EncoderModel.from_pretrained` loads.

    The embedding is written once, as `shared.weight` (transformers ties `encoder.embed_tokens` to it).
    LoRA adapters are merged into the written kernels; weights keep their stored dtype unless `dtype`
    is given (e.g. `jnp.bfloat16`).
    """
    config = model.config.to_transformers()
    config["dtype"] = np.dtype(dtype if dtype is not None else model.shared[...].dtype).name
    return model_io.save_model(model, t5_table(model.config), config, path, weights_name=WEIGHTS_NAME, dtype=dtype,
                               max_shard_bytes=max_shard_bytes)
