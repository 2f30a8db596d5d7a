"""CLIP text / vision towers: transformers folders <-> flowjax `CLIPTextModel` / `CLIPVisionModel`.

A folder is what `CLIPTextModelWithProjection.save_pretrained` (or `CLIPTextModel`, and the vision
twins) writes: `config.json` + `model.safetensors` (or shards with `model.safetensors.index.json`),
e.g. the `text_encoder` / `text_encoder_2` folders of an SD3 pipeline. Keys are read with or without
the `text_model.` / `vision_model.` prefix (transformers 5 writes a bare `CLIPTextModel` without it);
exports always carry it, which every transformers version loads.

Two more sources, import only (the rewards read them):
- a full transformers `CLIPModel` folder (`load_clip_model`): both towers, their projections and
  `logit_scale` from one config.json (text_config / vision_config) + model.safetensors, by the same
  tables with their `text_model.` / `vision_model.` prefixes (PickScore, CLIP-L/14, CLIP-H/14);
- an open_clip `CLIP` state dict (`load_open_clip`), e.g. HPSv2's `.pt` read by `torch_pickle`
  without torch: `transformer.resblocks.{i}` / `visual.transformer.resblocks.{i}` blocks whose fused
  `attn.in_proj_weight` is split into q / k / v, `text_projection` / `visual.proj` as [D, P] kernels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax import sharding as sharding_lib
from flowjax.convert import mapping, model_io
from flowjax.convert.mapping import CONV2D, IDENTITY, LINEAR, Transform, WeightsMismatchError, dense
from flowjax.convert.safetensors_io import CheckpointError, SafetensorsReader
from flowjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

WEIGHTS_NAME = "model"
TEXT_PREFIX, VISION_PREFIX = "text_model.", "vision_model."
TEXT_PROJECTION, VISUAL_PROJECTION = "text_projection.weight", "visual_projection.weight"


def _layer_norm(ours: str, theirs: str):
    return [(f"{ours}.scale", f"{theirs}.weight", IDENTITY), (f"{ours}.bias", f"{theirs}.bias", IDENTITY)]


def _encoder_stack(cfg, prefix: str):
    b = f"{prefix}encoder.layers.{{i}}"
    entries = [*_layer_norm("layer_norm1", f"{b}.layer_norm1"), *_layer_norm("layer_norm2", f"{b}.layer_norm2")]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        entries += dense(f"self_attn.{proj}", f"{b}.self_attn.{proj}")
    entries += dense("mlp.fc1", f"{b}.mlp.fc1") + dense("mlp.fc2", f"{b}.mlp.fc2")
    return ("encoder.blocks", range(cfg.num_hidden_layers), entries)


def clip_text_table(cfg: CLIPTextConfig, with_projection: bool = True, prefix: str = TEXT_PREFIX):
    """flowjax <-> transformers keys of a CLIPTextModel(WithProjection)."""
    top = [
        ("token_embedding", f"{prefix}embeddings.token_embedding.weight", IDENTITY),
        ("position_embedding", f"{prefix}embeddings.position_embedding.weight", IDENTITY),
        *_layer_norm("final_layer_norm", f"{prefix}final_layer_norm"),
    ]
    if with_projection:
        top.append(("text_projection.kernel", TEXT_PROJECTION, LINEAR))
    return mapping.build_table(top, [_encoder_stack(cfg, prefix)])


def clip_vision_table(cfg: CLIPVisionConfig, with_projection: bool = True, prefix: str = VISION_PREFIX):
    """flowjax <-> transformers keys of a CLIPVisionModel(WithProjection)."""
    e = f"{prefix}embeddings"
    top = [
        ("patch_embedding", f"{e}.patch_embedding.weight", CONV2D),
        ("class_embedding", f"{e}.class_embedding", IDENTITY),
        ("position_embedding", f"{e}.position_embedding.weight", IDENTITY),
        *_layer_norm("pre_layrnorm", f"{prefix}pre_layrnorm"),
        *_layer_norm("post_layernorm", f"{prefix}post_layernorm"),
    ]
    if with_projection:
        top.append(("visual_projection.kernel", VISUAL_PROJECTION, LINEAR))
    return mapping.build_table(top, [_encoder_stack(cfg, prefix)])


def _read_config(path, cls, model_type: str, what: str, subfolders: tuple[str, ...]):
    def wrong_kind(raw):
        found = raw.get("model_type") or raw.get("_class_name")
        if found is None or found == model_type:
            return None
        hint = (" (a full CLIPModel: save its text / vision tower with CLIP*ModelWithProjection first)"
                if found == "clip" else "")
        return f"describes a {found!r} model, not a {model_type!r} ({what}){hint}"

    return model_io.read_model_config(path, cls.from_transformers, folder=f"the transformers {what} folder (with "
                                      "config.json)", subfolders=subfolders, wrong_kind=wrong_kind)


def read_text_config(path: str | os.PathLike) -> CLIPTextConfig:
    return _read_config(path, CLIPTextConfig, "clip_text_model", "CLIP text encoder",
                        ("text_encoder", "text_encoder_2"))


def read_vision_config(path: str | os.PathLike) -> CLIPVisionConfig:
    return _read_config(path, CLIPVisionConfig, "clip_vision_model", "CLIP vision encoder", ("image_encoder",))


def _layout(reader: SafetensorsReader, prefix: str, projection_key: str, with_projection: bool | None):
    """(key prefix, with_projection) of a checkpoint, and the keys to skip."""
    keys = reader.keys()
    prefix = prefix if any(k.startswith(prefix) for k in keys) else ""
    has_projection = projection_key in reader
    if with_projection is None:
        with_projection = has_projection
    ignore = {f"{prefix}embeddings.position_ids"}  # a buffer some (older) checkpoints carry
    if has_projection and not with_projection:
        ignore.add(projection_key)  # asked to drop it
    return prefix, with_projection, ignore


def _load(model_cls, cfg, table_fn, path, reader, prefix, with_projection, ignore, *, what, dtype, param_dtype,
          mesh, rules, attention_impl, remat, progress):
    # The constructor refuses e.g. a projection in the file with projection_dim None in config.json.
    return model_io.load_model(
        lambda act: model_cls(cfg, with_projection=with_projection, rngs=nnx.Rngs(0), dtype=dtype,
                              param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
                              activation_sharding=act),
        table_fn(cfg, with_projection, prefix), reader, what=what, path=path, mesh=mesh, rules=rules,
        progress=progress, ignore=ignore)


class _Tower(NamedTuple):
    model: type
    read_config: Callable
    table: Callable
    prefix: str
    projection_key: str
    name: str  # transformers class, without "WithProjection"


_TOWERS = {
    "text": _Tower(CLIPTextModel, read_text_config, clip_text_table, TEXT_PREFIX, TEXT_PROJECTION, "CLIPTextModel"),
    "vision": _Tower(CLIPVisionModel, read_vision_config, clip_vision_table, VISION_PREFIX, VISUAL_PROJECTION,
                     "CLIPVisionModel"),
}


def _load_tower(kind: str, path, *, with_projection: bool | None, **kw):
    tower = _TOWERS[kind]
    cfg = tower.read_config(path)
    reader = SafetensorsReader(path, WEIGHTS_NAME)
    prefix, with_projection, ignore = _layout(reader, tower.prefix, tower.projection_key, with_projection)
    what = tower.name + ("WithProjection" if with_projection else "")
    return _load(tower.model, cfg, tower.table, path, reader, prefix, with_projection, ignore, what=what, **kw)


def load_clip_text(
    path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
    with_projection: bool | None = None,
    attention_impl: str = "xla",
    remat: str = "none",
    progress: bool = False,
) -> CLIPTextModel:
    """A `CLIPTextModel` with the weights of a transformers CLIP text folder.

    `with_projection=None` follows the checkpoint (`text_projection.weight` present or not); True
    demands it, False drops it. `dtype`, `param_dtype`, `mesh` and `rules` as in `load_transformer`.
    """
    return _load_tower("text", path, with_projection=with_projection, dtype=dtype, param_dtype=param_dtype,
                       mesh=mesh, rules=rules, attention_impl=attention_impl, remat=remat, progress=progress)


def load_clip_vision(
    path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
    with_projection: bool | None = None,
    attention_impl: str = "xla",
    remat: str = "none",
    progress: bool = False,
) -> CLIPVisionModel:
    """A `CLIPVisionModel` with the weights of a transformers CLIP vision folder (see `load_clip_text`)."""
    return _load_tower("vision", path, with_projection=with_projection, dtype=dtype, param_dtype=param_dtype,
                       mesh=mesh, rules=rules, attention_impl=attention_impl, remat=remat, progress=progress)


def _save(model, table, config: dict, path, dtype, max_shard_bytes) -> Path:
    return model_io.save_model(model, table, config, path, weights_name=WEIGHTS_NAME, dtype=dtype,
                               max_shard_bytes=max_shard_bytes)


def save_clip_text(model: CLIPTextModel, path, dtype=None, *, max_shard_bytes: int | None = None) -> Path:
    """Writes config.json + model.safetensors that `transformers.CLIPTextModelWithProjection` (or, for a
    model without projection, `CLIPTextModel`) `.from_pretrained(path)` loads; LoRA merged, weights in
    their stored dtype unless `dtype` is given."""
    config = model.config.to_transformers()
    if not model.with_projection:
        config["architectures"] = ["CLIPTextModel"]
    table = clip_text_table(model.config, model.with_projection)
    return _save(model, table, config, path, dtype, max_shard_bytes)


def save_clip_vision(model: CLIPVisionModel, path, dtype=None, *, max_shard_bytes: int | None = None) -> Path:
    """Writes a folder that `transformers.CLIPVisionModelWithProjection` (or `CLIPVisionModel`) loads."""
    config = model.config.to_transformers()
    if not model.with_projection:
        config["architectures"] = ["CLIPVisionModel"]
    table = clip_vision_table(model.config, model.with_projection)
    return _save(model, table, config, path, dtype, max_shard_bytes)


# --- full transformers CLIPModel folders (PickScore, CLIP-L/14, CLIP-H/14) -------------------------

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that leave them out.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32)
LOGIT_SCALE = "logit_scale"


class CLIPParts(NamedTuple):
    """The towers of a CLIP checkpoint; a tower not asked for is None."""

    text: CLIPTextModel | None
    vision: CLIPVisionModel | None
    logit_scale: float | None  # the learnt log temperature: logits = exp(logit_scale) * cosine


class ArraySource:
    """A `mapping.TensorSource` over a dict of arrays (a state dict read from a torch checkpoint)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays

    def keys(self) -> list[str]:
        return list(self._arrays)

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._arrays[key].shape)

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self._arrays[key])


