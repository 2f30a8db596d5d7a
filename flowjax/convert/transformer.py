"""Diffusion transformers: diffusers folder <-> flowjax model, SD3 / SD3.5 (`MMDiT`) and FLUX.1 (`Flux`).

The folder's config.json `_class_name` picks the family (`SD3Transformer2DModel` or `FluxTransformer2DModel`);
both go through the same load / save body (`model_io`) with their own key table.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from flowjax import sharding as sharding_lib
from flowjax.convert import flux as flux_convert
from flowjax.convert import mapping, model_io
from flowjax.convert.mapping import CONV2D, IDENTITY, dense, norm_scale
from flowjax.convert.safetensors_io import SafetensorsReader
from flowjax.models.flux import Flux, FluxConfig
from flowjax.models.mmdit import MMDiT, MMDiTConfig

WEIGHTS_NAME = "diffusion_pytorch_model"

_TOP = [
    ("patch_kernel", "pos_embed.proj.weight", CONV2D),
    ("patch_bias", "pos_embed.proj.bias", IDENTITY),
    ("pos_embed", "pos_embed.pos_embed", IDENTITY),
    *dense("timestep_linear_1", "time_text_embed.timestep_embedder.linear_1"),
    *dense("timestep_linear_2", "time_text_embed.timestep_embedder.linear_2"),
    *dense("text_linear_1", "time_text_embed.text_embedder.linear_1"),
    *dense("text_linear_2", "time_text_embed.text_embedder.linear_2"),
    *dense("context_embedder", "context_embedder"),
    *dense("norm_out.linear", "norm_out.linear"),
    *dense("proj_out", "proj_out"),
]


def _block_entries(cfg: MMDiTConfig, dual: bool, pre_only: bool):
    b = "transformer_blocks.{i}"
    e = [*dense("norm1.linear", f"{b}.norm1.linear"), *dense("norm1_context.linear", f"{b}.norm1_context.linear")]
    attns = [("attn", True)] + ([("attn2", False)] if dual else [])
    for name, joint in attns:
        for proj in ("to_q", "to_k", "to_v"):
            e += dense(f"{name}.{proj}", f"{b}.{name}.{proj}")
        e += dense(f"{name}.to_out", f"{b}.{name}.to_out.0")
        norms = ["norm_q", "norm_k"]
        if joint:
            for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
                e += dense(f"{name}.{proj}", f"{b}.{name}.{proj}")
            if not pre_only:
                e += dense(f"{name}.to_add_out", f"{b}.{name}.to_add_out")
            norms += ["norm_added_q", "norm_added_k"]
        if cfg.qk_norm == "rms_norm":
            for n in norms:
                e += norm_scale(f"{name}.{n}", f"{b}.{name}.{n}")
    ffs = ["ff"] + ([] if pre_only else ["ff_context"])
    for ff in ffs:
        e += dense(f"{ff}.proj_in", f"{b}.{ff}.net.0.proj") + dense(f"{ff}.proj_out", f"{b}.{ff}.net.2")
    return e


def mmdit_table(cfg: MMDiTConfig) -> list[mapping.KeyMap]:
    """The flowjax <-> diffusers key table of an SD3Transformer2DModel with this config."""
    stacks = [
        (f"stacks.{s}.blocks", range(start, start + n), _block_entries(cfg, dual, pre))
        for s, (start, n, dual, pre) in enumerate(cfg.stack_layout())
    ]
    return mapping.build_table(_TOP, stacks)


@dataclasses.dataclass(frozen=True)
class Family:
    """A diffusers transformer class and its flowjax model, config and key table."""

    class_name: str
    model: type
    config: type
    table: Callable[[Any], list[mapping.KeyMap]]


FAMILIES = {
    f.class_name: f
    for f in (Family("SD3Transformer2DModel", MMDiT, MMDiTConfig, mmdit_table),
              Family(flux_convert.CLASS_NAME, Flux, FluxConfig, flux_convert.flux_table))
}


def family_of(model: nnx.Module) -> Family:
    """The family of a flowjax transformer (MMDiT or Flux)."""
    for family in FAMILIES.values():
        if isinstance(model, family.model):
            return family
    raise TypeError(f"not a flowjax transformer: {type(model).__name__} (expected one of "
                    f"{[f.model.__name__ for f in FAMILIES.values()]})")


def family_of_config(cfg) -> Family:
    return next(f for f in FAMILIES.values() if isinstance(cfg, f.config))


def table_of(model: nnx.Module) -> list[mapping.KeyMap]:
    """The flowjax <-> diffusers key table of a loaded transformer."""
    return family_of(model).table(model.config)


def _family(raw) -> Family | None:
    # A config.json without _class_name is read as SD3's, as before FLUX was supported.
    return FAMILIES.get(raw.get("_class_name", "SD3Transformer2DModel"))


def read_config(path: str | os.PathLike) -> MMDiTConfig | FluxConfig:
    """The `MMDiTConfig` or `FluxConfig` of a diffusers transformer folder, by its `_class_name`."""
    known = " or ".join(FAMILIES)
    return model_io.read_model_config(
        path, lambda raw: _family(raw).config.from_diffusers(raw),
        folder="the diffusers transformer folder (with config.json)", subfolders=("transformer",),
        wrong_kind=lambda raw: None if _family(raw) else f"describes a {raw['_class_name']}, not an {known}")


def load_transformer(
    path,
    *,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
    attention_impl: str = "xla",
    remat: str = "none",
    progress: bool = False,
) -> MMDiT | Flux:
    """An `MMDiT` (SD3Transformer2DModel) or a `Flux` (FluxTransformer2DModel) with the weights of a diffusers
    transformer folder, chosen by the `_class_name` of its config.json.

    `param_dtype` is what the weights are stored in (fp32 keeps bf16/fp16 files exact), `dtype` what
    the transformer computes in. With `mesh`, every weight goes straight into its sharding under
    `rules`, and activations are constrained to the same rules.
    """
    cfg = read_config(path)
    family = family_of_config(cfg)
    return model_io.load_model(
        lambda act: family.model(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                 attention_impl=attention_impl, remat=remat, activation_sharding=act),
        family.table(cfg), SafetensorsReader(path, WEIGHTS_NAME), what=family.class_name, path=path, mesh=mesh,
        rules=rules, progress=progress)


def save_transformer(model: MMDiT | Flux, path, *, dtype=None, max_shard_bytes: int | None = None) -> Path:
    """Writes `config.json` + safetensors that `SD3Transformer2DModel.from_pretrained(path)` (for an MMDiT) or
    `FluxTransformer2DModel.from_pretrained(path)` (for a Flux) loads.

    LoRA adapters are merged into the written kernels (the model itself is left as it is). Weights
    are written in their stored dtype unless `dtype` is given (e.g. `jnp.bfloat16`); `max_shard_bytes`
    splits them into shards with their index.
    """
    return model_io.save_model(model, table_of(model), model.config.to_diffusers(), path, weights_name=WEIGHTS_NAME,
                               dtype=dtype, max_shard_bytes=max_shard_bytes)
