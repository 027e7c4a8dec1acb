"""The server certificate, real TLS handshakes on loopback, and known_hosts pinning."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ferry import paths
from ferry.client.known_hosts import KnownHosts, host_key
from ferry.client.tls import check_peer, client_ssl_context, peer_fingerprint
from ferry.errors import ConnectionBroken, ExitCode, FerryError, HostKeyMismatch, UsageError
from ferry.server.tls import ensure_certificate, fingerprint_file, server_ssl_context
from ferry.tlsbase import fingerprint

FP_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_certificate(tmp_path_factory.mktemp("root"))


# --- certificate -----------------------------------------------------------------------------------


def test_fingerprint_format() -> None:
    # sha256("") is well known; OpenSSH style drops the '=' padding.
    assert fingerprint(b"") == "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
    assert FP_RE.fullmatch(fingerprint(b"anything"))


def test_certificate_created_with_private_key(tmp_path: Path) -> None:
    old = os.umask(0)  # the key must be 0600 whatever the umask
    try:
        cert, key = ensure_certificate(tmp_path / "root")
    finally:
        os.umask(old)
    assert (cert, key) == (paths.cert_file(tmp_path / "root"), paths.key_file(tmp_path / "root"))
    assert mode(key) == 0o600
    assert mode(paths.tls_dir(tmp_path / "root")) == 0o700
    assert not [p for p in (tmp_path / "root").iterdir() if p.name.startswith(".tls-")]  # no leftovers


def test_certificate_contents(cert_pair: tuple[Path, Path]) -> None:
    cert = x509.load_pem_x509_certificate(cert_pair[0].read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert "localhost" in dns
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("::1") in ips
    hostname = socket.gethostname().lower().rstrip(".")
    if hostname and hostname.isascii():
        assert hostname in dns
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert lifetime > datetime.timedelta(days=9 * 365)
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)


def test_certificate_reused_and_fingerprint_stable(tmp_path: Path) -> None:
    cert, key = ensure_certificate(tmp_path)
    first = (cert.read_bytes(), key.read_bytes(), fingerprint_file(cert))
    os.chmod(key, 0o644)
    cert2, key2 = ensure_certificate(tmp_path)
    assert (cert2, key2) == (cert, key)
    assert (cert.read_bytes(), key.read_bytes(), fingerprint_file(cert)) == first
    assert mode(key) == 0o600  # a loosened key mode is tightened again
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert fingerprint(der) == first[2]
    assert FP_RE.fullmatch(first[2])


def test_missing_half_is_regenerated_as_a_matching_pair(tmp_path: Path) -> None:
    cert, key = ensure_certificate(tmp_path)
    old_fp = fingerprint_file(cert)
    cert.unlink()
    cert, key = ensure_certificate(tmp_path)
    assert fingerprint_file(cert) != old_fp
    server_ssl_context(cert, key)  # load_cert_chain checks that key and certificate match


def test_concurrent_first_start_yields_one_matching_pair(tmp_path: Path) -> None:
    root = tmp_path / "root"
    barrier = threading.Barrier(4, timeout=10)

    def start(_: int) -> tuple[bytes, bytes]:
        barrier.wait()
        cert, key = ensure_certificate(root)
        return cert.read_bytes(), key.read_bytes()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(start, range(4), timeout=60))
    assert len(set(results)) == 1
    server_ssl_context(paths.cert_file(root), paths.key_file(root))


def test_server_context_bad_files(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(FerryError, match="cannot load the TLS certificate"):
        server_ssl_context(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(FerryError, match="cannot read"):
        fingerprint_file(tmp_path / "missing.pem")


def test_context_settings(cert_pair: tuple[Path, Path]) -> None:
    client = client_ssl_context()
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_NONE and not client.check_hostname
    server = server_ssl_context(*cert_pair)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all("GCM" in name or "CHACHA20" in name for name in tls12)
    assert all(name.startswith("ECDHE") for name in tls12)


# --- real handshakes -----------------------------------------------------------------------------


class OneShotTLSServer:
    """Accepts one TLS connection on loopback in a thread, sends b"hello", records the result."""

    def __init__(self, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.host = host
        self.port = int(self.listener.getsockname()[1])
        self.ctx = ctx
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")
                tls.recv(1)  # wait for the client to close
        except BaseException as exc:  # reported to the test, not swallowed
            self.error = exc

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.listener.close()
        assert not self.thread.is_alive()


@pytest.fixture
def tls_server(cert_pair: tuple[Path, Path]) -> Iterator[OneShotTLSServer]:
    server = OneShotTLSServer(server_ssl_context(*cert_pair))
    yield server
    server.close()


def connect(server: OneShotTLSServer) -> ssl.SSLSocket:
    raw = socket.create_connection((server.host, server.port), timeout=10)
    return client_ssl_context().wrap_socket(raw, server_hostname="localhost")


def test_handshake_and_peer_fingerprint(tls_server: OneShotTLSServer, cert_pair: tuple[Path, Path]) -> None:
    with connect(tls_server) as tls:
        assert tls.recv(5) == b"hello"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        cipher = tls.cipher()
        assert cipher is not None and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])
        assert peer_fingerprint(tls) == fingerprint_file(cert_pair[0])
    assert tls_server.error is None


def test_handshake_over_ipv6(cert_pair: tuple[Path, Path]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = OneShotTLSServer(server_ssl_context(*cert_pair), host="::1")
    except OSError:
        pytest.skip("::1 not available")
    try:
        with connect(server) as tls:
            assert tls.recv(5) == b"hello"
            assert peer_fingerprint(tls) == fingerprint_file(cert_pair[0])
    finally:
        server.close()
    assert server.error is None


def test_peer_fingerprint_of_sslobject(cert_pair: tuple[Path, Path]) -> None:
    """asyncio hands us an SSLObject, not an SSLSocket: peer_fingerprint must work with both."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ssl_context().wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ssl_context(*cert_pair).wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):  # a handshake takes a few round trips; bounded
        for i, obj in enumerate((client, server)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            break
    assert all(done)
    assert peer_fingerprint(client) == fingerprint_file(cert_pair[0])


def test_peer_without_certificate() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> None:
            return None

    with pytest.raises(ConnectionBroken, match="no TLS certificate"):
        peer_fingerprint(NoCert())  # type: ignore[arg-type]


def test_check_peer_pins_then_detects_change(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    known = KnownHosts(tmp_path / "client" / "known_hosts")
    other_cert = ensure_certificate(tmp_path / "other-root")
    # Each server binds a fresh port, so pin under one logical name: what matters is the certificate.
    rounds = [(cert_pair, "new"), (cert_pair, "known"), (other_cert, "mismatch")]
    for pair, expected in rounds:
        server = OneShotTLSServer(server_ssl_context(*pair))
        try:
            with connect(server) as tls:
                if expected == "mismatch":
                    with pytest.raises(HostKeyMismatch) as info:
                        check_peer(tls, "server.test", 7373, known)
                    assert fingerprint_file(pair[0]) in str(info.value)
                else:
                    assert check_peer(tls, "server.test", 7373, known) == (
                        expected,
                        fingerprint_file(pair[0]),
                    )
        finally:
            server.close()
    assert known.lookup("server.test", 7373) == fingerprint_file(cert_pair[0])  # the pin was not replaced


# --- known_hosts ---------------------------------------------------------------------------------

FP_A = "SHA256:" + "A" * 43
FP_B = "SHA256:" + "B" * 43


@pytest.fixture
def known(tmp_path: Path) -> KnownHosts:
    return KnownHosts(tmp_path / "home" / "known_hosts")


def test_new_then_known(known: KnownHosts) -> None:
    assert known.lookup("example.org", 7373) is None
    assert known.check("example.org", 7373, FP_A) == "new"
    assert known.check("example.org", 7373, FP_A) == "known"
    assert known.path.read_text() == f"example.org:7373 {FP_A}\n"
    assert known.lookup("example.org", 7373) == FP_A


def test_file_and_folder_modes(known: KnownHosts) -> None:
    old = os.umask(0)
    try:
        known.check("example.org", 7373, FP_A)
    finally:
        os.umask(old)
    assert mode(known.path) == 0o600
    assert mode(known.path.parent) == 0o700
    # No temporary files are left behind by the atomic rewrite.
    assert sorted(p.name for p in known.path.parent.iterdir()) == ["known_hosts", "known_hosts.lock"]


def test_loose_mode_is_fixed_on_rewrite(known: KnownHosts) -> None:
    known.path.parent.mkdir(parents=True)
    known.path.write_text(f"a.example:1 {FP_A}\n")
    os.chmod(known.path, 0o644)
    known.check("b.example", 1, FP_B)
    assert mode(known.path) == 0o600


def test_mismatch_is_loud_and_says_what_to_do(known: KnownHosts) -> None:
    known.path.parent.mkdir(parents=True)
    known.path.write_text(f"# my servers\n\nother:1 {FP_B}\nexample.org:7373 {FP_A}\n")
    with pytest.raises(HostKeyMismatch) as info:
        known.check("example.org", 7373, FP_B)
    message = str(info.value)
    assert "the certificate of example.org:7373 changed" in message
    assert f"remove line 4 of {known.path}" in message
    assert FP_A in message and FP_B in message
    assert info.value.exit_code == ExitCode.CONNECTION
    # Must not look like a transient network error that a retry loop would retry.
    assert not isinstance(info.value, ConnectionBroken)
    assert known.path.read_text().count("example.org") == 1  # nothing was changed


def test_forget(known: KnownHosts) -> None:
    known.check("a.example", 1, FP_A)
    known.check("b.example", 1, FP_B)
    assert known.forget("a.example", 1) is True
    assert known.forget("a.example", 1) is False
    assert known.check("a.example", 1, FP_B) == "new"  # re-pinned with the new certificate
    assert known.lookup("b.example", 1) == FP_B


def test_comments_and_malformed_lines_are_kept(known: KnownHosts) -> None:
    known.path.parent.mkdir(parents=True)
    original = f"# comment\n\ngarbage\na.example:1 {FP_A}\n"
    known.path.write_text(original)
    assert known.check("b.example", 2, FP_B) == "new"
    assert known.path.read_text() == original + f"b.example:2 {FP_B}\n"
    assert known.forget("a.example", 1)
    assert known.path.read_text() == f"# comment\n\ngarbage\nb.example:2 {FP_B}\n"


def test_hosts_are_normalised_and_ports_distinguish(known: KnownHosts) -> None:
    assert host_key("[::1]", 7373) == host_key("::1", 7373) == host_key("0:0::1", 7373) == "[::1]:7373"
    assert host_key("Example.ORG.", 1) == "example.org:1"
    assert host_key("127.0.0.1", 2) == "127.0.0.1:2"
    assert known.check("::1", 7373, FP_A) == "new"
    assert known.check("[::1]", 7373, FP_A) == "known"
    assert known.check("::1", 7374, FP_B) == "new"  # another port is another server


@pytest.mark.parametrize(("host", "port"), [("a.example", 0), ("a.example", 70000), ("", 1), ("a b", 1)])
def test_invalid_host_or_port(known: KnownHosts, host: str, port: int) -> None:
    with pytest.raises(UsageError):
        known.check(host, port, FP_A)


def test_default_path_follows_ferry_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FERRY_HOME", str(tmp_path / "fh"))
    assert KnownHosts().path == tmp_path / "fh" / "known_hosts"


def test_concurrent_pins_are_not_lost(known: KnownHosts) -> None:
    barrier = threading.Barrier(8, timeout=10)

    def pin(i: int) -> str:
        barrier.wait()
        return KnownHosts(known.path).check(f"h{i}.example", 1, FP_A)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(pin, range(8), timeout=30)) == ["new"] * 8
    for i in range(8):
        assert known.lookup(f"h{i}.example", 1) == FP_A
