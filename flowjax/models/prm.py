"""A latent process reward model (PRM): the expected final reward of a rollout from its noisy latent.

`LatentPRM(x_t, sigma, ctx, pooled) -> scores [B]` reads a noisy latent x_t [B, H, W, C] at noise level
sigma [B] with its prompt's text embeddings (the world's conditioning: per-token ctx [B, L, D] and pooled
[B, P]) and is regressed onto the final rewards of the base model's rollouts (`flowjax.prm`), so that it
estimates E[r(x_0) | x_t, prompt]. Its gradient with respect to x_t steers Euphonium's guided sampler
(`flowjax.rl.euphonium`) and its scores at the guided steps give the per-step process advantages.

What comes from the reference and what is chosen here. Euphonium's latent PRM (zerzerzerz/Euphonium@d9f2c39,
euphonium/reward_models/trl_reward/latent_sub_reward.py, `LatentSubReward.compute_with_gradient`) is called
on (noisy_latents, timestep = int(sigma * 1000), prompt_embeds, attention mask, pooled_prompt_embeds) and
returns a score per sample (a raw score: `latent_reward_use_sigmoid` is false in scripts/train_grpo_hunyuan.sh)
and its gradient with respect to the noisy latent. Its network lives in the Latent_PRM submodule
(zerzerzerz/Latent_PRM@2972d70), which is not public in any form we could read, so the architecture below is
our own, small enough to train on a CPU in minutes: a conv net over the latent whose features are modulated
(FiLM) by an embedding of sigma (sinusoidal, of sigma * 1000 as the reference's timesteps) and of the prompt
(the pooled embedding and the token mean), mean-pooled and read out by an MLP together with that embedding.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax.convert import mapping
from flowjax.convert.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors
from flowjax.models.layers import timestep_embedding

WEIGHTS = "model"  # model.safetensors
# The PRM trained for the shapes world's shipped base model (configs/shapes.py:euphonium; its config.json records
# how it was trained and its held-out fit).
SHAPES_PRM = Path(__file__).resolve().parent.parent / "assets" / "shapes_prm"
CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class LatentPRMConfig:
    in_channels: int  # latent channels C
    text_dim: int  # D of the per-token text embedding
    pooled_dim: int  # P of the pooled text embedding
    width: int = 16  # channels of the first stage; each stride-2 stage doubles them
    stages: int = 3
    hidden: int = 128  # width of the conditioning embedding and of the read-out MLP
    time_dim: int = 64  # sinusoidal embedding of sigma * 1000
    groups: int = 8  # GroupNorm groups

    def __post_init__(self):
        for name in ("in_channels", "text_dim", "pooled_dim", "width", "stages", "hidden", "time_dim", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LatentPRMConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.groups:
            raise ValueError(f"LatentPRMConfig.width={self.width} must be a multiple of groups={self.groups}")

    @classmethod
    def from_dict(cls, d: dict) -> "LatentPRMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LatentPRMConfig keys {unknown}; the keys are {sorted(names)}")
        return cls(**d)


class LatentPRM(nnx.Module):
    """See the module docstring. All compute in float32 (the inputs are cast)."""

    def __init__(self, config: LatentPRMConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.cond_in = nnx.Linear(c.time_dim + c.text_dim + c.pooled_dim, c.hidden, rngs=rngs)
        self.cond_out = nnx.Linear(c.hidden, c.hidden, rngs=rngs)
        self.stem = nnx.Conv(c.in_channels, c.width, (3, 3), rngs=rngs)
        widths = [c.width * 2**i for i in range(c.stages + 1)]
        self.norms = nnx.List([nnx.GroupNorm(w, num_groups=c.groups, rngs=rngs) for w in widths[:-1]])
        # FiLM: per-channel (scale, shift) of each stage's normalised input, zero at initialisation.
        self.films = nnx.List([nnx.Linear(c.hidden, 2 * w, kernel_init=nnx.initializers.zeros, rngs=rngs)
                               for w in widths[:-1]])
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in zip(widths, widths[1:])])
        self.head_in = nnx.Linear(widths[-1] + c.hidden, c.hidden, rngs=rngs)
        self.head_out = nnx.Linear(c.hidden, 1, rngs=rngs)

    def embed(self, sigma, ctx, pooled) -> jax.Array:
        """The conditioning embedding [B, hidden] of the noise level and the prompt."""
        t = timestep_embedding(jnp.asarray(sigma, jnp.float32).reshape(-1) * 1000.0, self.config.time_dim)
        text = jnp.asarray(ctx, jnp.float32).mean(axis=1)
        e = jnp.concatenate([t, text, jnp.asarray(pooled, jnp.float32)], axis=-1)
        return self.cond_out(jax.nn.silu(self.cond_in(e)))

    def __call__(self, x, sigma, ctx, pooled) -> jax.Array:
        """Scores [B] float32 of noisy latents x [B, H, W, C] at sigma [B] (or a scalar) for their prompts."""
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"LatentPRM takes latents [B, H, W, {self.config.in_channels}], got {x.shape}")
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        e = self.embed(sigma, ctx, pooled)
        act = jax.nn.silu(e)
        h = self.stem(x)
        for norm, film, conv in zip(self.norms, self.films, self.convs):
            scale, shift = jnp.split(film(act)[:, None, None, :], 2, axis=-1)
            h = conv(jax.nn.silu(norm(h) * (1.0 + scale) + shift))
        feats = jnp.concatenate([h.mean(axis=(1, 2)), e], axis=-1)
        return self.head_out(jax.nn.silu(self.head_in(feats)))[:, 0]


def initialise(config: LatentPRMConfig, seed: int = 0) -> LatentPRM:
    """A fresh PRM with its weights drawn on the host (NumPy): kernels normal with std 1 / sqrt(fan in), the FiLM
    kernels and every bias zero, GroupNorm scales one. Drawing them with jax.random would compile one program
    per weight shape, which takes longer than training the PRM on a CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LatentPRM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        shape = tuple(var.shape)
        if path[-1] == "kernel" and path[0] != "films":
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "scale":
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        leaves.append((path, var.replace(jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


# ------------------------------------------------------------------------------------ save / load


def _table(state) -> list[mapping.KeyMap]:
    """The identity key table of a PRM state (its dotted paths are the file's keys)."""
    return [mapping.KeyMap(mapping.path_str(p), (mapping.path_str(p),)) for p, _ in nnx.to_flat_state(state)]


def save(model: LatentPRM, path, meta: dict | None = None) -> Path:
    """Writes PATH/config.json (the config, and `meta`: how it was trained, its fit) and PATH/model.safetensors."""
    path = Path(path)
    state = nnx.state(model, nnx.Param)
    write_safetensors(mapping.export_state(_table(state), state, np.float32), path, WEIGHTS)
    (path / CONFIG).write_text(json.dumps({"config": dataclasses.asdict(model.config), "meta": meta or {}}, indent=2))
    return path


def load(path) -> tuple[LatentPRM, dict]:
    """(model, meta) of a folder written by `save`; every missing, unexpected or misshaped key is listed."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a latent PRM folder (no {CONFIG}); train one with "
                              "`python -m flowjax.prm --config=CONFIG:euphonium --workdir=DIR`")
    try:
        blob = json.loads(cfg_file.read_text())
        config = LatentPRMConfig.from_dict(blob["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_file} is not a latent PRM config ({type(e).__name__}: {e})") from None
    abstract = nnx.eval_shape(lambda: LatentPRM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    loaded = mapping.load_state(_table(state), state, SafetensorsReader(path, WEIGHTS), what="latent PRM")
    return nnx.merge(graphdef, loaded), blob.get("meta", {})
