"""Flow-GRPO's OCR reward with PP-OCRv4 as jitted NNX modules: `flowjax.rewards.load("ocr", path=None)`.

    reward = flowjax.rewards.load("ocr")            # the ONNX files of an installed rapidocr-onnxruntime
    tokens = reward.tokenize(['A sign that says "Hello World"'])
    out = jax.jit(reward.evaluate)(reward.params, images, tokens)   # {"reward": [B], "accuracy": [B]}

The pipeline, per image [H, W, 3] in [0, 1]:
1. device: to uint8 as Flow-GRPO's `ocr_score` does (`(x * 255).round().clamp(0, 255)`), resized to the
   detector's size when the preset's rule changes it (`det_size`; cv2.resize on the host), normalised,
   `TextDetector` -> probability map.
2. host (`jax.pure_callback`, images in parallel threads): DB post-processing, box order and crops exactly
   as PaddleOCR / rapidocr compute them with OpenCV and pyclipper (`flowjax.rewards.ocr_boxes`), returned
   as fixed-size arrays: up to `max_boxes` crops [48, max_width] per image with their widths.
3. device: `TextRecognizer` on the crops, each at the width the reference batches it to (exactly, through
   width masks), in chunks of `chunk` crops that skip empty chunks and use the narrowest of `rec_widths`
   that holds them; CTC greedy decoding (argmax of the softmax, repeats merged, blanks dropped, the score
   the mean probability of the kept steps) and the reference's drop of texts scoring below `drop_score`.
4. device: Flow-GRPO's reward (`flow_grpo/ocr.py` at commit ac4c86e, `OcrScorer.__call__`): the target is
   `prompt.split('"')[1]`; recognised text (the kept boxes' texts joined in box order) and target both
   `.replace(' ', '').lower()`; distance 0 when the target occurs in the text, else the Levenshtein
   distance, clipped to len(target); reward = 1 - distance / len(target). `accuracy` is 1 where the
   reward is 1 (the target was read).

Why this split: the two networks are most of the work and run batched on the accelerator; the DB
post-processing (contours, minimum-area rectangles, polygon offsetting) has data-dependent sizes and its
exact results come from OpenCV and Clipper, so it runs on the host with those same routines, which also
cut and resize the crops bit-identically to the reference (perspective warps with OpenCV's fixed-point
bicubic kernels); the text comparison is small integer work on fixed-length arrays and stays on device.

Presets (`preset=`): "paddleocr" (default) is PaddleOCR 2.9.1's pipeline as Flow-GRPO calls it
(`PaddleOCR(use_angle_cls=False, lang="en")`, `ocr(img, cls=False)`): detector input limited to 960 px on
the long side (a 512 px image is not resized), ImageNet mean / std, DB thresh 0.3, box_thresh 0.6,
unclip_ratio 1.5, no dilation, drop_score 0.5. "rapidocr" is rapidocr-onnxruntime 1.4.4's config.yaml:
short side raised to 736 px, mean = std = 0.5, box_thresh 0.5, unclip_ratio 1.6, 2x2 dilation,
text_score 0.5. Both: recogniser height 48, base width 320, batches of 6, no angle classifier.
The weights are the Chinese + English PP-OCRv4 models that rapidocr ships; Flow-GRPO's `lang="en"` loads
PaddleOCR's English models (en_PP-OCRv3_det, en_PP-OCRv4_rec), which are not on PyPI and are neither
ported nor checked here (the v3 detector has another backbone).
Differences from the reference, all bounded by options: at most `max_boxes` boxes per image are read (the
first in reading order), crops wider than `max_width` are cut, targets longer than `max_target_chars`
characters are refused; rapidocr's extra resizing of images under 30 px or over 2000 px, and its
letterbox for aspect ratios over 8, are not reproduced.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax.data import prompts as prompts_lib
from flowjax.models.ppocr import TextRecognizer
from flowjax.rewards import ocr_boxes

__all__ = ["OCRReward", "PRESETS", "Preset", "det_size", "ocr_target", "flow_grpo_reward"]

_TARGET_PAD, _TEXT_PAD, _SPACE = -3, -2, -1


@dataclasses.dataclass(frozen=True)
class Preset:
    limit_side_len: int
    limit_type: str  # "max": shrink to fit, "min": enlarge to reach (DetResizeForTest.resize_image_type0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    db: ocr_boxes.DBParams
    drop_score: float
    corner_order: str
    rec_height: int = 48
    rec_width: int = 320
    rec_batch: int = 6


PRESETS = {
    # PaddleOCR 2.9.1 tools/infer/utility.py defaults, predict_det.py NormalizeImage, predict_system.py drop_score
    "paddleocr": Preset(960, "max", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                        ocr_boxes.DBParams(0.3, 0.6, 1.5, use_dilation=False), 0.5, "paddleocr"),
    # rapidocr_onnxruntime 1.4.4 config.yaml (Global.text_score, Det.*)
    "rapidocr": Preset(736, "min", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                       ocr_boxes.DBParams(0.3, 0.5, 1.6, use_dilation=True), 0.5, "rapidocr"),
}


def det_size(h: int, w: int, preset: Preset) -> tuple[int, int]:
    """The detector's input size for an h x w image (DetResizeForTest.resize_image_type0: multiples of 32, >= 32)."""
    if preset.limit_type == "max":
        ratio = float(preset.limit_side_len) / max(h, w) if max(h, w) > preset.limit_side_len else 1.0
    elif preset.limit_type == "min":
        ratio = float(preset.limit_side_len) / min(h, w) if min(h, w) < preset.limit_side_len else 1.0
    else:
        raise ValueError(f"limit_type must be 'max' or 'min', got {preset.limit_type!r}")
    return (max(int(round(int(h * ratio) / 32) * 32), 32), max(int(round(int(w * ratio) / 32) * 32), 32))


