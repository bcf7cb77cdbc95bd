"""Which float layers a bundle federates (SwarmModelPatch's idea: train a few, freeze the rest).

A bundle's head file is a small float MLP (``dense{i}.weight``/``dense{i}.bias``, ReLU between)
on top of the frozen backbone. The manifest may name the layers boards train and rounds carry:

    "trainable": ["dense1", "dense2"]

(read through ``Manifest.raw``; no manifest change is needed). Without it every head layer is
trainable, as before. The others are frozen on the board: tasks, updates, global heads and the
heads a run rolls out carry exactly the trainable tensors; ``merge`` puts them back on the
frozen layers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

Head = dict[str, np.ndarray]


class LayerError(ValueError):
    """A ``trainable`` declaration or a partial head that does not fit the bundle's head."""


def layer_names(head: Mapping[str, np.ndarray]) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in head}, key=lambda n: int(n[5:]) if n[5:].isdigit() else -1)


def trainable_tensors(raw_manifest: Mapping[str, Any] | None, head: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The tensor names federated for ``head`` under the manifest's ``trainable`` (all by default)."""
    layers = layer_names(head)
    decl = (raw_manifest or {}).get("trainable")
    if decl is None:
        return tuple(sorted(head))
    if not isinstance(decl, list) or not decl or not all(isinstance(x, str) for x in decl):
        raise LayerError("manifest 'trainable' must be a non-empty list of layer names, e.g. [\"dense1\"]")
    unknown = [x for x in decl if x not in layers]
    if unknown:
        raise LayerError(f"manifest 'trainable' names {unknown}, the head has layers {layers}")
    return tuple(sorted(k for k in head if k.rsplit(".", 1)[0] in decl))


def federated(head: Mapping[str, np.ndarray], names: tuple[str, ...]) -> Head:
    return {k: np.asarray(head[k], np.float32) for k in names}


def merge(full: Mapping[str, np.ndarray], part: Mapping[str, np.ndarray]) -> Head:
    """``full`` with the tensors of ``part`` replaced; refuses unknown names or other shapes."""
    extra = sorted(set(part) - set(full))
    if extra:
        raise LayerError(f"tensors {extra} are not in the head ({sorted(full)})")
    for k, v in part.items():
        if np.shape(v) != np.shape(full[k]):
            raise LayerError(f"{k}: shape {list(np.shape(v))} != {list(np.shape(full[k]))}")
    return {k: np.asarray(part.get(k, v), np.float32) for k, v in full.items()}


def federated_head_of(path: str | Path) -> Head:
    """The federated part of a bundle's head (a bundle directory), or a whole head ``.npz``."""
    from .bundle import load_bundle, load_head

    p = Path(path)
    if p.is_dir():
        b = load_bundle(p)
        if b.head is None:
            raise LayerError(f"{p}: the bundle has no float head to federate")
        return federated(b.head, trainable_tensors(b.manifest.raw, b.head))
    return load_head(p)
