"""Key and token login over real sockets: keys made by ssh-keygen, a real server, the real client.

Also the protocol's promises: a key signature is bound to the server it was made for (a replay to
another server or a relay through a man in the middle is refused), a changed certificate stops
the client before it sends anything, and a version-1 client still logs in with a password.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from ferry.client.aclient import AsyncClient
from ferry.client.auth import LoginOptions, log_in
from ferry.client.known_hosts import KnownHosts
from ferry.client.tls import client_ssl_context, peer_fingerprint
from ferry.errors import AuthError, HostKeyMismatch, PermissionDenied
from ferry.server.accounts import Accounts
from ferry.server.credentials import Credentials
from ferry.server.tls import ensure_certificate, fingerprint_file, server_ssl_context
from ferry.wire import CONNECTION_ENDED
from ferry.wire import messages as m
from ferry_server import CHEAP_HASHER, PASSWORD, ServerThread
from login_support import PASSPHRASE, KeySet
from transfer_support import RawClient, home
from transfer_support import connect_with as connect


def add_keys(root: Path, user: str, *lines: str) -> None:
    with Accounts(root, hasher=CHEAP_HASHER) as acc:
        Credentials(acc).add_keys(user, "".join(lines))


def add_token(root: Path, user: str, **kw: Any) -> str:
    with Accounts(root, hasher=CHEAP_HASHER) as acc:
        return Credentials(acc).add_token(user, **kw)[1]


@pytest.fixture
def server(server: ServerThread, keys: KeySet) -> ServerThread:
    """The shared server (alice may run commands: a read-only token must take that away), with bob
    and alice's keys."""
    server.add_user("bob")
    add_keys(server.root, "alice", keys.ed25519.pub, keys.ecdsa.pub, keys.rsa.pub, keys.protected.pub)
    return server


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_login_with_each_key_type(server: ServerThread, tmp_path: Path, keys: KeySet, kind: str) -> None:
    key = getattr(keys, kind)
    (home(server) / "hello.txt").write_text("hi")

    async def main() -> None:
        c = await connect(server, tmp_path, key=key.path)
        try:
            assert c.info is not None
            assert c.info.login_method == "key"
            # The fingerprint the server reports is the one ssh-keygen -l prints for the key.
            assert c.info.login_detail == f"key {key.fingerprint} ({key.path})"
            assert [e.name for e in await c.listdir("")] == ["hello.txt"]
        finally:
            await c.close()

    asyncio.run(main())
    log = (server.root / "logs" / "ferry.log").read_text()
    assert "login user=alice peer=127.0.0.1:" in log and f"method=key key={key.fingerprint}" in log


def test_passphrase_protected_key(server: ServerThread, tmp_path: Path, keys: KeySet) -> None:
    async def main() -> None:
        c = await connect(server, tmp_path, key=keys.protected.path, passphrase=PASSPHRASE)
        assert c.info is not None and c.info.login_detail.startswith(f"key {keys.protected.fingerprint}")
        await c.close()
        with pytest.raises(AuthError, match=r"passphrase given for .* is wrong"):
            await connect(server, tmp_path, key=keys.protected.path, passphrase="not it")
        # Asked for on a "terminal" (a callback): only after the server said it would accept the key.
        asked: list[str] = []

        def ask(prompt: str) -> str:
            asked.append(prompt)
            return PASSPHRASE

        c = await connect(server, tmp_path, login=LoginOptions(identities=[keys.protected.path], ask_passphrase=ask))
        await c.close()
        assert asked == [f"Enter passphrase for key '{keys.protected.path}': "]
        asked.clear()
        with pytest.raises(AuthError):  # bob does not have the key: no passphrase is asked for
            await connect(server, tmp_path, "bob", login=LoginOptions(identities=[keys.protected.path], ask_passphrase=ask))
        assert asked == []

    asyncio.run(main())


