"""What an offload worker computes for features sent from an exit or through a bottleneck.

A feature request from a bundle with exits names its split: ``split`` (the backbone and the cut
tensor, ``protocol.exits.split_tag``) and ``exit`` (which exit's tensor it carries). With
``codec: int8+zstd`` it carries the bottleneck code and names the encoder/decoder pair
(``bottleneck``); the worker runs its decoder, then the segments after the cut, then the head.
Without a codec it carries the exit's tensor as uint8 with ``scale``; the worker runs the
segments after that exit. Anything that does not match this worker's bundle is refused with a
reason code, so the board answers locally and counts it:

* ``split_mismatch`` — features from another backbone or cut (another split version),
* ``decoder_mismatch`` — a code from another encoder than this worker's decoder was trained with,
* ``bad_input`` — the tensor does not have the shape the decoder or segment takes.

The worker advertises what it computes in its status (``accepts.splits``): ``split`` for plain
exit features and ``split+pair`` for bottleneck codes, so a board routes codes only to a worker
with the matching decoder; the refusals catch what still arrives (a stale route, an unrouted
request).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from protocol.bundle import Bundle, head_forward, softmax
from protocol.exits import split_tag


class TailRefused(ValueError):
    """A feature request this worker will not compute; ``code`` is the reply's reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class TailModel:
    """The segments after each exit (and the decoder at the bottleneck) of one bundle."""

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        m = bundle.manifest
        self.bundle = bundle
        self.exits = m.exits
        self.head = bundle.head
        sha = m.files[str(m.file("backbone"))].sha256
        self.tags = [split_tag(sha, e.tensor) for e in m.exits]
        self.segments = [_session(bundle.path / s, threads) for s in m.segments]
        self.seg_in = [(s.get_inputs()[0].name, s.get_inputs()[0].shape) for s in self.segments]
        self.bottleneck = m.bottleneck
        self.decoder = _session(bundle.path / m.bottleneck.decoder, threads) if m.bottleneck else None
        self.cut = next((k for k, e in enumerate(m.exits) if m.bottleneck and e.tensor == m.bottleneck.at), None)

    def splits(self) -> list[str]:
        """The splits this worker computes, as a board names them (``routing_split``)."""
        out = list(self.tags)
        if self.bottleneck is not None and self.cut is not None:
            out.append(f"{self.tags[self.cut]}+{self.bottleneck.id}")
        return out

    def check(self, body: dict[str, Any]) -> int:
        """The exit index of a request this worker can compute, or TailRefused (no tensor needed)."""
        k = body.get("exit")
        if k is None and body.get("split") in self.tags:   # the split names the exit
            k = self.tags.index(body["split"])
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.exits):
            raise TailRefused("split_mismatch", f"exit {k!r} is not one of this worker's {len(self.exits)} exit(s)")
        if body.get("split") != self.tags[k]:
            raise TailRefused("split_mismatch", f"features for another split than this worker's "
                                                f"({self.exits[k].tensor!r} of its backbone)")
        codec = body.get("codec")
        if codec is not None:
            bn = self.bottleneck
            if bn is None or self.decoder is None or k != self.cut:
                raise TailRefused("decoder_mismatch", f"this worker has no decoder for a {codec} code at exit {k}")
            if codec != bn.codec or body.get("bottleneck") != bn.id:
                raise TailRefused("decoder_mismatch", f"code from encoder pair {body.get('bottleneck')!r}; this "
                                                      f"worker's decoder is pair {bn.id!r}")
        return k

    def answer(self, x: np.ndarray, body: dict[str, Any]) -> tuple[int, float]:
        k = self.check(body)
        codec = body.get("codec")
        if codec is not None:
            bn = self.bottleneck
            assert bn is not None and self.decoder is not None
            code = x if x.ndim == 4 else x.reshape((1,) + tuple(x.shape))
            if code.dtype != np.int8 or tuple(code.shape[1:]) != tuple(bn.code_shape):
                raise TailRefused("bad_input", f"code {code.dtype.name} {list(code.shape)}; the decoder takes int8 "
                                               f"[N, {', '.join(map(str, bn.code_shape))}]")
            h = self.decoder.run(None, {"code": code})[0]
        else:
            name, shape = self.seg_in[k + 1]
            want = tuple(int(d) for d in shape[1:] if isinstance(d, int))
            if int(np.prod(want)) != x.size or len(want) != len(shape) - 1:
                raise TailRefused("bad_input", f"features have {x.size} values; exit {k}'s tensor is {list(want)}")
            h = x.astype(np.float32).reshape((1,) + want) * np.float32(body["scale"])
        for s, (name, _) in zip(self.segments[k + 1:], self.seg_in[k + 1:]):
            h = s.run(None, {name: h})[0]
        probs = softmax(head_forward(self.head, h.reshape(1, -1))[0]) if self.head else softmax(h.reshape(-1))
        j = int(probs.argmax())
        return j, float(probs[j])
