"""What the OCR reward is checked against (tests/test_ocr.py, benchmarks/ocr_reward.py):

- rendered images: PIL text of varied phrases, fonts (matplotlib's DejaVu family), sizes, colours, positions,
  angles and backgrounds, 512 x 512 like SD3.5's outputs, plus images with no text; each sample is
  (uint8 image [H, W, 3], prompt 'A sign that says "<phrase>"'), deterministic per seed;
- rapidocr-onnxruntime's own pipeline, configured like the reward's presets, read as flow_grpo/ocr.py joins
  PaddleOCR's result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PHRASES = [
    "Hello World", "OPEN", "Fresh Coffee", "Spring Sale 2024", "No Parking", "Welcome Home", "Exit", "Library",
    "Happy Birthday", "Stop", "Bakery", "Gate 12", "Summer Vibes", "Good Morning", "Thank You", "Danger",
    "Pizza Night", "City Hall", "Keep Calm", "Route 66", "Best Friends", "Jazz Club", "Sold Out", "Free WiFi",
    "Lucky Cat", "Mountain View", "Ocean Drive", "Deep Learning", "Flow Matching", "Night Market", "Museum",
    "Hotel California", "Fire Station", "Made in Italy", "Coming Soon", "Bookstore", "Vintage", "Garden Party",
    "Pharmacy", "Airport", "Platform 9", "Grand Opening", "Taxi", "Caution Wet Floor", "Star Cinema",
    "Green Tea", "Space Station", "Hello 123", "Winter is Coming", "Ice Cream", "Dream Big", "Cafe Paris",
    "Pet Shop", "Bus Stop", "Sunset Boulevard", "Open 24 Hours", "Rock and Roll", "Science Fair", "Main Street",
    "Victory", "Quiet Please", "Mega Sale", "Art Gallery", "Yoga Studio", "Tokyo", "Berlin 1989", "Peace",
]
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
         "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono-Bold.ttf"]


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _background(rng, size: int) -> np.ndarray:
    kind = rng.integers(4)
    base = rng.integers(0, 256, 3)
    if kind == 0:  # solid
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == 1:  # vertical gradient
        other = rng.integers(0, 256, 3)
        t = np.linspace(0, 1, size)[:, None, None]
        return np.broadcast_to(base * (1 - t) + other * t, (size, size, 3)).astype(np.float32)
    if kind == 2:  # smooth noise texture
        coarse = rng.normal(0, 40, (8, 8, 3))
        up = np.asarray(Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255))).resize((size, size), Image.BICUBIC))
        return np.clip(base + (up.astype(np.float32) - 128), 0, 255)
    # two colour panels
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32).copy()
    img[:, size // 2:] = rng.integers(0, 256, 3)
    return img


def _contrasting(rng, background_mean: np.ndarray, contrast: float) -> tuple[int, int, int]:
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if abs(float(c.mean()) - float(background_mean.mean())) > contrast:
            return tuple(int(v) for v in c)
    return (0, 0, 0) if background_mean.mean() > 127 else (255, 255, 255)


def _draw(rng, image: np.ndarray, phrase: str, size: int) -> np.ndarray:
    """The phrase in a random font, size, colour, place and (sometimes) angle, blended into the image."""
    font_size = int(rng.integers(14, 84))
    font = ImageFont.truetype(str(_font_dir() / FONTS[rng.integers(len(FONTS))]), font_size)
    while font.getlength(phrase) > size * 0.9 and font_size > 12:
        font_size = int(font_size * 0.85)
        font = ImageFont.truetype(font.path, font_size)
    left, top, right, bottom = font.getbbox(phrase)
    layer = Image.new("L", (size, size), 0)
    x = int(rng.integers(0, max(1, size - (right - left)))) - left
    y = int(rng.integers(0, max(1, size - (bottom - top)))) - top
    ImageDraw.Draw(layer).text((x, y), phrase, font=font, fill=255)
    tilt = rng.random()
    if tilt < 0.35:  # a tilt, mostly slight
        angle = float(rng.uniform(-12, 12) if tilt < 0.25 else rng.uniform(-35, 35))
        cx, cy = x + left + (right - left) / 2, y + top + (bottom - top) / 2
        layer = layer.rotate(angle, resample=Image.BICUBIC, center=(cx, cy))
    alpha = np.asarray(layer, np.float32)[..., None] / 255.0
    contrast = 90.0 if rng.random() < 0.8 else 45.0
    colour = np.asarray(_contrasting(rng, image.reshape(-1, 3).mean(0), contrast), np.float32)
    return image * (1 - alpha) + colour * alpha


def render(seed: int, size: int = 512, blank: bool = False) -> tuple[np.ndarray, str]:
    """A background with the prompt's phrase (and in one image of five a second phrase) drawn on it."""
    rng = np.random.default_rng(seed)
    phrase = PHRASES[rng.integers(len(PHRASES))]
    img = _background(rng, size)
    prompt = f'A sign that says "{phrase}"'
    if blank:
        return np.uint8(np.clip(img, 0, 255)), prompt
    img = _draw(rng, img, phrase, size)
    if rng.random() < 0.2:
        img = _draw(rng, img, PHRASES[rng.integers(len(PHRASES))], size)
    if rng.random() < 0.3:  # mild sensor noise
        img = img + rng.normal(0, 6, img.shape)
    return np.uint8(np.clip(np.round(img), 0, 255)), prompt


def dataset(n: int, seed: int = 0, size: int = 512, blank_every: int = 10):
    """n samples; every `blank_every`-th has no text."""
    return [render(seed * 100003 + i, size, blank=(i % blank_every == blank_every - 1)) for i in range(n)]


def sign(phrase: str, height: int, width: int, font_size: int, xy=(8, 8), font: str = "DejaVuSans.ttf",
         colour=(20, 30, 120), background=(230, 220, 200)) -> np.ndarray:
    """One phrase at a known place: uint8 [height, width, 3]."""
    image = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(image).text(xy, phrase, font=ImageFont.truetype(str(_font_dir() / font), font_size), fill=colour)
    return np.asarray(image)


def rapidocr_engine(preset: str):
    """rapidocr's pipeline, with PaddleOCR 2.9.1's settings for the "paddleocr" preset (its detector size rule,
    normalisation, DB thresholds and corner order); used without the angle classifier (Flow-GRPO:
    use_angle_cls=False), see `rapidocr_read`."""
    from rapidocr_onnxruntime import RapidOCR

    from flowjax.rewards import ocr_boxes

    engine = RapidOCR()
    if preset == "paddleocr":
        det = engine.text_det
        det.limit_side_len, det.limit_type = 960, "max"
        det.mean, det.std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        post = det.postprocess_op
        post.box_thresh, post.unclip_ratio, post.dilation_kernel = 0.6, 1.5, None
        det.order_points_clockwise = ocr_boxes.CORNER_ORDERS["paddleocr"]
    elif preset != "rapidocr":
        raise ValueError(f"unknown preset {preset!r}")
    return engine


def rapidocr_read(engine, image: np.ndarray) -> str:
    """The text rapidocr reads from a uint8 RGB image, joined as flow_grpo/ocr.py joins PaddleOCR's result."""
    result, _ = engine(image, use_cls=False)
    return "" if result is None else "".join(text for _, text, score in result if score > 0)
