"""flowjax's own model folders: `flowjax_model.json` (family + architecture) + an orbax `params/` tree.

This is what `python -m flowjax.convert import-*` writes and what `export-*` reads back; restoring puts
each array straight into its sharding when a mesh is given. A model with LoRA adapters keeps them: the
manifest's `lora` entry lists each adapted module's rank, scale, dtype and merged flag, and
`load_model` re-attaches those adapters before restoring their weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flowjax import sharding as sharding_lib
from flowjax.convert import lora as lora_convert
from flowjax.convert.safetensors_io import CheckpointError
from flowjax.models.flux import Flux, FluxConfig
from flowjax.models.mmdit import MMDiT, MMDiTConfig

MANIFEST = "flowjax_model.json"
FAMILIES = {"sd3_transformer": (MMDiT, MMDiTConfig), "flux_transformer": (Flux, FluxConfig)}


def _family_of(model) -> str:
    for name, (cls, _) in FAMILIES.items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"no flowjax model family for {type(model).__name__}")


def save_model(model: nnx.Module, path) -> Path:
    path = Path(path).absolute()
    if (path / "params").exists():
        raise FileExistsError(f"{path} already holds a flowjax model; choose a new folder")
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    manifest = {"family": _family_of(model), "config": config.to_diffusers()}
    adapters = lora_convert.adapter_spec(model)
    if adapters:
        manifest["lora"] = adapters
    state = nnx.to_pure_dict(nnx.state(model))
    if jax.process_count() > 1:  # orbax writes host-local (unsharded) arrays of a multi-host run as NumPy
        state = jax.tree.map(lambda a: np.asarray(a) if getattr(a, "is_fully_addressable", True) else a, state)
    with ocp.StandardCheckpointer() as ckptr:  # collective: every process of a multi-host run calls it
        ckptr.save(path / "params", state)
    if jax.process_index() == 0:
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def load_model(path, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None, rules=sharding_lib.DEFAULT_RULES, **model_kwargs):
    """Restores a model saved by `save_model`; `param_dtype=None` keeps the dtype it was saved in."""
    path = Path(path).absolute()
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a flowjax model folder (no {MANIFEST}); create one with "
                              "`python -m flowjax.convert import-transformer`")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("family") not in FAMILIES:
        raise CheckpointError(f"{path}: unknown model family {manifest.get('family')!r}; known: {sorted(FAMILIES)}")
    cls, config_cls = FAMILIES[manifest["family"]]
    config = config_cls.from_diffusers(manifest["config"])
    metadata = ocp.StandardCheckpointer().metadata(path / "params")
    saved_dtype = jax.tree.leaves(metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata)[0].dtype
    param_dtype = param_dtype or saved_dtype
    adapters = manifest.get("lora") or {}

    def build(act):
        model = cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, activation_sharding=act, **model_kwargs)
        lora_convert.attach(model, adapters)  # the saved adapters' layout; their weights are restored below
        return model

    graphdef, state, shardings = sharding_lib.abstract_model(build, mesh, rules)
    if shardings is not None:
        shardings = nnx.to_pure_dict(shardings)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(state), shardings
    )
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------ training runs

POLICY_DIR, POLICY_MANIFEST = "policy", "flowjax_policy.json"


def save_policy(workdir, model: nnx.Module, *, base=None, trainable: str = "lora") -> Path:
    """Writes WORKDIR/policy/: what `load_trained` needs to rebuild the trained model from a run's checkpoints.

    The manifest names the model family and architecture, the LoRA adapters the trainer attached, which
    variables are trained ("lora" or "all") and `base`, the diffusers transformer folder the frozen weights
    come from. Without a base folder (a randomly initialised model) the model's own weights are saved beside
    it, which is only sensible for small models. Called by the trainer at start, on every process (the
    weights' save is collective); process 0 writes the manifests.
    """
    path = Path(workdir).absolute() / POLICY_DIR
    manifest = {"family": _family_of(model), "config": model.config.to_diffusers(),
                "lora": lora_convert.adapter_spec(model), "trainable": trainable,
                "base": str(Path(base).absolute()) if base else None}
    if base is None and not (path / "base" / MANIFEST).is_file():
        save_model(model, path / "base")
    path.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (path / POLICY_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def is_run(path) -> bool:
    """True for a training workdir (one with WORKDIR/policy/flowjax_policy.json)."""
    return (Path(path) / POLICY_DIR / POLICY_MANIFEST).is_file()


def _normalized(path) -> tuple:
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


def load_trained(workdir, *, ema: bool = False, step: int | None = None, dtype=jnp.float32, param_dtype=None):
    """The model of a training run with its trained weights: the latest checkpoint's (or `step`'s) policy
    parameters, or with `ema=True` its EMA evaluation copy. Only that part of the checkpoint is read."""
    from flowjax.convert import load_transformer

    workdir = Path(workdir).absolute()
    if not is_run(workdir):
        raise CheckpointError(f"{workdir} is not a flowjax training run (no {POLICY_DIR}/{POLICY_MANIFEST}); "
                              "give the --workdir of `python -m flowjax.train`")
    manifest = json.loads((workdir / POLICY_DIR / POLICY_MANIFEST).read_text())
    if manifest["base"]:
        model = load_transformer(manifest["base"], dtype=dtype, param_dtype=param_dtype or jnp.float32)
        lora_convert.attach(model, manifest.get("lora") or {})
    else:
        model = load_model(workdir / POLICY_DIR / "base", dtype=dtype, param_dtype=param_dtype)
    ckpts = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    if not steps:
        raise CheckpointError(f"{ckpts} holds no checkpoint yet")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {ckpts}; there are {steps}")
    field = "ema" if ema else "params"
    item = ckpts / str(step) / "default"
    meta = ocp.PyTreeCheckpointer().metadata(item)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    if not tree.get(field):
        raise CheckpointError(f"the checkpoint at step {step} has no {field!r}: this method keeps no EMA copy"
                              if ema else f"the checkpoint at step {step} has no trained parameters")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {field: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree[field])}
    restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))[field]
    saved = {_normalized(p): v for p, v in jax.tree_util.tree_leaves_with_path(restored)}
    kind = nnx.LoRAParam if manifest["trainable"] == "lora" else nnx.Param
    state = nnx.state(model, kind)
    pure = nnx.to_pure_dict(state)
    leaves = {}
    for p, v in jax.tree_util.tree_leaves_with_path(pure):
        key = _normalized(p)
        if key not in saved or saved[key].shape != v.shape:
            raise CheckpointError(f"{item}: trained variable {'.'.join(key)} is missing or misshaped "
                                  f"({None if key not in saved else saved[key].shape} vs {v.shape})")
        leaves[key] = saved.pop(key).astype(v.dtype)
    if saved:
        raise CheckpointError(f"{item}: {len(saved)} saved variables fit no trained variable of the model, e.g. "
                              f"{'.'.join(next(iter(saved)))}")
    pure = jax.tree_util.tree_map_with_path(lambda p, _: leaves[_normalized(p)], pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model
