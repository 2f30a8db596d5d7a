"""PP-OCRv4 ONNX files (PaddleOCR inference models exported by paddle2onnx) -> flowjax `TextDetector` /
`TextRecognizer`, read with the `onnx` package (no runtime).

The files `rapidocr-onnxruntime` ships (`models/ch_PP-OCRv4_det_infer.onnx`, `ch_PP-OCRv4_rec_infer.onnx`)
hold their weights as graph constants named after the Paddle parameters (`conv2d_394.w_0`,
`batch_norm2d_0.w_1`, `linear_85.b_0`, ...): numbered, not hierarchical. The key table is therefore built
from the graph: each weight constant gets its role from the node that consumes it (Conv input 1 = kernel,
input 2 = bias; BatchNormalization inputs 1-4 = scale, bias, mean, variance; MatMul = kernel; the Add
after a MatMul / ConvTranspose = bias; a scalar Mul / Add = a learnable affine's scale / bias; a vector
Mul / Add after a normalisation = LayerNorm scale / bias), constants sharing a Paddle layer name form one
layer, and the layers, in the order the graph first uses them, are matched one to one with our modules
listed in execution order (`detector_layers` / `recognizer_layers`). The match checks each layer's kind and
`flowjax.convert.mapping.check` every shape, and lists every missing, unexpected or misshaped tensor.
Constants that are no weights (the exporter's `p2o.*` helpers and `fill_constant_*`: hardswish's 3 / 6,
clip bounds, resize scales, reshape shapes, the attention scale, LayerNorm epsilons) are structure the
modules implement; they are counted and must be small, anything else unaccounted for is an error.

PaddleOCR inference folders (`inference.pdmodel` + `inference.pdiparams`) are protobuf programs that need
Paddle's `framework.proto` to read; they are not supported here: convert them with paddle2onnx, or use
rapidocr's ONNX files.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
from flax import nnx

from flowjax.convert import mapping
from flowjax.convert.mapping import CONV2D, IDENTITY, KeyMap, Transform
from flowjax.convert.safetensors_io import CheckpointError
from flowjax.models import ppocr

__all__ = ["OnnxConstants", "load_detector", "load_recognizer", "read_characters", "find_models",
           "detector_layers", "recognizer_layers"]

DET_FILE, REC_FILE = "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"
CONV_TRANSPOSE = Transform("conv_transpose", lambda a: a.transpose(0, 2, 3, 1), lambda a: a.transpose(0, 3, 1, 2))
FLAT = Transform("flat", lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1, 1))
_STRUCTURAL = re.compile(r"^(p2o\.|fill_constant_)")
_MAX_STRUCTURAL_SIZE = 16
# role of a weight constant from its consumer: (op, input index) -> our leaf name
_ROLES = {("Conv", 1): "kernel", ("Conv", 2): "bias", ("ConvTranspose", 1): "kernel",
          ("BatchNormalization", 1): "scale", ("BatchNormalization", 2): "bias",
          ("BatchNormalization", 3): "mean", ("BatchNormalization", 4): "var", ("MatMul", 1): "kernel"}
_KIND_OF_OP = {"Conv": "conv", "ConvTranspose": "conv_transpose", "BatchNormalization": "bn", "MatMul": "dense"}
_KIND_OF_MODULE = {ppocr.Conv: "conv", ppocr.ConvTranspose2x2: "conv_transpose", ppocr.BatchNorm: "bn",
                   ppocr.Dense: "dense", ppocr.Affine: "affine", ppocr.LayerNorm: "layer_norm"}
_TRANSFORMS = {("conv", "kernel"): CONV2D, ("conv_transpose", "kernel"): CONV_TRANSPOSE,
               ("conv_transpose", "bias"): FLAT}


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("reading PP-OCR ONNX files needs the `onnx` package: pip install onnx "
                          "(or pip install 'flowjax[ocr]')") from e
    return onnx


class OnnxConstants:
    """The constants of an ONNX graph (Constant nodes and initializers) as a `mapping.TensorSource` of its weights.

    `layers`: [(layer name, kind, {role: constant name})] in the order the graph first uses them;
    `structural`: the names of the non-weight constants (see the module docstring); `metadata`: the
    model's metadata_props (the recogniser keeps its character list under "character").
    """

    def __init__(self, path: str | Path):
        onnx = _onnx()
        from onnx import numpy_helper

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        model = onnx.load(str(path))
        graph = model.graph
        self.path = path
        self.metadata = {p.key: p.value for p in model.metadata_props}
        self._arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                attr = {a.name: a for a in node.attribute}
                if "value" not in attr:
                    raise CheckpointError(f"{path.name}: Constant node {node.output[0]!r} has no tensor value")
                self._arrays[node.output[0]] = numpy_helper.to_array(attr["value"].t)
        self.layers, self.structural = self._find_layers([n for n in graph.node if n.op_type != "Constant"])

    def _find_layers(self, nodes):
        produced_by = {out: n for n in nodes for out in n.output}
        roles: dict[str, str] = {}
        kinds: dict[str, str] = {}
        order: list[str] = []
        problems = []
        for node in nodes:
            for i, name in enumerate(node.input):
                if name not in self._arrays or _STRUCTURAL.match(name):
                    continue
                layer = name.rsplit(".", 1)[0]
                if (node.op_type, i) in _ROLES:
                    role, kind = _ROLES[(node.op_type, i)], _KIND_OF_OP[node.op_type]
                elif node.op_type in ("Mul", "Add"):
                    role = "scale" if node.op_type == "Mul" else "bias"
                    other = node.input[1 - i]
                    source = produced_by.get(other)
                    if source is not None and source.op_type in ("ConvTranspose", "MatMul"):
                        kind = _KIND_OF_OP[source.op_type]  # the bias of that layer
                    else:
                        kind = "affine" if self._arrays[name].size == 1 else "layer_norm"
                else:
                    problems.append(f"{name} (input {i} of a {node.op_type} node)")
                    continue
                if name in roles and roles[name] != role:
                    problems.append(f"{name} used as {roles[name]} and as {role}")
                roles[name] = role
                if layer not in kinds:
                    order.append(layer)
                    kinds[layer] = kind
                elif kinds[layer] != kind:
                    problems.append(f"{name}: layer {layer} is a {kinds[layer]} but this tensor serves a {kind}")
        structural = sorted(n for n in self._arrays if n not in roles)
        odd = [f"{n} {self._arrays[n].shape}" for n in structural
               if not _STRUCTURAL.match(n) or self._arrays[n].size > _MAX_STRUCTURAL_SIZE]
        if odd:
            problems.append(f"constants that serve no known layer and are no small exporter constant: {odd}")
        if problems:
            raise CheckpointError(f"{self.path.name}: unrecognised graph constants:\n  " + "\n  ".join(problems))
        layers = []
        for layer in order:
            members = {roles[n]: n for n in roles if n.rsplit(".", 1)[0] == layer}
            layers.append((layer, kinds[layer], members))
        return layers, structural

    # mapping.TensorSource
    def keys(self) -> list[str]:
        return [n for _, _, members in self.layers for n in members.values()]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._arrays[key].shape)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]


# ----------------------------------------------------------------------------- our layers in execution order


def _backbone_layers(bb: ppocr.PPLCNetV3, prefix: str = "backbone") -> list[str]:
    out = [f"{prefix}.conv1.conv", f"{prefix}.conv1.bn"]
    for s, stage in enumerate(bb.stages):
        for b, block in enumerate(stage):
            p = f"{prefix}.stages.{s}.{b}"
            for rep, name in ((block.dw_conv, "dw_conv"), (block.pw_conv, "pw_conv")):
                out += [f"{p}.{name}.conv", f"{p}.{name}.lab"] + ([f"{p}.{name}.act_lab"] if rep.act_lab else [])
                if name == "dw_conv" and block.se is not None:
                    out += [f"{p}.se.conv1", f"{p}.se.conv2"]
    if bb.det:
        out += [f"{prefix}.layer_list.{i}" for i in range(len(bb.layer_list))]
    return out


def _rse(p: str) -> list[str]:
    return [f"{p}.in_conv", f"{p}.se.conv1", f"{p}.se.conv2"]


def detector_layers(model: ppocr.TextDetector) -> list[str]:
    """Our detector's parameterised layers in the order the PaddleOCR graph runs them."""
    out = _backbone_layers(model.backbone)
    for i in (3, 2, 1, 0):  # RSEFPN.forward: in5, in4, in3, in2, then p5 ... p2
        out += _rse(f"neck.ins_conv.{i}")
    for i in (3, 2, 1, 0):
        out += _rse(f"neck.inp_conv.{i}")
    return out + ["head.conv1", "head.bn1", "head.conv2", "head.bn2", "head.conv3"]


