"""The shapes world as the RL trainer sees it: a base model (tiny CLIP text tower + tiny MMDiT on
pixels), prompt conditioning, and the verifiable reward.

The base model is stored as a folder in the diffusers/transformers formats, so the same converters
that load SD3.5 load it (and diffusers can read it):
  text_encoder/   CLIPTextModelWithProjection (config.json + model.safetensors)
  transformer/    SD3Transformer2DModel (config.json + diffusion_pytorch_model.safetensors)
  shapes.json     image size, sampler settings and how it was trained
`BASE_MODEL` is the one shipped inside the package (trained by `python -m flowjax.pretrain`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flowjax.convert.clip import load_clip_text, save_clip_text
from flowjax.convert.safetensors_io import CheckpointError
from flowjax.convert.transformer import load_transformer, save_transformer
from flowjax.data import shapes
from flowjax.models.clip import CLIPTextModel
from flowjax.rewards import shapes as shapes_reward

BASE_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes_base"


def pixels_to_images(x: jax.Array) -> jax.Array:
    """Model space [-1, 1] -> images [0, 1]."""
    return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def images_to_pixels(images):
    return images * 2.0 - 1.0


def encode_texts(text_encoder: CLIPTextModel, texts: list[str]) -> tuple[jax.Array, jax.Array]:
    """(per-token states [N, L, D], pooled projection [N, P]) of captions; "" is the empty prompt."""
    out = text_encoder(jnp.asarray(shapes.tokenize(texts)))
    return out.last_hidden_state.astype(jnp.float32), out.text_embeds.astype(jnp.float32)


def save_base(path, text_encoder, transformer, meta: dict) -> Path:
    path = Path(path)
    save_clip_text(text_encoder, path / "text_encoder")
    save_transformer(transformer, path / "transformer")
    (path / "shapes.json").write_text(json.dumps(meta, indent=2))
    return path


def load_base(path=None, *, dtype=jnp.float32, mesh=None):
    """(text_encoder, transformer, meta) of a shapes base-model folder (default: the shipped one)."""
    path = Path(path or BASE_MODEL)
    meta_file = path / "shapes.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a shapes base model (no shapes.json); train one with "
                              "`python -m flowjax.pretrain --config=configs/shapes_pretrain.py --workdir=DIR`")
    meta = json.loads(meta_file.read_text())
    text_encoder = load_clip_text(path / "text_encoder")
    transformer = load_transformer(path / "transformer", dtype=dtype, mesh=mesh)
    return text_encoder, transformer, meta


class ShapesWorld:
    """Conditioning and reward over one prompt split, with the held-out split as `eval_world`.

    Prompt ids index this world's prompt list. Text embeddings are computed once (the text encoder is
    frozen during RL), so `encode` is a table lookup.
    """

    channels = 3

    def __init__(self, text_encoder: CLIPTextModel, prompts: list[shapes.Prompt], *, image_size: int = 36,
                 detector: shapes_reward.Detector = shapes_reward.Detector(), eval_prompts=None):
        if not prompts:
            raise ValueError("the shapes world needs at least one prompt")
        self.prompts, self.image_size, self.detector = list(prompts), image_size, detector
        self.specs = jnp.asarray(shapes.specs_of(self.prompts))
        self.ctx, self.pooled = encode_texts(text_encoder, [p.text for p in self.prompts])
        neg_ctx, neg_pooled = encode_texts(text_encoder, [""])
        self.neg_ctx, self.neg_pooled = neg_ctx[0], neg_pooled[0]
        self.eval_world = (ShapesWorld(text_encoder, eval_prompts, image_size=image_size, detector=detector)
                           if eval_prompts else None)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def latent_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def cond_shapes(self):
        """([L, D], [P]): the conditioning shapes of one row (for flowjax.plan)."""
        return tuple(self.ctx.shape[1:]), tuple(self.pooled.shape[1:])

    def encode(self, prompt_ids):
        return self.ctx[prompt_ids], self.pooled[prompt_ids]

    def negative(self, batch: int):
        return (jnp.broadcast_to(self.neg_ctx, (batch, *self.neg_ctx.shape)),
                jnp.broadcast_to(self.neg_pooled, (batch, *self.neg_pooled.shape)))

    def images(self, samples) -> jax.Array:
        return pixels_to_images(samples)

    def captions(self, prompt_ids) -> list[str]:
        return [self.prompts[int(i)].text for i in np.asarray(prompt_ids)]

    def score(self, samples, prompt_ids, state=None):
        """{"reward": partial credit [B], "accuracy": strict 0/1 [B]} in one detection pass."""
        del state  # the reward has no weights
        return shapes_reward.score(self.images(samples), self.specs[prompt_ids], self.detector)

    def reward(self, samples, prompt_ids):
        return self.score(samples, prompt_ids)["reward"]

    def accuracy(self, samples, prompt_ids):
        return self.score(samples, prompt_ids)["accuracy"]

    def task_names(self, prompt_ids) -> list[str]:
        """The task of each prompt (single, counting, two, position), for per-task accuracies."""
        return [self.prompts[int(i)].task for i in np.asarray(prompt_ids)]
