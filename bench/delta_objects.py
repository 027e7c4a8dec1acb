"""Benchmark (not a test): case (d) of ``bench/sync.py`` -- 100 bytes inserted at one third of a big
file -- sent as a delta to a folder-backend and to an object-backend ``ferry serve``, and pulled back
(``--case c``: case (c)'s change of the big file instead, 1 MiB overwritten in the middle).

One run starts its own ``weed mini`` (SeaweedFS, from the dev extra) and PostgreSQL database, and two
servers on loopback: ``ferry serve --db`` (files in a folder) and ``ferry serve --db --store``
(files in weed, namespace in PostgreSQL). Both first receive the same big file (a delta upload
without basis, which leaves the file's chunk index in the server's cache as a sync leaves it);
then each repetition makes a new version locally (100 random bytes inserted at one third of the
previous one: fresh content after the insertion, as in a real edit) and, for each backend in
rotating order, times

* **push**: ``delta_put`` of the new version (what ``ferry sync`` does for one large changed file:
  GetChunks, then DeltaPut + DeltaData batches);
* **pull**: ``delta_get`` of it into a local copy of the previous version.

Per run: wall seconds, bytes on the wire (the client socket's TCP counters, TLS included), literal
bytes, and the server's CPU seconds (weed's for the object backend beside it). Medians of
``--reps``.

    flock /work/bench.lock .venv/bin/python bench/delta_objects.py              # 1 GiB, 3 reps
    .venv/bin/python bench/delta_objects.py --big-mib 64 --reps 1              # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import FerryServer, MiB, cpu_seconds, log, median, table
from components import create_database, drop_database, start_weed
from ferry.client.aclient import AsyncClient
from ferry.client.delta import delta_get, delta_put
from ferry.client.known_hosts import KnownHosts
from ferry.server.accounts import Accounts, default_hasher

USER = "bench"
PASSWORD = "bench-password-1"
INSERT = 100
BLOCK = 64 * MiB


def write_random(path: Path, size: int) -> None:
    """``size`` random bytes, written in blocks (never the whole file in memory)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(BLOCK, left)
            f.write(os.urandom(n))
            left -= n


def change(src: Path, dst: Path, case: str) -> None:
    """``dst`` = ``src`` with :data:`INSERT` random bytes inserted at one third of it (case d), or
    with 1 MiB in the middle overwritten (case c: nothing shifts)."""
    size = src.stat().st_size
    at = size // 3 if case == "d" else size // 2
    with open(src, "rb") as f, open(dst, "wb") as out:
        left = at
        while left:
            block = f.read(min(BLOCK, left))
            out.write(block)
            left -= len(block)
        if case == "d":
            out.write(os.urandom(INSERT))
        else:
            out.write(os.urandom(MiB))
            f.seek(MiB, os.SEEK_CUR)
        while block := f.read(BLOCK):
            out.write(block)


async def connect(port: int, tmp: Path) -> AsyncClient:
    """An authenticated TLS client (pins the server's certificate on first use)."""
    return await AsyncClient.connect(
        "127.0.0.1", port, user=USER, password=PASSWORD, known_hosts=KnownHosts(tmp / "known_hosts")
    )


async def push(port: int, tmp: Path, local: Path, *, basis: bool = True) -> dict[str, float]:
    """One delta upload of ``local`` as ``big``: seconds, wire bytes, literal bytes."""
    c = await connect(port, tmp)
    try:
        wire0 = c.mux.tcp_bytes() or 0
        t0 = time.monotonic()
        moved = await delta_put(c.mux, local, "big", use_basis=basis)
        seconds = time.monotonic() - t0
        wire = (c.mux.tcp_bytes() or 0) - wire0
    finally:
        await c.close()
    return {"seconds": seconds, "wire": wire, "literal": moved.literal}


async def pull(port: int, tmp: Path, dest: Path) -> dict[str, float]:
    """One delta download of ``big`` into ``dest`` (its previous version as basis)."""
    c = await connect(port, tmp)
    try:
        wire0 = c.mux.tcp_bytes() or 0
        t0 = time.monotonic()
        moved = await delta_get(c.mux, "big", dest)
        seconds = time.monotonic() - t0
        wire = (c.mux.tcp_bytes() or 0) - wire0
    finally:
        await c.close()
    return {"seconds": seconds, "wire": wire, "literal": moved.literal}


