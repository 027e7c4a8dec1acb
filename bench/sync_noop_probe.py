"""Probe (not a test): where the time of a no-op ``ferry sync`` goes, in milliseconds.

Case (b) of ``bench/sync.py``: a re-sync of N small files (default 10,000 x 4 KiB) and one big file
(default 1 GiB) that has nothing to send. Against one local TLS ``ferry serve`` (production argon2id,
the default ``--password-cache``), on a tmpfs, after one first sync, it times per round, interleaved:

* ``python -c pass`` (the interpreter's own start and exit: the floor) and ``ferry --version``
  (start, the CLI's imports, exit);
* the no-op sync as the console script runs it, logging in with a password (``FERRY_PASSWORD``,
  what ``bench/sync.py`` uses), an SSH key file (``--identity``) and a token (``--token-file``),
  and as ``python -m ferry`` (how ``bench/sync.py`` starts it: ``runpy`` costs a few ms more);
* the same password sync with **phase marks**: a child imports what the command imports, then
  wraps the functions of each phase (connect and TLS, the pin check, hello and login, the local
  scan, the remote listing, the plan, closing) and records when each starts and ends, in ms since
  the child's first line; the marks go to a file when the command exits.

Imports are measured on their own (``-X importtime`` of the password sync, self time summed per
top-level package, median of the runs). Per-phase figures are medians over the rounds; phases
that overlap (the local scan runs beside the connection) show it in their start and end.

    .venv/bin/python bench/sync_noop_probe.py --runs 15
    .venv/bin/python bench/sync_noop_probe.py --runs 15 --rev 4820231   # that revision's client too, interleaved
    .venv/bin/python bench/sync_noop_probe.py --small 2000 --big-mib 16 --runs 5    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CONSOLE,
    PROJECT,
    PYTHON,
    FerryServer,
    MiB,
    background_busy,
    compile_source,
    export_source,
    ferry_add_user,
    ferry_key_and_token,
    log,
    make_big_file,
    median,
    resolve_rev,
    scratch_dir,
    source_version,
    table,
)

USER, PASSWORD = "bench", "bench-password-not-secret"
MAX_RUNS = 100

#: The child that marks phases: (module, attribute) pairs wrapped, each named by a phase. Missing
#: ones are skipped (the code under test may not have them); coroutine functions are awaited.
MARKED = r"""
import sys, time, os, json, threading, functools, inspect, importlib
T0 = time.perf_counter()
MAIN = threading.get_ident()
marks = []
def mark(name, what):
    marks.append([name, what, round((time.perf_counter() - T0) * 1000, 2), threading.get_ident() == MAIN])
for mod in IMPORTS:
    importlib.import_module(mod)
mark("imports", "end")
def wrap(name, fn):
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def w(*a, **k):
            mark(name, "start")
            try:
                return await fn(*a, **k)
            finally:
                mark(name, "end")
    else:
        @functools.wraps(fn)
        def w(*a, **k):
            mark(name, "start")
            try:
                return fn(*a, **k)
            finally:
                mark(name, "end")
    return w
for name, mod, attr in PHASES:
    try:
        m = importlib.import_module(mod)
        owner = m
        *path, last = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        setattr(owner, last, wrap(name, getattr(owner, last)))
    except (ImportError, AttributeError):
        pass
import ferry.cli
_exit = ferry.cli._exit_now
def exit_now(code):
    mark("exit", "start")
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(marks, f)
    _exit(code)
ferry.cli._exit_now = exit_now
sys.argv = ["ferry", *ARGS]
mark("main", "start")
ferry.cli.main()
"""

#: What the password sync imports (checked against -X importtime; a superset would move time).
IMPORTS = [
    "ferry.cli",
    "ferry.cli.sync_cmd",
    "ferry.cli.common",
    "ferry.client.sync",
    "ferry.client.aclient",
    "ferry.client.tls",
    "ferry.aio",
]
PHASES = [
    ("event loop", "ferry.aio", "run"),
    ("connect+TLS", "ferry.client.aclient", "open_client_connection"),
    ("pin check", "ferry.client.tls", "check_peer"),
    ("hello+login", "ferry.client.aclient", "_handshake"),
    ("login", "ferry.client.aclient", "log_in"),
    ("local scan", "ferry.client.synclocal", "scan_local"),
    ("local scan", "ferry.client.sync", "scan_local"),
    ("remote listing", "ferry.client.sync", "scan_remote"),
    ("listing page", "ferry.client.sync", "_unpack"),
    ("plan", "ferry.client.sync", "plan"),
    ("close", "ferry.client.aclient", "AsyncClient.close"),
]


def write_tree(root: Path, count: int, big_mib: int) -> None:
    """``count`` files of 4 KiB (1,000 per folder) and ``big.bin``, as bench/sync.py lays them out."""
    rng = random.Random(1)
    pool = rng.randbytes(4096 + count)
    for i in range(count):
        sub = root / "small" / f"d{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}").write_bytes(pool[i : i + 4096])
    make_big_file(root / "big.bin", big_mib * MiB)


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, CPU ms) of one run (CPU: user + system of the command, RUSAGE_CHILDREN difference)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{argv}: exit {r.returncode}: {r.stderr.decode(errors='replace')[-600:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dt * 1000, cpu * 1000


def imports_by_package(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Self time (ms) of every import of one run under ``-X importtime``, summed per top-level
    package (``ferry.client`` and ``ferry.cli`` kept apart: they are what this project controls)."""
    r = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    out: dict[str, float] = defaultdict(float)
    for line in r.stderr.splitlines():
        fields = line.split("|")
        if (
            not line.startswith("import time:")
            or len(fields) != 3
            or not fields[0].split(":")[1].strip().isdigit()
        ):
            continue
        name = fields[2].strip()
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "ferry" and len(parts) > 1 else parts[0]
        out[key] += int(fields[0].split(":")[1]) / 1000
        out["(all)"] += int(fields[0].split(":")[1]) / 1000
    return out


