"""The host part of the OCR reward: text boxes from a DB probability map and the recogniser's input crops.

This is the geometry of PaddleOCR 2.9.1 (what Flow-GRPO's `flow_grpo/ocr.py` calls) and of
rapidocr-onnxruntime 1.4.4, with the same OpenCV and pyclipper routines they use, so that boxes and crops
are bit-identical to theirs; each function names the reference function it follows:

- `db_boxes`: `DBPostProcess.__call__` / `boxes_from_bitmap` (ppocr/postprocess/db_postprocess.py,
  rapidocr_onnxruntime/ch_ppocr_det/utils.py): threshold, optional 2x2 dilation, `cv2.findContours`
  (RETR_LIST, CHAIN_APPROX_SIMPLE), up to `max_candidates` contours, `get_mini_boxes` (minAreaRect corners
  in the order top-left, top-right, bottom-right, bottom-left), `box_score_fast` (mean probability inside
  the box), `unclip` (pyclipper round offset by area * ratio / perimeter, the area and perimeter computed as
  shapely / GEOS does), a second minAreaRect, min side 3 then 5, scaling to the image and rounding.
- `filter_boxes`: `TextDetector.filter_tag_det_res` (corner order, clipping to the image, dropping boxes
  with a side <= 3 px); PaddleOCR orders corners by x+y / y-x, rapidocr by x then y (`corner_order`).
- `sort_boxes`: `sorted_boxes` (top-to-bottom, then left-to-right within 10 px rows).
- `rotate_crop`: `get_rotate_crop_image` (perspective warp, bicubic, replicated border; a crop at least
  1.5 times as tall as wide is turned 90 degrees counter-clockwise).
- `rec_layout`: `TextRecognizer.__call__` / `resize_norm_img` (crops sorted by aspect ratio in batches of
  `rec_batch_num`, each batch padded to `int(48 * max(320 / 48, its widest ratio))` columns; a crop is
  resized to height 48 and width `min(ceil(48 * w / h), that)`, bilinear).

OpenCV (`opencv-python-headless`) and `pyclipper` are imported when the reward is built.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["DBParams", "db_boxes", "filter_boxes", "sort_boxes", "rotate_crop", "rec_layout", "prepare_crops"]


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError("the OCR reward's box post-processing needs OpenCV: pip install opencv-python-headless "
                          "(or pip install 'flowjax[ocr]')") from e
    return cv2


def _pyclipper():
    try:
        import pyclipper
    except ImportError as e:
        raise ImportError("the OCR reward's box expansion needs pyclipper: pip install pyclipper "
                          "(or pip install 'flowjax[ocr]')") from e
    return pyclipper


def check_dependencies() -> None:
    _cv2(), _pyclipper()


@dataclasses.dataclass(frozen=True)
class DBParams:
    """DBPostProcess settings (PaddleOCR's --det_db_* flags; rapidocr's config.yaml `Det` section)."""

    thresh: float = 0.3
    box_thresh: float = 0.6
    unclip_ratio: float = 1.5
    use_dilation: bool = False
    max_candidates: int = 1000
    min_size: int = 3


# ----------------------------------------------------------------------------- detection boxes


def _mini_box(points) -> tuple[np.ndarray, float]:
    """get_mini_boxes: the min-area rectangle's corners (tl, tr, br, bl) and its shorter side."""
    cv2 = _cv2()
    rect = cv2.minAreaRect(points)
    pts = sorted(list(cv2.boxPoints(rect)), key=lambda p: p[0])
    i1, i4 = (0, 1) if pts[1][1] > pts[0][1] else (1, 0)
    i2, i3 = (2, 3) if pts[3][1] > pts[2][1] else (3, 2)
    return np.array([pts[i1], pts[i2], pts[i3], pts[i4]]), min(rect[1])


