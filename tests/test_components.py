"""The real components of the scale-out tests start, serve and stop (tests/components.py)."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import obstore
import pytest
from obstore.store import S3Store

from components import Weed


def s3(weed: Weed, secret: str | None = None) -> S3Store:
    return S3Store(
        weed.bucket,
        endpoint=weed.endpoint,
        access_key_id=weed.access_key,
        secret_access_key=secret or weed.secret_key,
        region=weed.region,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )


def test_weed_serves_s3_with_credentials(weed: Weed, s3_prefix: str) -> None:
    store = s3(weed)
    obstore.put(store, s3_prefix + "a", b"hello")
    assert bytes(obstore.get(store, s3_prefix + "a").bytes()) == b"hello"
    # The credentials are checked: the store is not open to anyone on loopback.
    with pytest.raises(obstore.exceptions.PermissionDeniedError):
        obstore.put(s3(weed, secret="wrong"), s3_prefix + "b", b"x")
    # Conditional create is honoured (the chunk layer relies on put-if-absent).
    with pytest.raises(obstore.exceptions.AlreadyExistsError):
        obstore.put(store, s3_prefix + "a", b"other", mode="create")


def test_postgres_database_per_run(pg_database: str, pg_dsn: str) -> None:
    async def check() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            name, schema = await conn.fetchrow("SELECT current_database(), current_schema()")
            assert name.startswith("ferry_test_")
            assert schema.startswith("t_")  # a schema of this test's own
            await conn.execute("CREATE TABLE t (x int)")
            await conn.execute("INSERT INTO t VALUES (1)")
            assert await conn.fetchval("SELECT count(*) FROM t") == 1
        finally:
            await conn.close()

    asyncio.run(check())


class _Named(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def backends() -> Iterator[Callable[[int], list[_Named]]]:
    started: list[_Named] = []

    def start(n: int) -> list[_Named]:
        for i in range(n):
            name = f"backend{i}\n".encode()

            class Handler(socketserver.BaseRequestHandler):
                def handle(self, name: bytes = name) -> None:
                    self.request.sendall(name)

            srv = _Named(("127.0.0.1", 0), Handler)
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            started.append(srv)
        return started

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def _ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        data = b""
        while not data.endswith(b"\n"):
            got = s.recv(64)
            if not got:
                break
            data += got
        return data


def test_haproxy_spreads_and_routes_around_a_dead_backend(
    haproxy: Callable[..., Any], backends: Callable[[int], list[_Named]]
) -> None:
    servers = backends(2)
    proxy = haproxy([srv.server_address[:2] for srv in servers], check_interval_ms=100)
    seen = {_ask(proxy.port) for _ in range(6)}
    assert seen == {b"backend0\n", b"backend1\n"}  # round robin reaches both
    servers[0].shutdown()
    servers[0].server_close()
    deadline = time.monotonic() + 10
    answers: list[bytes] = []
    while time.monotonic() < deadline:  # the health check notices within a few intervals
        answers = [_ask(proxy.port) for _ in range(4)]
        if answers == [b"backend1\n"] * 4:
            break
        time.sleep(0.1)
    assert answers == [b"backend1\n"] * 4