def ocr_target(prompt: Any) -> str:
    """The text a prompt asks to render, from a string or a metadata dict's "prompt": the first double-quoted
    span (`flowjax.data.prompts.ocr_target`, flow_grpo/ocr.py's `prompt.split('"')[1]`)."""
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    if not isinstance(text, str):
        raise TypeError(f"an OCR prompt must be a string or a dict with a 'prompt' string, got {prompt!r:.80}")
    target = prompts_lib.ocr_target(text)
    if target is None or not target.replace(" ", ""):
        raise ValueError(f"the OCR reward reads the text between the first pair of double quotes of the prompt, "
                         f'and this prompt has none (or only spaces there): {text!r:.120}')
    return target


def flow_grpo_reward(recognised: str, target: str) -> float:
    """flow_grpo/ocr.py's reward of one recognised string, in plain Python (the reference for the JAX version)."""
    rec, tgt = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    dist = 0 if tgt in rec else _levenshtein(rec, tgt)
    return 1 - min(dist, len(tgt)) / len(tgt)


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# ----------------------------------------------------------------------------- text matching (JAX)


def _contains(text, n_text, target, n_target):
    """[B] bool: target[:n_target] occurs in text[:n_text] (codes; text [B, L], target [B, N])."""
    L, N = text.shape[1], target.shape[1]
    starts = jnp.arange(L)[:, None] + jnp.arange(N)[None, :]  # [L, N]
    windows = jnp.take_along_axis(text, jnp.minimum(starts, L - 1).reshape(1, -1), axis=1).reshape(-1, L, N)
    windows = jnp.where(starts[None] < L, windows, _TEXT_PAD)
    used = jnp.arange(N)[None, None, :] < n_target[:, None, None]
    match = jnp.all(~used | (windows == target[:, None, :]), axis=-1)
    fits = jnp.arange(L)[None, :] + n_target[:, None] <= n_text[:, None]
    return jnp.any(match & fits, axis=-1)