def test_unknown_and_weak_keys_are_refused(server: ServerThread, tmp_path: Path, keys: KeySet) -> None:
    async def main() -> None:
        with pytest.raises(AuthError, match="none of the offered keys is accepted"):
            await connect(server, tmp_path, key=keys.stranger.path)
        with pytest.raises(AuthError, match="none of the offered keys is accepted"):
            await connect(server, tmp_path, "bob", key=keys.ed25519.path)  # alice's key, not bob's
        with pytest.raises(AuthError, match="1024 bits refused"):
            await connect(server, tmp_path, key=keys.rsa1024.path)
        # A refused key, then the password: the login goes on to the next method.
        c = await connect(server, tmp_path, key=keys.stranger.path, password=PASSWORD)
        assert c.info is not None and c.info.login_method == "password"
        await c.close()

    asyncio.run(main())


def test_key_of_a_disabled_user_is_refused(server: ServerThread, tmp_path: Path, keys: KeySet) -> None:
    with Accounts(server.root, hasher=CHEAP_HASHER) as acc:
        acc.modify("alice", disabled=True)

    async def main() -> None:
        with pytest.raises(AuthError):
            await connect(server, tmp_path, key=keys.ed25519.path)
        with pytest.raises(AuthError):
            await connect(server, tmp_path, password=PASSWORD)

    asyncio.run(main())


def test_token_login_read_only_and_expiry(server: ServerThread, tmp_path: Path) -> None:
    (home(server) / "data.txt").write_text("payload")
    writer = add_token(server.root, "alice")
    reader = add_token(server.root, "alice", read_only=True, label="ci")
    expiring = add_token(server.root, "alice", expires=int(time.time()) + 3600)
    with sqlite3.connect(server.root / "users.db") as db:  # as if an hour had passed
        db.execute("UPDATE tokens SET expires = ? WHERE id = ?", (int(time.time()) - 1, expiring.split("_")[1]))

    async def main() -> None:
        c = await connect(server, tmp_path, token=writer)
        assert c.info is not None and c.info.login_method == "token" and not c.info.read_only
        await c.mkdir("made-by-token")
        await c.close()

        c = await connect(server, tmp_path, token=reader)
        assert c.info is not None and c.info.read_only and not c.info.exec_allowed
        try:
            assert {e.name for e in await c.listdir("")} == {"data.txt", "made-by-token"}
            await c.get("data.txt", tmp_path / "copy.txt")
            assert (tmp_path / "copy.txt").read_text() == "payload"
            src = tmp_path / "up.txt"
            src.write_text("x" * 10)
            big = tmp_path / "big.bin"
            big.write_bytes(b"y" * (3 << 20))  # streamed, not inline: its data frames are dropped
            for action in (
                c.mkdir("nope"),
                c.remove("data.txt"),
                c.rename("data.txt", "moved.txt"),
                c.put(src, "up.txt"),
                c.put(big, "big.bin"),
                c.run(["true"]),
            ):
                with pytest.raises(PermissionDenied) as info:
                    await action
                assert info.value.code == "read-only-token"
            await c.ping()  # the session is still usable after the refusals
        finally:
            await c.close()
        assert sorted(p.name for p in home(server).iterdir()) == ["data.txt", "made-by-token"]

        with pytest.raises(AuthError, match="invalid, expired or revoked token"):
            await connect(server, tmp_path, token=expiring)
        with pytest.raises(AuthError, match="invalid, expired or revoked token"):
            await connect(server, tmp_path, token=writer[:-2] + "xx")
        with pytest.raises(AuthError):  # a token of alice does not log in as bob
            await connect(server, tmp_path, "bob", token=writer)

    asyncio.run(main())


