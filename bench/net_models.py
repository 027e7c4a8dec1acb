"""Benchmark (not a test): ``ferry net serve echo`` under each concurrency MODEL.

A server subprocess per model is started on loopback; then, for 1, 10 and 100 concurrent
clients, each client does a fixed number of 64-byte echo round trips (one outstanding request
per client: closed loop). Reports round trips per second and p50/p99 latency, the median over
``--runs`` runs. Every run is bounded by a round-trip count *and* a time cap.

The load generator is one single-threaded ``selectors`` loop in this process, so on a small
machine it competes with the server for CPU; the numbers compare models against each other on
the same machine, they are not absolute limits of a model.

    python bench/net_models.py                       # all models, 1/10/100 clients, 3 runs
    python bench/net_models.py --models select,asyncio --clients 10 --runs 5
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

MODELS = ["iterative", "thread", "fork", "prefork", "select", "asyncio"]
BANNER = re.compile(rb"listening on (\S+):(\d+)\s*$")
MESSAGE = bytes(range(64))  # 64-byte message


@dataclass
class Result:
    """One measured run."""

    round_trips: int
    seconds: float
    latencies: list[float]  # seconds per round trip
    capped: bool

    @property
    def rate(self) -> float:
        """Round trips per second over the whole run."""
        return self.round_trips / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Latency (seconds) at quantile ``q`` (nearest rank)."""
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")


def start_server(model: str) -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    """Start ``ferry net serve echo`` for ``model``; returns the process and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry", "net", "serve", "echo", "--model", model, "--port", "0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = BANNER.search(line)
    if not m:
        proc.kill()
        raise SystemExit(f"{model}: no readiness line (got {line!r})")
    return proc, (m.group(1).decode(), int(m.group(2)))


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM our server by PID; SIGKILL if it does not exit in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Conn:
    __slots__ = ("got", "left", "sock", "t0")

    def __init__(self, sock: socket.socket, rounds: int) -> None:
        self.sock = sock
        self.left = rounds
        self.got = 0
        self.t0 = 0.0


def run_load(address: tuple[str, int], clients: int, rounds: int, cap: float) -> Result:
    """``clients`` connections, ``rounds`` round trips each, all multiplexed in one thread."""
    sel = selectors.DefaultSelector()
    conns = []
    for _ in range(clients):
        s = socket.create_connection(address, timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        conns.append(_Conn(s, rounds))
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + cap
    for c in conns:
        c.t0 = time.perf_counter()
        c.sock.send(MESSAGE)
        sel.register(c.sock, selectors.EVENT_READ, c)
    active = len(conns)
    capped = False
    while active:
        now = time.perf_counter()
        if now >= deadline:
            capped = True
            break
        for key, _ in sel.select(deadline - now):
            c = key.data
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit("server closed a benchmark connection")
            c.got += len(data)
            if c.got < len(MESSAGE):
                continue
            t = time.perf_counter()
            latencies.append(t - c.t0)
            c.got = 0
            c.left -= 1
            if c.left:
                c.t0 = t
                c.sock.send(MESSAGE)  # 64 bytes always fit in an empty socket buffer
            else:
                sel.unregister(c.sock)
                c.sock.close()  # iterative can only move on once this client leaves
                active -= 1
    elapsed = time.perf_counter() - start
    for c in conns:
        if c.sock.fileno() >= 0:
            c.sock.close()
    sel.close()
    return Result(len(latencies), elapsed, latencies, capped)


def main() -> None:
    """Parse options, run every (model, clients) pair ``--runs`` times, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--clients", default="1,10,100")
    parser.add_argument(
        "--total", type=int, default=20000, help="round trips per run, split over the clients"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cap", type=float, default=15.0, help="seconds per run at most")
    args = parser.parse_args()
    models = args.models.split(",")
    levels = [int(x) for x in args.clients.split(",")]

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, {platform.system()} "
        f"{platform.release()}, {cpus} CPUs ({platform.processor() or platform.machine()}), loopback TCP"
    )
    print(f"# {len(MESSAGE)}-byte echo, {args.total} round trips per run, median of {args.runs} runs")
    print(
        f"| {'model':<9} | {'clients':>7} | {'round trips/s':>13} | {'p50 ms':>7} | {'p99 ms':>8} | {'max ms':>8} |"
    )
    print(f"|{'-' * 11}|{'-' * 8}:|{'-' * 14}:|{'-' * 8}:|{'-' * 9}:|{'-' * 9}:|")
    # All servers run side by side (idle ones cost nothing) and every run cycles through all
    # models: a burst of load from elsewhere on the machine then hits every model alike
    # instead of skewing whichever model happened to be measured at that moment.
    servers: dict[str, tuple[subprocess.Popen[bytes], tuple[str, int]]] = {}
    try:
        for model in models:
            servers[model] = start_server(model)
            run_load(servers[model][1], 1, 200, args.cap)  # warm-up: imports, caches, first fork
        results: dict[tuple[str, int], list[Result]] = {(m, c): [] for m in models for c in levels}
        for run in range(args.runs):
            print(f"# run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
            for model in models:
                for clients in levels:
                    rounds = max(1, args.total // clients)
                    results[model, clients].append(run_load(servers[model][1], clients, rounds, args.cap))
    finally:
        for proc, _address in servers.values():
            stop_server(proc)
    for model in models:
        for clients in levels:
            rs = results[model, clients]
            rate = statistics.median(r.rate for r in rs)
            p50 = statistics.median(r.percentile(0.50) for r in rs) * 1e3
            p99 = statistics.median(r.percentile(0.99) for r in rs) * 1e3
            # max shows what percentiles hide: e.g. iterative's queued clients waiting for
            # every client before them (one slow round trip per client, < 1 % of samples).
            worst = statistics.median(max(r.latencies, default=float("nan")) for r in rs) * 1e3
            mark = "*" if any(r.capped for r in rs) else " "
            print(
                f"| {model:<9} | {clients:>7} | {rate:>12.0f}{mark} | {p50:>7.3f} | {p99:>8.3f} | {worst:>8.1f} |"
            )
    print("# * = a run hit the time cap (fewer round trips than asked)")


if __name__ == "__main__":
    main()
