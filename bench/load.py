"""Login storms: C clients started within one second against a real ``ferry serve``.

Each client logs in (a real argon2id password check with the production parameters), downloads a
4 KiB file, uploads 4 KiB and closes, all with the client's default timeouts. For each C (200, 500,
1,000 by default) a fresh server is started and the benchmark reports how many clients succeeded,
why the others failed, the login and whole-client latencies (p50, p99), how long the burst took,
the login rate, the server's CPU time and its peak RSS, and how long one more client that arrives
right after the burst waits for its login.

``--profile`` first measures where a login's time goes: one argon2id check (one thread, and the
throughput of 1, 2 and 3 threads at once), the CPU cost of a TLS handshake on each side (in
memory, no sockets), and sequential logins against an idle server.

    python bench/load.py                      # 200, 500, 1000 clients
    python bench/load.py --clients 1000 --profile
    python bench/load.py --login-threads 1    # how the login thread count matters

The clients all come from 127.0.0.1, so the server is started with a per-address pending-login
limit above C (the default, 32, would refuse most of them: that guard is tested in
tests/test_admission.py, not measured here). Logins are with passwords (argon2id), or with
``--auth token`` (a token per account) or ``--auth key`` (an ed25519 key made with ssh-keygen,
registered for every account); docs/performance.md has the runs.

Timed runs take the shared benchmark lock: ``flock /work/bench.lock python bench/load.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import ssl
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import FerryServer, KiB, MiB, _cpu_jiffies, fmt_num, log, scratch_dir, table, wait_quiet
from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.errors import FerryError
from ferry.server.accounts import Accounts, default_hasher
from ferry.server.credentials import Credentials

PASSWORD = "a long and honest benchmark password"
FILE_SIZE = 4 * KiB


@dataclass
class Outcome:
    """One client's result."""

    ok: bool
    kind: str  #: "ok", or what went wrong ("busy", "timeout", "broken", ...)
    login: float | None  #: seconds from its start to AuthOk (None if it never got there)
    total: float  #: seconds from its scheduled start to done (or failure)
    login_at: float | None = None  #: seconds from the start of the burst to its AuthOk


@dataclass
class Result:
    """One burst."""

    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0
    cpu: float | None = None
    peak_mib: float | None = None
    straggler_login: float | None = None
    straggler_kind: str = ""
    background: float = 0.0  #: share of the CPUs busy with other work just before the burst
    client_cpu: float | None = None  #: CPU seconds of this process (the clients) during the burst
    others: float | None = None  #: share of all CPUs used by other processes during the burst


@dataclass
class Logins:
    """How the clients log in (``--auth``): what :meth:`AsyncClient.connect` gets for each user."""

    auth: str
    tokens: dict[str, str] = field(default_factory=dict)  #: user -> token (``--auth token``)
    key: Path | None = None  #: private key file (``--auth key``; one key for every account)

    def kwargs(self, user: str) -> dict[str, Any]:
        """Keyword arguments for :meth:`AsyncClient.connect` that log ``user`` in."""
        if self.auth == "password":
            return {"user": user, "password": PASSWORD}
        if self.auth == "token":
            return {"user": user, "token": self.tokens[user]}
        return {"user": user, "key": str(self.key)}