class _Subset:
    """The keys of one tower in a file that holds several: each tower is checked against its own keys."""

    def __init__(self, source, keys):
        self._source, self._keys = source, [k for k in source.keys() if k in set(keys)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._source[key]


def read_clip_model_config(path: str | os.PathLike) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """Text and vision configs of a full transformers `CLIPModel` folder (model_type "clip").

    The top-level `projection_dim` (what CLIPModel's projections use) overrides the sub-configs' own.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; give the transformers CLIPModel folder (with config.json)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {path} (a transformers CLIPModel folder has config.json + "
                              "model.safetensors)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("model_type", "clip") != "clip":
        found = raw.get("model_type") if isinstance(raw, dict) else None
        hint = {"clip_text_model": " (a text tower alone: use load_clip_text)",
                "clip_vision_model": " (a vision tower alone: use load_clip_vision)"}.get(found, "")
        raise CheckpointError(f"{cfg_file} describes a {found!r} model, not a full 'clip' CLIPModel{hint}")
    projection_dim = raw.get("projection_dim", 512)
    try:
        text = {**_TEXT_DEFAULTS, **(raw.get("text_config") or {}), "projection_dim": projection_dim}
        vision = {**_VISION_DEFAULTS, **(raw.get("vision_config") or {}), "projection_dim": projection_dim}
        text.setdefault("model_type", "clip_text_model")
        vision.setdefault("model_type", "clip_vision_model")
        return CLIPTextConfig.from_transformers(text), CLIPVisionConfig.from_transformers(vision)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def _folder_source(path: Path):
    """model.safetensors (or shards) of a folder; failing that its pytorch_model.bin (read without torch)."""
    try:
        return SafetensorsReader(path, WEIGHTS_NAME)
    except CheckpointError:
        from flowjax.convert import torch_pickle

        bins = [path / "pytorch_model.bin"]
        index = path / "pytorch_model.bin.index.json"
        if index.is_file():
            bins = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if not all(b.is_file() for b in bins):
            raise
        arrays = {}
        for b in bins:
            arrays.update(torch_pickle.load_state_dict(b, strip_prefix=""))
        return ArraySource(arrays)


def _scalar(value) -> float:
    value = np.asarray(value, dtype=np.float32)
    if value.size != 1:
        raise CheckpointError(f"logit_scale must hold one value, got shape {value.shape}")
    return float(value.reshape(-1)[0])


def _check_leftovers(source, used: set[str], ignore: set[str], what: str):
    left = sorted(set(source.keys()) - used - ignore)
    if left:
        listing = "\n".join(f"    {k}" for k in left[:50]) + ("\n    ..." if len(left) > 50 else "")
        raise WeightsMismatchError(f"the weights do not match the {what}:\n  {len(left)} unexpected keys:\n{listing}")


def load_clip_model(
    path,
    *,
    towers: tuple[str, ...] = ("text", "vision"),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
    attention_impl: str = "xla",
    remat: str = "none",
    progress: bool = False,
) -> CLIPParts:
    """The towers (with their projections) and `logit_scale` of a transformers `CLIPModel` folder.

    `path`: config.json (model_type "clip", with text_config / vision_config) + model.safetensors (or
    shards; or pytorch_model.bin, read without torch) with `text_model.*`, `vision_model.*`,
    `text_projection.weight`, `visual_projection.weight` and `logit_scale`, as `CLIPModel.save_pretrained`
    writes (PickScore_v1, openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-...). `towers` picks which to build; keys of the towers left out are skipped,
    any key of neither tower is reported.
    """
    unknown = set(towers) - {"text", "vision"}
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of ('text', 'vision'), got {towers!r}")
    text_cfg, vision_cfg = read_clip_model_config(path)
    reader = _folder_source(Path(path))
    keys = reader.keys()
    text_keys = {k for k in keys if k.startswith(TEXT_PREFIX)} | ({TEXT_PROJECTION} & set(keys))
    vision_keys = {k for k in keys if k.startswith(VISION_PREFIX)} | ({VISUAL_PROJECTION} & set(keys))
    buffers = {f"{TEXT_PREFIX}embeddings.position_ids", f"{VISION_PREFIX}embeddings.position_ids"}
    _check_leftovers(reader, text_keys | vision_keys, buffers | {LOGIT_SCALE},
                     "CLIPModel (text + vision + logit_scale)")
    kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, attention_impl=attention_impl,
              remat=remat, progress=progress)
    text = vision = None
    if "text" in towers:
        text = _load(CLIPTextModel, text_cfg, clip_text_table, path, _Subset(reader, text_keys), TEXT_PREFIX, True,
                     buffers, what="CLIPModel text tower", **kw)
    if "vision" in towers:
        vision = _load(CLIPVisionModel, vision_cfg, clip_vision_table, path, _Subset(reader, vision_keys),
                       VISION_PREFIX, True, buffers, what="CLIPModel vision tower", **kw)
    if LOGIT_SCALE not in reader:
        raise WeightsMismatchError(f"the weights do not match the CLIPModel: 1 missing keys:\n    {LOGIT_SCALE}")
    return CLIPParts(text, vision, _scalar(reader[LOGIT_SCALE]))


# --- open_clip checkpoints (HPSv2: open_clip ViT-H-14) --- import only -----------------------------

# open_clip's model config of ViT-H-14 (open_clip/model_configs/ViT-H-14.json), the HPSv2 backbone.
OPEN_CLIP_VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
# Options of open_clip's CLIPVisionCfg / CLIPTextCfg that change the maths and are not implemented here,
# with the value that is (None: must be absent or falsy).
_OPEN_CLIP_UNSUPPORTED_VISION = {
    "ls_init_value": None, "attentional_pool": None, "no_ln_pre": None, "pos_embed_type": "learnable",
    "pool_type": "tok", "timm_model_name": None, "block_type": None, "qk_norm": None, "scaled_cosine_attn": None,
    "scale_heads": None, "scale_attn_inner": None, "scale_attn": None, "scale_fc": None, "act_kwargs": None,
}
_OPEN_CLIP_UNSUPPORTED_TEXT = {
    "hf_model_name": None, "embed_cls": None, "no_causal_mask": None, "pool_type": "argmax", "proj_bias": None,
    "proj_type": "linear", "ls_init_value": None, "block_type": None, "qk_norm": None, "scaled_cosine_attn": None,
    "scale_heads": None, "scale_attn_inner": None, "scale_attn": None, "scale_fc": None, "act_kwargs": None,
}


def _unsupported(cfg: dict, table: dict, where: str) -> list[str]:
    out = []
    for name, allowed in table.items():
        value = cfg.get(name)
        if value in (None, False, 0, 0.0, {}, "") or value == allowed:
            continue
        out.append(f"{where}.{name}={value!r}")
    return out


def open_clip_configs(model_cfg: dict, *, quick_gelu: bool | None = None) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """Our configs from an open_clip model config dict (the format of open_clip/model_configs/*.json).

    Heads are not in the weights, so the config is needed: `OPEN_CLIP_VIT_H_14` for HPSv2.
    `quick_gelu` overrides the config's own flag (open_clip's `-quickgelu` models and OpenAI weights).
    Text pooling is open_clip's 'argmax' (the highest id, the end-of-text token), our legacy rule.
    """
    vision, text = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    problems = _unsupported(vision, _OPEN_CLIP_UNSUPPORTED_VISION, "vision_cfg")
    problems += _unsupported(text, _OPEN_CLIP_UNSUPPORTED_TEXT, "text_cfg")
    if model_cfg.get("custom_text") and text.get("hf_model_name"):
        problems.append("custom_text with a Hugging Face text tower")
    if problems:
        raise ValueError("open_clip options not supported by flowjax's CLIP towers: " + ", ".join(problems))
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ValueError(f"non-square open_clip image_size {image_size} is not supported")
        image_size = image_size[0]
    act = "quick_gelu" if (model_cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu) else "gelu"
    eps = lambda c: float((c.get("norm_kwargs") or {}).get("eps", 1e-5))
    embed_dim = model_cfg["embed_dim"]
    v_width = vision.get("width", 768)
    vision_cfg = CLIPVisionConfig(
        hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision.get("layers", 12), num_attention_heads=v_width // vision.get("head_width", 64),
        image_size=image_size, patch_size=vision.get("patch_size", 16), projection_dim=embed_dim, hidden_act=act,
        layer_norm_eps=eps(vision))
    t_width = text.get("width", 512)
    text_cfg = CLIPTextConfig(
        vocab_size=text.get("vocab_size", 49408), hidden_size=t_width,
        intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)), num_hidden_layers=text.get("layers", 12),
        num_attention_heads=text.get("heads", 8), max_position_embeddings=text.get("context_length", 77),
        projection_dim=embed_dim, hidden_act=act, layer_norm_eps=eps(text), eos_token_id=2)
    return text_cfg, vision_cfg


def _import_only(name):
    def refuse(_):
        raise NotImplementedError(f"open_clip tables are import only ({name} has no export)")
    return refuse


def _in_proj(i: int) -> Transform:
    """Part i (q, k, v) of nn.MultiheadAttention's fused in_proj_weight [3D, D] / in_proj_bias [3D]."""

    def to_ours(a):
        n = a.shape[0] // 3
        part = a[i * n:(i + 1) * n] if a.shape[0] % 3 == 0 else a  # a wrong shape is reported by the check
        return part.T if part.ndim == 2 else part

    return Transform(f"in_proj[{'qkv'[i]}]", to_ours, _import_only(f"in_proj[{'qkv'[i]}]"))


IN_PROJ = tuple(_in_proj(i) for i in range(3))
OPEN_CLIP_PROJECTION = Transform("x @ proj", lambda a: a, _import_only("x @ proj"))  # [D, P] is our kernel


def _open_clip_stack(cfg, block: str):
    b = f"{block}.{{i}}"
    entries = [*_layer_norm("layer_norm1", f"{b}.ln_1"), *_layer_norm("layer_norm2", f"{b}.ln_2")]
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        entries += [(f"self_attn.{proj}.kernel", f"{b}.attn.in_proj_weight", IN_PROJ[i]),
                    (f"self_attn.{proj}.bias", f"{b}.attn.in_proj_bias", IN_PROJ[i])]
    entries += dense("self_attn.out_proj", f"{b}.attn.out_proj") + dense("mlp.fc1", f"{b}.mlp.c_fc")
    entries += dense("mlp.fc2", f"{b}.mlp.c_proj")
    return ("encoder.blocks", range(cfg.num_hidden_layers), entries)


def open_clip_text_table(cfg: CLIPTextConfig, with_projection: bool = True, prefix: str = ""):
    """flowjax <- open_clip keys of the text tower (CLIP: no prefix; CustomTextCLIP: 'text.'). Import only."""
    top = [
        ("token_embedding", f"{prefix}token_embedding.weight", IDENTITY),
        ("position_embedding", f"{prefix}positional_embedding", IDENTITY),
        *_layer_norm("final_layer_norm", f"{prefix}ln_final"),
    ]
    if with_projection:
        top.append(("text_projection.kernel", f"{prefix}text_projection", OPEN_CLIP_PROJECTION))
    return mapping.build_table(top, [_open_clip_stack(cfg, f"{prefix}transformer.resblocks")])


def open_clip_vision_table(cfg: CLIPVisionConfig, with_projection: bool = True, prefix: str = "visual."):
    """flowjax <- open_clip keys of the ViT image tower. Import only."""
    top = [
        ("patch_embedding", f"{prefix}conv1.weight", CONV2D),
        ("class_embedding", f"{prefix}class_embedding", IDENTITY),
        ("position_embedding", f"{prefix}positional_embedding", IDENTITY),
        *_layer_norm("pre_layrnorm", f"{prefix}ln_pre"),
        *_layer_norm("post_layernorm", f"{prefix}ln_post"),
    ]
    if with_projection:
        top.append(("visual_projection.kernel", f"{prefix}proj", OPEN_CLIP_PROJECTION))
    return mapping.build_table(top, [_open_clip_stack(cfg, f"{prefix}transformer.resblocks")])


def read_state_dict(path, *, key: str | None = None) -> ArraySource:
    """A torch checkpoint (.pt / .pth / .bin, read without torch) or a .safetensors file as a tensor source."""
    from flowjax.convert import torch_pickle

    path = Path(path)
    if path.suffix == ".safetensors":
        return SafetensorsReader(path.parent, path.name[: -len(".safetensors")])
    return ArraySource(torch_pickle.load_state_dict(path, key=key))


def load_open_clip(
    source,
    model_cfg: dict = OPEN_CLIP_VIT_H_14,
    *,
    quick_gelu: bool | None = None,
    key: str | None = None,
    towers: tuple[str, ...] = ("text", "vision"),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
    attention_impl: str = "xla",
    remat: str = "none",
    progress: bool = False,
) -> CLIPParts:
    """Text + vision towers and logit_scale of an open_clip `CLIP` state dict (import only).

    `source`: a checkpoint path (.pt / .pth / .bin through `torch_pickle`, e.g. HPSv2's
    `HPS_v2.1_compressed.pt` whose state dict sits under "state_dict"; or .safetensors), or a dict
    of arrays. `model_cfg`: the open_clip model config (default ViT-H-14). The fused
    `attn.in_proj_weight` is split into q / k / v; `text_projection` and `visual.proj` ([D, P], used
    as x @ P) are our kernels as they are.
    """
    unknown = set(towers) - {"text", "vision"}
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of ('text', 'vision'), got {towers!r}")
    text_cfg, vision_cfg = open_clip_configs(model_cfg, quick_gelu=quick_gelu)
    reader = ArraySource(dict(source)) if isinstance(source, dict) else read_state_dict(source, key=key)
    where = Path(source) if not isinstance(source, dict) else Path("<state dict>")
    keys = reader.keys()
    text_prefix = "text." if any(k.startswith("text.transformer.") for k in keys) else ""
    vision_keys = {k for k in keys if k.startswith("visual.")}
    text_keys = {k for k in keys if (k.startswith(text_prefix) if text_prefix else True)} - vision_keys
    text_keys -= {LOGIT_SCALE, "attn_mask", "logit_bias"}
    _check_leftovers(reader, text_keys | vision_keys, {LOGIT_SCALE, "attn_mask"}, "open_clip CLIP")
    kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, attention_impl=attention_impl,
              remat=remat, progress=progress)
    text = vision = None
    if "text" in towers:
        text = _load(CLIPTextModel, text_cfg, open_clip_text_table, where, _Subset(reader, text_keys), text_prefix,
                     True, (), what="open_clip text tower", **kw)
    if "vision" in towers:
        vision = _load(CLIPVisionModel, vision_cfg, open_clip_vision_table, where, _Subset(reader, vision_keys),
                       "visual.", True, (), what="open_clip vision tower", **kw)
    logit_scale = _scalar(reader[LOGIT_SCALE]) if LOGIT_SCALE in reader else None
    return CLIPParts(text, vision, logit_scale)