def phase_table(runs: list[list[list[object]]]) -> list[list[str]]:
    """Median start, end and duration (ms since the child's first line) of each marked phase; a
    phase run several times (listing pages) shows its first start, last end and summed time."""
    per: dict[str, list[tuple[float, float, float, int]]] = defaultdict(list)
    order: list[str] = []
    for marks in runs:
        opened: dict[str, list[float]] = defaultdict(list)
        seen: dict[str, list[float]] = {}
        for name, what, ms, _main in marks:  # type: ignore[misc]
            assert isinstance(name, str) and isinstance(ms, float | int)
            if name not in order:
                order.append(name)
            if what == "start":
                opened[name].append(float(ms))
                seen.setdefault(name, [float(ms), float(ms), 0.0, 0])
            elif opened[name] or name in ("imports",):
                start = opened[name].pop() if opened[name] else 0.0
                s = seen.setdefault(name, [start, float(ms), 0.0, 0])
                s[1] = float(ms)
                s[2] += float(ms) - start
                s[3] += 1
        for name, (a, b, d, n) in seen.items():
            per[name].append((a, b, d, int(n)))
    rows = []
    for name in order:
        vals = per[name]
        rows.append([
            name,
            f"{median(v[0] for v in vals):.1f}",
            f"{median(v[1] for v in vals):.1f}",
            f"{median(v[2] for v in vals):.1f}",
            f"{median(v[3] for v in vals):.0f}",
        ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=10_000, help="small files (4 KiB each)")
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the big file")
    ap.add_argument("--runs", type=int, default=15, help=f"rounds (at most {MAX_RUNS})")
    ap.add_argument("--delete", action="store_true", help="sync with --delete (case (e)'s options)")
    ap.add_argument(
        "--rev", default=None, help="also measure this git revision's client (src/ exported), interleaved"
    )
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if not 1 <= args.runs <= MAX_RUNS:
        ap.error(f"--runs must be 1..{MAX_RUNS}")
    # Byte-compiled sources, as an installed copy has (without them, and with PYTHONDONTWRITEBYTECODE
    # set, every run compiles ferry's modules again: ~0.1 s that no user pays).
    compile_source(PROJECT / "src")
    need = 2 * (args.big_mib * MiB + args.small * 8192) + 256 * MiB
    with scratch_dir(need, prefix="ferry-sync-probe-") as scratch, contextlib.ExitStack() as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "SSH_AUTH_SOCK"}
        # HOME without ~/.ssh: a password login must not try someone's default key files first.
        env.update(FERRY_HOME=str(scratch / "home"), FERRY_PASSWORD=PASSWORD, HOME=str(scratch / "no-home"),
                   PYTHONUNBUFFERED="1")  # fmt: skip
        root = scratch / "root"
        ferry_add_user(root, USER, PASSWORD, env=env)
        key, token_file = ferry_key_and_token(root, USER, scratch, env)
        src = scratch / "src"
        write_tree(src, args.small, args.big_mib)
        srv = stack.enter_context(FerryServer(root, plain=False, env=env))
        log(f"ferry {source_version()}; {args.small} x 4 KiB + {args.big_mib} MiB; server on port {srv.port}")
        target = f"ferry://{USER}@127.0.0.1:{srv.port}/s"
        sync_args = ["sync", "--json", "-q", *(["--delete"] if args.delete else []), f"{src}/", target]
        console = [PYTHON, "-c", CONSOLE]
        env_no_pw = {k: v for k, v in env.items() if k != "FERRY_PASSWORD"}
        cmds: list[tuple[str, list[str], dict[str, str]]] = [
            ("python -c pass", [PYTHON, "-c", "pass"], env),
            ("ferry --version", [*console, "--version"], env),
            ("sync, password", [*console, *sync_args], env),
            ("sync, password, python -m ferry", [PYTHON, "-m", "ferry", *sync_args], env),
            (
                "sync, key file",
                [*console, *sync_args[:-2], "--identity", str(key), *sync_args[-2:]],
                env_no_pw,
            ),
            (
                "sync, token",
                [*console, *sync_args[:-2], "--token-file", str(token_file), *sync_args[-2:]],
                env_no_pw,
            ),
        ]
        # The trees measured: the working tree, and (--rev) a revision's client on the same server,
        # interleaved round by round so that load from elsewhere hits both alike.
        trees: list[tuple[str, dict[str, str]]] = [(f"tree {source_version()}", env)]
        if args.rev:
            rev = resolve_rev(args.rev)
            old = export_source(rev, scratch / "rev")
            compile_source(old)
            trees.insert(0, (source_version(rev=rev), dict(env, PYTHONPATH=str(old))))
        first = run_once(cmds[2][1], env)
        log(f"first sync: {first[0]:.0f} ms")
        for _label, cmd, e in cmds:  # warm-up: caches, .pyc files, the server's password cache
            for _name, tree_env in trees:
                run_once(cmd, {**e, **{k: v for k, v in tree_env.items() if k == "PYTHONPATH"}})
        marked_src = (
            MARKED.replace("IMPORTS", repr(IMPORTS))
            .replace("PHASES", repr(PHASES))
            .replace("ARGS", repr(sync_args))
        )
        samples: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        marked: dict[str, list[list[list[object]]]] = defaultdict(list)
        marked_wall: dict[str, list[float]] = defaultdict(list)
        busy: list[float] = []
        loads: list[float] = []
        imports: dict[str, list[dict[str, float]]] = defaultdict(list)
        probe_out = scratch / "marks.json"
        for i in range(args.runs):
            busy.append(background_busy(0.1))
            loads.append(os.getloadavg()[0])
            order = cmds[i % len(cmds) :] + cmds[: i % len(cmds)]
            tree_order = trees if i % 2 == 0 else trees[::-1]
            for label, cmd, e in order:
                for name, tree_env in tree_order:
                    if name != trees[-1][0] and label not in ("sync, password", "ferry --version"):
                        continue  # the revision: only the rows that compare
                    run_env = {**e, **{k: v for k, v in tree_env.items() if k == "PYTHONPATH"}}
                    samples[(label, name)].append(run_once(cmd, run_env))
            for name, tree_env in tree_order:
                wall, _cpu = run_once([PYTHON, "-c", marked_src], dict(tree_env, PROBE_OUT=str(probe_out)))
                marked_wall[name].append(wall)
                marked[name].append(json.loads(probe_out.read_text()))
                imports[name].append(imports_by_package(cmds[2][1], tree_env))
    names = [n for n, _ in trees]
    print(f"median of {args.runs} rounds; {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"background CPU median {median(busy) * 100:.0f} %, max {max(busy) * 100:.0f} %; "
          f"load average (1 min) median {median(loads):.2f}, max {max(loads):.2f}")  # fmt: skip
    print()
    headers = ["command"] + [f"{n} wall ms" for n in names] + [f"{n} CPU ms" for n in names]
    rows = []
    for label, _cmd, _e in cmds:
        cells = [samples.get((label, n)) for n in names]
        rows.append(
            [label]
            + [f"{median(v[0] for v in c):.1f}" if c else "-" for c in cells]
            + [f"{median(v[1] for v in c):.1f}" if c else "-" for c in cells]
        )
    rows.append(
        ["sync, password, phase marks"]
        + [f"{median(marked_wall[n]):.1f}" for n in names]
        + ["-"] * len(names)
    )
    print(table(headers, rows, markdown=args.markdown))
    for name in names:
        print()
        print(f"phases of the marked password sync, {name} (ms since the child's first line; medians):")
        print(
            table(
                ["phase", "start", "end", "time", "count"], phase_table(marked[name]), markdown=args.markdown
            )
        )
    print()
    keys = sorted(
        {k for n in names for d in imports[n] for k in d},
        key=lambda k: -median(d.get(k, 0.0) for d in imports[names[-1]]),
    )
    rows = [
        [k, *(f"{median(d.get(k, 0.0) for d in imports[n]):.1f}" for n in names)]
        for k in keys
        if max(median(d.get(k, 0.0) for d in imports[n]) for n in names) >= 0.5
    ]
    print("imports of the password sync (-X importtime, self ms per top-level package, medians):")
    print(table(["package", *names], rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