def _box_score(prob: np.ndarray, box: np.ndarray) -> float:
    """box_score_fast: mean of the map over the box polygon (corners truncated to ints, cv2.fillPoly)."""
    cv2 = _cv2()
    h, w = prob.shape
    box = box.copy()
    xmin = np.clip(np.floor(box[:, 0].min()).astype(np.int32), 0, w - 1)
    xmax = np.clip(np.ceil(box[:, 0].max()).astype(np.int32), 0, w - 1)
    ymin = np.clip(np.floor(box[:, 1].min()).astype(np.int32), 0, h - 1)
    ymax = np.clip(np.ceil(box[:, 1].max()).astype(np.int32), 0, h - 1)
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    box[:, 0] = box[:, 0] - xmin
    box[:, 1] = box[:, 1] - ymin
    cv2.fillPoly(mask, box.reshape(1, -1, 2).astype(np.int32), 1)
    return cv2.mean(prob[ymin:ymax + 1, xmin:xmax + 1], mask)[0]


def _area_and_length(box: np.ndarray) -> tuple[float, float]:
    """shapely Polygon(box).area and .length, computed as GEOS does (Area::ofRing, Length::ofLine)."""
    ring = [(float(x), float(y)) for x, y in box] + [(float(box[0][0]), float(box[0][1]))]
    x0 = ring[0][0]
    total = 0.0
    for i in range(1, len(ring) - 1):
        total += (ring[i][0] - x0) * (ring[i - 1][1] - ring[i + 1][1])
    length = 0.0
    for (xa, ya), (xb, yb) in zip(ring[:-1], ring[1:]):
        dx, dy = xb - xa, yb - ya
        length += math.sqrt(dx * dx + dy * dy)
    return abs(total / 2.0), length


