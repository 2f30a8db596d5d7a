"""python -m flowjax.train --config=configs/shapes.py --workdir=runs/shapes [--config.train.lr=1e-4 ...]

Writes WORKDIR/metrics.jsonl (one JSON object per logged step; `eval/...` keys on evaluations) and
WORKDIR/checkpoints/; rerunning with the same workdir resumes from the last checkpoint.
On several hosts (TPU pod workers with --multihost, GPU nodes with --coordinator/--num_processes/--process_id;
see launch/)
`jax.distributed` is initialised first and only process 0 writes logs.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from flowjax.worlds.toy import ToyWorld
from flowjax.models.mmdit import MMDiT, MMDiTConfig
from flowjax.rl.trainer import Trainer


def _define_flags():
    """Command-line flags, defined only when run as a program, so that `from flowjax.train import build`
    (flowjax.compare, notebooks) leaves the importer's own flags alone."""
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/toy.py:grpo", lock_config=True)
    flags.DEFINE_string("workdir", None, "output folder (metrics, checkpoints); reused to resume")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-host GPU runs")
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
    flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
    flags.DEFINE_bool("multihost", False, "initialise jax.distributed from the environment (TPU pods, SLURM)")
    flags.mark_flags_as_required(["config", "workdir"])


def build(config, workdir, mesh=None) -> Trainer:
    """Model and world of a config: `world.name` "shapes" (the shipped base model and its world), "sd3"
    (a diffusers SD3 / SD3.5 folder, prompt files and a reward: configs/geneval.py, ocr.py, pickscore.py), "flux"
    (a diffusers FLUX.1 folder: configs/flux_pickscore.py, flux_geneval.py) or "toy" (a randomly initialised
    MMDiT steering colours)."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    name = config.world.get("name", "toy")
    if name == "shapes":
        return _build_shapes(config, workdir, mesh, dtype)
    if name in ("sd3", "flux"):
        return _build_pipeline_world(config, workdir, mesh, dtype, name)
    if name != "toy":
        raise ValueError(f"world.name must be 'shapes', 'sd3', 'flux' or 'toy', got {name!r}")
    arch = MMDiTConfig(**config.arch)
    m = config.get("model") or {}
    model = MMDiT(arch, rngs=nnx.Rngs(config.seed), dtype=dtype, attention_impl=m.get("attention", "xla"),
                  remat=m.get("remat", "none"))
    world = ToyWorld(text_len=config.world.text_len, joint_dim=arch.joint_attention_dim,
                     pooled_dim=arch.pooled_projection_dim, channels=arch.in_channels,
                     num_prompts=config.world.num_prompts, target_scale=config.world.target_scale, seed=config.seed)
    return Trainer(config, workdir, model=model, world=world, mesh=mesh)


def _build_shapes(config, workdir, mesh, dtype) -> Trainer:
    from flowjax.data import shapes
    from flowjax.worlds.shapes import BASE_MODEL, ShapesWorld, load_base

    text_encoder, model, meta = load_base(config.world.base or None, dtype=dtype)
    size = meta["image_size"]
    if tuple(config.sample.latent_size) != (size, size):
        raise ValueError(f"sample.latent_size must be ({size}, {size}) for this base model, got "
                         f"{tuple(config.sample.latent_size)}")
    split = shapes.split_prompts(meta["held_out_fraction"], meta["split_seed"])
    world = ShapesWorld(text_encoder, split["train"], image_size=size, eval_prompts=split["heldout"])
    base = Path(config.world.base or BASE_MODEL) / "transformer"
    return Trainer(config, workdir, model=model, world=world, mesh=mesh, prediction=meta.get("prediction", "velocity"),
                   base=base)


_FLAX_REWARDS = ("pickscore", "clipscore", "aesthetic", "hpsv2")
_URL_REWARDS = ("remote", "geneval_remote")
_CHECKPOINTS = {"pickscore": "PickScore_v1 (a transformers CLIPModel folder)",
                "clipscore": "clip-vit-large-patch14 (a transformers CLIPModel folder)",
                "hpsv2": "HPS_v2.1_compressed.pt"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _plain(value):
    """ConfigDicts (and their nested values) as plain dicts / tuples for the reward loaders."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _reward_options(name: str, options: dict, mesh) -> dict:
    options = {k: v for k, v in options.items() if v != ""}  # "" = the loader's default (e.g. tokenizer)
    if name in _FLAX_REWARDS:
        for key in ("dtype", "param_dtype"):
            if isinstance(options.get(key), str):
                if options[key] not in _DTYPES:
                    raise ValueError(f"config.reward.options.{key} must be one of {sorted(_DTYPES)}, "
                                     f"got {options[key]!r}")
                options[key] = _DTYPES[options[key]]
        options.setdefault("mesh", mesh)
    return options


