"""A short-lived fleet client for the CLI: request/response and live subscriptions.

Replies come back inside the device's own subtree
(``{root}/v1/dev/{id}/reply/{client_id}``) so the broker ACL never has to let a
device write elsewhere; correlation is by ``corr`` in the envelope (and MQTT 5
correlation data when the session is v5).

It connects under the CLI's own identity (``[cli]``, ``link.cli_settings``), never as the
controller: the broker names each connection after its certificate, one at a time.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator

from protocol import envelope as env_mod
from protocol.config_loader import ConfigError
from protocol.envelope import DecodeError, Envelope, encode, new_id
from protocol.mqttlink import Message, MqttLink
from protocol.topics import Topics, validate_id

from .channel import ControlChannel, load_signing_key
from .config import ControllerConfig
from .link import CliIdentityError, cli_settings, make_link


class FleetClientError(RuntimeError):
    pass


#: the link's head start before a failure is diagnosed, and the whole wait for a silent broker
HEAD_START_S = 2.0
CONNECT_TIMEOUT_S = 10.0


class FleetClient:
    def __init__(self, cfg: ControllerConfig, name: str = "fleetctl") -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_root)
        self.client_id = f"{name}-{os.urandom(4).hex()}"   # names the reply topics; the broker may rename the session
        try:
            settings = cli_settings(cfg)
        except CliIdentityError as exc:
            raise FleetClientError(str(exc)) from None
        self.link: MqttLink = make_link(cfg, self.client_id, settings=settings,
                                        subscriptions=[(f"{self.topics.base}/dev/+/reply/{self.client_id}", 1)])
        self._pending: dict[str, asyncio.Future] = {}
        try:
            key = load_signing_key(cfg.security.signing_key)
        except ConfigError as exc:
            raise FleetClientError(str(exc)) from None
        self.channel = ControlChannel(self.topics, cfg.controller.id, self.link.publish, key,
                                      connected=self.link.connected.is_set)
        self._pump: asyncio.Task | None = None
        self.extra: asyncio.Queue[Message] = asyncio.Queue()
        self._reply_prefix = f"{self.topics.base}/dev/"
        self._reply_suffix = f"/reply/{self.client_id}"
        self.link.dispatch = self._on_reply   # replies resolve their request as they are read

    async def __aenter__(self) -> "FleetClient":
        await self.link.start()
        if not await self.link.wait_connected(HEAD_START_S):
            # fail fast, saying why: the broker's own refusal (CONNACK), else what a plain TCP/TLS
            # connection finds (refused, DNS, TLS, timeout); only a silent broker gets the full wait
            why = self.link.last_error
            if why is None:
                from .reach import diagnose

                bad = await asyncio.to_thread(diagnose, self.link.broker, self.link.tls)
                if bad is not None and not self.link.connected.is_set():
                    await self.link.stop()
                    raise FleetClientError(bad.message(self.cfg.mqtt.broker))
            elif not await self.link.wait_connected(HEAD_START_S):
                # a refusal may be the MQTT 5 → 3.1.1 fallback (the link retries at once): one more
                # head start, then the broker's reason
                if self.link.last_error is not None and not self.link.connected.is_set():
                    await self.link.stop()
                    raise FleetClientError(f"the broker at {self.cfg.mqtt.broker} refused the connection: "
                                           f"{self.link.last_error} (credentials, certificate or ACL)")
            if not await self.link.wait_connected(CONNECT_TIMEOUT_S - HEAD_START_S):
                await self.link.stop()
                raise FleetClientError(f"cannot connect to {self.cfg.mqtt.broker}: "
                                       f"{self.link.last_error or 'no MQTT answer (CONNACK) in time'}")
        self._pump = asyncio.create_task(self._run(), name="fleet-client")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pump:
            self._pump.cancel()
        await self.link.stop()

    def _on_reply(self, msg: Message) -> bool:
        """A reply to one of our requests: resolve its future now (True); anything else goes
        through the link's queue to ``_run``. A reply that does not decode is dropped, as before."""
        t = msg.topic
        if not (t.startswith(self._reply_prefix) and t.endswith(self._reply_suffix)):
            return False
        parsed = self.topics.parse(t)
        if not (parsed and parsed[1] == "reply" and parsed[2] == (self.client_id,)):
            return False
        try:
            env = env_mod.decode(msg.payload, expect_sender=parsed[0])
        except DecodeError:
            return True
        fut = self._pending.pop(env.corr or "", None)
        if fut and not fut.done():
            fut.set_result(env)
        return True

    async def _run(self) -> None:
        while True:
            msg = await self.link.messages.get()
            if not self._on_reply(msg):        # (replies queued before dispatch was set)
                self.extra.put_nowait(msg)

    async def command(self, device_id: str, command: str, args: dict[str, Any] | None = None,
                      timeout: float = 5.0) -> dict[str, Any]:
        validate_id(device_id)
        topic, env = self.channel.command_envelope(device_id, command, args,
                                                   reply_to=self.topics.reply(device_id, self.client_id), corr=new_id())
        return await self.request(device_id, topic, env, timeout)

    async def infer(self, device_id: str, x: Any, label: int | None = None, timeout: float = 5.0,
                    deadline_ms: float | None = None) -> dict[str, Any]:
        """Inference request/response on the device's request topic."""
        env = self._infer_envelope(device_id, {"x": x}, label, deadline_ms)
        return await self.request(device_id, self.topics.req(device_id), env, timeout)

    def _infer_envelope(self, device_id: str, body: dict[str, Any], label: int | None = None,
                        deadline_ms: float | None = None) -> Envelope:
        """An ``infer.request`` to ``device_id`` whose reply comes back to this client."""
        validate_id(device_id)
        if label is not None:
            body["label"] = label
        if deadline_ms is not None:
            body["deadline_ms"] = deadline_ms
        return Envelope(kind="infer.request", sender=self.cfg.controller.id, body=body,
                        reply_to=self.topics.reply(device_id, self.client_id), corr=new_id())

    async def infer_inputs(self, device_id: str, inputs: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """JSON inference for a multi-input model: ``inputs`` maps input names to (nested) lists."""
        env = self._infer_envelope(device_id, {"inputs": inputs})
        return await self.request(device_id, self.topics.req(device_id), env, timeout)

    async def infer_tensors(self, device_id: str, tensors: dict[str, Any], label: int | None = None,
                            timeout: float = 5.0, deadline_ms: float | None = None,
                            compress: bool = False) -> dict[str, Any]:
        """Inference with the inputs as a binary frame (dtype, shape, raw bytes; optional zstd):
        a 224x224x3 uint8 image is 147 KiB on the wire instead of ~600 KiB of JSON."""
        from protocol.binary import encode_frame

        env = self._infer_envelope(device_id, {}, label, deadline_ms)
        return await self.request(device_id, self.topics.req(device_id), env, timeout,
                                  payload=encode_frame(env, tensors, compress=compress))

    async def feedback(self, device_id: str, request_id: str, label: int, timeout: float = 5.0) -> dict[str, Any]:
        """Label an earlier inference request so the device can learn from it."""
        validate_id(device_id)
        env = Envelope(kind="feedback", sender=self.cfg.controller.id, body={"request_id": request_id, "label": label},
                       reply_to=self.topics.reply(device_id, self.client_id), corr=new_id())
        return await self.request(device_id, self.topics.req(device_id), env, timeout)

    async def request(self, device_id: str, topic: str, env: Envelope, timeout: float = 5.0,
                      payload: bytes | None = None) -> dict[str, Any]:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[env.corr or env.id] = fut
        if not self.link.publish(topic, encode(env) if payload is None else payload, 1, response_topic=env.reply_to,
                                 correlation=(env.corr or env.id).encode()):
            self._pending.pop(env.corr or env.id, None)
            raise FleetClientError("not connected to the broker")
        try:
            reply: Envelope = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(env.corr or env.id, None)
            raise FleetClientError(f"no reply from {device_id} within {timeout:g}s") from None
        return dict(reply.body)

    async def follow(self, leaf: str) -> AsyncIterator[tuple[str, Envelope | DecodeError]]:
        self.link.subscribe(self.topics.all_devices(leaf), 0)
        while True:
            msg = await self.extra.get()
            parsed = self.topics.parse(msg.topic)
            if not parsed or parsed[1] != leaf:
                continue
            try:
                yield parsed[0], env_mod.decode(msg.payload, expect_sender=parsed[0])
            except DecodeError as exc:
                yield parsed[0], exc