def recognizer_layers(model: ppocr.TextRecognizer) -> list[str]:
    """Our recogniser's parameterised layers in the order the PaddleOCR graph runs them."""
    out = _backbone_layers(model.backbone)
    out += ["neck.conv1.conv", "neck.conv1.bn", "neck.conv2.conv", "neck.conv2.bn"]
    for i in range(len(model.neck.svtr_block)):
        p = f"neck.svtr_block.{i}"
        out += [f"{p}.norm1", f"{p}.attn.qkv", f"{p}.attn.proj", f"{p}.norm2", f"{p}.fc1", f"{p}.fc2"]
    out += ["neck.norm"] + [f"neck.{c}.{part}" for c in ("conv3", "conv4", "conv1x1") for part in ("conv", "bn")]
    return out + ["head"]


def _submodule(model, path: str):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def build_table(model, ours: list[str], source: OnnxConstants, what: str) -> list[KeyMap]:
    """KeyMaps pairing our layers (execution order) with the file's layers (first-use order)."""
    problems = []
    if len(ours) != len(source.layers):
        problems.append(f"the file has {len(source.layers)} weighted layers, the {what} has {len(ours)}")
    table = []
    for i, (path, (layer, kind, members)) in enumerate(zip(ours, source.layers)):
        module = _submodule(model, path)
        our_kind = _KIND_OF_MODULE[type(module)]
        if our_kind != kind:
            problems.append(f"layer {i}: the file's {layer} is a {kind}, our {path} a {our_kind}")
            continue
        leaves = [".".join(map(str, name)) for name, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]
        for leaf in leaves:
            key = members.get(leaf, f"{layer}.<{leaf}: absent>")
            table.append(KeyMap(f"{path}.{leaf}", (key,), _TRANSFORMS.get((kind, leaf), IDENTITY)))
        extra = sorted(set(members) - set(leaves))
        if extra:
            problems.append(f"{layer}: tensors {[members[r] for r in extra]} have no place in our {path}")
    for layer, kind, _ in source.layers[len(ours):]:
        problems.append(f"unexpected layer {layer} ({kind}) past the end of the {what}")
    for path in ours[len(source.layers):]:
        problems.append(f"our {path} has no layer in the file")
    if problems:
        raise mapping.WeightsMismatchError(f"{source.path.name} does not match the {what}:\n  " + "\n  ".join(problems))
    return table


