"""Secure aggregation with dropouts (Bonawitz et al. 2017; SecAgg+'s shape, Bell et al. 2020),
as two sans-IO state machines: messages in, messages out, no socket, no clock.

Rules (the whole protocol; the controller only ever holds masked vectors and the sum):

1. advertise  client → server  two X25519 public keys: c (to seal shares) and s (for masks).
2. roster     server → all     the clients that advertised in time (U1), the Shamir threshold t
                               (= n − floor(max_dropout · n), at least n//2 + 1), the vector length.
3. shares     client → server  a fresh self-mask seed bᵢ and its SHA-256 commitment; t-of-n Shamir
                               shares of bᵢ and of the private s key, one sealed (AES-GCM under the
                               X25519(c) agreement) for each other client: the server cannot read them.
4. inbox      server → each    the shares sealed for it and who shared (U2).
5. masked     client → server  yᵢ = xᵢ + PRG(bᵢ) + Σ_{j∈U2, j≠i} ±PRG(sᵢⱼ) in Z/2^64 (+ if i < j, − else).
6. unmask     server → U3      who sent a masked vector (U3 ⊆ U2, survivors) and who dropped (U2 − U3).
7. reveal     client → server  for each survivor its share of bᵢ, for each dropped client its share
                               of the s key — never both for one client (a client refuses a request
                               that would reveal both, or with fewer than t survivors).
8. the server rebuilds each bᵢ (checked against its commitment) and each dropped s key (checked
   against its public key; a wrong share is found by trying other t-subsets and named), and
   Σ yᵢ − Σ PRG(bᵢ) ∓ the dropped clients' pairwise masks = Σ_{U3} xᵢ exactly (in fixed point).

Two error kinds, as h11 has: ``SecAggError`` for a peer's bad message — it is refused with a
reason and the run goes on (``refused`` lists them) — and a sticky ``failed`` state when the
round cannot finish (fewer than t clients left at some stage): ``result`` then says why.
Every message names its session; one from another session (a replay) or a second one from
the same client at the same stage is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import itertools
import math
import os
from typing import Mapping, Sequence

import numpy as np

from . import secagg_crypto as sc

SCALE_BITS = 28


class SecAggError(ValueError):
    """A peer's message cannot be used; ``reason`` says why (refused, counted, survived)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- messages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Advertise:
    session: str
    client: str
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class Roster:
    session: str
    threshold: int
    clients: tuple[tuple[str, bytes, bytes], ...]   # (id, c_pk, s_pk), sorted by id
    length: int
    scale_bits: int = SCALE_BITS


@dataclass(frozen=True)
class Shares:
    session: str
    client: str
    b_commit: str
    sealed: Mapping[str, bytes]                      # destination → sealed shares


@dataclass(frozen=True)
class Inbox:
    session: str
    to: str
    shared: tuple[str, ...]                          # U2
    sealed: Mapping[str, bytes]                      # source → sealed shares for ``to``


@dataclass(frozen=True)
class Masked:
    session: str
    client: str
    vector: np.ndarray                               # uint64


@dataclass(frozen=True)
class UnmaskRequest:
    session: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class Reveal:
    session: str
    client: str
    b_shares: Mapping[str, tuple[int, bytes]]        # survivor → share of its bᵢ
    sk_shares: Mapping[str, tuple[int, bytes]]       # dropped → share of its s key


