"""Probe (not a test): where a no-op ``ferry sync`` through the resident connection spends its time.

Case (b) of ``bench/sync.py`` (N small files, default 10,000 x 4 KiB, and one big file, default
1 GiB, already synced) against one local TLS ``ferry serve``. Per round, interleaved, in a
rotating order, each command run as the console script runs it (byte-compiled sources):

* ``python -c pass``: the interpreter's own start and exit (the floor);
* ``ferry ls HOST:`` through the resident process (its fixed cost: the thin client's start, the
  hand-over, click in the resident, one small request);
* the no-op ``ferry sync`` through the resident process;
* the same with ``--no-resident`` (a direct command: start-up, imports, TLS, login, the work).

For the resident runs it also reads what the resident process says about the command (``ferry
resident list --json``: ``last_seconds``, from accepting the command to its exit status) and its
CPU time (``/proc``), so a wall time splits into the thin client's part and the resident's.

    .venv/bin/python bench/sync_resident_probe.py --runs 15 --markdown
    .venv/bin/python bench/sync_resident_probe.py --small 2000 --big-mib 16 --runs 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    FERRY_SCRIPT,
    PROJECT,
    FerryServer,
    MiB,
    background_busy,
    compile_source,
    ferry_add_user,
    log,
    make_big_file,
    median,
    run_timed,
    scratch_dir,
    source_version,
    table,
)

USER, PASSWORD = "bench", "bench-password-not-secret"


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_info(env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([*FERRY_SCRIPT, "resident", "list", "--json"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    found = [json.loads(line) for line in out.splitlines()]
    assert len(found) == 1, found
    return found[0]  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    runs = max(1, min(args.runs, 200))
    with scratch_dir(args.big_mib * MiB * 3 + args.small * 8192 + 256 * MiB, prefix="ferry-resident-probe-") as scratch:
        run_dir = scratch / "run"
        run_dir.mkdir(mode=0o700)
        env = dict(os.environ, FERRY_HOME=str(scratch / "client-home"), FERRY_PASSWORD=PASSWORD,
                   FERRY_RUNTIME_DIR=str(run_dir), FERRY_RESIDENT="900")  # fmt: skip
        compile_source(PROJECT / "src")
        src = scratch / "src"
        for i in range(args.small):
            sub = src / "small" / f"d{i // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f{i:05d}").write_bytes(os.urandom(4096))
        make_big_file(src / "big.bin", args.big_mib * MiB)
        root = scratch / "root"
        ferry_add_user(root, USER, PASSWORD, env=env)
        with FerryServer(root, plain=False, env=env) as srv:
            dest = f"ferry://{USER}@127.0.0.1:{srv.port}/"
            sync = [*FERRY_SCRIPT, "sync", "-q", f"{src}/", dest + "s"]
            subprocess.run([*sync, "--no-resident"], env=env, check=True, timeout=900)
            subprocess.run([*FERRY_SCRIPT, "resident", "start", "-q", dest], env=env, check=True, timeout=120)
            pid = int(resident_info(env)["pid"])
            commands = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "ls through the resident": [*FERRY_SCRIPT, "ls", dest],
                "no-op sync through the resident": sync,
                "no-op sync, direct (--no-resident)": [*sync, "--no-resident"],
            }
            log(f"ferry {source_version()}; {args.small} x 4 KiB + {args.big_mib} MiB; {runs} rounds; "
                f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
            wall: dict[str, list[float]] = defaultdict(list)
            cpu: dict[str, list[float]] = defaultdict(list)
            inside: dict[str, list[float]] = defaultdict(list)
            rcpu: dict[str, list[float]] = defaultdict(list)
            busy = []
            names = list(commands)
            for r in range(runs):
                busy.append(background_busy())
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    c0 = cpu_of(pid)
                    res = run_timed(commands[name], timeout=600, env=env)
                    c1 = cpu_of(pid)
                    if not res.ok:
                        raise SystemExit(f"{name}: {res.describe_failure()}")
                    wall[name].append(res.seconds)
                    cpu[name].append(res.cpu_seconds)
                    if "through the resident" in name:
                        inside[name].append(float(resident_info(env)["last_seconds"]))
                        rcpu[name].append(c1 - c0)
            rows = []
            for name in names:
                w, c = median(wall[name]) * 1000, median(cpu[name]) * 1000
                i = median(inside[name]) * 1000 if inside[name] else None
                rc = median(rcpu[name]) * 1000 if rcpu[name] else None
                rows.append([
                    name, f"{w:.0f}", f"{c:.0f}",
                    "-" if i is None else f"{i:.0f}", "-" if i is None else f"{w - i:.0f}",
                    "-" if rc is None else f"{rc:.0f}",
                ])  # fmt: skip
            print(table(["command (medians, ms)", "wall", "command CPU", "in the resident", "wall - resident",
                         "resident CPU"], rows, markdown=args.markdown))  # fmt: skip
            print(f"\nbackground CPU busy: median {100 * median(busy):.0f}%; load average {os.getloadavg()[0]:.2f}")
            subprocess.run([*FERRY_SCRIPT, "resident", "stop"], env=env, capture_output=True, timeout=60, check=False)


if __name__ == "__main__":
    main()