def _load(cls, layers_fn, path, what):
    source = OnnxConstants(path)
    model = cls()
    table = build_table(model, layers_fn(model), source, what)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = mapping.load_state(table, params, source, what=what)
    return nnx.merge(graphdef, params, rest)


def load_detector(path: str | Path) -> ppocr.TextDetector:
    """A `TextDetector` with the weights of a PP-OCRv4 detection ONNX file (e.g. ch_PP-OCRv4_det_infer.onnx)."""
    return _load(ppocr.TextDetector, detector_layers, path, "PP-OCRv4 detector")


def load_recognizer(path: str | Path) -> ppocr.TextRecognizer:
    """A `TextRecognizer` with the weights of a PP-OCRv4 recognition ONNX file (ch_PP-OCRv4_rec_infer.onnx)."""
    return _load(ppocr.TextRecognizer, recognizer_layers, path, "PP-OCRv4 recogniser")


def read_characters(rec_path: str | Path, dict_path: str | Path | None = None) -> list[str]:
    """The CTC classes: blank, the dictionary, space (PaddleOCR's CTCLabelDecode with use_space_char).

    The dictionary comes from `dict_path` (one character per line, e.g. ppocr_keys_v1.txt) or else from the
    recogniser's ONNX metadata "character" (where rapidocr keeps it).
    """
    if dict_path is not None:
        lines = Path(dict_path).read_bytes().decode("utf-8").splitlines()
    else:
        onnx = _onnx()
        model = onnx.load(str(rec_path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        if "character" not in meta:
            raise CheckpointError(f"{rec_path} has no 'character' metadata; pass dict_path= (the model's "
                                  "character dictionary, e.g. PaddleOCR's ppocr/utils/ppocr_keys_v1.txt)")
        lines = meta["character"].splitlines()
    return ["blank", *lines, " "]


def find_models(path: str | Path | None = None) -> tuple[Path, Path]:
    """(detector, recogniser) ONNX files: in `path` (a folder, or None for the installed rapidocr-onnxruntime)."""
    if path is None:
        spec = importlib.util.find_spec("rapidocr_onnxruntime")  # located, not imported (it imports onnxruntime)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the OCR reward needs the PP-OCRv4 ONNX files: install them with `pip install --no-deps "
                "rapidocr-onnxruntime` (a 15 MB wheel of ONNX files; flowjax never imports it), or pass "
                f"path=<a folder with {DET_FILE} and {REC_FILE}>")
        path = Path(list(spec.submodule_search_locations)[0]) / "models"
    path = Path(path)
    if path.suffix.lower() in (".pdmodel", ".pdiparams") or (path / "inference.pdmodel").exists():
        raise ValueError(f"{path} is a PaddleOCR inference folder; those need Paddle to read. Convert them with "
                         f"paddle2onnx, or use rapidocr's ONNX files (pip install --no-deps rapidocr-onnxruntime)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; give a folder with {DET_FILE} and {REC_FILE}")
    found = []
    for want, pattern in ((DET_FILE, "*det*.onnx"), (REC_FILE, "*rec*.onnx")):
        if (path / want).is_file():
            found.append(path / want)
            continue
        matches = sorted(path.glob(pattern))
        if len(matches) != 1:
            raise FileNotFoundError(f"{path} has {len(matches)} files matching {pattern} and no {want}; "
                                    "give a folder with one detection and one recognition ONNX file")
        found.append(matches[0])
    return found[0], found[1]
