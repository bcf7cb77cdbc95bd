"""Turn what a person has (an image file, an .npy, JSON) into the tensors a bundle's input takes.

Pure apart from reading the file; Pillow (the ``tools`` extra) is imported only for ``--image``.
A mismatch we cannot fix by resizing or converting is refused with a message naming the input,
its declared shape and dtype, and what was given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


class TensorInputError(ValueError):
    """The file cannot become the model's input; the message says why."""


def _layout(shape: Sequence[int | None]) -> tuple[int, int, int, str]:
    """(height, width, channels, "nhwc"|"nchw") of an image input spec, or TensorInputError."""
    dims = list(shape[1:]) if len(shape) == 4 else list(shape)
    if len(dims) != 3 or any(d is None for d in dims):
        raise TensorInputError(f"shape {list(shape)} is not an image (H, W, C or C, H, W with static sizes)")
    a, b, c = (int(d) for d in dims)  # type: ignore[arg-type]
    if c in (1, 3, 4):
        return a, b, c, "nhwc"
    if a in (1, 3, 4):
        return b, c, a, "nchw"
    raise TensorInputError(f"shape {list(shape)} has no channel dimension of 1, 3 or 4")


def image_tensor(path: str | Path, spec: Mapping[str, Any]) -> np.ndarray:
    """An image file resized and converted to ``spec`` (a manifest tensor spec: name, shape,
    dtype, min, max): RGB/L/RGBA by the channel count, H×W by the shape, NHWC or NCHW, uint8
    as is, float scaled into [min, max] when the spec gives a range within [-1, 1] (else 0..255)."""
    try:
        from PIL import Image
    except ImportError:
        raise TensorInputError("--image needs Pillow: pip install 'edgefleet[tools]'") from None
    name, shape, dtype = spec.get("name", "input"), list(spec.get("shape") or []), spec.get("dtype", "float32")
    try:
        h, w, c, layout = _layout(shape)
    except TensorInputError as exc:
        raise TensorInputError(f"the model's input {name!r}: {exc}; give --npy or --input instead") from None
    if dtype not in ("uint8", "int8", "float32", "float16"):
        raise TensorInputError(f"the model's input {name!r} is {dtype}; an image can become uint8 or float only")
    try:
        with Image.open(path) as im:
            im = im.convert({1: "L", 3: "RGB", 4: "RGBA"}[c]).resize((w, h), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise TensorInputError(f"{path}: not an image Pillow can read: {exc}") from None
    a = a.reshape(h, w, c)
    if layout == "nchw":
        a = a.transpose(2, 0, 1)
    if dtype == "uint8":
        out: np.ndarray = a
    elif dtype == "int8":
        out = (a.astype(np.int16) - 128).astype(np.int8)
    else:
        lo, hi = spec.get("min"), spec.get("max")
        f = a.astype(np.float32)
        if lo is not None and hi is not None and -1.0 <= lo < hi <= 1.0:
            f = lo + f / 255.0 * (hi - lo)
        out = f.astype(dtype)
    return out.reshape([1] + list(out.shape)) if len(shape) == 4 else out


def npy_tensor(path: str | Path, row: int | None) -> np.ndarray:
    """An .npy array (no pickles): ``row`` picks one sample of a stack; float64 becomes float32
    (numpy's default, almost never what a model takes)."""
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TensorInputError(f"{path}: {exc}") from None
    if row is None and a.ndim == 2 and a.shape[0] > 1:
        row = 0                                # a table of vectors: its first row (the old behaviour)
    if row is not None:
        if a.ndim < 1 or row >= a.shape[0]:
            raise TensorInputError(f"{path}: row {row} is out of range for shape {list(a.shape)}")
        a = a[row]
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    if a.dtype.kind not in "biuf":
        raise TensorInputError(f"{path}: dtype {a.dtype} is not numeric")
    return np.ascontiguousarray(a)
