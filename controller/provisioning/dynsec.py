"""Mosquitto's dynamic-security plugin, driven over ``$CONTROL/dynamic-security/v1``.

Each provisioned device gets a broker client named after its certificate CN (the broker runs
``use_identity_as_username``) and its own role that confines it to its own subtree — the same
rights as the shipped ACL file's ``%u`` patterns, without a restart or a hand-edited file.
Every call is idempotent ("already exists" / "not found" count as done), so a controller killed
half-way through completes on restart by making the same calls again.

No socket here: the client is handed ``publish`` (the service's MQTT link) and is fed the
plugin's responses; responses are matched by ``correlationData``.
"""
from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Callable

from protocol.topics import Topics

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSE = CONTROL + "/response"
#: errors that mean "the state we wanted is already there"
_IDEMPOTENT = ("already exists", "not found")


class DynsecError(RuntimeError):
    pass


def role_name(device_id: str) -> str:
    return f"edgefleet-dev-{device_id}"


def device_acls(topics: Topics, device_id: str) -> list[dict[str, Any]]:
    """configs/mosquitto/acl's ``pattern`` lines for this one device: it writes only its own
    subtree (not its ``cmd``/``bin``/``req``: those are written to it), reads its own commands,
    frames, requests and replies, any group's commands and the Home Assistant birth topic."""
    own = f"{topics.base}/dev/{device_id}"
    send = [f"{own}/state", f"{own}/telemetry", f"{own}/events", f"{own}/results", f"{own}/reply/#",
            f"{own}/data/#", f"{topics.base}/offload/req", f"homeassistant/+/{device_id}/+/config"]
    read = [f"{own}/cmd", f"{own}/bin", f"{own}/req", f"{own}/reply/#", f"{topics.base}/group/+/cmd",
            "homeassistant/status"]
    return ([{"acltype": "publishClientSend", "topic": t, "allow": True} for t in send]
            + [{"acltype": "subscribePattern", "topic": t, "allow": True} for t in read])


def add_device_commands(topics: Topics, device_id: str) -> list[dict[str, Any]]:
    role = role_name(device_id)
    return [{"command": "createRole", "rolename": role, "acls": device_acls(topics, device_id)},
            {"command": "createClient", "username": device_id, "textname": "edgefleet device",
             "roles": [{"rolename": role}]},
            {"command": "enableClient", "username": device_id}]


def remove_device_commands(device_id: str) -> list[dict[str, Any]]:
    """deleteClient disconnects the device at once (the plugin kicks a deleted client)."""
    return [{"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": role_name(device_id)}]


class Dynsec:
    def __init__(self, publish: Callable[[str, bytes, int], bool], timeout: float = 10.0) -> None:
        self._publish = publish
        self.timeout = timeout
        self._waiting: dict[str, asyncio.Future] = {}

    def on_response(self, payload: bytes) -> None:
        try:
            responses = json.loads(payload).get("responses") or []
        except (ValueError, AttributeError):
            return
        for r in responses:
            fut = self._waiting.get(str(r.get("correlationData", "")))
            if fut is not None and not fut.done():
                fut.set_result(r)

    async def call(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one message; the responses in order. Raises DynsecError on a real error
        (idempotent ones pass) or when the plugin does not answer."""
        loop = asyncio.get_running_loop()
        tagged, futs = [], []
        for c in commands:
            corr = os.urandom(8).hex()
            fut = loop.create_future()
            self._waiting[corr] = fut
            tagged.append({**c, "correlationData": corr})
            futs.append((corr, fut))
        try:
            if not self._publish(CONTROL, json.dumps({"commands": tagged}).encode(), 1):
                raise DynsecError("not connected to the broker")
            try:
                results = await asyncio.wait_for(asyncio.gather(*(f for _, f in futs)), self.timeout)
            except asyncio.TimeoutError:
                raise DynsecError(f"the dynamic-security plugin did not answer within {self.timeout:g}s "
                                  "(is it loaded, and may this client use $CONTROL?)") from None
        finally:
            for corr, _ in futs:
                self._waiting.pop(corr, None)
        for c, r in zip(commands, results):
            err = r.get("error")
            if err and not any(s in str(err).lower() for s in _IDEMPOTENT):
                raise DynsecError(f"{c['command']}: {err}")
        return list(results)

    async def add_devices(self, topics: Topics, device_ids: list[str]) -> None:
        cmds = [c for d in device_ids for c in add_device_commands(topics, d)]
        for i in range(0, len(cmds), 150):   # one message per 50 devices
            await self.call(cmds[i:i + 150])

    async def remove_device(self, device_id: str) -> None:
        await self.call(remove_device_commands(device_id))
