"""Text-to-image in JAX with diffusers pipeline folders: SD3 / SD3.5 (`SD3Pipeline`) and FLUX.1 (`FluxPipeline`).

    pipe = flowjax.pipeline.load_pipeline("FLUX.1-dev")   # or SD3Pipeline / FluxPipeline.from_pretrained(...)
    images = pipe(["a photo of a cat"])                   # [B, H, W, 3] float in [0, 1]

`common` holds what both share (folder reading, tokenization, the sampling loop, the VAE decode); `sd3` and
`flux` their prompt encoding, schedule and guidance.
"""

from __future__ import annotations

from pathlib import Path

from flowjax.pipeline import common
from flowjax.pipeline.common import load_tokenizer
from flowjax.pipeline.flux import FluxPipeline
from flowjax.pipeline.sd3 import SD3Pipeline, read_scheduler_config

PIPELINES = {"StableDiffusion3Pipeline": SD3Pipeline, "FluxPipeline": FluxPipeline}


def read_model_index(path) -> dict:
    """The parsed `model_index.json` of a diffusers SD3 or FLUX pipeline folder; CheckpointError otherwise."""
    return common.read_model_index(path)


def pipeline_class(path) -> type[SD3Pipeline] | type[FluxPipeline]:
    """`SD3Pipeline` or `FluxPipeline`, by the `_class_name` of the folder's model_index.json."""
    return PIPELINES[common.kind_of_index(read_model_index(Path(path))).class_name]


def load_pipeline(path, **kwargs) -> SD3Pipeline | FluxPipeline:
    """`pipeline_class(path).from_pretrained(path, **kwargs)`."""
    return pipeline_class(path).from_pretrained(path, **kwargs)


__all__ = ["FluxPipeline", "SD3Pipeline", "load_pipeline", "load_tokenizer", "pipeline_class", "read_model_index",
           "read_scheduler_config"]
