"""``edge-agent check``: what ``run`` will open, checked before systemd starts it.

A config that parses is not a config that runs: a key the service user cannot read, a certificate
that expired last week or a bundle directory that is not there all used to pass ``check`` and then
fail (or, worse, run without a model, silently) under systemd. Each check here returns problems as
one line each, naming the file and the config key; warnings (a certificate about to expire) do not
fail the check.
"""
from __future__ import annotations

from dataclasses import dataclass
import datetime as dt
import os
from pathlib import Path
import ssl

from .config import AgentConfig

EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class Finding:
    problem: bool          # False: a warning only
    text: str


def _readable(key: str, path: str) -> Finding | None:
    p = Path(path)
    if not p.exists():
        return Finding(True, f"{key} {path} does not exist")
    if p.is_dir():
        return Finding(True, f"{key} {path} is a directory, not a file")
    if not os.access(p, os.R_OK):
        return Finding(True, f"{key} {path} is not readable by this user (uid {os.geteuid()}): "
                             "docs/install-on-a-board.md: keys are 0640 root:edgefleet")
    return None


def check_state_dir(path: str) -> list[Finding]:
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return [Finding(True, f"state.dir {path} is not a directory")]
        if not os.access(p, os.W_OK | os.X_OK):
            return [Finding(True, f"state.dir {path} is not writable by this user (uid {os.geteuid()})")]
        return []
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        return [Finding(True, f"state.dir {path} does not exist and cannot be created here "
                              f"({parent} is not writable)")]
    return []


def _expiry(key: str, path: str, now: dt.datetime) -> list[Finding]:
    from cryptography import x509

    try:
        with open(path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
    except ValueError as exc:
        return [Finding(True, f"{key} {path} is not a PEM certificate ({exc})")]
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if after < now:
        return [Finding(True, f"{key} {path} expired on {after:%Y-%m-%d %H:%M} UTC")]
    if before > now:
        return [Finding(True, f"{key} {path} is not valid before {before:%Y-%m-%d %H:%M} UTC (is the clock right?)")]
    if after - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        return [Finding(False, f"{key} {path} expires on {after:%Y-%m-%d} (in {(after - now).days} days)")]
    return []


def check_tls(cfg: AgentConfig, now: dt.datetime | None = None) -> list[Finding]:
    m = cfg.mqtt
    now = now or dt.datetime.now(dt.timezone.utc)
    out: list[Finding] = []
    files = [("mqtt.ca_file", m.ca_file), ("mqtt.cert_file", m.cert_file), ("mqtt.key_file", m.key_file)]
    for key, path in files:
        if path and (f := _readable(key, path)):
            out.append(f)
    if out:
        return out
    if m.cert_file and not m.key_file:
        out.append(Finding(True, "mqtt.key_file is required with mqtt.cert_file"))
    if m.ca_file:
        out += _expiry("mqtt.ca_file", m.ca_file, now)
    if m.cert_file:
        out += _expiry("mqtt.cert_file", m.cert_file, now)
    if any(f.problem for f in out):
        return out
    try:
        ctx = ssl.create_default_context(cafile=m.ca_file) if m.ca_file else ssl.create_default_context()
        if m.cert_file:
            ctx.load_cert_chain(m.cert_file, m.key_file or None)
    except ssl.SSLError as exc:
        which = f"mqtt.cert_file {m.cert_file} / mqtt.key_file {m.key_file}" if m.cert_file else f"mqtt.ca_file {m.ca_file}"
        out.append(Finding(True, f"{which}: {exc.reason or exc} (the key does not match the certificate?)"))
    return out


def check_files(cfg: AgentConfig) -> list[Finding]:
    """Everything ``run`` opens, without connecting anywhere."""
    out = check_state_dir(cfg.state.dir)
    m = cfg.mqtt
    if m.username and m.password_file and (f := _readable("mqtt.password_file", m.password_file)):
        out.append(f)
    out += check_tls(cfg)
    from protocol.signing import SignatureError, load_public

    for path in cfg.security.trusted_keys:
        if f := _readable("security.trusted_keys", path):
            out.append(f)
            continue
        try:
            load_public(path)
        except SignatureError as exc:
            out.append(Finding(True, f"security.trusted_keys {path}: {exc}"))
    if cfg.model.bundle:
        out += check_bundle(cfg.model.bundle)
    if cfg.bridge.enabled and cfg.bridge.port and not Path(cfg.bridge.port).exists():
        out.append(Finding(True, f"bridge.port {cfg.bridge.port} does not exist (MCU unplugged?)"))
    return out


def check_bundle(path: str) -> list[Finding]:
    from protocol.bundle import BundleError, load_bundle

    p = Path(path)
    if not p.is_dir():
        return [Finding(True, f"model.bundle {path} does not exist (or is not a directory)")]
    try:
        load_bundle(p)            # the manifest, and every file against its SHA-256
    except BundleError as exc:
        return [Finding(True, f"model.bundle {path}: {exc}")]
    except OSError as exc:
        return [Finding(True, f"model.bundle {path}: {exc.strerror or exc}")]
    return []
