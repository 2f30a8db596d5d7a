"""Transformer LoRA adapters (SD3 / SD3.5 `MMDiT`, FLUX.1 `Flux`) <-> the diffusers / PEFT LoRA format.

`save_lora` writes `pytorch_lora_weights.safetensors` as `StableDiffusion3Pipeline.save_lora_weights` /
`FluxPipeline.save_lora_weights` do (both mixins name the transformer `transformer`, diffusers 0.42
`loaders/lora_pipeline.py`): keys `transformer.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], and PEFT's
`LoraConfig` fields (`r`, `lora_alpha`, `target_modules`, `rank_pattern`, `alpha_pattern`) in the
file's `lora_adapter_metadata`, prefixed `transformer.`. diffusers >= 0.34 builds the adapter's
`LoraConfig` from that metadata, so the scale alpha / rank survives; without metadata diffusers
assumes alpha = rank (scale 1). `fold_scale=True` writes scale * B and alpha = rank instead, which
every reader (metadata-aware or not) applies identically.

`load_lora` reads such a file (or a PEFT `adapter_model.safetensors` + `adapter_config.json`), attaches
adapters of the file's ranks to the matching projections and sets their weights, so a published LoRA
can be sampled from or trained further. Module names come from the model's key table
(`transformer.table_of`), the same table that converts the base weights, so the two can never disagree.
"""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from flowjax.convert.mapping import LINEAR, WeightsMismatchError
from flowjax.convert.safetensors_io import CheckpointError
from flowjax.convert.transformer import FAMILIES, family_of_config
from flowjax.models import lora
from flowjax.models.flux import Flux, FluxConfig
from flowjax.models.mmdit import MMDiT, MMDiTConfig

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # PeftModel.save_pretrained
PEFT_CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"  # diffusers' SD3LoraLoaderMixin / FluxLoraLoaderMixin .transformer_name
PEFT_PREFIX = "base_model.model"
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te", "te1_", "te2_")
PEFT_DEFAULT_ALPHA = 8  # `LoraConfig.lora_alpha` when a config omits it (what diffusers then uses)


# --- module names -----------------------------------------------------------------------------


