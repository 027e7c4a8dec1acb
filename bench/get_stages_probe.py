"""Which stage of a large ``get`` holds it back? (a benchmark, not a test)

A download has three stages that should overlap: the event loop receives into a few 4 MiB buffers
(:class:`ferry.client.stream.ClientStream`), and one worker thread writes each full buffer to the
file and then hashes it (:class:`ferry.client.receive.DownloadWriter`). This probe runs whole
``AsyncClient.get`` downloads of one large file from a real ``ferry serve`` on loopback and adds up,
per download, how long the worker spent in ``pwrite`` and in BLAKE3, and how long the loop waited
for a free buffer (all buffers queued behind the worker) or for data (waiting on the network).
If ``write + hash`` is close to the wall time and the loop mostly waits for buffers, the writer
thread is the bound, not the network.

``--variants base,hash-thread`` also measures, interleaved, a variant that hashes on a second
thread while the first writes (the buffer is reused once both are done).

    .venv/bin/python bench/get_stages_probe.py [--size-mib 1024] [--repeat 5] [--tls] [--variants base,hash-thread]

The timing wrappers patch the client's private methods in this process only: this is a probe of
today's code, not an API.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import FerryServer, MiB, ferry_add_user, log, make_big_file, median, prewarm, scratch_dir, table
from ferry.client import receive
from ferry.client.aclient import AsyncClient
from ferry.client.stream import ClientStream

USER, PASSWORD = "probe", "probe-password-not-secret"
STAGES = ("write", "hash", "wait_free", "wait_data")


class Stages:
    """Seconds per stage for the download in progress (reset before each one)."""

    def __init__(self) -> None:
        self.s = dict.fromkeys(STAGES, 0.0)

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.s[name] += time.perf_counter() - t

        return wrapper

    def atimed(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*args)
            finally:
                self.s[name] += time.perf_counter() - t

        return wrapper


def instrument(st: Stages) -> None:
    W = receive.DownloadWriter
    W._write = st.timed("write", W._write)  # type: ignore[method-assign]
    W._hash = st.timed("hash", W._hash)  # type: ignore[method-assign]
    W._retire_oldest = st.atimed("wait_free", W._retire_oldest)  # type: ignore[method-assign]
    ClientStream.readinto = st.atimed("wait_data", ClientStream.readinto)  # type: ignore[method-assign]


_base_start_job = receive.DownloadWriter._start_job


def _hash_thread_start_job(self: Any, buf: bytearray, n: int, pos: int) -> asyncio.Future[Any]:
    """Variant: write on the worker, hash on a second thread at the same time."""
    if self._worker is None:
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ferry-get")
    if getattr(self, "_probe_hasher", None) is None:
        self._probe_hasher = ThreadPoolExecutor(1, thread_name_prefix="probe-hash")
    loop = asyncio.get_running_loop()
    write = loop.run_in_executor(self._worker, self._write, buf, n, pos)
    digest = loop.run_in_executor(self._probe_hasher, self._hash, buf, n)
    return asyncio.ensure_future(asyncio.gather(write, digest))


async def one_get(port: int, plain: bool, dst: Path) -> tuple[float, float]:
    """(wall seconds of the get alone, process CPU seconds during it)."""
    client = await AsyncClient.connect("127.0.0.1", port, user=USER, password=PASSWORD, plain=plain)
    try:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await client.get("big.bin", dst)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await client.close()
    return wall, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tls", action="store_true", help="TLS instead of plain TCP")
    ap.add_argument("--variants", default="base", help="comma-separated: base, hash-thread")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if set(variants) - {"base", "hash-thread"} or not 1 <= args.repeat <= 50:
        ap.error("variants are base and hash-thread; --repeat 1..50")
    size = args.size_mib * MiB
    st = Stages()
    instrument(st)
    try:
        import uvloop

        run: Callable[[Any], Any] = uvloop.run
    except ImportError:
        run = asyncio.run
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with scratch_dir(size * 3 + 256 * MiB, prefix="ferry-stages-probe-") as scratch:
        env = dict(os.environ, FERRY_HOME=str(scratch / "client-home"))
        os.environ["FERRY_HOME"] = env["FERRY_HOME"]  # the client pins the certificate there
        root = scratch / "root"
        ferry_add_user(root, USER, PASSWORD, env)
        make_big_file(root / "homes" / USER / "big.bin", size)
        dst = scratch / "dst" / "big.bin"
        with FerryServer(root, plain=not args.tls, env=env) as server:
            for k in range(args.repeat):
                for v in variants if k % 2 == 0 else variants[::-1]:
                    receive.DownloadWriter._start_job = (  # type: ignore[method-assign]
                        _hash_thread_start_job if v == "hash-thread" else _base_start_job
                    )
                    prewarm(dst.parent, size, [root / "homes" / USER / "big.bin"])
                    st.s = dict.fromkeys(STAGES, 0.0)
                    wall, cpu = run(one_get(server.port, not args.tls, dst))
                    dst.unlink()
                    rec = {"wall": wall, "MiB/s": size / MiB / wall, "cpu": cpu, **st.s}
                    rows[v].append(rec)
                    log(f"{v:11} run {k + 1}: " + ", ".join(f"{key} {val:.3f}" for key, val in rec.items()))
    cols = ["wall", "MiB/s", "cpu", *STAGES]
    print(f"{'TLS' if args.tls else 'plain'} get of {args.size_mib} MiB, medians of {args.repeat} (seconds):")
    print(
        table(
            ["variant", *cols],
            [[v, *(f"{median(r[c] for r in rows[v]):,.3f}" for c in cols)] for v in variants],
        )
    )


if __name__ == "__main__":
    main()