def test_version_1_client_still_logs_in_with_a_password(server: ServerThread, keys: KeySet) -> None:
    raw = RawClient(server.port, tls=True)
    raw.send(m.Hello(min_version=1, max_version=1, software="ferry/0.0.1"))
    welcome = raw.next_event()
    assert isinstance(welcome, m.Welcome) and welcome.version == 1 and welcome.nonce == b""
    raw.send(m.Auth(user="alice", password=PASSWORD))
    assert isinstance(raw.next_event(), m.AuthOk)
    raw.close()
    # And a version-1 connection cannot use the version-2 login messages.
    raw = RawClient(server.port, tls=True)
    raw.send(m.Hello(min_version=1, max_version=1))
    assert isinstance(raw.next_event(), m.Welcome)
    raw.send(m.AuthToken(token="fyt_whatever_x"))
    events = raw.until_closed()
    assert any(isinstance(e, m.Error) and e.code == "protocol" for e in events), events


class _Recorder:
    """An Exchange over a RawClient that keeps what was sent (to replay it elsewhere)."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self.sent: list[m.Message] = []

    async def send(self, msg: m.Message) -> None:
        self.sent.append(msg)
        self.raw.send(msg)

    async def receive(self) -> m.Message:
        ev = self.raw.next_event()
        assert ev is not CONNECTION_ENDED
        return ev  # type: ignore[no-any-return]


def _replay(port: int, msg: m.Message) -> m.Error:
    """Send ``msg`` as the login of a fresh connection; the server's answer (an Error)."""
    raw = RawClient(port, tls=True)
    try:
        raw.send(m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION))
        assert isinstance(raw.next_event(), m.Welcome)
        raw.send(msg)
        reply = raw.next_event()
        assert isinstance(reply, m.Error), reply
        return reply
    finally:
        raw.close()


def test_signature_replayed_to_another_server_is_refused(tmp_path: Path, keys: KeySet) -> None:
    a = ServerThread(tmp_path / "a")
    b = ServerThread(tmp_path / "b")
    for srv in (a, b):
        srv.add_user("alice")
        srv.start()
        add_keys(srv.root, "alice", keys.ed25519.pub)
    try:
        assert fingerprint_file(a.root / "tls" / "cert.pem") != fingerprint_file(b.root / "tls" / "cert.pem")
        # A real key login to A, recording the AuthKey the client sent.
        raw = RawClient(a.port, tls=True)
        fp = peer_fingerprint(raw.sock)  # type: ignore[arg-type]
        raw.send(m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION))
        welcome = raw.next_event()
        rec = _Recorder(raw)
        result = asyncio.run(log_in(rec, welcome, "alice", LoginOptions(identities=[keys.ed25519.path]), fingerprint=fp))
        assert result.method == "key"
        signed = [msg for msg in rec.sent if isinstance(msg, m.AuthKey)]
        assert len(signed) == 1
        raw.close()
        # The same message to B (same user, same key registered there): refused; and to A again
        # on a new connection (a new server nonce): refused too.
        for port in (b.port, a.port):
            assert _replay(port, signed[0]).code == "auth"
    finally:
        a.stop()
        b.stop()


def test_relay_through_a_man_in_the_middle_is_refused(server: ServerThread, tmp_path: Path, keys: KeySet) -> None:
    """A relay with its own certificate passes every ferry byte unchanged between a client and the
    real server: the client signs the relay's fingerprint (which it pinned), so the server refuses."""
    cert, key = ensure_certificate(tmp_path / "evil")

    async def main() -> None:
        relayed: list[int] = []

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                relayed.append(len(data))
                w.write(data)
                await w.drain()
            w.close()

        async def on_victim(vr: asyncio.StreamReader, vw: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", server.port, ssl=client_ssl_context())
            await asyncio.gather(pipe(vr, uw), pipe(ur, vw), return_exceptions=True)

        evil = await asyncio.start_server(on_victim, "127.0.0.1", 0, ssl=server_ssl_context(cert, key))
        port = evil.sockets[0].getsockname()[1]
        try:
            with pytest.raises(AuthError, match="none of the offered keys"):
                await AsyncClient.connect(
                    "127.0.0.1", port, user="alice", key=keys.ed25519.path,
                    known_hosts=KnownHosts(tmp_path / "victim_known_hosts"),
                )  # fmt: skip
            assert relayed  # the relay did carry the login
        finally:
            evil.close()

    asyncio.run(main())
    log = (server.root / "logs" / "ferry.log").read_text()
    assert "auth failed method=key user=alice" in log
    assert "login user=alice" not in log


def test_changed_certificate_stops_before_anything_is_sent(tmp_path: Path, keys: KeySet) -> None:
    """A server with another certificate on a pinned address gets not one byte of the login."""
    old_cert, _ = ensure_certificate(tmp_path / "old")
    cert, key = ensure_certificate(tmp_path / "new")
    token = "fyt_abcdefghijkm_" + "s" * 43

    async def main() -> None:
        received: list[bytes] = []

        async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            received.append(await r.read(65536))
            w.close()

        srv = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ssl_context(cert, key))
        port = srv.sockets[0].getsockname()[1]
        known = KnownHosts(tmp_path / "known_hosts")
        known.check("127.0.0.1", port, fingerprint_file(old_cert))
        try:
            with pytest.raises(HostKeyMismatch):
                await AsyncClient.connect(
                    "127.0.0.1", port, user="alice", key=keys.ed25519.path, token=token,
                    password=PASSWORD, known_hosts=known,
                )  # fmt: skip
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.02)
        finally:
            srv.close()
        assert received == [b""]  # the TLS handshake, then the client closed: no Hello, no credential

    asyncio.run(main())