def load_reward(reward_config, mesh=None):
    """The reward of `config.reward`: `flowjax.rewards.load(name, path, url=..., **options)`; name "multi"
    takes `weights` {name: w} and `components` {name: {"name", "path", "url", **options}}."""
    from flowjax import rewards

    r = _plain(reward_config)
    name = str(r.get("name") or "")
    if name.lower() not in rewards.NAMES:
        raise ValueError(f"config.reward.name: unknown reward {name!r}; the rewards are {', '.join(rewards.NAMES)}")
    name = name.lower()

    def spec_to_args(spec, where, inline=False):
        spec = dict(spec)
        sub = str(spec.pop("name", "") or "").lower()
        path = spec.pop("path", "") or None
        url = spec.pop("url", "") or None
        options = dict(spec.pop("options", {}) or {})
        if inline:  # a component's other keys are its options
            options.update(spec)
        if url is not None:
            if sub not in _URL_REWARDS:
                raise ValueError(f"{where}.url is set but reward {sub!r} takes no url "
                                 f"(only {', '.join(_URL_REWARDS)} do)")
            options["url"] = url
        return sub, path, _reward_options(sub, options, mesh)

    if name == "multi":
        weights, components = r.get("weights") or {}, r.get("components") or {}
        if not components:
            raise ValueError("config.reward.name='multi' needs config.reward.components = {name: {'name': ..., "
                             "'path' / 'url': ..., **options}} and config.reward.weights = {name: weight}")
        specs = {}
        for key, spec in components.items():
            sub, path, options = spec_to_args({"name": key, **spec}, f"config.reward.components.{key}",
                                              inline=True)
            if sub not in rewards.NAMES:
                raise ValueError(f"config.reward.components.{key}.name: unknown reward {sub!r}; the rewards are "
                                 f"{', '.join(rewards.NAMES)}")
            specs[key] = {"name": sub, "path": path, **options}
        return rewards.load("multi", weights=dict(weights), rewards=specs)
    _, path, options = spec_to_args(r, "config.reward")
    if path is None and name in ("pickscore", "clipscore", "hpsv2"):
        raise ValueError(f"config.reward.path is not set: the {name} reward needs its checkpoint, e.g. "
                         f"--config.reward.path=/path/to/{_CHECKPOINTS[name]}")
    return rewards.load(name, path, **options)


_PIPELINES = {"sd3": ("SD3 / SD3.5", "stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-medium"),
              "flux": ("FLUX.1", "FLUX.1-dev", "black-forest-labs/FLUX.1-dev")}


def _build_pipeline_world(config, workdir, mesh, dtype, name: str) -> Trainer:
    """A diffusers SD3 / SD3.5 or FLUX.1 pipeline folder, its prompt set and reward (configs/geneval.py, ocr.py,
    pickscore.py, flux_pickscore.py, flux_geneval.py)."""
    from flowjax import sharding as sharding_lib
    from flowjax.data.prompts import load_prompts
    from flowjax.pipeline import FluxPipeline, SD3Pipeline
    from flowjax.worlds.sd3 import SD3World

    w = config.world
    what, folder, repo = _PIPELINES[name]
    if not w.get("model"):
        raise ValueError(f"config.world.model is not set: pass --config.world.model=/path/to/{folder} "
                         f"(a diffusers {what} pipeline folder, with model_index.json)")
    if not Path(w.model).is_dir():
        raise FileNotFoundError(f"config.world.model={w.model!r} is not a folder; give a local diffusers {what} "
                                f"pipeline folder (e.g. a download of {repo})")
    param_dtype = config.get("param_dtype", "float32")
    if param_dtype not in _DTYPES:
        raise ValueError(f"config.param_dtype must be one of {sorted(_DTYPES)}, got {param_dtype!r}")
    mesh = mesh or sharding_lib.make_mesh(dict(config.mesh))
    rules = tuple(config.sharding_rules)
    # Prompts and reward before the weights: their errors are cheap to hit.
    train, evaluation = load_prompts(w.get("prompts") or None, w.get("prompt_kind", "geneval"),
                                     train_split=w.get("train_split", "train"), eval_split=w.get("eval_split", "test"),
                                     generate_train=w.get("generate_train", 5000),
                                     generate_test=w.get("generate_test", 500), generate_seed=w.get("generate_seed", 0))
    reward = load_reward(config.reward, mesh)
    m = config.get("model") or {}
    kw = dict(dtype=dtype, param_dtype=_DTYPES[param_dtype], mesh=mesh, rules=rules,
              attention_impl=m.get("attention", "xla"), remat=m.get("remat", "none"))
    if name == "flux":
        pipe = FluxPipeline.from_pretrained(w.model, **kw)
    else:
        pipe = SD3Pipeline.from_pretrained(w.model, text_encoder_3=w.get("text_encoder_3", True), **kw)
    resolution = int(w.get("resolution", 512))
    latent = pipe.check_size(resolution, resolution)
    if tuple(config.sample.latent_size) != latent:
        raise ValueError(f"sample.latent_size must be {latent} for world.resolution={resolution} with this VAE "
                         f"(vae_scale_factor {pipe.vae_scale_factor}), got {tuple(config.sample.latent_size)}; set "
                         f"--config.sample.latent_size='{latent}'")
    # Host rewards are called per device shard: each host scores its own rows, no batch gathers to one device.
    from jax.sharding import NamedSharding, PartitionSpec

    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    world = SD3World(pipe, train, reward, eval_prompts=evaluation if w.get("eval_split", "test") else None,
                     resolution=resolution, max_sequence_length=w.get("max_sequence_length", 128),
                     precompute_limit=w.get("precompute_limit", 256),
                     encode_batch_size=w.get("encode_batch_size", 32),
                     metrics=tuple(config.reward.get("metrics", ())), sharding=batch_sharding,
                     guidance=w.get("guidance", 3.5))
    return Trainer(config, workdir, model=pipe.transformer, world=world, mesh=mesh,
                   base=Path(w.model) / "transformer")


def main(argv):
    del argv
    f = flags.FLAGS
    if f.coordinator or (f.num_processes or 1) > 1:
        jax.distributed.initialize(f.coordinator, f.num_processes, f.process_id)
    elif f.multihost:
        jax.distributed.initialize()
    trainer = build(f.config, f.workdir)
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    _define_flags()
    app.run(main)
