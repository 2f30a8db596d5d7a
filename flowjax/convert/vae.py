"""SD3 / SD3.5 VAE: diffusers `AutoencoderKL` folder <-> flowjax `AutoencoderKL`.

Levels have different widths, so nothing is stacked: the table is one entry per tensor. Folders
written before diffusers renamed the attention projections (`query`, `key`, `value`, `proj_attn`)
are read as well, as `from_pretrained` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from flowjax import sharding as sharding_lib
from flowjax.convert import mapping, model_io
from flowjax.convert.mapping import CONV2D, IDENTITY, dense
from flowjax.convert.safetensors_io import SafetensorsReader
from flowjax.models.vae import AutoencoderKL, VAEConfig

WEIGHTS_NAME = "diffusion_pytorch_model"
CLASS_NAME = "AutoencoderKL"
# Old diffusers attention names -> current ones (modeling_utils._convert_deprecated_attention_blocks).
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _conv(ours: str, theirs: str):
    return [(f"{ours}.kernel", f"{theirs}.weight", CONV2D), (f"{ours}.bias", f"{theirs}.bias", IDENTITY)]


def _norm(ours: str, theirs: str):
    return [(f"{ours}.scale", f"{theirs}.weight", IDENTITY), (f"{ours}.bias", f"{theirs}.bias", IDENTITY)]


def _resnet(ours: str, theirs: str, cin: int, cout: int):
    e = _norm(f"{ours}.norm1", f"{theirs}.norm1") + _conv(f"{ours}.conv1", f"{theirs}.conv1")
    e += _norm(f"{ours}.norm2", f"{theirs}.norm2") + _conv(f"{ours}.conv2", f"{theirs}.conv2")
    if cin != cout:
        e += _conv(f"{ours}.conv_shortcut", f"{theirs}.conv_shortcut")
    return e


def _mid(ours: str, theirs: str, cfg: VAEConfig, ch: int):
    e = [x for j in range(2) for x in _resnet(f"{ours}.resnets.{j}", f"{theirs}.resnets.{j}", ch, ch)]
    if cfg.mid_block_add_attention:
        a, t = f"{ours}.attention", f"{theirs}.attentions.0"
        e += _norm(f"{a}.group_norm", f"{t}.group_norm")
        for proj in ("to_q", "to_k", "to_v"):
            e += dense(f"{a}.{proj}", f"{t}.{proj}")
        e += dense(f"{a}.to_out", f"{t}.to_out.0")
    return e


def vae_table(cfg: VAEConfig) -> list[mapping.KeyMap]:
    """The flowjax <-> diffusers key table of an AutoencoderKL with this config."""
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    e = _conv("encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        cin = ch[max(i - 1, 0)]
        for j in range(cfg.layers_per_block):
            p = f"down_blocks.{i}.resnets.{j}"
            e += _resnet(f"encoder.{p}", f"encoder.{p}", cin if j == 0 else ch[i], ch[i])
        if i < n - 1:
            e += _conv(f"encoder.down_blocks.{i}.downsampler", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    e += _mid("encoder.mid_block", "encoder.mid_block", cfg, ch[-1])
    e += _norm("encoder.conv_norm_out", "encoder.conv_norm_out") + _conv("encoder.conv_out", "encoder.conv_out")
    if cfg.use_quant_conv:
        e += _conv("quant_conv", "quant_conv")
    if cfg.use_post_quant_conv:
        e += _conv("post_quant_conv", "post_quant_conv")

    rev = tuple(reversed(ch))
    e += _conv("decoder.conv_in", "decoder.conv_in") + _mid("decoder.mid_block", "decoder.mid_block", cfg, rev[0])
    for i in range(n):
        cin = rev[max(i - 1, 0)]
        for j in range(cfg.layers_per_block + 1):
            p = f"up_blocks.{i}.resnets.{j}"
            e += _resnet(f"decoder.{p}", f"decoder.{p}", cin if j == 0 else rev[i], rev[i])
        if i < n - 1:
            e += _conv(f"decoder.up_blocks.{i}.upsampler", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    e += _norm("decoder.conv_norm_out", "decoder.conv_norm_out") + _conv("decoder.conv_out", "decoder.conv_out")
    return mapping.build_table(e, [])


class _RenamedAttention:
    """A tensor source that shows deprecated attention keys (`...attentions.0.query.weight`) under the current names."""

    def __init__(self, source: SafetensorsReader):
        self._source = source
        self._names = {}
        for key in source.keys():
            parts = key.split(".")
            if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _DEPRECATED_ATTENTION:
                self._names[".".join([*parts[:-2], _DEPRECATED_ATTENTION[parts[-2]], parts[-1]])] = key
            else:
                self._names[key] = key

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(self._names[key])

    def __getitem__(self, key: str):
        return self._source[self._names[key]]


def read_vae_config(path: str | os.PathLike) -> VAEConfig:
    """The `VAEConfig` of a diffusers AutoencoderKL folder; CheckpointError naming the fix otherwise."""
    return model_io.read_model_config(
        path, VAEConfig.from_diffusers, folder="the diffusers VAE folder (with config.json)", subfolders=("vae",),
        wrong_kind=model_io.class_name_is(CLASS_NAME, "an"))


def load_vae(
    path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
    attention_impl: str = "xla",
    progress: bool = False,
) -> AutoencoderKL:
    """An `AutoencoderKL` with the weights of a diffusers VAE folder (e.g. the `vae` folder of SD3.5 or FLUX.1).

    `param_dtype` is what the weights are stored in, `dtype` what the VAE computes in. With `mesh`,
    the (replicated) weights are placed on every device and the batch is constrained by `rules`.
    """
    cfg = read_vae_config(path)
    return model_io.load_model(
        lambda act: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=attention_impl, activation_sharding=act),
        vae_table(cfg), _RenamedAttention(SafetensorsReader(path, WEIGHTS_NAME)), what=CLASS_NAME, path=path,
        mesh=mesh, rules=rules, progress=progress)


def save_vae(model: AutoencoderKL, path, dtype=None, *, max_shard_bytes: int | None = None) -> Path:
    """Writes `config.json` + safetensors that `diffusers.AutoencoderKL.from_pretrained(path)` loads.

    Weights are written in their stored dtype unless `dtype` is given (e.g. `jnp.bfloat16`).
    """
    config = {"_class_name": CLASS_NAME, **model.config.to_diffusers()}
    return model_io.save_model(model, vae_table(model.config), config, path, weights_name=WEIGHTS_NAME, dtype=dtype,
                               max_shard_bytes=max_shard_bytes)