def threshold_for(n: int, max_dropout: float) -> int:
    """Shares needed: survivors after ``max_dropout`` of n drop, and always a majority."""
    if not 0 <= max_dropout < 0.5:
        raise ValueError("max_dropout must be in [0, 0.5)")
    return max(n // 2 + 1, n - int(math.floor(max_dropout * n)))


def _pair_info(kind: str, session: str, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return f"edgefleet-secagg|{kind}|{session}|{lo}|{hi}".encode()


def pair_mask(s_sk: bytes, peer_s_pk: bytes, session: str, me: str, peer: str, n: int) -> np.ndarray:
    """The mask ``me`` adds for ``peer``: +PRG(sᵢⱼ) if me < peer, −PRG(sᵢⱼ) otherwise."""
    m = sc.prg(sc.agree(s_sk, peer_s_pk, _pair_info("mask", session, me, peer)), n)
    return m if me < peer else (np.uint64(0) - m)


# -- client --------------------------------------------------------------------------------------
class SecAggClient:
    """One device's side of one session."""

    def __init__(self, session: str, client_id: str) -> None:
        self.session, self.id = session, client_id
        self.c_sk, self.c_pk = sc.new_keypair()
        self.s_sk, self.s_pk = sc.new_keypair()
        self.b = os.urandom(16)
        self.state = "new"
        self.roster: Roster | None = None
        self.shared: tuple[str, ...] = ()
        self.held: dict[str, tuple[tuple[int, bytes], tuple[int, bytes]]] = {}   # src → (b share, sk share)
        self.unreadable: dict[str, str] = {}

    def _expect(self, state: str, msg) -> None:
        if self.state != state:
            raise SecAggError(f"{type(msg).__name__} in state {self.state}")
        if msg.session != self.session:
            raise SecAggError(f"session {msg.session!r} is not {self.session!r} (replayed?)")

    def advertise(self) -> Advertise:
        if self.state != "new":
            raise SecAggError("already advertised")
        self.state = "advertised"
        return Advertise(self.session, self.id, self.c_pk, self.s_pk)

    def _index(self, cid: str) -> int:
        assert self.roster is not None
        return [c for c, _, _ in self.roster.clients].index(cid) + 1

    def on_roster(self, r: Roster) -> Shares:
        self._expect("advertised", r)
        ids = [c for c, _, _ in r.clients]
        if len(set(ids)) != len(ids) or ids != sorted(ids):
            raise SecAggError("roster ids must be distinct and sorted")
        mine = [(c, cp, sp) for c, cp, sp in r.clients if c == self.id]
        if mine != [(self.id, self.c_pk, self.s_pk)]:
            raise SecAggError("roster does not carry our own keys")
        n = len(ids)
        if not (n // 2 + 1 <= r.threshold <= n) or n < 2:
            raise SecAggError(f"threshold {r.threshold} of {n} is not a majority (the server could unmask us)")
        if any(len(cp) != 32 or len(sp) != 32 for _, cp, sp in r.clients) or r.length < 1:
            raise SecAggError("bad key length or vector length in the roster")
        self.roster = r
        b_sh = sc.share(self.b, r.threshold, n)
        sk_sh = sc.share(self.s_sk, r.threshold, n)
        sealed = {}
        for k, (cid, cpk, _) in enumerate(r.clients):
            if cid == self.id:
                self.held[self.id] = (b_sh[k], sk_sh[k])
                continue
            key = sc.agree(self.c_sk, cpk, _pair_info("share", self.session, self.id, cid))
            pt = self.id.encode() + b"\0" + cid.encode() + b"\0" + b_sh[k][1] + sk_sh[k][1]
            sealed[cid] = sc.seal(key, pt, f"{self.session}|{self.id}|{cid}".encode())
        self.state = "shared"
        return Shares(self.session, self.id, sc.commit(self.b, self.session.encode()), sealed)

    def on_inbox(self, box: Inbox, x: np.ndarray) -> Masked:
        """Open the shares sealed for us, then mask ``x`` (a float vector, already weighted)."""
        self._expect("shared", box)
        r = self.roster
        assert r is not None
        keys = {c: (cp, sp) for c, cp, sp in r.clients}
        if box.to != self.id or self.id not in box.shared or not set(box.shared) <= set(keys):
            raise SecAggError("inbox is not for us or names clients outside the roster")
        if len(box.shared) < r.threshold:
            raise SecAggError(f"only {len(box.shared)} clients shared (< threshold {r.threshold})")
        for src, blob in box.sealed.items():
            if src not in box.shared or src == self.id:
                continue
            try:
                key = sc.agree(self.c_sk, keys[src][0], _pair_info("share", self.session, src, self.id))
                pt = sc.open_sealed(key, blob, f"{self.session}|{src}|{self.id}".encode())
                head = src.encode() + b"\0" + self.id.encode() + b"\0"
                if not pt.startswith(head) or len(pt) != len(head) + 48:
                    raise ValueError("share names the wrong clients")
                body = pt[len(head):]
                idx = self._index(self.id)
                self.held[src] = ((idx, body[:16]), (idx, body[16:]))
            except Exception as exc:  # noqa: BLE001 - InvalidTag or garbage: we cannot help rebuild src
                self.unreadable[src] = f"sealed share from {src} unreadable: {type(exc).__name__}"
        x = np.asarray(x, np.float64).reshape(-1)
        if x.size != r.length:
            raise SecAggError(f"vector of {x.size} values, the roster says {r.length}")
        y = sc.encode(x, r.scale_bits, len(r.clients)) + sc.prg(self.b, r.length)
        for j in box.shared:
            if j != self.id:
                y = y + pair_mask(self.s_sk, keys[j][1], self.session, self.id, j, r.length)
        self.shared = tuple(box.shared)
        self.state = "masked"
        return Masked(self.session, self.id, y)

    def on_unmask(self, req: UnmaskRequest) -> Reveal:
        self._expect("masked", req)
        r = self.roster
        assert r is not None
        surv, drop = set(req.survivors), set(req.dropped)
        if surv & drop:
            raise SecAggError(f"asked for both secrets of {sorted(surv & drop)}: refused")
        if not (surv | drop) <= set(self.shared) or self.id not in surv:
            raise SecAggError("unmask request names clients that did not share, or not us")
        if len(surv) < r.threshold:
            raise SecAggError(f"only {len(surv)} survivors (< threshold {r.threshold}): refused")
        self.state = "done"
        return Reveal(self.session, self.id,
                      {i: self.held[i][0] for i in sorted(surv) if i in self.held},
                      {i: self.held[i][1] for i in sorted(drop) if i in self.held})


# -- server --------------------------------------------------------------------------------------
@dataclass
class SecAggServer:
    """The controller's side of one session: it routes, checks, and sums; ``close()`` ends a stage
    (the runner calls it on a deadline or when everyone answered)."""

    session: str
    length: int
    max_dropout: float = 0.3
    min_clients: int = 3
    scale_bits: int = SCALE_BITS
    state: str = "advertise"
    error: str | None = None
    refused: list[tuple[str, str]] = field(default_factory=list)     # (client, reason)
    _ads: dict[str, Advertise] = field(default_factory=dict)
    _shares: dict[str, Shares] = field(default_factory=dict)
    _masked: dict[str, np.ndarray] = field(default_factory=dict)
    _reveals: dict[str, Reveal] = field(default_factory=dict)
    roster: Roster | None = None
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    def _refuse(self, client: str, reason: str) -> None:
        self.refused.append((client, reason))
        raise SecAggError(reason)

    def _check(self, sender: str, msg, stage: str) -> None:
        if msg.session != self.session:
            self._refuse(sender, f"session {msg.session!r} is not {self.session!r} (replayed?)")
        if getattr(msg, "client", sender) != sender:
            self._refuse(sender, f"message names {msg.client!r}, sent by {sender!r}")
        if self.state != stage:
            self._refuse(sender, f"{type(msg).__name__} while the session is in {self.state}")

    def _fail(self, why: str) -> None:
        self.state, self.error = "failed", why

    # stage 1 -> 2
    def on_advertise(self, sender: str, m: Advertise) -> None:
        self._check(sender, m, "advertise")
        if sender in self._ads:
            self._refuse(sender, "advertised twice")
        if len(m.c_pk) != 32 or len(m.s_pk) != 32 or m.c_pk == m.s_pk:
            self._refuse(sender, "public keys must be two distinct 32-byte X25519 keys")
        self._ads[sender] = m

    def close_advertise(self) -> Roster | None:
        n = len(self._ads)
        if n < max(2, self.min_clients):
            self._fail(f"only {n} clients advertised keys (need {max(2, self.min_clients)})")
            return None
        clients = tuple((c, self._ads[c].c_pk, self._ads[c].s_pk) for c in sorted(self._ads))
        self.roster = Roster(self.session, threshold_for(n, self.max_dropout), clients, self.length, self.scale_bits)
        self.state = "share"
        return self.roster

    # stage 3 -> 4
    def on_shares(self, sender: str, m: Shares) -> None:
        self._check(sender, m, "share")
        assert self.roster is not None
        ids = {c for c, _, _ in self.roster.clients}
        if sender not in ids:
            self._refuse(sender, "not in the roster")
        if sender in self._shares:
            self._refuse(sender, "shares sent twice")
        if set(m.sealed) != ids - {sender}:
            self._refuse(sender, f"sealed shares for {sorted(m.sealed)}, expected every other roster client")
        if len(m.b_commit) != 64 or any(not isinstance(v, bytes) or len(v) != 12 + 48 + 16 + len(sender.encode()) + 2
                                        + len(k.encode()) for k, v in m.sealed.items()):
            self._refuse(sender, "malformed commitment or sealed share")
        self._shares[sender] = m

    def close_share(self) -> list[Inbox]:
        assert self.roster is not None
        shared = tuple(sorted(self._shares))
        if len(shared) < self.roster.threshold:
            self._fail(f"only {len(shared)} clients shared keys (threshold {self.roster.threshold})")
            return []
        self.state = "mask"
        return [Inbox(self.session, c, shared, {s: self._shares[s].sealed[c] for s in shared if s != c})
                for c in shared]

    # stage 5 -> 6
    def on_masked(self, sender: str, m: Masked) -> None:
        self._check(sender, m, "mask")
        if sender not in self._shares:
            self._refuse(sender, "masked input from a client that did not share keys")
        if sender in self._masked:
            self._refuse(sender, "masked input sent twice (replay): the first one stands")
        v = np.asarray(m.vector)
        if v.dtype != np.uint64 or v.shape != (self.length,):
            self._refuse(sender, f"masked vector must be {self.length} uint64 values")
        if any(np.array_equal(v, o) for o in self._masked.values()):
            self._refuse(sender, "masked vector equal to another client's (replayed mask)")
        self._masked[sender] = v

    def close_mask(self) -> UnmaskRequest | None:
        assert self.roster is not None
        self.survivors = tuple(sorted(self._masked))
        self.dropped = tuple(sorted(set(self._shares) - set(self._masked)))
        if len(self.survivors) < self.roster.threshold:
            self._fail(f"only {len(self.survivors)} masked inputs (threshold {self.roster.threshold})")
            return None
        self.state = "unmask"
        return UnmaskRequest(self.session, self.survivors, self.dropped)

    # stage 7 -> 8
    def on_reveal(self, sender: str, m: Reveal) -> None:
        self._check(sender, m, "unmask")
        assert self.roster is not None
        if sender not in self.survivors:
            self._refuse(sender, "reveal from a client that sent no masked input")
        if sender in self._reveals:
            self._refuse(sender, "revealed twice")
        if set(m.b_shares) & set(self.dropped) or set(m.sk_shares) & set(self.survivors):
            self._refuse(sender, "reveal mixes up survivors and dropped clients")
        idx = [c for c, _, _ in self.roster.clients].index(sender) + 1
        for name, shares, size in (("b", m.b_shares, 16), ("s key", m.sk_shares, 32)):
            for owner, sh in shares.items():
                ok = (isinstance(sh, tuple) and len(sh) == 2 and sh[0] == idx and isinstance(sh[1], bytes)
                      and len(sh[1]) == size)
                if not ok:
                    self._refuse(sender, f"malformed {name} share for {owner}")
        self._reveals[sender] = m

    def _rebuild(self, owner: str, shares: list[tuple[str, tuple[int, bytes]]], check) -> bytes:
        t = self.roster.threshold  # type: ignore[union-attr]
        if len(shares) < t:
            raise SecAggError(f"only {len(shares)} shares for {owner} (threshold {t})")
        for n, subset in enumerate(itertools.combinations(shares, t)):
            secret = sc.combine([s for _, s in subset])
            if check(secret):
                good = {c for c, _ in subset}
                for c, s in shares:   # name the shares inconsistent with the rebuilt secret
                    if c not in good and not check(sc.combine([x for _, x in subset[:-1]] + [s])):
                        self.refused.append((c, f"wrong share for {owner}"))
                return secret
            if n >= 200:
                break
        raise SecAggError(f"no consistent set of {t} shares rebuilds {owner}'s secret")

    def result(self) -> np.ndarray:
        """Σ xᵢ over the survivors (float64); raises ``SecAggError`` if the session cannot finish."""
        if self.state == "failed":
            raise SecAggError(self.error or "failed")
        if self.state != "unmask":
            raise SecAggError(f"no result in state {self.state}")
        r = self.roster
        assert r is not None
        if len(self._reveals) < r.threshold:
            self._fail(f"only {len(self._reveals)} clients revealed (threshold {r.threshold})")
            raise SecAggError(self.error)
        keys = {c: (cp, sp) for c, cp, sp in r.clients}
        total = np.zeros(self.length, np.uint64)
        for v in self._masked.values():
            total = total + v
        try:
            for i in self.survivors:
                commit = self._shares[i].b_commit
                b = self._rebuild(i, [(c, m.b_shares[i]) for c, m in self._reveals.items() if i in m.b_shares],
                                  lambda s: sc.commit(s, self.session.encode()) == commit)
                total = total - sc.prg(b, self.length)
            for i in self.dropped:
                spk = keys[i][1]
                sk = self._rebuild(i, [(c, m.sk_shares[i]) for c, m in self._reveals.items() if i in m.sk_shares],
                                   lambda s: sc.public_of(s) == spk)
                for j in self.survivors:   # j added pair_mask(j → i) = −pair_mask(i → j): cancel it
                    total = total + pair_mask(sk, keys[j][1], self.session, i, j, self.length)
        except SecAggError as exc:
            self._fail(exc.reason)
            raise
        self.state = "done"
        return sc.decode(total, self.scale_bits)
