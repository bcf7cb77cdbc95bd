import os
import random

import pytest

from protocol.chunks import ChunkError, ChunkManifest, ChunkReceiver, iter_chunks, make_manifest
from protocol.signing import SignatureError, generate, load_private, load_public, save_keypair, sign, verify


def test_sign_verify_and_tamper(tmp_path):
    key = generate()
    save_keypair(key, tmp_path / "k.pem", tmp_path / "k.pub")
    assert oct(os.stat(tmp_path / "k.pem").st_mode & 0o777) == "0o600"
    priv, pub = load_private(tmp_path / "k.pem"), load_public(tmp_path / "k.pub")
    doc = {"version": "1.2.0", "files": {"head.npz": {"sha256": "ab" * 32}}}
    signed = sign(doc, priv)
    assert verify(signed, [pub]) == signed["signature"]["key_id"]
    # key order does not matter: canonical JSON
    assert verify(dict(reversed(list(signed.items()))), [pub])
    tampered = {**signed, "version": "1.2.1"}
    with pytest.raises(SignatureError, match="bad signature"):
        verify(tampered, [pub])
    with pytest.raises(SignatureError, match="not trusted"):
        verify(signed, [generate().public_key()])
    with pytest.raises(SignatureError, match="unsigned"):
        verify(doc, [pub])
    with pytest.raises(SignatureError, match="base64"):
        verify({**signed, "signature": {**signed["signature"], "sig": "!!"}}, [pub])


def test_load_key_errors(tmp_path):
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SignatureError):
        load_private(tmp_path / "junk.pem")
    with pytest.raises(SignatureError):
        load_public(tmp_path / "missing.pub")


def test_chunked_transfer_resumes_with_only_missing_chunks():
    blob = os.urandom(10_000)
    m = make_manifest("t1", blob, chunk_size=1024)
    assert m.count == 10
    m2 = ChunkManifest.from_dict(m.to_dict())
    r = ChunkReceiver(m2)
    for i, data in iter_chunks(blob, m, [0, 1, 2, 7]):
        assert r.accept(i, data)
    assert r.missing() == [3, 4, 5, 6, 8, 9]
    # "reconnect": resend only what is missing, in any order, with a duplicate
    order = r.missing()
    random.Random(1).shuffle(order)
    for i, data in iter_chunks(blob, m, order + [0]):
        r.accept(i, data)
    assert r.duplicates == 1
    assert r.complete and r.assemble() == blob


@pytest.mark.parametrize("index,data,msg", [
    (99, b"x", "out of range"), (-1, b"x", "out of range"), (0, b"short", "expected"),
])
def test_bad_chunks_rejected_state_unchanged(index, data, msg):
    blob = os.urandom(3000)
    r = ChunkReceiver(make_manifest("t", blob, 1024))
    with pytest.raises(ChunkError, match=msg):
        r.accept(index, data)
    assert r.missing() == [0, 1, 2]


def test_corrupted_chunk_rejected():
    blob = os.urandom(2048)
    m = make_manifest("t", blob, 1024)
    r = ChunkReceiver(m)
    bad = bytearray(blob[:1024])
    bad[5] ^= 1
    with pytest.raises(ChunkError, match="SHA-256"):
        r.accept(0, bytes(bad))
    assert r.rejected == 1 and r.missing() == [0, 1]


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.pop("sha256"), "missing"),
    (lambda d: d.update(chunk_size=0), "chunk_size"),
    (lambda d: d.update(total_size=-1), "total_size"),
    (lambda d: d["chunk_sha256"].pop(), "needs"),
    (lambda d: d.update(sha256="zz"), "hex"),
    (lambda d: d.update(transfer_id=""), "transfer_id"),
])
def test_bad_manifests(mutate, msg):
    d = make_manifest("t", os.urandom(3000), 1024).to_dict()
    mutate(d)
    with pytest.raises(ChunkError, match=msg):
        ChunkManifest.from_dict(d)


def test_size_cap():
    m = make_manifest("t", b"x" * 5000, 1024)
    with pytest.raises(ChunkError, match="exceeds"):
        ChunkReceiver(m, max_total=4096)