def _levenshtein_jax(text, n_text, target, n_target):
    """[B] int32 Levenshtein distance between text[:n_text] and target[:n_target]; text rows past
    text.shape[1] are not read (callers clip the distance so that it does not matter)."""
    B, N = target.shape
    cols = jnp.arange(N + 1)

    def step(row, inputs):
        i, c = inputs
        sub = row[:, :-1] + (c[:, None] != target).astype(jnp.int32)
        a = jnp.concatenate([jnp.full((B, 1), i + 1, jnp.int32), jnp.minimum(sub, row[:, 1:] + 1)], axis=1)
        new = jax.lax.cummin(a - cols, axis=1) + cols  # insertions: min over k <= j of a[k] + (j - k)
        return jnp.where((i < n_text)[:, None], new, row), None

    rows = text.shape[1]
    row0 = jnp.broadcast_to(cols, (B, N + 1)).astype(jnp.int32)
    row, _ = jax.lax.scan(step, row0, (jnp.arange(rows, dtype=jnp.int32), text.T))
    return jnp.take_along_axis(row, n_target[:, None], axis=1)[:, 0]


def match_reward(text, n_text, tokens):
    """Flow-GRPO's reward and accuracy [B] of recognised codes text [B, L] (n_text used) vs tokens [B, 1 + N]."""
    n_target, target = tokens[:, 0], tokens[:, 1:]
    N = target.shape[1]
    contained = _contains(text, n_text, target, n_target)
    rows = min(text.shape[1], 2 * N)  # past 2N characters the clipped distance is len(target) anyway
    lev = _levenshtein_jax(text[:, :rows], n_text, target, n_target)
    dist = jnp.where(n_text > rows, n_target, jnp.minimum(lev, n_target))
    dist = jnp.where(contained, 0, dist)
    reward = 1.0 - dist.astype(jnp.float32) / n_target.astype(jnp.float32)
    return reward, (dist == 0).astype(jnp.float32)


# ----------------------------------------------------------------------------- the reward


