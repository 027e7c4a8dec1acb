"""Several ``ferry serve`` processes sharing one PostgreSQL accounts database (``--db``), one
certificate (``--cert/--key``) and one address (HAProxy in front); and ``--store``: its checks, and
two servers serving one namespace. Real processes, real PostgreSQL, weed and HAProxy.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from components import Weed
from conftest import free_port
from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.errors import AuthError, PermissionDenied
from ferry.server.tls import generate_certificate
from login_support import REVOCATION_WITHIN, ended
from serve_process import ServeProcess, run_ferry


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One certificate and key for every server behind the address."""
    folder = tmp_path_factory.mktemp("tls")
    cert_pem, key_pem = generate_certificate()
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(key_pem)
    os.chmod(folder / "key.pem", 0o600)
    return folder / "cert.pem", folder / "key.pem"


def start_servers(
    tmp_path: Path, env: dict[str, str], dsn: str, certificate: tuple[Path, Path], count: int
) -> list[ServeProcess]:
    cert, key = certificate
    servers = []
    try:
        for i in range(count):
            args = ["--db", dsn, "--cert", str(cert), "--key", str(key)]
            servers.append(ServeProcess(tmp_path / f"root{i}", env, args=args).start())
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


async def connect(port: int, tmp_path: Path, user: str, password: str, kh: str = "kh") -> AsyncClient:
    c = await AsyncClient.connect(
        "127.0.0.1", port, user=user, password=password, known_hosts=KnownHosts(tmp_path / kh)
    )
    c.read_timeout = 20.0
    return c


def test_servers_share_accounts_certificate_and_revocation(
    tmp_path: Path, ferry_env: dict[str, str], pg_dsn: str, certificate: tuple[Path, Path], haproxy: Any
) -> None:
    """Two servers on one database behind one address: one first user, one fingerprint, a user added
    with ``ferry user --db`` (another process) logs in on both, and ``ferry user del --db`` ends its
    sessions on both within seconds."""
    a, b = start_servers(tmp_path, ferry_env, pg_dsn, certificate, 2)
    try:
        assert [s.password is not None for s in (a, b)] == [True, False]  # only the first creates it
        assert a.fingerprint is not None and a.fingerprint == b.fingerprint
        assert any("accounts:" in line and "postgresql://" in line for line in b.lines)
        r = run_ferry(["user", "add", "ann", "--db", pg_dsn, "--password-stdin"], ferry_env, input="ann pw\n")
        assert r.returncode == 0, r.stderr
        proxy = haproxy([("127.0.0.1", a.port), ("127.0.0.1", b.port)])

        async def main() -> None:
            # Round robin: four connections through the proxy reach both servers; one pin is enough.
            for _ in range(4):
                c = await connect(proxy.port, tmp_path, "ferry", a.password or "", kh="kh-proxy")
                await c.close()
            on_a = await connect(a.port, tmp_path, "ann", "ann pw")
            on_b = await connect(b.port, tmp_path, "ann", "ann pw")
            try:
                await on_a.mkdir("made-through-a")
                assert [e.name for e in await on_b.listdir("")] == []  # homes are per server (folder backend)
                # A change that ends nothing, and time for both servers to poll with the sessions open
                # (once a second): the deletion below must then be noticed as a change of its own.
                r = await asyncio.to_thread(run_ferry, ["user", "mod", "ann", "--quota", "1G", "--db", pg_dsn], ferry_env)
                assert r.returncode == 0, r.stderr
                await asyncio.sleep(2.5)
                await on_a.ping()  # both sessions are still open
                await on_b.ping()
                started = time.monotonic()
                r = await asyncio.to_thread(run_ferry, ["user", "del", "ann", "--db", pg_dsn], ferry_env)
                assert r.returncode == 0, r.stderr
                for c in (on_a, on_b):
                    reason = await ended(c)
                    assert reason is not None and "your account was deleted" in reason, reason
                assert time.monotonic() - started < REVOCATION_WITHIN + 2
            finally:
                await on_a.close()
                await on_b.close()
            with pytest.raises(AuthError):
                await connect(b.port, tmp_path, "ann", "ann pw")

        asyncio.run(asyncio.wait_for(main(), 90))
        for s in (a, b):
            assert (s.root / "homes" / "ann").is_dir()  # each server made the home at the first login
    finally:
        for s in (a, b):
            s.stop()


