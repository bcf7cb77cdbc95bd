"""Real pretrained models that pip-installed packages ship inside their wheels, and data for them.

Used by the tests and ``bench/byo_model.py`` (nothing is downloaded at run time):

* ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` — PaddleOCR's text-orientation classifier (0° / 180°),
  exported by paddle2onnx (Constant weights, dynamic dims, an Identity tail), in the
  ``rapidocr-onnxruntime`` wheel. Found through the distribution's file list: the package itself
  is never imported (it imports OpenCV).
* ``logreg_iris.onnx`` — an ``ai.onnx.ml`` LinearClassifier + ZipMap, in the ``onnxruntime`` wheel.

``text_orientation_set`` renders real text lines with Pillow's bundled font (upright = 0, turned
180° = 1) and preprocesses them as PaddleOCR does (height 48, width padded to 192, [-1, 1]).
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

OCR_CLS = ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
IRIS = ("onnxruntime", "onnxruntime/datasets/logreg_iris.onnx")
OCR_SHAPE = (3, 48, 192)


def wheel_file(dist: str, relpath: str) -> Path:
    """A file a distribution installed, or FileNotFoundError saying which package to install."""
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{relpath}: install {dist!r} (pip install 'edgefleet[test]')") from None
    p = Path(str(d.locate_file(relpath)))
    if not p.exists():
        raise FileNotFoundError(f"{relpath}: not in the installed {dist} {d.version}")
    return p


def ocr_cls_model() -> Path:
    return wheel_file(*OCR_CLS)


def iris_model() -> Path:
    return wheel_file(*IRIS)


_WORDS = ("edge fleet model bundle quantize agent broker serial camera sensor packet update round "
          "federated latency orientation invoice total amount date number street city station meter "
          "temperature pressure voltage order parcel label batch line shift ok 2026 1234 A17 B-52").split()


def _render(text: str, rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(18, 30))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a bitmap font with no size
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
    pad = int(rng.integers(2, 8))
    img = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad),
                    tuple(int(v) for v in rng.integers(200, 256, 3)))
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, font=font,
                             fill=tuple(int(v) for v in rng.integers(0, 70, 3)))
    return img


def preprocess_cls(img) -> np.ndarray:
    """PaddleOCR's classifier input: resize to height 48 (width ≤ 192), pad right, scale to [-1, 1]."""
    from PIL import Image

    c, h, w = OCR_SHAPE
    ratio = img.width / img.height
    rw = min(w, max(1, int(np.ceil(h * ratio))))
    a = np.asarray(img.convert("RGB").resize((rw, h), Image.BILINEAR), np.float32) / 255.0
    a = (a - 0.5) / 0.5
    out = np.zeros((c, h, w), np.float32)
    out[:, :, :rw] = a.transpose(2, 0, 1)
    return out


def text_orientation_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n text-line images [n, 3, 48, 192] and labels (0 upright, 1 turned 180°), balanced."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        words = rng.choice(_WORDS, int(rng.integers(2, 5)))
        img = _render(" ".join(words), rng)
        label = i % 2
        if label:
            img = img.rotate(180)
        xs.append(preprocess_cls(img))
        ys.append(label)
    return np.stack(xs), np.asarray(ys, np.int64)
