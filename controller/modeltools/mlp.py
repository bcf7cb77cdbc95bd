"""A small numpy MLP trainer (Adam, ReLU, softmax cross-entropy) used to build example models.

Kept here, not in the agent: the agent's on-device learner trains only the head.
"""
from __future__ import annotations

import numpy as np


def init_mlp(sizes: list[int], rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    return [((rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32), np.zeros(b, np.float32))
            for a, b in zip(sizes[:-1], sizes[1:])]


def forward(layers, x: np.ndarray, relu_last: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    acts = [x]
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1 or relu_last:
            x = np.maximum(x, 0)
        acts.append(x)
    return x, acts


def train_mlp(layers, x: np.ndarray, y: np.ndarray, epochs: int, rng: np.random.Generator, lr: float = 1e-3,
              batch: int = 64, weight_decay: float = 1e-5) -> list[float]:
    """Adam over minibatches; returns the mean loss per epoch. Updates ``layers`` in place."""
    m = [(np.zeros_like(w), np.zeros_like(b)) for w, b in layers]
    v = [(np.zeros_like(w), np.zeros_like(b)) for w, b in layers]
    b1, b2, eps, t = 0.9, 0.999, 1e-8, 0
    losses = []
    n = len(x)
    for _ in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            xb, yb = x[idx], y[idx]
            logits, acts = forward(layers, xb)
            z = logits - logits.max(1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(1, keepdims=True)
            total += float(-np.log(p[np.arange(len(yb)), yb] + 1e-12).sum())
            g = p
            g[np.arange(len(yb)), yb] -= 1
            g /= len(yb)
            t += 1
            for i in range(len(layers) - 1, -1, -1):
                w, b = layers[i]
                gw = acts[i].T @ g + weight_decay * w
                gb = g.sum(0)
                if i > 0:
                    g = (g @ w.T) * (acts[i] > 0)
                for j, (param, grad) in enumerate(((w, gw), (b, gb))):
                    mm, vv = m[i][j], v[i][j]
                    mm *= b1
                    mm += (1 - b1) * grad
                    vv *= b2
                    vv += (1 - b2) * grad * grad
                    param -= lr * (mm / (1 - b1 ** t)) / (np.sqrt(vv / (1 - b2 ** t)) + eps)
        losses.append(total / n)
    return losses


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())