class OCRReward:
    """Flow-GRPO's OCR reward on PP-OCRv4 (see the module docstring); jittable like the CLIP rewards.

    Args:
      path: a folder with the detection and recognition ONNX files, or None for the installed
        rapidocr-onnxruntime's (`pip install --no-deps rapidocr-onnxruntime`).
      preset: "paddleocr" (Flow-GRPO's PaddleOCR settings) or "rapidocr" (rapidocr's config.yaml).
      max_boxes: text boxes read per image (the first in reading order).
      max_width: widest recogniser input (a crop the reference would feed wider is cut).
      rec_widths: recogniser program widths (each compiled once); chunks run at the narrowest that fits.
      chunk: crops per recogniser call.
      max_target_chars: longest target (spaces removed) that `tokenize` accepts.
      workers: host threads for the box post-processing (default min(8, cpu count)).
      dict_path: the character dictionary, if not in the recogniser's ONNX metadata.
    """

    name = "ocr"
    jittable = True
    metric_names = ("accuracy",)

    def __init__(self, path: str | os.PathLike | None = None, *, preset: str = "paddleocr", max_boxes: int = 8,
                 max_width: int = 1280, rec_widths: Sequence[int] = (320, 640, 1280), chunk: int = 16,
                 max_target_chars: int = 64, workers: int | None = None, dict_path=None):
        from flowjax.convert import ppocr as convert

        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        widths = sorted(int(w) for w in rec_widths)
        if not widths or widths[-1] != int(max_width) or any(w % 8 or w < 8 for w in widths):
            raise ValueError(f"rec_widths must be multiples of 8 ending with max_width={max_width}, got {rec_widths}")
        if max_boxes < 1 or chunk < 1 or max_target_chars < 1:
            raise ValueError("max_boxes, chunk and max_target_chars must be positive")
        ocr_boxes.check_dependencies()
        self.preset = PRESETS[preset]
        self.max_boxes, self.max_width, self.rec_widths, self.chunk = int(max_boxes), int(max_width), widths, int(chunk)
        self.max_target_chars = int(max_target_chars)
        det_path, rec_path = convert.find_models(path)
        detector, recognizer = convert.load_detector(det_path), convert.load_recognizer(rec_path)
        self.characters = convert.read_characters(rec_path, dict_path)
        if len(self.characters) != recognizer.config.num_classes:
            raise ValueError(f"the dictionary has {len(self.characters)} classes (with blank and space), the "
                             f"recogniser {recognizer.config.num_classes}")
        self._det_graph, det_state = nnx.split(detector)
        self._rec_graph, rec_state = nnx.split(recognizer)
        self.params = {"det": det_state, "rec": rec_state}
        self._codes = jnp.asarray(self._code_table(self.characters))
        self._pool = concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1))
        self._jitted = jax.jit(self.evaluate)
        self._analyse_jit = jax.jit(self._analyse)
        self.metrics: dict[str, np.ndarray] = {}
        self.paths = (Path(det_path), Path(rec_path))

    @staticmethod
    def _code_table(characters: list[str]) -> np.ndarray:
        """Per class, the code the reward compares: the lower-cased character's code point (space: removed)."""
        codes = np.zeros(len(characters), np.int32)
        for i, ch in enumerate(characters[1:], 1):
            low = ch.lower()
            if ch == " ":
                codes[i] = _SPACE
            elif len(low) != 1:
                raise ValueError(f"dictionary entry {ch!r} lower-cases to {len(low)} characters; not supported")
            else:
                codes[i] = ord(low)
        return codes

    # ------------------------------------------------------------------ prompts

    def tokenize(self, prompts: Sequence[Any]) -> np.ndarray:
        """int32 [B, 1 + max_target_chars]: the target's length, then its code points (normalised as Flow-GRPO)."""
        if isinstance(prompts, np.ndarray) and prompts.dtype.kind in "iu":
            return prompts.astype(np.int32)
        out = np.full((len(prompts), 1 + self.max_target_chars), _TARGET_PAD, np.int32)
        for i, p in enumerate(prompts):
            target = ocr_target(p).replace(" ", "").lower()
            if len(target) > self.max_target_chars:
                raise ValueError(f"OCR target {target!r} has {len(target)} characters; the reward was built for at "
                                 f"most max_target_chars={self.max_target_chars}")
            out[i, 0] = len(target)
            out[i, 1:1 + len(target)] = [ord(c) for c in target]
        return out

    # ------------------------------------------------------------------ detection

    def _to_uint8(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] in [0, 1], got {images.shape}")
        return jnp.clip(jnp.round(images.astype(jnp.float32) * 255.0), 0, 255).astype(jnp.uint8)

    def _det_input(self, u8):
        b, h, w, _ = u8.shape
        hd, wd = det_size(h, w, self.preset)
        if (hd, wd) != (h, w):
            def resize(x):
                cv2 = ocr_boxes._cv2()
                return np.stack([cv2.resize(np.asarray(im), (wd, hd)) for im in x])
            u8 = jax.pure_callback(resize, jax.ShapeDtypeStruct((b, hd, wd, 3), jnp.uint8), u8,
                                   vmap_method="sequential")
        mean = jnp.asarray(self.preset.mean, jnp.float32)
        std = jnp.asarray(self.preset.std, jnp.float32)
        return (u8.astype(jnp.float32) * np.float32(1.0 / 255.0) - mean) / std

    def detect(self, params, images) -> jax.Array:
        """Probability maps [B, Hd, Wd] of images [B, H, W, 3] in [0, 1] (traceable)."""
        detector = nnx.merge(self._det_graph, params["det"])
        return detector(self._det_input(self._to_uint8(images)))

    # ------------------------------------------------------------------ boxes and crops (host)

    def _host_crops(self, u8, prob):
        p = self.preset

        def one(i):
            return ocr_boxes.prepare_crops(u8[i], prob[i], p.db, corner_order=p.corner_order,
                                           max_boxes=self.max_boxes, max_width=self.max_width,
                                           height=p.rec_height, width=p.rec_width, batch=p.rec_batch)

        u8, prob = np.asarray(u8), np.asarray(prob)
        results = list(self._pool.map(one, range(len(u8))))
        return tuple(np.stack([r[j] for r in results]) for j in range(3)) + (
            np.asarray([r[3] for r in results], np.int32),)

    def crops(self, u8, prob):
        """(crops uint8 [B, K, 48, max_width, 3], resized widths [B, K], padded widths [B, K], boxes found [B])."""
        b, K, H = u8.shape[0], self.max_boxes, self.preset.rec_height
        shapes = (jax.ShapeDtypeStruct((b, K, H, self.max_width, 3), jnp.uint8),
                  jax.ShapeDtypeStruct((b, K), jnp.int32), jax.ShapeDtypeStruct((b, K), jnp.int32),
                  jax.ShapeDtypeStruct((b,), jnp.int32))
        return jax.pure_callback(self._host_crops, shapes, u8, prob, vmap_method="sequential")

    # ------------------------------------------------------------------ recognition

    def _recognise_chunk(self, rec_state, width, crops, resized, padded):
        """(class ids, their probabilities) [C, T_max] of one chunk run at `width` columns."""
        recognizer = nnx.merge(self._rec_graph, rec_state)
        x = crops[:, :, :width].astype(jnp.float32) / 255.0
        x = (x - 0.5) / 0.5
        x = jnp.where((jnp.arange(width)[None, :] < resized[:, None])[:, None, :, None], x, 0.0)  # padding_im
        probs = jax.nn.softmax(recognizer(x, jnp.maximum(padded, 8)), axis=-1)
        t_max = TextRecognizer.output_length(self.max_width)
        pad = ((0, 0), (0, t_max - probs.shape[1]))
        return (jnp.pad(jnp.argmax(probs, -1).astype(jnp.int32), pad),
                jnp.pad(jnp.max(probs, -1), pad))

    def recognise(self, params, crops, resized, padded):
        """Greedy CTC inputs (ids, probabilities) [B, K, T_max] of the crops (traceable)."""
        b, K = padded.shape
        n = b * K
        C = self.chunk
        nc = -(-n // C)
        flat = lambda a: jnp.pad(a.reshape(n, *a.shape[2:]), [(0, nc * C - n)] + [(0, 0)] * (a.ndim - 2))
        crops_f, resized_f, padded_f = flat(crops), flat(resized), flat(padded)
        big = jnp.iinfo(jnp.int32).max
        order = jnp.argsort(jnp.where(padded_f > 0, padded_f, big))  # valid crops first, narrow to wide
        t_max = TextRecognizer.output_length(self.max_width)
        widths = jnp.asarray(self.rec_widths, jnp.int32)

        def run_chunk(args):
            crops_c, resized_c, padded_c = args
            need = jnp.max(padded_c)
            branch = jnp.where(need > 0, 1 + jnp.searchsorted(widths, need), 0)
            skip = lambda *_: (jnp.zeros((C, t_max), jnp.int32), jnp.zeros((C, t_max), jnp.float32))
            branches = [skip] + [lambda cr, rs, pd, w=w: self._recognise_chunk(params["rec"], w, cr, rs, pd)
                                 for w in self.rec_widths]
            return jax.lax.switch(branch, branches, crops_c, resized_c, padded_c)

        chunks = (crops_f[order].reshape(nc, C, *crops_f.shape[1:]), resized_f[order].reshape(nc, C),
                  padded_f[order].reshape(nc, C))
        ids, probs = jax.lax.map(run_chunk, chunks)
        unsort = lambda a: jnp.zeros_like(a.reshape(nc * C, t_max)).at[order].set(a.reshape(nc * C, t_max))[:n]
        return unsort(ids).reshape(b, K, t_max), unsort(probs).reshape(b, K, t_max)

    def decode(self, ids, probs, padded):
        """CTCLabelDecode + the drop_score filter: (selected steps [B, K, T], kept boxes [B, K])."""
        lengths = jnp.where(padded > 0, TextRecognizer.output_length(padded), 0)
        t = jnp.arange(ids.shape[-1])
        prev = jnp.concatenate([jnp.full(ids.shape[:-1] + (1,), -1, ids.dtype), ids[..., :-1]], axis=-1)
        selected = (t < lengths[..., None]) & (ids != 0) & (ids != prev)
        count = selected.sum(-1)
        score = jnp.where(count > 0, (probs * selected).sum(-1) / jnp.maximum(count, 1), 0.0)
        return selected, (padded > 0) & (score >= self.preset.drop_score)

    def text_codes(self, ids, selected, kept):
        """The recognised text as codes [B, K * T] (spaces dropped, lower-cased; padded) and its length [B]."""
        b = ids.shape[0]
        codes = self._codes[ids]
        emit = (selected & kept[..., None] & (codes != _SPACE)).reshape(b, -1)
        codes = codes.reshape(b, -1)
        length = codes.shape[1]
        pos = jnp.where(emit, jnp.cumsum(emit, axis=1) - 1, length)
        text = jnp.full((b, length), _TEXT_PAD, jnp.int32)
        text = text.at[jnp.arange(b)[:, None], pos].set(codes, mode="drop")
        return text, emit.sum(-1).astype(jnp.int32)

    # ------------------------------------------------------------------ the reward

    def _analyse(self, params, images, tokens):
        prob = self.detect(params, images)
        crops, resized, padded, found = self.crops(self._to_uint8(images), prob)
        ids, probs = self.recognise(params, crops, resized, padded)
        selected, kept = self.decode(ids, probs, padded)
        text, n_text = self.text_codes(ids, selected, kept)
        reward, accuracy = match_reward(text, n_text, jnp.asarray(tokens, jnp.int32))
        return {"reward": reward, "accuracy": accuracy, "ids": ids, "selected": selected, "kept": kept,
                "boxes": found, "prob": prob}

    def evaluate(self, params, images, tokens) -> dict[str, jax.Array]:
        """{"reward": [B], "accuracy": [B]} of images [B, H, W, 3] in [0, 1] and tokenized prompts (traceable)."""
        out = self._analyse(params, images, tokens)
        return {"reward": out["reward"], "accuracy": out["accuracy"]}

    def score(self, params, images, tokens) -> jax.Array:
        """Rewards [B] (traceable; see `evaluate` for the accuracy too)."""
        return self.evaluate(params, images, tokens)["reward"]

    def __call__(self, images, prompts) -> jax.Array:
        tokens = prompts if isinstance(prompts, jax.Array) else jnp.asarray(self.tokenize(prompts))
        out = self._jitted(self.params, jnp.asarray(images), tokens)
        self.metrics = {"accuracy": np.asarray(out["accuracy"])}
        return out["reward"]

    def read(self, images, prompts=None) -> dict[str, Any]:
        """What the reward reads (host): {"text": [str] (the kept boxes' texts joined in box order, as the
        reference joins them), "boxes": boxes found per image, "prob": the detector's maps}, with "reward"
        and "accuracy" when prompts are given."""
        images = jnp.asarray(images)
        if prompts is None:
            tokens = np.full((images.shape[0], 1 + self.max_target_chars), _TARGET_PAD, np.int32)
            tokens[:, 0] = 1
        else:
            tokens = self.tokenize(prompts)
        out = jax.device_get(self._analyse_jit(self.params, images, jnp.asarray(tokens)))
        ids, selected, kept = out["ids"], out["selected"], out["kept"]
        texts = ["".join(self.characters[i] for k in np.flatnonzero(kept[b]) for i in ids[b, k][selected[b, k]])
                 for b in range(ids.shape[0])]
        result = {"text": texts, "boxes": out["boxes"], "prob": out["prob"]}
        if prompts is not None:
            result.update(reward=out["reward"], accuracy=out["accuracy"])
        return result