def measured(srv: FerryServer, weed_pid: int | None, fn: Any) -> dict[str, float]:
    """``fn()`` (a coroutine function) with the server's and weed's CPU seconds around it."""
    cpu0, w0 = srv.cpu() or 0.0, cpu_seconds(weed_pid) if weed_pid else None
    out: dict[str, float] = asyncio.run(fn())
    out["server_cpu"] = (srv.cpu() or 0.0) - cpu0
    if weed_pid and w0 is not None:
        out["weed_cpu"] = (cpu_seconds(weed_pid) or 0.0) - w0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the big file (MiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--case", choices=["d", "c"], default="d", help="d: 100 B inserted at one third; c: 1 MiB overwritten in the middle")
    opts = ap.parse_args()
    size = opts.big_mib * MiB
    name, dsn = create_database()
    servers: dict[str, FerryServer] = {}
    with tempfile.TemporaryDirectory(prefix="ferry-delta-objects-") as tmpdir:
        tmp = Path(tmpdir)
        weed = start_weed(tmp / "weed")
        try:
            acc = Accounts(None, db=dsn, hasher=default_hasher())
            try:
                acc.add(USER, PASSWORD)
            finally:
                acc.close()
            (tmp / "folder" / "homes" / USER).mkdir(parents=True, mode=0o700)
            servers["folder"] = FerryServer(tmp / "folder", False, args=["--db", dsn]).start()
            servers["object"] = FerryServer(
                tmp / "object",
                False,
                env={**os.environ, **weed.env()},
                args=["--db", dsn, "--store", f"s3://{weed.bucket}/bench/"],
            ).start()
            weed_pid = weed.proc.pid
            current = tmp / "v0"
            log(f"writing a {opts.big_mib} MiB random file")
            write_random(current, size)
            for backend, srv in servers.items():
                r = measured(srv, weed_pid if backend == "object" else None, lambda srv=srv: push(srv.port, tmp, current, basis=False))
                log(f"{backend}: first upload {r['seconds']:.1f} s ({size / MiB / r['seconds']:.0f} MiB/s)")
                os.link(current, tmp / f"pull-{backend}")
            results: dict[tuple[str, str], list[dict[str, float]]] = {}
            order = list(servers)
            for rep in range(opts.reps):
                new = tmp / f"v{rep + 1}"
                change(current, new, opts.case)
                for backend in order if rep % 2 == 0 else order[::-1]:
                    srv = servers[backend]
                    wp = weed_pid if backend == "object" else None
                    r = measured(srv, wp, lambda srv=srv, new=new: push(srv.port, tmp, new))
                    results.setdefault((backend, "push"), []).append(r)
                    log(f"rep {rep + 1} {backend} push: {r}")
                    dest = tmp / f"pull-{backend}"
                    r = measured(srv, wp, lambda srv=srv, dest=dest: pull(srv.port, tmp, dest))
                    results.setdefault((backend, "pull"), []).append(r)
                    log(f"rep {rep + 1} {backend} pull: {r}")
                    if dest.read_bytes() != new.read_bytes():
                        raise SystemExit(f"{backend}: the pulled copy differs from the new version")
                current.unlink()
                current = new
            rows = []
            for (backend, op), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                rows.append(
                    [
                        op,
                        backend,
                        f"{median([r['seconds'] for r in runs]):.2f}",
                        f"{median([r['wire'] for r in runs]) / 1024:,.0f}",
                        f"{median([r['literal'] for r in runs]) / 1024:,.0f}",
                        f"{median([r['server_cpu'] for r in runs]):.2f}",
                        f"{median([r['weed_cpu'] for r in runs]):.2f}" if "weed_cpu" in runs[0] else "-",
                    ]
                )
            print(
                table(
                    [f"case ({opts.case})", "backend", "seconds", "wire KiB", "literal KiB", "server CPU s", "weed CPU s"],
                    rows,
                )
            )
        finally:
            for srv in servers.values():
                srv.stop()
            weed.stop()
            drop_database(name)


if __name__ == "__main__":
    main()