def classify(exc: BaseException) -> str:
    """A short name for why a client failed."""
    text = str(exc)
    if "busy" in text or "refused the connection" in text:
        return "busy"
    if "timed out" in text or isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, FerryError):
        return type(exc).__name__
    return type(exc).__name__


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values`` (NaN when empty)."""
    if not values:
        return float("nan")
    data = sorted(values)
    return data[min(len(data) - 1, max(0, round(q * (len(data) - 1))))]


def prepare(root: Path, users: int, local: Path, auth: str = "password") -> tuple[list[str], Logins]:
    """Accounts (production password hashing) with a 4 KiB file in each home, the local file to
    upload, and the credentials for ``auth`` (a token per user, or one SSH key for all)."""
    names = [f"u{i:04d}" for i in range(users)]
    local.mkdir(parents=True, exist_ok=True)
    (local / "up4k").write_bytes(os.urandom(FILE_SIZE))
    logins = Logins(auth)
    if auth == "key":
        logins.key = local / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "load", "-f", str(logins.key)],
            check=True,
            timeout=60,
        )
    acc = Accounts(root)
    try:
        creds = Credentials(acc)
        for name in names:
            home = acc.add(name, PASSWORD).home
            home.mkdir(parents=True, exist_ok=True)
            (home / "f4k").write_bytes(os.urandom(FILE_SIZE))
            if auth == "token":
                logins.tokens[name] = creds.add_token(name, label="load")[1]
            elif auth == "key":
                creds.add_keys(name, (local / "id_ed25519.pub").read_text())
    finally:
        acc.close()
    return names, logins


async def one_client(
    port: int, plain: bool, logins: Logins, user: str, local: Path, index: int, known: KnownHosts, delay: float
) -> Outcome:
    """Wait ``delay``, then log in, get 4 KiB, put 4 KiB, close."""
    await asyncio.sleep(delay)
    t0 = time.monotonic()
    login: float | None = None
    try:
        client = await AsyncClient.connect("127.0.0.1", port, plain=plain, known_hosts=known, **logins.kwargs(user))
        login = time.monotonic() - t0
        async with client:
            await client.get("f4k", local / f"got{index}")
            await client.put(local / "up4k", f"up{index}")
    except Exception as exc:  # counted, not raised: the benchmark reports every kind of failure
        return Outcome(False, classify(exc), login, time.monotonic() - t0, _at(delay, login))
    return Outcome(True, "ok", login, time.monotonic() - t0, _at(delay, login))


def _at(delay: float, login: float | None) -> float | None:
    return None if login is None else delay + login


async def burst(port: int, plain: bool, logins: Logins, names: list[str], local: Path, n: int, spread: float) -> Result:
    """``n`` clients with start times spread evenly over ``spread`` seconds, plus one straggler
    that starts just after the last of them."""
    known = KnownHosts(local / "known_hosts")
    # Pin the certificate once, so a thousand first connections do not all write known_hosts.
    async with await AsyncClient.connect("127.0.0.1", port, plain=plain, known_hosts=known, **logins.kwargs(names[0])):
        pass
    res = Result(n)
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(one_client(port, plain, logins, names[i % len(names)], local, i, known, spread * i / n))
        for i in range(n)
    ]
    straggler = asyncio.create_task(one_client(port, plain, logins, names[-1], local, n, known, spread + 0.01))
    res.outcomes = list(await asyncio.gather(*tasks))
    res.wall = time.monotonic() - t0
    late = await straggler
    res.straggler_login, res.straggler_kind = late.login, late.kind
    return res


def run_one(n: int, args: argparse.Namespace) -> Result:
    """A fresh server, one burst of ``n`` clients."""
    with scratch_dir(256 * MiB, prefix="ferry-load-") as tmp:
        root, local = Path(tmp) / "root", Path(tmp) / "local"
        names, logins = prepare(root, min(args.users, n), local, args.auth)
        serve_args = [
            "--max-pending-logins-per-address",
            str(n + 64),
            "--max-pending-logins",
            str(max(1024, n + 64)),
        ]
        if args.login_threads:
            serve_args += ["--login-threads", str(args.login_threads)]
        with FerryServer(root, args.plain, args=serve_args) as srv:
            srv.reset_peak()
            cpu0, own0, (busy0, total0) = srv.cpu(), time.process_time(), _cpu_jiffies()
            res = asyncio.run(burst(srv.port, args.plain, logins, names, local, n, args.spread))
            cpu1, own1, (busy1, total1) = srv.cpu(), time.process_time(), _cpu_jiffies()
            res.cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            res.client_cpu = own1 - own0
            if res.cpu is not None and total1 > total0:
                # Everything busy on the machine, minus the server and the clients: other people's work.
                tick = os.sysconf("SC_CLK_TCK")
                others = (busy1 - busy0) / tick - res.cpu - res.client_cpu
                res.others = max(0.0, others) / ((total1 - total0) / tick)
            res.peak_mib = srv.peak_mib()
        return res


# --- where a login's time goes -------------------------------------------------------------------


def profile(args: argparse.Namespace) -> None:
    """Print the cost of the pieces of a login (see the module docstring)."""
    hasher = default_hasher()
    stored = hasher.hash(PASSWORD)
    one = []
    for _ in range(20):
        t = time.perf_counter()
        hasher.verify(stored, PASSWORD)
        one.append(time.perf_counter() - t)
    rows = [["argon2id check, 1 thread (median of 20)", f"{statistics.median(one) * 1000:.1f} ms", ""]]
    for threads in (1, 2, 3):
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(lambda _i: hasher.verify(stored, PASSWORD), range(60)))
            rate = 60 / (time.perf_counter() - t)
        rows.append([f"argon2id checks, {threads} threads at once", f"{rate:.0f} /s", ""])
    server_ms, client_ms = tls_handshake_cpu(200)
    rows.append(["TLS handshake, server side (CPU, in memory)", f"{server_ms:.2f} ms", ""])
    rows.append(["TLS handshake, client side (CPU, in memory)", f"{client_ms:.2f} ms", ""])
    with scratch_dir(256 * MiB, prefix="ferry-load-") as tmp:
        root, local = Path(tmp) / "root", Path(tmp) / "local"
        names, logins = prepare(root, 1, local, args.auth)
        with FerryServer(root, args.plain) as srv:

            async def sequential() -> list[float]:
                known = KnownHosts(local / "known_hosts")
                times = []
                for _ in range(30):
                    t = time.perf_counter()
                    c = await AsyncClient.connect(
                        "127.0.0.1", srv.port, plain=args.plain, known_hosts=known, **logins.kwargs(names[0])
                    )
                    times.append(time.perf_counter() - t)
                    await c.close()
                return times

            cpu0 = srv.cpu()
            times = asyncio.run(sequential())
            cpu1 = srv.cpu()
        per_login_cpu = (cpu1 - cpu0) / 31 if cpu0 is not None and cpu1 is not None else float("nan")
        rows.append(["login, sequential, idle server (median of 30)", f"{statistics.median(times) * 1000:.1f} ms", ""])
        rows.append(["server CPU per login (incl. argon2id)", f"{per_login_cpu * 1000:.1f} ms", ""])
    print(table(["piece of a login", "cost", ""], rows, markdown=args.markdown))
    print()


def tls_handshake_cpu(n: int) -> tuple[float, float]:
    """CPU milliseconds per TLS handshake on the server and the client side, measured over memory
    BIOs with the server's real context (same certificate type and settings as ``ferry serve``)."""
    from ferry.server.tls import ensure_certificate, server_ssl_context

    with scratch_dir(MiB, prefix="ferry-load-tls-") as tmp:
        cert, key = ensure_certificate(Path(tmp))
        sctx = server_ssl_context(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    server_cpu = client_cpu = 0.0
    for _ in range(n):
        s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        s = sctx.wrap_bio(s_in, s_out, server_side=True)
        c = cctx.wrap_bio(c_in, c_out, server_hostname="localhost")
        done_s = done_c = False
        for _step in range(10):
            if not done_c:
                t = time.thread_time()
                try:
                    c.do_handshake()
                    done_c = True
                except ssl.SSLWantReadError:
                    pass
                client_cpu += time.thread_time() - t
            s_in.write(c_out.read())
            if not done_s:
                t = time.thread_time()
                try:
                    s.do_handshake()
                    done_s = True
                except ssl.SSLWantReadError:
                    pass
                server_cpu += time.thread_time() - t
            c_in.write(s_out.read())
            if done_s and done_c:
                break
    return server_cpu / n * 1000, client_cpu / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="200,500,1000", help="comma-separated burst sizes (default: %(default)s)")
    ap.add_argument("--users", type=int, default=100, help="accounts the clients log in as, round-robin (default: 100)")
    ap.add_argument("--spread", type=float, default=1.0, help="seconds over which a burst's clients start (default: 1)")
    ap.add_argument("--plain", action="store_true", help="no TLS")
    ap.add_argument(
        "--auth", choices=("password", "token", "key"), default="password", help="how clients log in (default: password)"
    )
    ap.add_argument("--login-threads", type=int, default=0, help="ferry serve --login-threads (default: the server's)")
    ap.add_argument("--profile", action="store_true", help="first measure where a login's time goes")
    ap.add_argument("--markdown", action="store_true", help="tables in markdown")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="before each burst, wait up to this long for other work on the machine to calm down",
    )
    args = ap.parse_args()
    log(f"load: {os.cpu_count()} cores, clients {args.clients}, {args.users} users, tls={not args.plain}")
    if args.profile:
        profile(args)
    rows = []
    for n in (int(x) for x in args.clients.split(",")):
        busy = wait_quiet(args.wait_quiet)
        log(f"load: burst of {n} clients (other work on the machine: {busy:.0%} of the CPUs)...")
        res = run_one(n, args)
        res.background = busy
        ok = [o for o in res.outcomes if o.ok]
        failed = Counter(o.kind for o in res.outcomes if not o.ok)
        logins = [o.login for o in res.outcomes if o.login is not None]
        totals = [o.total for o in ok]
        refusals = [o.total for o in res.outcomes if o.kind == "busy"]
        rows.append(
            [
                str(n),
                str(len(ok)),
                ", ".join(f"{k} {v}" for k, v in failed.most_common()) or "0",
                fmt_num(percentile(logins, 0.5), 2, " s"),
                fmt_num(percentile(logins, 0.99), 2, " s"),
                fmt_num(percentile(totals, 0.5), 2, " s"),
                fmt_num(percentile(totals, 0.99), 2, " s"),
                (
                    f"{percentile(refusals, 0.5):.2f} / {max(refusals):.2f} s" if refusals else "-"
                ),
                fmt_num(res.wall, 1, " s"),
                fmt_num(len(logins) / max(o.login_at or 0 for o in res.outcomes) if logins else None, 0, "/s"),
                fmt_num(res.cpu, 1, " s"),
                fmt_num(res.client_cpu, 1, " s"),
                fmt_num(res.peak_mib, 0, " MiB"),
                (fmt_num(res.straggler_login, 2, " s") if res.straggler_login is not None else res.straggler_kind),
                f"{res.background:.0%} / {res.others:.0%}" if res.others is not None else f"{res.background:.0%}",
            ]
        )
    print(
        table(
            [
                "clients",
                "ok",
                "failed",
                "login p50",
                "login p99",
                "client p50",
                "client p99",
                "refused after (p50 / max)",
                "burst",
                "logins/s",
                "server CPU",
                "client CPU",
                "server peak RSS",
                "next login",
                "other load (before / during)",
            ],
            rows,
            markdown=args.markdown,
        )
    )


if __name__ == "__main__":
    main()
