"""Shared test helpers: only loopback, only free ports, only processes we started.

The server/client fixtures are one family over the conformance matrix (tests/conformance.py,
tests/README.md): ``cell`` (which transport, client and event loop), ``server`` (a started
in-process server of that cell with user ``alice``), ``client`` (alice's client of that cell).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance import Cell, cells_for, open_client
from ferry_server import ServerThread
from transfer_support import running_server

FERRY = [sys.executable, "-m", "ferry"]

# No test's `ferry` process leaves a resident connection behind (or uses one a user has): each
# would hold a session on a test server for minutes. tests/test_resident.py turns it on for itself.
os.environ["FERRY_RESIDENT"] = "0"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "matrix: run on every cell of the conformance matrix (tests/README.md)"
    )
    config.addinivalue_line("markers", "transports: run over TLS and plain (async client, asyncio)")
    config.addinivalue_line("markers", "backends: run on the folder and the object backend (default cell)")
    config.addinivalue_line("markers", "cell(transport, client, loop, backend): run on that one cell")
    config.addinivalue_line("markers", "shared_server(NAME={options}): the module's tests share one server")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``matrix``, ``transports`` or ``cell(...)`` that use ``cell`` (or ``server``,
    ``client``) run once per cell; the rest keep the default cell and their test ids."""
    if "cell" in metafunc.fixturenames:
        cells = cells_for(metafunc.definition)
        if cells != [Cell()]:
            metafunc.parametrize("cell", cells, ids=[c.id for c in cells])


@pytest.fixture
def cell() -> Cell:
    """The default cell (TLS, async client, asyncio); marks widen it (see pytest_generate_tests)."""
    return Cell()


@pytest.fixture
def server(request: pytest.FixtureRequest, cell: Cell, tmp_path: Path) -> Iterator[ServerThread]:
    """A started in-process server of ``cell`` (transport, loop) with user ``alice`` (password
    PASSWORD, commands allowed); its root is ``tmp_path/root``. In a module marked ``shared_server``
    it is the module's one server instead (:func:`module_server`)."""
    if request.node.get_closest_marker("shared_server") is not None:
        yield request.getfixturevalue("module_server")
        return
    backend: dict[str, Any] = {}
    if cell.objects:  # files in the real SeaweedFS, namespace and accounts in a schema of their own
        from store_support import s3_config

        backend = {
            "db": request.getfixturevalue("pg_dsn"),
            "store": s3_config(request.getfixturevalue("weed"), request.getfixturevalue("s3_prefix")),
        }
    with running_server(
        tmp_path / "root", plain=cell.plain, loop=cell.loop, exec_allowed=True, **backend
    ) as srv:
        assert (srv.loop is not None) and (
            type(srv.loop).__module__.startswith("uvloop") == (cell.loop == "uvloop")
        )
        yield srv


@pytest.fixture(scope="module")
def module_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """One server (the default cell) for all tests of a module marked ``shared_server(NAME={...})``:
    for tests that leave nothing behind that another would see (most CLI tests), one start instead
    of one a test. User ``alice`` as in ``server``, plus each NAME of the mark with those options
    of ``ServerThread.add_user`` (``bob={}``, ``carol={"exec_allowed": True}``)."""
    mark = request.node.get_closest_marker("shared_server")
    root = tmp_path_factory.mktemp(request.node.name.removesuffix(".py")) / "root"
    with running_server(root, exec_allowed=True) as srv:
        for name, options in (mark.kwargs if mark else {}).items():
            srv.add_user(name, **options)
        yield srv


@pytest.fixture
def client(cell: Cell, server: ServerThread, tmp_path: Path) -> Iterator[Any]:
    """alice's client of ``cell`` (async or sync, on the cell's loop) with a blocking interface."""
    c = open_client(cell, server, tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One key of each kind (``login_support.KeySet``), made once per run by the real ssh-keygen."""
    from login_support import make_keys

    return make_keys(tmp_path_factory.mktemp("keys"))


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0). Prefer letting servers bind 0 themselves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ferry_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for ferry subprocesses: a private FERRY_HOME so tests never touch ~/.config."""
    env = dict(os.environ)
    env["FERRY_HOME"] = str(tmp_path / "ferry-home")
    env["PYTHONUNBUFFERED"] = "1"
    yield env


# --- Real components for the scale-out tests (tests/components.py): started on first use, once per run.


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real SeaweedFS S3 store (``components.Weed``) on loopback for the whole test run."""
    from components import start_weed  # components imports this module: import it lazily

    w = start_weed(tmp_path_factory.mktemp("weed"))
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def s3_prefix() -> str:
    """A key prefix of its own for one test in the shared bucket (``t/<random>/``)."""
    return f"t/{secrets.token_hex(6)}/"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """DSN of a fresh PostgreSQL database for this test run, dropped at the end."""
    from components import create_database, drop_database

    name, dsn = create_database()
    try:
        yield dsn
    finally:
        drop_database(name)


@pytest.fixture
def pg_dsn(pg_database: str) -> Iterator[str]:
    """DSN whose default schema is a fresh one for this test (so tests never see each other's rows)."""
    from components import dsn_with, run_sql

    schema = f"t_{secrets.token_hex(6)}"
    run_sql(f"CREATE SCHEMA {schema}", pg_database)
    try:
        yield dsn_with(pg_database, schema=schema)
    finally:
        run_sql(f"DROP SCHEMA {schema} CASCADE", pg_database)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``haproxy([(host, port), ...])`` starts a real HAProxy (``components.HAProxy``) in front of
    those backends; every one started is stopped (by PID) when the test ends."""
    from components import start_haproxy

    started: list[Any] = []

    def start(backends: list[tuple[str, int]], **kw: Any) -> Any:
        h = start_haproxy(tmp_path / f"haproxy{len(started)}", backends, **kw)
        started.append(h)
        return h

    try:
        yield start
    finally:
        for h in started:
            h.stop()
