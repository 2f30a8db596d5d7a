"""Weights in and out of flowjax: diffusers / transformers folders <-> NNX models (no torch needed)."""

from flowjax.convert.mapping import WeightsMismatchError
from flowjax.convert.safetensors_io import CheckpointError
from flowjax.convert.transformer import load_transformer, read_config, save_transformer

__all__ = ["CheckpointError", "WeightsMismatchError", "load_transformer", "read_config", "save_transformer"]
