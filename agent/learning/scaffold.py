"""SCAFFOLD's client side (Karimireddy et al. 2020, Algorithm 1, option II).

The device keeps its own control variate cᵢ (zeros at first) across rounds *and restarts*: one
file, ``scaffold.npz``, replaced atomically (temp file, fsync, ``os.replace``), tied to the bundle
it was computed for and to a checksum of its bytes. A file that is corrupt, truncated, for
another bundle or of other shapes is refused with the reason and cᵢ restarts from zeros —
SCAFFOLD stays correct (cᵢ = 0 is its own initialisation), only its variance reduction restarts.

Per round: every local gradient g is corrected to g − cᵢ + c (``correction`` = c − cᵢ, handed to
the trainer); after K local steps of rate η from x to y,
    cᵢ⁺ = cᵢ − c + (x − y) / (K η),      Δcᵢ = cᵢ⁺ − cᵢ,
and the update carries Δy = y − x and Δcᵢ (``cv.<name>``). With heavy-ball momentum β the
local steps move at η/(1−β) each, so that is the η to give ``new_control``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from . import boundstate

Head = dict[str, np.ndarray]
CV = "cv."
FILE = "scaffold.npz"


class ScaffoldStateError(ValueError):
    """The stored control variate cannot be used (the reason says why); start from zeros."""


def split_task(tensors: Mapping[str, np.ndarray]) -> tuple[Head, Head]:
    """(global head x, server control variate c) from a SCAFFOLD task's tensors."""
    head = {k: np.asarray(v, np.float32) for k, v in tensors.items() if not k.startswith(CV)}
    c = {k[len(CV):]: np.asarray(v, np.float32) for k, v in tensors.items() if k.startswith(CV)}
    if set(c) != set(head):
        raise ValueError(f"SCAFFOLD task: control variate tensors {sorted(c)} != head tensors {sorted(head)}")
    for k in head:
        if c[k].shape != head[k].shape:
            raise ValueError(f"SCAFFOLD task: {CV}{k} shape {list(c[k].shape)} != {list(head[k].shape)}")
    return head, c


def correction(c: Mapping[str, np.ndarray], ci: Mapping[str, np.ndarray]) -> Head:
    """c − cᵢ: added to every local gradient."""
    return {k: (np.asarray(c[k], np.float32) - np.asarray(ci[k], np.float32)).astype(np.float32) for k in c}


def new_control(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray],
                ci: Mapping[str, np.ndarray], steps: int, lr: float) -> tuple[Head, Head]:
    """Option II: (cᵢ⁺, Δcᵢ) after ``steps`` local steps of rate ``lr`` from ``x`` to ``y``."""
    if steps < 1 or lr <= 0:
        raise ValueError("SCAFFOLD needs steps >= 1 and lr > 0")
    new = {k: (np.asarray(ci[k], np.float64) - np.asarray(c[k], np.float64)
               + (np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64)) / (steps * lr)).astype(np.float32)
           for k in x}
    return new, {k: (new[k] - np.asarray(ci[k], np.float32)).astype(np.float32) for k in x}


def update_tensors(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], dci: Mapping[str, np.ndarray]) -> Head:
    """What a SCAFFOLD update carries: Δy under the head's names, Δcᵢ under ``cv.<name>``."""
    out = {k: (np.asarray(y[k], np.float32) - np.asarray(x[k], np.float32)).astype(np.float32) for k in x}
    out.update({CV + k: np.asarray(v, np.float32) for k, v in dci.items()})
    return out


class ControlStore:
    """cᵢ of this device for one bundle, on disk."""

    def __init__(self, directory: str | Path, bundle_id: str) -> None:
        self.path = Path(directory) / FILE
        self.bundle_id = bundle_id

    def load(self, shapes: Mapping[str, tuple[int, ...]]) -> Head:
        """The stored cᵢ; raises ``ScaffoldStateError`` (with why) if it cannot be used, and
        returns zeros if there is none yet."""
        if not self.path.exists():
            return {k: np.zeros(s, np.float32) for k, s in shapes.items()}
        try:
            arrays = boundstate.read(self.path, self.bundle_id, "ci/")
        except boundstate.BoundStateError as exc:
            raise ScaffoldStateError(str(exc)) from None
        if {k: tuple(v.shape) for k, v in arrays.items()} != {k: tuple(s) for k, s in shapes.items()}:
            raise ScaffoldStateError(f"{self.path.name}: tensors {sorted(arrays)} do not match the head")
        if not all(np.all(np.isfinite(v)) for v in arrays.values()):
            raise ScaffoldStateError(f"{self.path.name}: NaN or inf values")
        return arrays

    def load_or_reset(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Head, str | None]:
        """(cᵢ, None), or (zeros, the reason the stored one was refused)."""
        try:
            return self.load(shapes), None
        except ScaffoldStateError as exc:
            return {k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(exc)

    def save(self, ci: Mapping[str, np.ndarray]) -> None:
        boundstate.write(self.path, ci, self.bundle_id, "ci/")
