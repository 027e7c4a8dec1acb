"""How much does writing into a tmpfs cost when the memory was freed a moment ago versus a while ago?
(a benchmark, not a test)

Every download has to write the file. On the benchmark VM that write, not the network, bounds a
large download (a ``perf`` profile of a TLS ``ferry get`` put ~44 % of all CPU samples of both
cores in the client's writer thread, almost all in the kernel's copy into fresh tmpfs pages). The
cause is the VM's memory balloon: the guest reports free pages to the host, which takes them back;
the next touch of such a page faults into the host. Linux exposes the reporting as
``/sys/module/page_reporting/parameters/`` (``passes`` counts reporting passes).

This probe writes ``--size-mib`` from a 4 MiB buffer into a tmpfs file right after freeing the same
amount (``warm``: the kernel hands back pages the host still backs) and after freeing it and waiting
``--wait`` seconds (``cold``: a reporting pass has given them back to the host meanwhile),
alternating, and prints the medians and the reporting passes seen during each wait.

    .venv/bin/python bench/fresh_pages_probe.py [--size-mib 1024] [--repeat 5] [--wait 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
PASSES = Path("/sys/module/page_reporting/parameters/passes")


def passes() -> int | None:
    """Free-page reporting passes so far, or None when this kernel has no such counter."""
    try:
        return int(PASSES.read_text())
    except (OSError, ValueError):
        return None


def write(path: Path, nbytes: int, block: memoryview) -> float:
    """Seconds to write ``nbytes`` (whole blocks) into a new file at ``path``, then delete it."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, block)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--wait", type=float, default=4.0, help="seconds between freeing and writing (cold)")
    p.add_argument("--tmpfs", default="/dev/shm")
    args = p.parse_args()
    nbytes = args.size_mib * MiB
    block = memoryview(bytearray(os.urandom(4 * MiB)))
    results: dict[str, list[float]] = {"warm": [], "cold": []}
    seen: dict[str, list[int]] = {"warm": [], "cold": []}
    with tempfile.TemporaryDirectory(dir=args.tmpfs, prefix="ferry-pages-") as tmp:
        scratch, target = Path(tmp) / "free-me", Path(tmp) / "target"
        for _ in range(args.repeat):
            for mode in ("warm", "cold"):
                write(scratch, nbytes, block)  # allocate and free the memory the write will get
                p0 = passes()
                if mode == "cold":
                    time.sleep(args.wait)
                p1 = passes()
                results[mode].append(args.size_mib / write(target, nbytes, block))
                if p0 is not None and p1 is not None:
                    seen[mode].append(p1 - p0)
    print(f"write {args.size_mib:,} MiB into {args.tmpfs} from a 4 MiB buffer; medians of {args.repeat}")
    for mode, label in (("warm", "freed just before"), ("cold", f"freed {args.wait:g} s before")):
        runs = " ".join(f"{r:,.0f}" for r in results[mode])
        rep = f"; reporting passes while waiting: {seen[mode]}" if seen[mode] else ""
        print(f"  {mode} ({label}): {statistics.median(results[mode]):8,.0f} MiB/s  [{runs}]{rep}")
    if passes() is None:
        print(
            "  (no /sys/module/page_reporting here: this kernel does not report free pages)", file=sys.stderr
        )


if __name__ == "__main__":
    main()
