"""The one body every converter uses to read and write a model folder (config.json + safetensors).

- `read_model_config`: config.json -> the model's config object, with a `CheckpointError` that names the file
  and the fix for a missing folder, a pipeline folder given instead of its component, another kind of model,
  or values the config class refuses.
- `load_model`: builds the model abstractly (nothing allocated), checks the key table against the file (every
  missing / unexpected / misshaped key listed at once), and fills the state leaf by leaf, each leaf straight
  into its sharding when a mesh is given.
- `save_model`: the table run backwards (LoRA adapters merged into the written kernels), safetensors in one
  file or in shards with their index, and the config.json the reference library reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from flax import nnx
from tqdm.auto import tqdm

from flowjax import sharding as sharding_lib
from flowjax.convert import mapping
from flowjax.convert.safetensors_io import CheckpointError, read_config_json, write_safetensors
from flowjax.models import lora


def read_model_config(
    path: str | os.PathLike,
    parse: Callable[[Mapping[str, Any]], Any],
    *,
    folder: str,
    subfolders: tuple[str, ...] = (),
    pipeline: str = "pipeline",
    wrong_kind: Callable[[Mapping[str, Any]], str | None] | None = None,
):
    """`parse(config.json)`; CheckpointError naming the file otherwise.

    `folder` says what the user should give, `subfolders` the pipeline components that hold such a model (for
    the hint when a whole pipeline folder is given). `wrong_kind(raw)` returns a message ("describes a X, not a
    Y") when config.json belongs to another kind of model, else None.
    """
    cfg_file, raw = read_config_json(path, folder=folder, subfolders=subfolders, pipeline=pipeline)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} does not hold a config object")
    problem = wrong_kind(raw) if wrong_kind is not None else None
    if problem:
        raise CheckpointError(f"{cfg_file} {problem}")
    try:
        return parse(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def class_name_is(expected: str, article: str = "a") -> Callable[[Mapping[str, Any]], str | None]:
    """A `wrong_kind` check for diffusers configs: `_class_name` (when present) must be `expected`."""

    def check(raw):
        found = raw.get("_class_name", expected)
        return None if found == expected else f"describes a {found}, not {article} {expected}"

    return check


def load_model(
    build: Callable[[Any], nnx.Module],
    table: list[mapping.KeyMap],
    source: mapping.TensorSource,
    *,
    what: str,
    path,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
    progress: bool = False,
    ignore: Iterable[str] = (),
) -> nnx.Module:
    """The model `build(activation_sharding)` with the weights of `source` mapped through `table`.

    `what` names the model in messages ("SD3Transformer2DModel"); `path` is the folder, named when the
    constructor refuses the config. With `mesh`, each weight goes straight into its sharding under `rules`
    and activations are constrained by the same rules.
    """
    try:
        graphdef, abstract_state, shardings = sharding_lib.abstract_model(build, mesh, rules)
    except ValueError as e:  # the config passed its own checks but the model cannot be built from it
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from None
    bar = (lambda it: tqdm(it, desc=f"loading {what}", unit="tensor")) if progress else (lambda it: it)
    state = mapping.load_state(table, abstract_state, source, what=what, shardings=shardings, progress=bar,
                               ignore=ignore)
    return nnx.merge(graphdef, state)


def save_model(
    model: nnx.Module,
    table: list[mapping.KeyMap],
    config: Mapping[str, Any],
    path,
    *,
    weights_name: str,
    dtype=None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes `config` as config.json and the model's weights as `weights_name`.safetensors (or shards).

    LoRA adapters are merged into the written kernels (the model itself is left as it is); weights keep their
    stored dtype unless `dtype` is given (e.g. `jnp.bfloat16`).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = mapping.export_state(table, lora.merged_state(model), dtype=dtype)
    write_safetensors(tensors, path, weights_name, max_shard_bytes=max_shard_bytes)
    (path / "config.json").write_text(json.dumps(dict(config), indent=2))
    return path
