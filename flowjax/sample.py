"""Text-to-image with a diffusers SD3 / SD3.5 or FLUX.1 folder, one PNG per prompt.

python -m flowjax.sample --model=DIR --prompt="a photo of a cat" [--prompt=... | --prompts_file=FILE]
    [--negative_prompt=] [--num_steps=28] [--guidance_scale=G] [--true_cfg_scale=1] [--height=H --width=W]
    [--seed=0] [--max_sequence_length=L] [--lora=DIR_OR_FILE] [--dtype=bfloat16|float32] [--param_dtype=float32]
    [--batch_size=4] [--notext_encoder_3] --out=DIR

The folder's model_index.json picks the pipeline (`flowjax.pipeline.load_pipeline`). Unset options take the
pipeline's defaults: SD3 classifier-free guidance 4.5, 512x512, 256 T5 tokens; FLUX distilled guidance 3.5 (dev;
schnell has none), 1024x1024, 512 T5 tokens, and true CFG only with --true_cfg_scale > 1.

Writes OUT/0000_<prompt>.png, OUT/0001_<prompt>.png, ... in prompt order and prints their paths. The initial
noise of prompt i depends only on --seed and i (not on --batch_size), so a prompt's image can be regenerated
alone. Needs the tokenizers: pip install 'flowjax[pipeline]'.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Sequence

from absl import app, flags


def define_flags() -> None:
    """The command-line flags; defined only when run as a program, so importing `generate` defines none
    (absl refuses a flag name defined twice in one process)."""
    flags.DEFINE_string("model", None, "diffusers SD3 / SD3.5 or FLUX.1 pipeline folder (the one with "
                        "model_index.json)")
    flags.DEFINE_multi_string("prompt", [], "a prompt; repeat the flag for several prompts")
    flags.DEFINE_string("prompts_file", None, "text file with one prompt per line (blank lines and lines starting "
                        "with # are skipped); used after any --prompt")
    flags.DEFINE_string("negative_prompt", "", "negative prompt for classifier-free guidance (all images; FLUX: "
                        "with --true_cfg_scale > 1)")
    flags.DEFINE_integer("num_steps", 28, "number of Euler ODE steps")
    flags.DEFINE_float("guidance_scale", None, "SD3: classifier-free guidance scale (<= 1 turns it off; default 4.5); "
                       "FLUX.1-dev: the distilled guidance the transformer embeds (default 3.5; schnell ignores it)")
    flags.DEFINE_float("true_cfg_scale", 1.0, "FLUX only: classifier-free guidance with --negative_prompt when > 1")
    flags.DEFINE_integer("height", None, "image height in pixels (a multiple of 16; default SD3 512, FLUX 1024)")
    flags.DEFINE_integer("width", None, "image width in pixels (a multiple of 16; default SD3 512, FLUX 1024)")
    flags.DEFINE_integer("seed", 0, "seed of the initial noise")
    flags.DEFINE_integer("max_sequence_length", None, "T5 tokens per prompt (at most 512; default SD3 256, FLUX 512)")
    flags.DEFINE_string("lora", None, "a diffusers / PEFT LoRA (.safetensors file or the folder holding it) "
                        "applied to the transformer")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype of every model")
    flags.DEFINE_enum("param_dtype", "float32", ["bfloat16", "float32"],
                      "dtype the weights are stored in (bfloat16 halves the memory)")
    flags.DEFINE_integer("batch_size", 4, "prompts per transformer batch")
    flags.DEFINE_bool("text_encoder_3", True, "SD3 only: load the T5 encoder; --notext_encoder_3 runs without it "
                      "(zero T5 features, less memory)")
    flags.DEFINE_string("out", None, "output folder for the PNGs (created if missing)")


def read_prompts(prompts: Sequence[str] = (), prompts_file: str | None = None) -> list[str]:
    """The --prompt values, then the lines of --prompts_file (blank and # lines skipped)."""
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts_file {path} does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _slug(prompt: str, length: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:length].rstrip("_")
    return s or "prompt"


def save_png(image, path) -> Path:
    """Writes an image [H, W, 3] float in [0, 1] as an 8-bit PNG (rounded as diffusers' numpy_to_pil)."""
    import numpy as np
    from PIL import Image

    pixels = (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return Path(path)


def _call_options(pipe, **options) -> dict:
    """The options for `pipe(...)`: unset ones (None) take the pipeline's own defaults; FLUX's true CFG options go
    only to a FLUX pipeline."""
    accepted = inspect.signature(type(pipe).__call__).parameters
    if "true_cfg_scale" not in accepted and options.get("true_cfg_scale", 1.0) > 1.0:
        raise ValueError("true_cfg_scale is FLUX's classifier-free guidance; SD3 pipelines use guidance_scale")
    if "true_cfg_scale" in accepted and options.get("true_cfg_scale", 1.0) <= 1.0:
        options["negative_prompt"] = None  # as diffusers' FluxPipeline: a negative prompt only with true CFG
    out = {k: v for k, v in options.items() if k in accepted and v is not None}
    return {**{k: p.default for k, p in accepted.items() if k in options and k not in out}, **out}


def generate(
    model,
    prompts: Sequence[str],
    out,
    *,
    negative_prompt: str = "",
    num_steps: int = 28,
    guidance_scale: float | None = None,
    true_cfg_scale: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    max_sequence_length: int | None = None,
    lora=None,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
    batch_size: int = 4,
    text_encoder_3: bool = True,
    progress: bool = False,
    pipe=None,
) -> list[Path]:
    """Samples every prompt and writes one PNG each under `out`; returns the paths in prompt order.

    `model` is the SD3 or FLUX pipeline folder (or pass a loaded `pipe`; then `model`, the dtypes and
    `text_encoder_3` are ignored). `dtype` / `param_dtype` are "bfloat16" or "float32". Options left None take
    the pipeline's defaults (see the module docstring).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flowjax.pipeline import SD3Pipeline, pipeline_class

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: give --prompt (repeatable) or --prompts_file")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if pipe is None:
        dtypes = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
        kw = dict(dtype=dtypes[dtype], param_dtype=dtypes[param_dtype], progress=progress)
        cls = pipeline_class(model)
        if cls is SD3Pipeline:
            kw["text_encoder_3"] = text_encoder_3
        pipe = cls.from_pretrained(model, **kw)
    options = _call_options(pipe, negative_prompt=negative_prompt, num_steps=num_steps, guidance_scale=guidance_scale,
                            true_cfg_scale=true_cfg_scale, height=height, width=width,
                            max_sequence_length=max_sequence_length)
    height, width = options.pop("height"), options.pop("width")
    if lora:
        from flowjax.convert.lora import load_lora  # written alongside; imported only when asked for

        adapted = load_lora(pipe.transformer, lora)
        print(f"LoRA {lora}: {len(adapted)} modules adapted", file=sys.stderr)
    # All the noise at once, so prompt i's image does not depend on the batching.
    noise = pipe.prepare_latents(len(prompts), height, width, key=jax.random.key(seed))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        lat = noise[start:start + batch_size]
        pad = batch_size - len(chunk) if len(prompts) > batch_size else 0  # keep one compiled batch size
        images = pipe(chunk + chunk[-1:] * pad, latents=jnp.concatenate([lat, jnp.repeat(lat[-1:], pad, 0)]),
                      height=height, width=width, **options)
        images = np.asarray(images)[: len(chunk)]
        for i, (prompt, image) in enumerate(zip(chunk, images)):
            paths.append(save_png(image, out / f"{start + i:04d}_{_slug(prompt)}.png"))
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; quote prompts: --prompt=\"a photo of a cat\"")
    f = flags.FLAGS
    prompts = read_prompts(f.prompt, f.prompts_file)
    if not prompts:
        raise app.UsageError("no prompts: give --prompt (repeatable) or --prompts_file")
    paths = generate(
        f.model, prompts, f.out, negative_prompt=f.negative_prompt, num_steps=f.num_steps,
        guidance_scale=f.guidance_scale, true_cfg_scale=f.true_cfg_scale, height=f.height, width=f.width, seed=f.seed,
        max_sequence_length=f.max_sequence_length, lora=f.lora, dtype=f.dtype, param_dtype=f.param_dtype,
        batch_size=f.batch_size, text_encoder_3=f.text_encoder_3, progress=True,
    )
    for p in paths:
        print(p)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["model", "out"])
    app.run(main)
