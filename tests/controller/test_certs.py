"""The broker CA: what it mints is what Mosquitto/OpenSSL and the ACL expect; keys stay private."""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from controller.certs import CertError, init_ca, issue_client, issue_server
from controller.cli.certs import certs
from protocol.topics import InvalidId


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    init_ca(d)
    return d


def test_ca_is_a_p256_self_signed_ca_with_a_private_key(pki):
    ca = load(pki / "ca.pem")
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.verify_directly_issued_by(ca)
    assert mode(pki / "ca.key") == 0o600 and mode(pki / "ca.pem") == 0o644
    assert not [p for p in pki.iterdir() if ".tmp-" in p.name]   # no temp files left behind


def test_init_refuses_to_replace_a_ca_unless_forced(pki):
    before = (pki / "ca.pem").read_bytes()
    with pytest.raises(CertError, match="exists"):
        init_ca(pki)
    assert (pki / "ca.pem").read_bytes() == before
    init_ca(pki, force=True)
    assert (pki / "ca.pem").read_bytes() != before


def test_client_cert_cn_is_the_device_id_and_verifies_as_a_client(pki):
    issue_client(pki, "pi-07")
    leaf, ca = load(pki / "pi-07.pem"), load(pki / "ca.pem")
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-07"
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(pki / "pi-07.key") == 0o600


def test_server_cert_names_the_broker_and_verifies_for_it(pki):
    issue_server(pki)   # the defaults: 127.0.0.1 and localhost
    leaf = load(pki / "server.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    verifier = PolicyBuilder().store(Store([load(pki / "ca.pem")])).build_server_verifier(x509.DNSName("localhost"))
    chain = verifier.verify(leaf, [])
    assert chain[-1] == load(pki / "ca.pem")
    other = PolicyBuilder().store(Store([load(pki / "ca.pem")])).build_server_verifier(x509.DNSName("evil.lan"))
    with pytest.raises(Exception):
        other.verify(leaf, [])


def test_openssl_accepts_the_chain_for_the_right_purpose(pki):
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.fail("openssl is missing (apt-get install -y openssl)")
    issue_server(pki, ["broker.site.lan", "10.0.0.5"])
    issue_client(pki, "pi-07")

    def check(cert: str, purpose: str) -> subprocess.CompletedProcess:
        return subprocess.run([openssl, "verify", "-CAfile", str(pki / "ca.pem"), "-purpose", purpose,
                               str(pki / cert)], capture_output=True, text=True)

    assert check("server.pem", "sslserver").returncode == 0
    assert check("pi-07.pem", "sslclient").returncode == 0
    assert check("pi-07.pem", "sslserver").returncode != 0     # a device cert cannot pose as the broker
    other = pki.parent / "other"
    init_ca(other)
    issue_client(other, "pi-07")
    assert check("../other/pi-07.pem", "sslclient").returncode != 0


@pytest.mark.parametrize("bad", ["pi/07", "+", "#", "", "$SYS", "a" * 65, "pi 07"])
def test_ids_that_would_break_the_acl_are_refused(pki, bad):
    with pytest.raises(InvalidId):
        issue_client(pki, bad)
    assert {p.name for p in pki.iterdir()} == {"ca.pem", "ca.key"}


def test_errors_name_what_is_wrong(tmp_path, pki):
    with pytest.raises(CertError, match="no usable CA"):
        issue_client(tmp_path / "nowhere", "pi-1")
    with pytest.raises(CertError, match="neither an IP address nor a DNS name"):
        issue_server(pki, ["bad host!"])
    with pytest.raises(CertError, match="at least one host"):
        issue_server(pki, [])
    with pytest.raises(CertError, match="days"):
        issue_client(pki, "pi-1", days=0)


def test_key_stays_private_despite_umask_and_a_stale_temp_file(pki):
    stale = pki / f".pi-9.key.tmp-{os.getpid()}"
    stale.write_bytes(b"junk")
    stale.chmod(0o666)
    old = os.umask(0)
    try:
        issue_client(pki, "pi-9")
    finally:
        os.umask(old)
    assert mode(pki / "pi-9.key") == 0o600 and not stale.exists()
    assert b"PRIVATE KEY" in (pki / "pi-9.key").read_bytes()


def test_reissue_rotates_the_key(pki):
    issue_client(pki, "pi-1")
    first = (pki / "pi-1.key").read_bytes()
    issue_client(pki, "pi-1")
    assert (pki / "pi-1.key").read_bytes() != first
    load(pki / "pi-1.pem").verify_directly_issued_by(load(pki / "ca.pem"))


def test_cli(tmp_path):
    r = CliRunner()
    d = str(tmp_path / "pki")
    assert r.invoke(certs, ["init", "--dir", d]).exit_code == 0
    again = r.invoke(certs, ["init", "--dir", d])
    assert again.exit_code == 1 and "exists" in again.output
    res = r.invoke(certs, ["server", "--dir", d])
    assert res.exit_code == 0 and "server.pem" in res.output
    res = r.invoke(certs, ["server", "--dir", d, "--host", "broker.lan", "--host", "10.1.2.3", "--days", "30"])
    assert res.exit_code == 0
    san = load(tmp_path / "pki" / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert r.invoke(certs, ["issue", "pi-9", "--dir", d]).exit_code == 0
    bad = r.invoke(certs, ["issue", "pi/+", "--dir", d])
    assert bad.exit_code == 2 and "DEVICE_ID" in bad.output and "contains" in bad.output
    assert r.invoke(certs, ["issue", "pi-9", "--dir", d, "--days", "0"]).exit_code == 2
