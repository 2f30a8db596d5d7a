"""Meshes and logical-axis sharding.

Parameters carry logical axis names (`embed`, `heads`, `mlp`, `vocab`, `layers`) and activations are
constrained with `activation_*` names; a table of rules maps each logical name to mesh axes
(`data`, `fsdp`, `tensor`). The rules and the mesh shape come from the config, never from a global.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Pure FSDP by default: weights split over `fsdp` along their model dimension, batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with axes (data, fsdp, tensor); one size may be -1 (fill)."""
    devices = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = {"data": 1, "fsdp": -1, "tensor": 1}
    if not isinstance(shape, Mapping):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // rest
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {len(devices)} are "
            "available; make the product of the axis sizes equal the device count (or use -1 on one axis)"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules, mesh: Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec of an array with these logical axis names.

    A dimension that the mapped mesh axes do not divide is kept whole (replicated) rather than padded:
    tiny configs and odd sizes (e.g. 12 text channels on 8 devices) still load.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        if axes and shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def variable_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """The state with each Variable's value replaced by its NamedSharding (from `logical_axes` metadata)."""

    def one(v):
        names = v.get_metadata().get("logical_axes") or (None,) * len(v.shape)
        return v.replace(NamedSharding(mesh, logical_to_spec(names, rules, mesh, v.shape)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Callable (x, logical names) -> x constrained to its sharding; hashable, so models keep it as static."""

    mesh: Mesh
    rules: tuple = DEFAULT_RULES

    def __call__(self, x, names):
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, logical_to_spec(names, self.rules, self.mesh, x.shape)))


def shard_state(state, mesh: Mesh, rules=DEFAULT_RULES):
    """An NNX state with every array moved onto its sharding."""
    return jax.device_put(state, variable_shardings(state, mesh, rules))


def abstract_model(build, mesh: Mesh | None = None, rules=DEFAULT_RULES):
    """(graphdef, abstract state, shardings or None) of `build(activation_sharding)`, allocating nothing.

    The loaders fill the abstract state leaf by leaf, each leaf straight into its sharding.
    """
    act = ActivationSharding(mesh, tuple(rules)) if mesh is not None else None
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(act)))
    shardings = variable_shardings(state, mesh, rules) if mesh is not None else None
    return graphdef, state, shardings