class _CountingHasher(type(CHEAP_HASHER)):  # type: ignore[misc]
    verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        type(self).verifications += 1
        return super().verify(hash, password)  # type: ignore[no-any-return]


def test_unknown_users_cost_the_same_work(tmp_path: Path, keys: KeySet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown user, wrong password and disabled user each cost one argon2 check; a key offer costs
    one signature check whether or not the user or the key exists."""
    import ferry.sshkeys

    hasher = _CountingHasher(time_cost=1, memory_cost=8192, parallelism=1)
    srv = ServerThread(tmp_path / "root")
    srv.config.hasher = hasher
    srv.add_user("alice")
    srv.add_user("carol")
    srv.start()
    add_keys(srv.root, "alice", keys.ed25519.pub)
    with Accounts(srv.root, hasher=CHEAP_HASHER) as acc:
        acc.modify("carol", disabled=True)
    checks = {"n": 0}
    real_verify = ferry.sshkeys.verify

    def counting_verify(*args: Any) -> bool:
        checks["n"] += 1
        return real_verify(*args)

    monkeypatch.setattr(ferry.sshkeys, "verify", counting_verify)
    try:
        async def main() -> None:
            for user, password in (("alice", "wrong"), ("nobody", "wrong"), ("carol", PASSWORD)):
                before = _CountingHasher.verifications
                with pytest.raises(AuthError, match="wrong user name or password"):
                    await connect(srv, tmp_path, user, password=password)
                assert _CountingHasher.verifications - before == 1, user
            for user, key in (("alice", keys.stranger), ("nobody", keys.ed25519), ("bob", keys.ed25519)):
                before = checks["n"]
                with pytest.raises(AuthError, match="none of the offered keys"):
                    await connect(srv, tmp_path, user, key=key.path)
                assert checks["n"] - before == 1, user

        asyncio.run(main())
    finally:
        srv.stop()


def test_welcome_nonce_is_fresh_per_connection(server: ServerThread) -> None:
    nonces = set()
    for _ in range(3):
        raw = RawClient(server.port, tls=True)
        raw.send(m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION))
        welcome = raw.next_event()
        assert isinstance(welcome, m.Welcome) and len(welcome.nonce) == 32
        assert {"key", "token"} <= set(welcome.features)
        nonces.add(welcome.nonce)
        raw.close()
    assert len(nonces) == 3


@pytest.mark.cell(transport="plain")
def test_plain_connection_signs_an_empty_fingerprint(server: ServerThread, tmp_path: Path, keys: KeySet) -> None:
    srv = server

    async def main() -> None:
        c = await connect(srv, tmp_path, key=keys.ed25519.path)
        assert c.info is not None and c.info.login_method == "key"
        await c.close()

    asyncio.run(main())