def _unclip(box: np.ndarray, ratio: float):
    """unclip: the box grown by area * ratio / perimeter with round joins (pyclipper, as the reference)."""
    pyclipper = _pyclipper()
    area, length = _area_and_length(box)
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(box, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    return offset.Execute(area * ratio / length)


def db_boxes(prob: np.ndarray, dest_hw: tuple[int, int], p: DBParams) -> np.ndarray:
    """Text boxes [n, 4, 2] int32 (image coordinates of an image `dest_hw` = (H, W)) from a probability map."""
    cv2 = _cv2()
    prob = np.asarray(prob, np.float32)
    height, width = prob.shape
    dest_h, dest_w = dest_hw
    mask = prob > p.thresh
    if p.use_dilation:
        mask = cv2.dilate(mask.astype(np.uint8), np.array([[1, 1], [1, 1]]))
    outs = cv2.findContours((mask * 255).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    contours = outs[1] if len(outs) == 3 else outs[0]
    boxes = []
    for contour in contours[:p.max_candidates]:
        points, sside = _mini_box(contour)
        if sside < p.min_size:
            continue
        if p.box_thresh > _box_score(prob, points.reshape(-1, 2)):
            continue
        expanded = _unclip(points, p.unclip_ratio)
        if len(expanded) != 1:  # PaddleOCR 2.9.1 skips an expansion that splits (rapidocr would fail)
            continue
        box, sside = _mini_box(np.array(expanded).reshape(-1, 1, 2))
        if sside < p.min_size + 2:
            continue
        box = np.array(box)
        box[:, 0] = np.clip(np.round(box[:, 0] / width * dest_w), 0, dest_w)
        box[:, 1] = np.clip(np.round(box[:, 1] / height * dest_h), 0, dest_h)
        boxes.append(box.astype(np.int32))
    return np.array(boxes, dtype=np.int32).reshape(-1, 4, 2)


def _corners_paddle(pts: np.ndarray) -> np.ndarray:
    """PaddleOCR 2.9.1 TextDetector.order_points_clockwise (by x + y and y - x)."""
    rect = np.zeros((4, 2), dtype=np.float32)
    s = pts.sum(axis=1)
    rect[0] = pts[np.argmin(s)]
    rect[2] = pts[np.argmax(s)]
    tmp = np.delete(pts, (np.argmin(s), np.argmax(s)), axis=0)
    diff = np.diff(np.array(tmp), axis=1)
    rect[1] = tmp[np.argmin(diff)]
    rect[3] = tmp[np.argmax(diff)]
    return rect


def _corners_rapidocr(pts: np.ndarray) -> np.ndarray:
    """rapidocr 1.4.4 TextDetector.order_points_clockwise (imutils: by x, then by y on each side)."""
    xs = pts[np.argsort(pts[:, 0]), :]
    left, right = xs[:2, :], xs[2:, :]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype="float32")


CORNER_ORDERS = {"paddleocr": _corners_paddle, "rapidocr": _corners_rapidocr}


def filter_boxes(boxes: np.ndarray, image_hw: tuple[int, int], corner_order: str = "paddleocr") -> list[np.ndarray]:
    """filter_tag_det_res: ordered, clipped float32 boxes whose sides exceed 3 px."""
    order = CORNER_ORDERS[corner_order]
    h, w = image_hw
    kept = []
    for box in boxes:
        box = order(box)
        for i in range(4):
            box[i, 0] = int(min(max(box[i, 0], 0), w - 1))
            box[i, 1] = int(min(max(box[i, 1], 0), h - 1))
        if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
            continue
        kept.append(box)
    return kept


def sort_boxes(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """sorted_boxes: by (top-left y, x), then one bubble pass within rows 10 px high."""
    out = sorted(boxes, key=lambda b: (b[0][1], b[0][0]))
    for i in range(len(out) - 1):
        for j in range(i, -1, -1):
            if abs(out[j + 1][0][1] - out[j][0][1]) < 10 and out[j + 1][0][0] < out[j][0][0]:
                out[j], out[j + 1] = out[j + 1], out[j]
            else:
                break
    return out


# ----------------------------------------------------------------------------- crops


def rotate_crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """get_rotate_crop_image: the box warped upright (bicubic, replicated border), turned if tall."""
    cv2 = _cv2()
    w = int(max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3])))
    h = int(max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2])))
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    m = cv2.getPerspectiveTransform(box.astype(np.float32), target)
    crop = cv2.warpPerspective(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    return np.rot90(crop) if crop.shape[0] * 1.0 / crop.shape[1] >= 1.5 else crop


def rec_layout(crops: list[np.ndarray], height: int = 48, width: int = 320, batch: int = 6):
    """(padded width, resized width) of each crop as TextRecognizer.__call__ batches them."""
    ratios = [c.shape[1] / float(c.shape[0]) for c in crops]
    order = np.argsort(np.array(ratios))
    padded, resized = [0] * len(crops), [0] * len(crops)
    for start in range(0, len(crops), batch):
        members = order[start:start + batch]
        max_ratio = max([width / height] + [crops[i].shape[1] * 1.0 / crops[i].shape[0] for i in members])
        batch_width = int(height * max_ratio)
        for i in members:
            h, w = crops[i].shape[:2]
            need = math.ceil(height * (w / float(h)))
            padded[i], resized[i] = batch_width, batch_width if need > batch_width else int(need)
    return padded, resized


def prepare_crops(image: np.ndarray, prob: np.ndarray, p: DBParams, *, corner_order: str, max_boxes: int,
                  max_width: int, height: int = 48, width: int = 320, batch: int = 6):
    """One image's recogniser inputs: crops uint8 [max_boxes, height, max_width, 3] (left-aligned), their
    resized widths and padded widths [max_boxes] int32 (0: no box), and the number of boxes found.

    A padded width above `max_width` is cut to `max_width` (and the resized width with it): the only place
    where the result can differ from the reference, for text lines wider than max_width / 48 : 1.
    """
    cv2 = _cv2()
    h, w = image.shape[:2]
    boxes = sort_boxes(filter_boxes(db_boxes(prob, (h, w), p), (h, w), corner_order))
    crops = [rotate_crop(image, b) for b in boxes]
    padded, resized = rec_layout(crops, height, width, batch)
    out = np.zeros((max_boxes, height, max_width, 3), np.uint8)
    out_resized = np.zeros(max_boxes, np.int32)
    out_padded = np.zeros(max_boxes, np.int32)
    for k, crop in enumerate(crops[:max_boxes]):
        rw = min(resized[k], max_width)
        out[k, :, :rw] = cv2.resize(crop, (resized[k], height))[:, :rw]
        out_resized[k], out_padded[k] = rw, min(padded[k], max_width)
    return out, out_resized, out_padded, len(boxes)
