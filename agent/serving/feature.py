"""Model serving on the agent: the model store, inference requests, streaming sources, results.

Wiring only: the engine (``agent.serving.inference``) does the maths, ``protocol.bundle``
verifies files, ``agent.updates.modelstore`` installs versions A/B, sources produce samples and
``agent.serving.results`` decides what to publish. A bad request gets a clear error reply and
the next one is served normally; a bad bundle is refused and the agent keeps what it had.

Siblings come in explicitly: ``resolver`` (the offload feature) decides per prediction whether
the answer is local or remote; observers and taps are how learning, the MCU bridge and the
live-shadow gate see served predictions.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from protocol.binary import Frame
from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message

from ..core.config import ConfigError
from ..core.context import AgentContext, CommandError, Feature
from .inference import InferenceEngine, InputError, Prediction
from .results import ResultsLimiter

if TYPE_CHECKING:  # pragma: no cover
    from ..updates.modelstore import ModelStore

log = logging.getLogger("edge_agent.serving")


class Resolver(Protocol):
    """Who decides, per prediction, which answer is returned (the offload feature)."""

    @property
    def enabled(self) -> bool: ...

    async def resolve(self, pred: Prediction, x: Any, local: dict[str, Any],
                      deadline_ms: float | None = None) -> dict[str, Any]: ...


def prediction_body(pred: Prediction, path: str = "local") -> dict[str, Any]:
    return {"label": pred.label, "label_name": pred.label_name, "confidence": round(pred.confidence, 5),
            "entropy": round(pred.entropy, 5), "latency_ms": round(pred.latency_ms, 4), "path": path}


class Serving(Feature):
    """Owns the serving engine; swaps it atomically when a new version is installed."""

    name = "model"

    def __init__(self, ctx: AgentContext, runtimes: list[str] | None = None,
                 resolver: Resolver | None = None) -> None:
        self.ctx = ctx
        self.runtimes = list(runtimes or [])
        self.resolver = resolver
        self.engine: InferenceEngine | None = None
        self.store: "ModelStore | None" = None
        self.requests = 0
        self.request_errors = 0
        self.load_error: str | None = None
        inf = ctx.cfg.inference
        self.results = ResultsLimiter(inf.results, inf.results_interval_s, inf.max_results_per_s)
        #: called with (sample id, prediction, label) for every streamed or requested inference
        self.observers: list[Callable[[str, Prediction, int | None], None]] = []
        self.sources: list[Any] = []
        self.bundle_sha256: str | None = None
        self.source: Any = None
        #: called with (input, label) for every served prediction (agent.shadow collects live inputs)
        self.taps: list[Callable[[Any, int], None]] = []
        self.observers.append(self._exit_observed)

    # -- early exits (agent/serving/exits.py) ---------------------------------
    def _offload_may_follow(self) -> bool:
        r = self.resolver
        return r is not None and r.enabled and getattr(getattr(r, "policy", None), "mode", None) == "features"

    def _exit_observed(self, _id: str, pred: Prediction, label: int | None) -> None:
        eng = self.engine
        if eng is not None and eng.exits is not None and label is not None:
            eng.exits.observe(pred, label)

    async def _resolved(self, pred: Prediction, x: Any, result: dict[str, Any],
                        deadline_ms: float | None = None, label: Any = None) -> dict[str, Any]:
        """The resolver's answer; a request that stopped at the bottleneck's exit for a possible
        offload and was not answered remotely is finished locally (its path and reason kept)."""
        assert self.resolver is not None
        out = await self.resolver.resolve(pred, x, result, deadline_ms)
        if pred.resume is None or out.get("path") == "remote":
            return out
        full = pred.resume()
        if label is not None and self.engine is not None and self.engine.exits is not None:
            self.engine.exits.observe(full, label)
        extra = {k: v for k, v in out.items() if k in ("path", "offload_error", "offload_reason", "low_confidence",
                                                       "offload_skipped")}
        body = prediction_body(full)
        body["latency_ms"] = round(pred.latency_ms + full.latency_ms, 4)
        return {**body, **extra}

    # -- declarations ------------------------------------------------------
    def commands(self) -> dict[str, Any]:
        return {"model.describe": self._cmd_describe, "model.rollback": self._cmd_rollback}

    def request_kinds(self) -> dict[str, Any]:
        return {"infer.request": self.handle_request}

    def telemetry(self) -> dict[str, Any]:
        return self.metrics()

    def state_fields(self) -> dict[str, Any]:
        info = self.model_info()
        return {"model": info} if info else {}

    def tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        out: list[tuple[str, Callable[[], Awaitable[None]]]] = [("results", self.summary_ticker)]
        if self.source is not None:
            src = self.source
            out.append(("source", lambda: self.run_source(src)))
        return out

    # -- model lifecycle -------------------------------------------------
    def start(self) -> None:
        """Open the store, install the configured first bundle if needed, serve ``current``;
        build the configured sample source."""
        from .sources import SourceError

        self.open_store()
        try:
            self.source = make_source(self.ctx.cfg)
        except SourceError as exc:
            raise ConfigError(f"inference: {exc}") from None

    def open_store(self) -> None:
        from ..updates.modelstore import ModelStore

        cfg = self.ctx.cfg
        self.store = ModelStore(Path(cfg.state.dir) / "models", keep=cfg.model.keep_versions)
        for note in self.store.recover():
            log.warning("model store: %s", note)
        if cfg.model.bundle and not Path(cfg.model.bundle).is_dir():
            log.warning("model.bundle %s does not exist (or is not a directory): %s", cfg.model.bundle,
                        "serving the installed model" if self.store.current else "serving no model")
        elif cfg.model.bundle and self.store.current is None:
            res = self.store.install_bundle_dir(cfg.model.bundle, health=self.health_check)
            self.ctx.emit_event("model.installed" if res.ok else "model.refused", "info" if res.ok else "error",
                                  version=res.version, reason=res.reason, source=cfg.model.bundle)
            if not res.ok:
                self.load_error = res.reason
                log.error("refused the configured bundle %s: %s; serving no model", cfg.model.bundle, res.reason)
        self.load_current()

    def load_current(self) -> bool:
        from protocol.bundle import BundleError, load_bundle

        cur = self.store.current if self.store else None
        if cur is None:
            return False
        from .health import model_problems

        try:
            engine = InferenceEngine(load_bundle(cur), threads=self.ctx.cfg.model.threads,
                                     providers=list(self.ctx.cfg.model.providers) or None)
            problems = model_problems(engine)
            for p in problems:
                if p.severity != "error":
                    log.warning("%s: %s", cur.name, p)
            bad = [str(p) for p in problems if p.severity == "error"]
            if bad:
                raise ValueError(f"manifest does not match its model: {'; '.join(bad)}")
        except (BundleError, ValueError, RuntimeError) as exc:
            self.load_error = f"{cur.name}: {exc}"
            self.ctx.counters.reject("bad_bundle")
            log.error("cannot serve %s: %s", cur.name, exc)
            self.ctx.emit_event("model.refused", "error", dir=cur.name, reason=str(exc))
            return False
        if engine.exits is not None:   # stop at the bottleneck's exit only when an offload may follow
            engine.exits.stop_at_cut = self._offload_may_follow
        self.engine, self.load_error = engine, None
        try:
            from protocol.patch import bundle_id

            self.bundle_sha256 = bundle_id(cur)
        except Exception:  # noqa: BLE001 - informational only
            self.bundle_sha256 = None
        m = engine.bundle.manifest
        log.info("serving %s %s (%s)", m.name, m.version, engine.runtime.name)
        return True

    def health_check(self, staged: Path) -> dict[str, Any]:
        """Check a staged version against the serving one; its figures, or RuntimeError with the reason."""
        from .health import Unhealthy, check_bundle

        try:
            figures = check_bundle(staged, self.ctx.cfg.model.threads, current=self.engine)
        except Unhealthy as exc:
            raise RuntimeError(str(exc)) from None
        mc = self.ctx.cfg.model
        if mc.shadow_live_samples > 0 and self.engine is not None:
            figures.update(self._live_shadow(staged, mc.shadow_live_samples, mc.shadow_live_window_s,
                                             mc.shadow_min_agreement))
        log.info("staged %s healthy: %s", staged.name, figures)
        return figures

    def own_health_check(self, target: Path) -> dict[str, Any]:
        """The target's own gate (loads, reference outputs, its eval baseline, no comparison with the
        serving model): for an allowed downgrade, where differing from the serving model is the point."""
        from .health import Unhealthy, check_bundle

        try:
            figures = check_bundle(target, self.ctx.cfg.model.threads, current=None)
        except Unhealthy as exc:
            raise RuntimeError(str(exc)) from None
        log.info("kept %s healthy on its own checks: %s", target.name, figures)
        return figures

    def switch_gate(self, target: Path) -> Callable[[Path], dict[str, Any]]:
        """The gate for switching to a version kept in the store: the full one (shadow evaluation and
        live shadow against the serving model) when the target is newer, its own checks when older."""
        from protocol.patch import PatchError, read_manifest, version_key

        cur = self.store.current if self.store else None
        try:
            newer = cur is None or version_key(read_manifest(target)["version"]) > \
                version_key(read_manifest(cur)["version"])
        except PatchError:
            newer = True
        return self.health_check if newer else self.own_health_check

    def _live_shadow(self, staged: Path, n: int, window_s: float, min_agreement: float) -> dict[str, Any]:
        """Runs in the installer's thread: collect live inputs, then let the candidate answer them."""
        from protocol.bundle import load_bundle

        from .shadow import LiveSample, live_agreement

        sample = LiveSample(n)
        self.taps.append(sample.tap)
        try:
            items = sample.wait(window_s)
        finally:
            self.taps.remove(sample.tap)
        candidate = InferenceEngine(load_bundle(staged), threads=self.ctx.cfg.model.threads)
        agree = live_agreement(lambda x: candidate.predict(x).label, items)
        out = {"live_samples": len(items), "live_agreement": None if agree is None else round(agree, 5)}
        if agree is not None and agree < min_agreement:
            raise RuntimeError(f"live shadow: agrees with the serving model on {agree:.1%} of {len(items)} live "
                               f"inputs (< {min_agreement:.0%})")
        return out

    def model_info(self) -> dict[str, Any] | None:
        if self.engine is None:
            return None
        m = self.engine.bundle.manifest
        info: dict[str, Any] = {"name": m.name, "version": m.version, "runtime": self.engine.runtime.name,
                                "labels": len(m.labels), "head_version": self.engine.head_version,
                                "bundle_sha256": self.bundle_sha256}
        if self.store is not None:
            info["installed"] = self.store.installed()
        return info

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "request_errors": self.request_errors}
        if self.engine is not None:
            out.update(self.engine.metrics())
        if self.load_error:
            out["load_error"] = self.load_error
        for src in self.sources:
            for attr in ("bad", "dropped"):
                v = getattr(src, attr, None)
                if v:
                    out.setdefault("source_" + attr, 0)
                    out["source_" + attr] += sum(v.values()) if isinstance(v, dict) else int(v)
        return out

    # -- inference ---------------------------------------------------------
    def predict(self, x: Any) -> Prediction:
        if self.engine is None:
            raise LookupError(f"no model loaded on this device{': ' + self.load_error if self.load_error else ''}")
        pred = self.engine.predict(x)
        for tap in self.taps:
            tap(x, pred.label)
        return pred

    def refuse(self, env: Envelope, msg: Message, reason: str, error: str) -> None:
        """Every refused or failed request gets an error reply with a reason code."""
        self.request_errors += 1
        self.ctx.counters.reject("bad_request" if reason not in ("internal", "no_model") else reason)
        self.ctx.reply(env, msg, {"ok": False, "reason": reason, "error": error,
                                  "request_id": env.corr or env.id})

    async def handle_request(self, req: "Envelope | Frame", msg: Message) -> None:
        """``infer.request`` as JSON (``x`` or ``inputs``) or as a binary frame (tensors by input
        name; a single-input model takes any one tensor)."""
        self.requests += 1
        env = req.envelope if isinstance(req, Frame) else req
        if isinstance(req, Frame) and req.tensors:
            inputs: Any = req.tensors
        elif "inputs" in env.body and env.body["inputs"] is not None:
            inputs = env.body["inputs"]
        elif env.body.get("x") is not None:
            inputs = env.body["x"]
        else:
            self.refuse(env, msg, "missing_input", "the request carries no input: body.x, body.inputs "
                                                   "or the tensors of a binary frame")
            return
        engine = self.engine
        if engine is None:
            self.refuse(env, msg, "no_model", f"no model loaded on this device"
                                              f"{': ' + self.load_error if self.load_error else ''}")
            return
        try:
            ans = engine.answer(inputs)
        except InputError as exc:
            self.refuse(env, msg, exc.reason, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the runtime's own failure: say so, keep serving
            log.exception("inference failed inside %s", engine.runtime.name)
            self.refuse(env, msg, "internal", f"inference failed: {type(exc).__name__}: {exc}"[:500])
            return
        pred = ans.prediction
        if pred is None:
            result = {**ans.result, "latency_ms": round(ans.latency_ms, 4), "path": "local"}
            self.ctx.reply(env, msg, {"ok": True, "request_id": env.corr or env.id, "result": result})
            return
        x = inputs if not isinstance(inputs, dict) or len(inputs) != 1 else next(iter(inputs.values()))
        for tap in self.taps:
            tap(x, pred.label)
        label = env.body.get("label")
        for fn in self.observers:
            fn(env.corr or env.id, pred, label)
        result = prediction_body(pred)
        if self.resolver is not None:
            result = await self._resolved(pred, x, result, env.body.get("deadline_ms"), label)
        else:
            result = {**result, "path": "local"}
        result["task"], result["top_k"] = "classify", ans.result["top_k"]
        self.ctx.reply(env, msg, {"ok": True, "request_id": env.corr or env.id, "result": result})

    async def run_source(self, source: Any) -> None:
        """Consume a streaming source: predict, tell observers, publish results as configured."""
        self.sources.append(source)
        topic = self.ctx.topics.results(self.ctx.device_id)
        async for sample in source:
            try:
                pred = self.predict(sample.x)
            except (InputError, LookupError) as exc:
                self.ctx.counters.reject("bad_sample")
                log.debug("sample %s rejected: %s", sample.id, exc)
                continue
            for fn in self.observers:
                fn(sample.id, pred, sample.label)
            result = prediction_body(pred)
            if self.resolver is not None and self.resolver.enabled:
                result = await self._resolved(pred, sample.x, result, None, sample.label)
            for body in self.results.add(time.monotonic(), {**result, "id": sample.id}, sample.label):
                env = Envelope(kind="result", sender=self.ctx.device_id, body=body)
                if body["type"] == "summary":
                    self.ctx.publish_reliable("result", topic, encode(env), qos=1)
                else:
                    self.ctx.publish(topic, encode(env), qos=0)

    async def summary_ticker(self) -> None:
        topic = self.ctx.topics.results(self.ctx.device_id)
        while True:
            await asyncio.sleep(min(1.0, self.results.interval_s))
            for body in self.results.tick(time.monotonic()):
                self.ctx.publish_reliable("result", topic, encode(Envelope(kind="result",
                                                                           sender=self.ctx.device_id, body=body)))

    # -- commands ------------------------------------------------------------
    def _cmd_describe(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        store = self.store
        out: dict[str, Any] = {"serving": self.model_info(), "store": store.describe() if store else None,
                               "load_error": self.load_error}
        if self.engine is not None:   # what a request must send (fleetctl infer --image resizes to it)
            m = self.engine.bundle.manifest
            out["inputs"] = [s.to_dict() for s in (m.inputs or (m.input,))]
            out["task"] = m.task
        return out

    def _cmd_rollback(self, args: dict[str, Any], env: Envelope) -> Awaitable[dict[str, Any]]:
        """An explicit rollback (an operator, or the controller switching to a kept version): an
        allowed downgrade, but the target must pass its health gate before it serves."""
        store = self.store
        if store is None:
            raise CommandError("no model store")
        if args.get("bundle_sha256"):
            target = store.find_id(str(args["bundle_sha256"]))
            if target is None:
                raise CommandError(f"bundle {str(args['bundle_sha256'])[:12]} is not installed here")
        elif args.get("version"):
            target = store.find(str(args["version"]))
            if target is None:
                raise CommandError(f"version {args['version']!r} is not installed here")
        else:
            target = store.previous
            if target is None or not store.valid(target):
                raise CommandError("no previous version to roll back to")
        if store.current is not None and target == store.current:
            raise CommandError("already serving that version")
        return self._rollback_to(target)

    async def _rollback_to(self, target: Path) -> dict[str, Any]:
        store = self.store
        assert store is not None
        res = await asyncio.to_thread(store.switch, target, self.switch_gate(target), True)
        if not res.ok:
            self.ctx.emit_event("model.rollback_refused", "error", version=res.version, reason=res.reason)
            raise CommandError(res.reason)
        self.load_current()
        self.ctx.emit_event("model.rolled_back", "warning", version=res.version, reason="on command",
                            health=res.health)
        self.ctx.republish_state()
        return {"version": res.version, "health": res.health}


def make_source(cfg: Any) -> Any:
    """The configured streaming source (``[inference] source``), or None."""
    from .sources import ReplaySource, StdinSource, load_replay

    inf = cfg.inference
    if inf.source == "replay":
        x, y = load_replay(inf.replay_x, inf.replay_y or None)
        return ReplaySource(x, y, inf.rate_hz, inf.loop)
    if inf.source == "stdin":
        return StdinSource()
    return None
