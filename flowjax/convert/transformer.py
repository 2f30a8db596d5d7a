"""SD3 / SD3.5 transformer: diffusers folder <-> flowjax `MMDiT`."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from flowjax import sharding as sharding_lib
from flowjax.convert import mapping, model_io
from flowjax.convert.mapping import CONV2D, IDENTITY, dense, norm_scale
from flowjax.convert.safetensors_io import SafetensorsReader
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


CLASS_NAME = "SD3Transformer2DModel"


def read_config(path: str | os.PathLike) -> MMDiTConfig:
    return model_io.read_model_config(
        path, MMDiTConfig.from_diffusers, folder="the diffusers transformer folder (with config.json)",
        subfolders=("transformer",), wrong_kind=model_io.class_name_is(CLASS_NAME, "an"))


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
) -> MMDiT:
    """An `MMDiT` with the weights of a diffusers SD3/SD3.5 transformer folder.

    `param_dtype` is what the weights are stored in (fp32 keeps bf16/fp16 files exact), `dtype` what
    the transformer computes in. With `mesh`, every weight goes straight into its sharding under
    `rules`, and activations are constrained to the same rules.
    """
    cfg = read_config(path)
    return model_io.load_model(
        lambda act: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, remat=remat, activation_sharding=act),
        mmdit_table(cfg), SafetensorsReader(path, WEIGHTS_NAME), what=CLASS_NAME, path=path, mesh=mesh,
        rules=rules, progress=progress)


def save_transformer(model: MMDiT, path, *, dtype=None, max_shard_bytes: int | None = None) -> Path:
    """Writes `config.json` + safetensors that `SD3Transformer2DModel.from_pretrained(path)` loads.

    LoRA adapters are merged into the written kernels (the model itself is left as it is). Weights
    are written in their stored dtype unless `dtype` is given (e.g. `jnp.bfloat16`).
    """
    return model_io.save_model(model, mmdit_table(model.config), model.config.to_diffusers(), path,
                               weights_name=WEIGHTS_NAME, dtype=dtype, max_shard_bytes=max_shard_bytes)