def serve_fails(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    """``ferry serve ARGS`` that must stop before listening: its status and what it said."""
    r = run_ferry(["serve", "--root", str(tmp_path / "root"), "--port", "0", *args], env, timeout=60)
    assert "listening on" not in r.stdout, r.stdout
    return r.returncode, r.stderr


def test_store_options_are_checked(
    tmp_path: Path, ferry_env: dict[str, str], pg_dsn: str, weed: Weed, s3_prefix: str
) -> None:
    """--store fails fast with what to fix: no --db, a bad URL, missing credentials, an unreachable
    database or store."""
    store = f"s3://{weed.bucket}/{s3_prefix}"
    env = {**ferry_env, **weed.env()}
    code, err = serve_fails(tmp_path, env, "--store", store)
    assert code == 2 and "--store needs --db" in err, err
    code, err = serve_fails(tmp_path, env, "--store", "s3:/nobucket", "--db", pg_dsn)
    assert code == 2 and "expected s3://BUCKET/PREFIX" in err, err
    no_keys = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    code, err = serve_fails(tmp_path, no_keys, "--store", store, "--db", pg_dsn)
    assert code == 2 and "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err, err
    down = f"postgresql://ferry:pw-not-shown@127.0.0.1:{free_port()}/ferry"
    code, err = serve_fails(tmp_path, env, "--store", store, "--db", down)
    assert code == 1 and "accounts database postgresql://ferry@127.0.0.1" in err and "unreachable" in err, err
    assert "pw-not-shown" not in err
    gone = f"http://127.0.0.1:{free_port()}"
    code, err = serve_fails(tmp_path, env, "--store", store, "--db", pg_dsn, "--s3-endpoint", gone)
    assert code == 1 and f"cannot use the object store {store}" in err and gone in err, err


def test_two_store_servers_serve_one_namespace(
    tmp_path: Path, ferry_env: dict[str, str], pg_dsn: str, weed: Weed, s3_prefix: str, certificate: tuple[Path, Path]
) -> None:
    """``ferry serve --store --db`` (the endpoint from FERRY_S3_ENDPOINT) serves; a folder made through
    one server is listed through the other at once, and commands are refused clearly."""
    env = {**ferry_env, **weed.env()}
    cert, key = certificate
    args = ["--db", pg_dsn, "--store", f"s3://{weed.bucket}/{s3_prefix}", "--cert", str(cert), "--key", str(key)]
    a = ServeProcess(tmp_path / "root-a", env, args=args).start()
    try:
        b = ServeProcess(tmp_path / "root-b", env, args=args).start()
    except BaseException:
        a.stop()
        raise
    try:
        assert a.password is not None and b.password is None  # one shared first user

        async def main() -> None:
            on_a = await connect(a.port, tmp_path, "ferry", a.password or "")
            on_b = await connect(b.port, tmp_path, "ferry", a.password or "")
            try:
                await on_a.mkdir("made-through-a/sub", parents=True)
                assert [e.name for e in await on_b.listdir("", recursive=True)] == ["made-through-a", "made-through-a/sub"]
                with pytest.raises(PermissionDenied, match="object store"):
                    await on_b.run(["true"])
            finally:
                await on_a.close()
                await on_b.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        assert not any((s.root / "homes" / "ferry").exists() and any((s.root / "homes" / "ferry").iterdir()) for s in (a, b))
    finally:
        for s in (a, b):
            s.stop()


def test_cert_and_key_options_are_checked(tmp_path: Path, ferry_env: dict[str, str], certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    code, err = serve_fails(tmp_path, ferry_env, "--cert", str(cert))
    assert code == 2 and "--cert and --key go together" in err, err
    code, err = serve_fails(tmp_path, ferry_env, "--cert", str(cert), "--key", str(key), "--plain")
    assert code == 2 and "--plain" in err, err
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    # On a terminal: a clear error, not OpenSSL asking for a pass phrase (a server starts unattended).
    import pexpect

    from conftest import FERRY

    argv = ["serve", "--root", str(tmp_path / "root"), "--port", "0", "--cert", str(cert), "--key", str(locked)]
    child = pexpect.spawn(FERRY[0], [*FERRY[1:], *argv], env=ferry_env, timeout=30, encoding="utf-8")
    try:
        assert child.expect(["the key is encrypted", "pass phrase", pexpect.EOF]) == 0, child.before
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1