def lora_targets(cfg: MMDiTConfig | FluxConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Our `Dense` path -> (its diffusers module name per layer, stacked), from the family's key table.

    Every linear layer of the table is listed: `stacks.0.blocks.attn.to_q` ->
    (`transformer_blocks.0.attn.to_q`, `transformer_blocks.1.attn.to_q`, ...), True.
    """
    out = {}
    for km in family_of_config(cfg).table(cfg):
        if km.transform is LINEAR and km.ours.endswith(".kernel"):
            out[km.ours.removesuffix(".kernel")] = (tuple(t.removesuffix(".weight") for t in km.theirs), km.stacked)
    return out


def _dense_by_path(model: nnx.Module) -> dict[str, Any]:
    return {".".join(map(str, path)): dense for path, dense in lora.dense_modules(model)}


# --- adapter layout (also what flowjax.checkpoint keeps in flowjax_model.json) ----------------


def adapter_spec(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """`{dense path: {"rank", "scale", "dtype", "merged"}}` of every adapter of the model (JSON-able)."""
    spec = {}
    for path, dense in _dense_by_path(model).items():
        if dense.lora_a is not None:
            spec[path] = {
                "rank": int(dense.lora_a.shape[-1]),
                "scale": float(dense.lora_scale),
                "dtype": jnp.dtype(dense.lora_a.dtype).name,
                "merged": bool(dense.lora_merged),
            }
    return spec


def attach(model: nnx.Module, spec: Mapping[str, Mapping[str, Any]], *, key: jax.Array | None = None) -> list[str]:
    """Attaches fresh adapters (A ~ N(0, 1/rank^2) as `lora.apply`, B = 0) laid out as `adapter_spec` says.

    The inverse of `adapter_spec` (values aside): `flowjax.checkpoint.load_model` rebuilds a saved
    model's adapters with it before restoring their weights. Unlike `lora.apply`, which matches
    target names in every stack, it adapts exactly the listed modules, each with its own rank.
    """
    modules = _dense_by_path(model)
    unknown = sorted(set(spec) - set(modules))
    if unknown:
        raise ValueError(f"no Dense module at {unknown}")
    key = jax.random.key(0) if key is None else key
    for i, (path, s) in enumerate(sorted(spec.items())):
        dense, rank = modules[path], int(s["rank"])
        if dense.lora_a is not None:
            raise ValueError(f"{path} already has a LoRA adapter")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank} for {path}")
        dtype = jnp.dtype(s.get("dtype", "float32"))
        lead = dense.kernel.shape[:-2]
        axes = dense.kernel.get_metadata().get("logical_axes") or (None,) * dense.kernel.ndim
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, dense.in_features, rank), dtype) / rank
        dense.lora_a = nnx.LoRAParam(a, logical_axes=(*axes[:-1], None))
        dense.lora_b = nnx.LoRAParam(
            jnp.zeros((*lead, rank, dense.out_features), dtype), logical_axes=(*axes[:-2], None, axes[-1])
        )
        dense.lora_scale = float(s["scale"])
        dense.lora_merged = bool(s.get("merged", False))
    return sorted(spec)


# --- export -----------------------------------------------------------------------------------


def _number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-6 else float(x)


def lora_state_dict(model: MMDiT | Flux, *, dtype=None, fold_scale: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors keyed by diffusers module name without prefix, PEFT `LoraConfig` fields).

    The config holds the most common rank / alpha as `r` / `lora_alpha`; modules that differ get
    anchored entries in `rank_pattern` / `alpha_pattern`, as diffusers writes them.
    """
    spec = adapter_spec(model)
    if not spec:
        raise CheckpointError(
            "the model has no LoRA adapters to save: attach them with flowjax.models.lora.apply (and train) or "
            "flowjax.convert.load_lora (CLI: import-lora); for the full weights use save_transformer (export-transformer)"
        )
    names = lora_targets(model.config)
    modules = _dense_by_path(model)
    tensors: dict[str, np.ndarray] = {}
    rank_alpha: dict[str, tuple[int, int | float]] = {}
    for path in sorted(spec):
        if path not in names:  # a Dense that diffusers has no Linear for
            raise ValueError(f"{path} carries a LoRA adapter but has no diffusers counterpart")
        dense, (theirs, stacked) = modules[path], names[path]
        a = np.asarray(jax.device_get(dense.lora_a[...]))
        b = np.asarray(jax.device_get(dense.lora_b[...]))
        scale = float(dense.lora_scale)
        if fold_scale:
            b = (b.astype(np.float32) * scale).astype(b.dtype)
        rank = a.shape[-1]
        alpha = rank if fold_scale else _number(scale * rank)
        a_layers, b_layers = (list(a), list(b)) if stacked else ([a], [b])
        for name, la, lb in zip(theirs, a_layers, b_layers, strict=True):
            if dtype is not None:
                la, lb = la.astype(dtype), lb.astype(dtype)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(LINEAR.to_theirs(la))  # [r, in]
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(LINEAR.to_theirs(lb))  # [out, r]
            rank_alpha[name] = (rank, alpha)
    r, lora_alpha = collections.Counter(rank_alpha.values()).most_common(1)[0][0]
    config = {
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(rank_alpha),
        "rank_pattern": {f"^{re.escape(n)}": ra[0] for n, ra in sorted(rank_alpha.items()) if ra[0] != r},
        "alpha_pattern": {f"^{re.escape(n)}": ra[1] for n, ra in sorted(rank_alpha.items()) if ra[1] != lora_alpha},
    }
    return tensors, config


def save_lora(model: MMDiT | Flux, path, *, dtype=None, fold_scale: bool = False) -> Path:
    """Writes the model's adapters where `StableDiffusion3Pipeline.load_lora_weights(path)` (MMDiT) or
    `FluxPipeline.load_lora_weights(path)` (Flux) reads them.

    `path` is a folder (created; the file is `pytorch_lora_weights.safetensors`) or a `.safetensors`
    file name. Weights are written in their stored dtype unless `dtype` is given (e.g. `jnp.bfloat16`).
    The scale alpha / rank travels in the file's adapter metadata; `fold_scale=True` multiplies B by
    it and writes alpha = rank, for readers that ignore the metadata. Returns the file written.
    """
    tensors, config = lora_state_dict(model, dtype=dtype, fold_scale=fold_scale)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()},
                                                       indent=2, sort_keys=True)}
    save_file({f"{PREFIX}.{k}": v for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# --- import -----------------------------------------------------------------------------------


def _find_file(path: Path, adapter_name: str | None) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; give a LoRA .safetensors file or the folder holding it")
    folders = [path / adapter_name, path] if adapter_name else [path]
    for folder in folders:
        for name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME):
            if (folder / name).is_file():
                return folder / name
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return path / found[0]
    pickles = sorted(p.name for p in path.glob("*.bin"))
    hint = (f" (found {found}: pass the file itself)" if found else
            f" (found {pickles}: only safetensors are read; re-save with safe_serialization=True)" if pickles else "")
    raise CheckpointError(f"no {WEIGHTS_NAME} or {PEFT_WEIGHTS_NAME} in {path}{hint}")


def _read_config(file: Path, raw_metadata: Mapping[str, str] | None) -> dict | None:
    """The PEFT LoraConfig fields of the transformer adapter: file metadata, else adapter_config.json."""
    if raw_metadata and raw_metadata.get(METADATA_KEY):
        try:
            meta = json.loads(raw_metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: the {METADATA_KEY} metadata is not valid JSON ({e})") from None
        prefixed = {k.removeprefix(f"{PREFIX}."): v for k, v in meta.items() if k.startswith(f"{PREFIX}.")}
        if prefixed:
            return prefixed
        if any(k in meta for k in ("r", "lora_alpha", "target_modules")):  # save_lora_adapter: no prefix
            return meta
        return None
    cfg_file = file.parent / PEFT_CONFIG_NAME
    if cfg_file.is_file():
        try:
            return json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from None
    return None


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"    {i}" for i in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {len(items)} {title}:\n{shown}{more}"


_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def read_lora(path, *, adapter_name: str | None = None) -> tuple[dict[str, dict[str, np.ndarray]], dict | None, Path]:
    """Reads a diffusers / PEFT transformer LoRA: ({module: {"A": [r,in], "B": [out,r]}}, config, file).

    Module names are diffusers' (`transformer_blocks.0.attn.to_q`), with the `transformer.` or PEFT's
    `base_model.model.` prefix removed. `config` is the adapter's PEFT LoraConfig fields, or None.
    """
    file = _find_file(Path(path), adapter_name)
    try:
        with safe_open(str(file), framework="numpy") as f:
            raw_metadata = f.metadata()
            keys = list(f.keys())
            arrays = {k: f.get_tensor(k) for k in keys}
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    config = _read_config(file, raw_metadata)

    text = sorted(k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES))
    if text:
        raise CheckpointError(
            f"{file} holds text-encoder LoRA weights, which flowjax does not support (it adapts only the "
            f"transformer); load it in diffusers, or drop those keys and keep the transformer.* ones:\n"
            + _listing("text-encoder keys", text)
        )
    if any(k.startswith("lora_unet_") or ".lora_down." in k or ".lora_up." in k for k in keys):
        raise CheckpointError(
            f"{file} is a kohya / ComfyUI style LoRA (lora_down / lora_up keys); only the diffusers / PEFT "
            "format (lora_A / lora_B) is read. diffusers' StableDiffusion3Pipeline does not read it either."
        )
    unsupported = sorted(k for k in keys if "lora_magnitude_vector" in k or ("lora_B" in k and k.endswith(".bias")))
    if unsupported:
        raise CheckpointError(f"{file} uses DoRA or LoRA biases, which flowjax's LoRA cannot represent:\n"
                              + _listing("keys", unsupported))

    modules: dict[str, dict[str, dict[str, np.ndarray]]] = collections.defaultdict(lambda: collections.defaultdict(dict))
    odd = []
    for k in keys:
        name = k
        for prefix in (f"{PEFT_PREFIX}.", f"{PREFIX}."):
            name = name.removeprefix(prefix)
        m = _KEY.match(name)
        if m is None:
            odd.append(k)
            continue
        modules[m["adapter"] or ""][m["module"]][m["which"]] = arrays[k]
    if odd:
        raise CheckpointError(f"{file} has keys that are not LoRA lora_A / lora_B weights:\n" + _listing("keys", sorted(odd)))
    if not modules:
        raise CheckpointError(f"{file} holds no tensors")
    names = sorted(modules)
    if adapter_name is not None and adapter_name in modules:
        chosen = modules[adapter_name]
    elif len(names) == 1:
        chosen = modules[names[0]]
    else:
        named = [n or "(unnamed)" for n in names]
        raise CheckpointError(f"{file} holds several adapters {named}; choose one with adapter_name")
    halves = sorted(f"{n} (lora_{'B' if 'A' in ab else 'A'} missing)" for n, ab in chosen.items() if len(ab) != 2)
    if halves:
        raise CheckpointError(f"{file} has incomplete adapters:\n" + _listing("modules", halves))
    return {n: dict(ab) for n, ab in chosen.items()}, config, file


def _pattern_value(patterns: Mapping[str, Any] | None, name: str, default):
    """PEFT's `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", name)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _scale_of(config: Mapping[str, Any] | None, name: str, rank: int) -> float:
    """PEFT's scale for one module: alpha / rank (alpha / sqrt(rank) with rsLoRA); alpha = rank without a config."""
    if config is None:
        return 1.0
    alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def load_lora(model: MMDiT | Flux, path, *, adapter_name: str | None = None, param_dtype=jnp.float32) -> list[str]:
    """Attaches the adapters of a diffusers / PEFT SD3 or FLUX LoRA to `model` and sets their weights; in place.

    `path`: a `.safetensors` file, or a folder with `pytorch_lora_weights.safetensors` (diffusers'
    `save_lora_weights`) or `adapter_model.safetensors` + `adapter_config.json` (PEFT). The scale is
    alpha / rank with alpha from the adapter metadata (`lora_alpha`, `alpha_pattern`), or alpha = rank
    without metadata, as diffusers does. Each projection gets the file's rank (ranks may differ between
    projections, not between the layers of one scanned stack); projections that already carry an
    adapter of that rank have their weights replaced. In a scanned stack, layers the file does not
    adapt keep what they have: for a new adapter, B = 0, an exact no-op that still trains. New
    adapters are stored in `param_dtype`. `adapter_name` picks a PEFT subfolder or, in a file holding
    several adapters (`...lora_A.<name>.weight`), that adapter. Everything is checked before the model
    is touched; returns the adapted module paths.
    """
    if not isinstance(model, tuple(f.model for f in FAMILIES.values())):
        raise TypeError(f"load_lora reads transformer LoRAs into an MMDiT (SD3) or a Flux (FLUX.1), got "
                        f"{type(model).__name__}")
    weights, config, file = read_lora(path, adapter_name=adapter_name)
    if config is not None and (config.get("use_dora") or config.get("lora_bias")):
        raise CheckpointError(f"{file}: DoRA / LoRA-bias adapters cannot be represented by flowjax's LoRA")
    names = lora_targets(model.config)
    where = {n: (ours, i if stacked else None) for ours, (theirs, stacked) in names.items() for i, n in enumerate(theirs)}
    modules = _dense_by_path(model)

    unknown = sorted(n for n in weights if n not in where)
    problems: list[str] = []
    plan: dict[str, dict[int | None, tuple[np.ndarray, np.ndarray, float]]] = collections.defaultdict(dict)
    for name in sorted(set(weights) - set(unknown)):
        ours, layer = where[name]
        dense, a, b = modules[ours], weights[name]["A"], weights[name]["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape != (a.shape[0], dense.in_features) or \
                b.shape != (dense.out_features, a.shape[0]):
            problems.append(f"{name}: lora_A {list(a.shape)}, lora_B {list(b.shape)}; this model needs "
                            f"[r, {dense.in_features}] and [{dense.out_features}, r]")
            continue
        rank = a.shape[0]
        plan[ours][layer] = (LINEAR.to_ours(a), LINEAR.to_ours(b), _scale_of(config, name, rank))
    layout: dict[str, dict[str, Any]] = {}
    for ours, layers in sorted(plan.items()):
        dense = modules[ours]
        ranks = {a.shape[1] for a, _, _ in layers.values()}
        scales = {round(s, 12) for _, _, s in layers.values()}
        if len(ranks) > 1 or len(scales) > 1:
            problems.append(f"{ours} (diffusers {', '.join(names[ours][0])}): its layers are one scanned stack and "
                            f"need one rank and scale, the file has ranks {sorted(ranks)}, scales {sorted(scales)}")
            continue
        rank, scale = ranks.pop(), scales.pop()
        if dense.lora_merged:
            problems.append(f"{ours}: its adapter is merged into the kernel; call flowjax.models.lora.unmerge first")
        elif dense.lora_a is not None and dense.lora_a.shape[-1] != rank:
            problems.append(f"{ours}: already has a rank-{dense.lora_a.shape[-1]} adapter, the file's is rank {rank}")
        layout[ours] = {"rank": rank, "scale": scale, "dtype": jnp.dtype(param_dtype).name}
    if unknown or problems:
        parts = [f"the LoRA {file} does not fit this {family_of_config(model.config).class_name}:"]
        if unknown:
            parts.append(_listing("modules the model does not have (or cannot adapt)", unknown))
        if problems:
            parts.append(_listing("problems", problems))
        parts.append("  check that the LoRA was trained for this model (SD3 vs SD3.5 vs FLUX.1, Medium vs Large).")
        raise WeightsMismatchError("\n".join(parts))

    attach(model, {p: s for p, s in layout.items() if modules[p].lora_a is None})
    for ours, layers in plan.items():
        dense = modules[ours]
        a_full, b_full = np.array(dense.lora_a[...]), np.array(dense.lora_b[...])
        for layer, (a, b, _) in layers.items():
            if layer is None:
                a_full, b_full = a, b
            else:
                a_full[layer], b_full[layer] = a, b
        dense.lora_a[...] = jnp.asarray(a_full, dtype=dense.lora_a.dtype)
        dense.lora_b[...] = jnp.asarray(b_full, dtype=dense.lora_b.dtype)
        dense.lora_scale = layout[ours]["scale"]
    return sorted(plan)
