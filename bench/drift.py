"""Learning-quality benchmark: drift on real data, recovery by on-device head fine-tuning.

Digits (scikit-learn's bundled set) through the example bundle's int8 backbone. A drift is
applied to the device's inputs (contrast drop: x*0.5+5; also a one-pixel shift, reported
too); the agent's drift monitor (PSI of the confidence distribution against the clean
reference, plus the mean-confidence/entropy score) is fed a clean and a drifted stream, and
the agent's own Learner fine-tunes the head on 50/100/200 labelled drifted samples
(cached features; a fifth held out for the adopt-if-not-worse gate). Also measured: the
inference p99 while a training cycle runs (in the short-lived child process the agent uses,
paced at the default cpu_fraction) vs idle, and peak RSS of the agent and of the trainer.
Never fails on a number; last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.disable(logging.WARNING)

from agent.serving.inference import InferenceEngine  # noqa: E402
from agent.learning import LearnConfig, Learner  # noqa: E402
from agent.learning.drift import DriftConfig, DriftMonitor  # noqa: E402
from agent.learning.trainer import accuracy, logits  # noqa: E402
from controller.modeltools.example import build_example, digits_split  # noqa: E402
from protocol.bundle import load_bundle  # noqa: E402

DRIFTS = {"contrast": lambda x: np.clip(x * 0.5 + 5, 0, 16),
          "shift": lambda x: np.roll(x.reshape(-1, 8, 8), 1, axis=2).reshape(-1, 64)}


def learner_cfg(steps: int) -> LearnConfig:
    return LearnConfig(optimizer="sgd", lr=0.05, max_steps=steps, budget_s=30, min_train=10, min_holdout=2,
                       cpu_fraction=1.0)


def conf_entropy(head, f) -> tuple[np.ndarray, np.ndarray]:
    z = logits(head, f)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p.max(1), -(p * np.log(p + 1e-12)).sum(1)


def drift_signal(head, ref_f, live_f) -> dict:
    """The agent's drift monitor, referenced on clean features, fed a stream of live ones."""
    rc, re_ = conf_entropy(head, ref_f)
    mon = DriftMonitor(float(rc.mean()), float(re_.mean()), DriftConfig(), ref_confidences=rc)
    first = None
    for i, (c, e) in enumerate(zip(*conf_entropy(head, live_f))):
        mon.observe(float(c), float(e))
        if first is None and mon.drifting:
            first = i + 1
    return {"psi": mon.psi, "score": mon.score, "drifting": mon.drifting, "detected_after": first}


def recovery(engine, head, xtr, ytr, xte, yte, drift, ns, steps, work) -> dict:
    feats = lambda x: np.stack([engine.features(xi)[0] for xi in x])  # noqa: E731
    fclean = feats(xte)
    clean = accuracy(head, fclean, yte)
    ftr, fte = feats(drift(xtr)), feats(drift(xte))
    drifted = accuracy(head, fte, yte)
    out = {"clean": round(clean, 4), "drifted": round(drifted, 4)}
    # drift detection: a clean stream (train half) vs the drifted stream, both against the clean test half
    ctl, drf = drift_signal(head, fclean, feats(xtr)), drift_signal(head, fclean, ftr)
    out.update(psi_clean_stream=round(ctl["psi"], 4), psi_drifted_stream=round(drf["psi"], 4),
               false_alarm=ctl["drifting"], drift_detected_after_samples=drf["detected_after"])
    for n in ns:
        lr = Learner(head, 10, learner_cfg(steps), work / f"l{n}", "bench")
        for i in range(n):
            lr.observe(str(i), ftr[i], 0.5, 0.5, int(ytr[i]), 0.0)
        res = lr.run_cycle()
        acc = accuracy(lr.head, fte, yte)
        out[f"after_{n}"] = round(acc, 4)
        out[f"recovered_fraction_at_{n}"] = round((acc - drifted) / max(1e-9, clean - drifted), 3)
        out[f"adopted_{n}"] = res.adopted
    return out


def p99(engine, x, seconds: float) -> tuple[float, int]:
    lat = []
    t_end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        engine.predict(x[i % len(x)])
        lat.append((time.perf_counter() - t) * 1000)
        i += 1
        time.sleep(0.0005)  # a request stream, not a busy loop
    return float(np.percentile(lat, 99)), len(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-drift-"))
    build_example(work / "bundle", "small", epochs=30 if a.quick else 40)
    b = load_bundle(work / "bundle")
    eng = InferenceEngine(b, threads=1)
    xtr, ytr, xte, yte = digits_split()
    steps = 800
    fig: dict = {}
    for name, fn in DRIFTS.items():
        r = recovery(eng, b.head, xtr, ytr, xte, yte, fn, (50, 100, 200), steps, work)
        print(f"{name:>8}: clean {r['clean']:.3f}, drifted {r['drifted']:.3f}, after fine-tuning on 50/100/200 "
              f"labelled: {r['after_50']:.3f} / {r['after_100']:.3f} / {r['after_200']:.3f} "
              f"(recovered {r['recovered_fraction_at_200']:.0%} of the loss at 200); drift monitor PSI "
              f"{r['psi_drifted_stream']:.3f} (clean stream {r['psi_clean_stream']:.3f}), flagged after "
              f"{r['drift_detected_after_samples']} samples")
        fig[name] = r
    fig["recovered_fraction_at_200"] = fig["contrast"]["recovered_fraction_at_200"]
    fig["recovered_fraction_at_200_shift"] = fig["shift"]["recovered_fraction_at_200"]

    # inference latency while the learner trains in its worker thread, vs idle
    secs = 3.0 if a.quick else 8.0
    xs = DRIFTS["contrast"](xte)
    idle, n_idle = p99(eng, xs, secs)
    # the agent's default pacing (learning.cpu_fraction = 0.25), training for the whole window
    lr = Learner(b.head, 10, LearnConfig(max_steps=10**6, budget_s=secs + 1, min_train=10, min_holdout=2,
                                         cpu_fraction=0.25, buffer_bytes=4 << 20), work / "bg", "bench")
    f = np.stack([eng.features(xi)[0] for xi in DRIFTS["contrast"](xtr)])
    for i in range(len(f)):
        lr.observe(str(i), f[i], 0.5, 0.5, int(ytr[i]), 0.0)
    th = threading.Thread(target=lr.run_cycle, name="train")
    th.start()
    time.sleep(0.05)
    busy, n_busy = p99(eng, xs, secs)
    th.join()
    steps_done = lr.last.steps if lr.last else 0
    fig.update(p99_idle_ms=round(idle, 4), p99_training_ms=round(busy, 4),
               p99_ratio_training_vs_idle=round(busy / idle, 3), training_steps_during_measurement=steps_done,
               inferences_measured=n_idle + n_busy,
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               trainer_child_peak_rss_mb=lr.child_peak_rss_mb,
               buffer_bytes=lr.buffer.nbytes)
    print(f"inference p99 idle {idle:.3f} ms, while training ({steps_done} steps) {busy:.3f} ms: "
          f"ratio {busy / idle:.2f}; peak RSS {fig['peak_rss_mb']} MB + trainer child "
          f"{fig['trainer_child_peak_rss_mb']} MB (replay buffer {lr.buffer.nbytes // 1024} KB)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
