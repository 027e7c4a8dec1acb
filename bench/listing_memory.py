"""Benchmark (not a test): what recursive listings of a big tree cost the server in memory and time.

A recursive listing used to be built whole in the server's memory before its first page went out
(issue 10: +61 MiB for 200,000 entries, 307 MiB for four at once). Now pages are cut from the walk
as they are sent. This starts one ``ferry serve --plain`` on 127.0.0.1 (port 0) over a home holding
ENTRIES entries (folders of 1,000 empty files, on a tmpfs so the disk is not what is measured),
then runs C recursive listings at once (``AsyncClient.listdir(recursive=True)``, each on its own
connection) 1 + REPEAT times, and reports the server's peak RSS above its RSS before each round (``VmHWM``
after ``clear_refs``, measured after the clients logged in: an argon2id check takes 19 MiB) and the
wall time. The first round is shown apart: it also grows the thread pools and the allocator's
arenas, which later rounds reuse (so they show only what they needed beyond that).

``--rev REV`` also measures that commit's server (``src/`` exported), alternating rounds with the
working tree's so that load from elsewhere hits both alike; the client is always the working tree's.
Every loop is bounded; the server is stopped by its PID.

    .venv/bin/python bench/listing_memory.py                        # 200,000 entries, 4 clients
    .venv/bin/python bench/listing_memory.py --rev ee90332 --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    FerryServer,
    GiB,
    export_source,
    ferry_add_user,
    log,
    median,
    proc_status_kib,
    resolve_rev,
    scratch_dir,
    source_version,
    table,
)

USER = "bench"
PASSWORD = "bench password 1"
PER_FOLDER = 1000


def make_listing_tree(home: Path, entries: int) -> int:
    """Folders of :data:`PER_FOLDER` empty files under ``home``; returns the entries a recursive
    listing of ``home`` shows (files and folders)."""
    home.mkdir(parents=True, exist_ok=True)
    folders = max(1, entries // (PER_FOLDER + 1))
    for k in range(folders):
        folder = home / f"folder-{k:04d}"
        folder.mkdir()
        for i in range(PER_FOLDER):
            os.close(os.open(folder / f"a-file-with-a-longish-name-{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return folders * (PER_FOLDER + 1)


async def listing_round(server: FerryServer, clients: int) -> tuple[float, float, list[int]]:
    """Log ``clients`` connections in (argon2id takes 19 MiB per check: not what is measured),
    then list the home recursively on all of them at once. Returns (peak RSS growth of the server
    in MiB, seconds, entries each listing got)."""
    from ferry.client.aclient import AsyncClient

    conns = [
        await asyncio.wait_for(
            AsyncClient.connect("127.0.0.1", server.port, user=USER, password=PASSWORD, plain=True), 120
        )
        for _ in range(clients)
    ]
    try:
        before = proc_status_kib(server.pid, "VmRSS") or 0
        server.reset_peak()
        t0 = time.monotonic()
        listings = [c.listdir("", recursive=True) for c in conns]
        results = await asyncio.wait_for(asyncio.gather(*listings), 600)
        elapsed = time.monotonic() - t0
        peak = proc_status_kib(server.pid, "VmHWM") or 0
    finally:
        for c in conns:
            await c.close()
    return (peak - before) / 1024, elapsed, [len(r) for r in results]


def measure(server: FerryServer, clients: int) -> tuple[float, float, list[int]]:
    """One round (see :func:`listing_round`)."""
    return asyncio.run(listing_round(server, clients))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=200_000, help="entries in the tree (default 200,000)")
    parser.add_argument("--clients", type=int, default=4, help="listings at once (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per server (default 3)")
    parser.add_argument("--rev", default=None, help="also measure this git revision's server, alternating")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    repeat = max(1, min(args.repeat, 20))

    with scratch_dir(1 * GiB, prefix="ferry-bench-listing-") as scratch:
        root = scratch / "root"
        ferry_add_user(root, USER, PASSWORD)
        log(f"making {args.entries:,} entries...")
        expected = make_listing_tree(root / "homes" / USER, args.entries)
        trees: list[tuple[str, dict[str, str] | None]] = [(source_version(), None)]
        if args.rev:
            rev = resolve_rev(args.rev)
            src = export_source(rev, scratch / "rev")
            trees.append((source_version(rev=rev), dict(os.environ, PYTHONPATH=str(src))))
        servers = {name: FerryServer(root=root, plain=True, env=env).start() for name, env in trees}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in trees}
        try:
            first: dict[str, float] = {}
            for name, _env in trees:  # the first round grows thread pools and allocator arenas
                first[name] = measure(servers[name], args.clients)[0]
                log(f"first round {name}: +{first[name]:.1f} MiB")
            for i in range(repeat):
                for name, _env in trees:
                    growth, seconds, counts = measure(servers[name], args.clients)
                    if any(c != expected for c in counts):
                        raise SystemExit(f"{name}: listings returned {counts}, expected {expected} each")
                    log(f"round {i + 1} {name}: +{growth:.1f} MiB, {seconds:.2f} s")
                    results[name].append((growth, seconds))
        finally:
            for server in servers.values():
                server.stop()

    headers = [
        "server",
        "entries",
        "listings at once",
        "first round: peak RSS growth (MiB)",
        "later rounds: median MiB",
        "max MiB",
        "seconds (median)",
    ]
    rows = [
        [
            name,
            f"{expected:,}",
            str(args.clients),
            f"{first[name]:.1f}",
            f"{median(g for g, _ in runs):.1f}",
            f"{max(g for g, _ in runs):.1f}",
            f"{median(s for _, s in runs):.2f}",
        ]
        for name, runs in results.items()
    ]
    print(table(headers, rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
