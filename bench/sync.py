"""Sync benchmark: ``ferry sync`` against rsync over ssh and the rsync daemon, in one run.

Cases (issue 11), each run by every tool in rotating order, repeated; medians are reported:

(a) first sync of N small files (default 10,000 x 4 KiB) plus one big file (default 1 GiB);
(b) a no-op re-sync;
(c) 1% of the small files rewritten, 1 MiB overwritten in the middle of the big file;
(d) 100 bytes inserted at one third of the big file;
(e) 10% of the small files deleted at the source, with ``--delete``;
(f) a first sync of text logs (default 200 MiB) with ``-z`` (``rsync -z``).

Tools: ``ferry`` (TLS, through its resident connection: docs/cli.md), ``ferry-direct`` (TLS, each
command connecting and logging in itself, ``FERRY_RESIDENT=0``) and ``ferry-plain`` (``--plain``,
direct) against ``rsync-ssh`` (``rsync -a -e ssh``, the private loopback sshd from
``../shared/peers/sshd-loopback.sh``), ``rsync-ssh-cm`` (the same over an OpenSSH ControlMaster
connection kept by ControlPersist: ssh's own resident connection, for comparison; not part of
the targets) and ``rsyncd`` (the daemon from ``../shared/peers/rsyncd-loopback.sh``). All push
(local source, destination on the server).

The resident process of ``ferry`` is warmed (started, logged in) before each of its timed runs,
untimed (``ferry resident start``: a no-op when it is there), as the ssh master of
``rsync-ssh-cm`` is by the untimed runs before. Its CPU time counts as the client's: the
command's work runs there.

Per run: wall time; bytes on the wire (ferry: the client socket's TCP counters, TLS included; rsync:
its ``--stats`` totals sent + received, the rsync protocol's bytes *before* ssh's framing and
encryption, so this favours rsync-ssh a little); CPU seconds of the client (the command and the
children it waited for: ssh) and of the server (the server process, with its reaped children for
sshd and rsyncd).

ferry runs as its console script does (``ferry``, what a user types), from byte-compiled sources
(as an installed copy has them: without .pyc files, e.g. with PYTHONDONTWRITEBYTECODE set, every
command would compile ferry's modules again, ~0.1 s that no user pays).

    flock /work/bench.lock python bench/sync.py                    # the full run (~10 minutes)
    python bench/sync.py --small 2000 --big-mib 64 --logs-mib 20 --reps 1   # a quick look
    python bench/sync.py --markdown                                 # the table for docs/performance.md
    python bench/sync.py --cases b,e --reps 7                       # only some cases timed

With ``--cases``, the cases left out are not timed; the first sync (a) still runs (untimed) when a
later case needs its state, and the changes of (c) and (d) are made only when they are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    FERRY_SCRIPT,
    PROJECT,
    SHARED,
    FerryServer,
    GiB,
    MiB,
    SshPeer,
    compile_source,
    ferry_add_user,
    fmt_num,
    log,
    median,
    prewarm,
    run_timed,
    scratch_dir,
    source_version,
    ssh_peer,
    table,
)

USER, PASSWORD = "bench", "bench-password-not-secret"
RSYNCD_SCRIPT = SHARED / "peers" / "rsyncd-loopback.sh"
CASES = ("a", "b", "c", "d", "e", "f")
CASE_TEXT = {
    "a": "first sync",
    "b": "no-op re-sync",
    "c": "1% small + 1 MiB of big changed",
    "d": "100 B inserted in big",
    "e": "10% deleted, --delete",
    "f": "text logs, -z",
}


#: Seconds the resident process of the ``ferry`` tool stays idle between runs.
RESIDENT_PERSIST = 900


def cpu_with_children(pid: int) -> float | None:
    """User + system CPU of a process and of its children it has reaped (sshd, rsyncd fork per
    connection)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Sample:
    """One timed run."""

    seconds: float
    wire: int | None
    client_cpu: float
    server_cpu: float | None


@dataclass
class Results:
    """Samples per (case, tool)."""

    runs: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, case: str, tool: str, s: Sample) -> None:
        self.runs.setdefault((case, tool), []).append(s)

    def med(self, case: str, tool: str, attr: str) -> float | None:
        vals = [getattr(s, attr) for s in self.runs.get((case, tool), []) if getattr(s, attr) is not None]
        return median(vals) if vals else None


# --- data --------------------------------------------------------------------------------------


def write_small(root: Path, count: int, seed: int, only: range | None = None) -> None:
    """``count`` files of 4 KiB under ``root/small`` (1,000 per folder), deterministic per seed."""
    rng = random.Random(seed)
    pool = rng.randbytes(4096 + count)
    for i in only if only is not None else range(count):
        sub = root / "small" / f"d{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}").write_bytes(pool[i : i + 4096])


def small_path(root: Path, i: int) -> Path:
    return root / "small" / f"d{i // 1000:03d}" / f"f{i:05d}"


def write_logs(root: Path, nbytes: int) -> None:
    """Text logs: ``nbytes`` of plausible web-server lines in 10 MiB files."""
    rng = random.Random(7)
    paths = ["/", "/index.html", "/api/v1/items", "/static/app.js", "/login", "/img/logo.png"]
    agents = ["Mozilla/5.0 (X11; Linux x86_64)", "curl/8.5.0", "Go-http-client/1.1", "python-requests/2.32"]
    root.mkdir(parents=True, exist_ok=True)
    written, n = 0, 0
    while written < nbytes:
        lines = []
        size = 0
        while size < 10 * MiB and written + size < nbytes:
            line = (
                f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)} - - "
                f"[02/Dec/2026:13:{rng.randrange(60):02d}:{rng.randrange(60):02d} +0000] "
                f'"GET {rng.choice(paths)}?id={rng.randrange(100000)} HTTP/1.1" {rng.choice((200, 200, 200, 304, 404))} '
                f'{rng.randrange(100, 90000)} "-" "{rng.choice(agents)}"\n'
            )
            lines.append(line)
            size += len(line)
        (root / f"access-{n:03d}.log").write_text("".join(lines))
        written += size
        n += 1


# --- tools ---------------------------------------------------------------------------------------


@dataclass
class Env:
    """What the tools need: servers, peers, paths."""

    scratch: Path
    env: dict[str, str]
    ferry_tls: FerryServer | None = None
    ferry_plain: FerryServer | None = None
    ssh: SshPeer | None = None
    rsyncd_port: int = 0
    rsyncd_pid: int = 0
    sshd_pid: int = 0

    def dest(self, tool: str, case_set: str) -> tuple[str, Path]:
        """(the tool's destination argument, the local path that holds it)."""
        if tool.startswith("ferry"):
            srv = self.ferry_plain if tool == "ferry-plain" else self.ferry_tls
            assert srv is not None
            name = f"{case_set}-direct" if tool == "ferry-direct" else case_set  # (the same server)
            local = srv.root / "homes" / USER / name
            return f"ferry://{USER}@127.0.0.1:{srv.port}/{name}", local
        if tool.startswith("rsync-ssh"):
            local = self.scratch / tool / case_set
            assert self.ssh is not None
            return self.ssh.target(f"{local}/"), local
        local = self.scratch / "rsyncd" / case_set
        return f"rsync://127.0.0.1:{self.rsyncd_port}/data/{case_set}/", local

    def server_cpu(self, tool: str) -> float | None:
        if tool in ("ferry", "ferry-direct"):
            return self.ferry_tls.cpu() if self.ferry_tls else None
        if tool == "ferry-plain":
            return self.ferry_plain.cpu() if self.ferry_plain else None
        if tool.startswith("rsync-ssh"):
            return cpu_with_children(self.sshd_pid) if self.sshd_pid else None
        return cpu_with_children(self.rsyncd_pid) if self.rsyncd_pid else None


def wait_servers_idle(e: Env, tools: list[str], quiet: float = 0.3, limit: float = 20.0) -> float:
    """Wait (at most ``limit`` seconds) until no server process of ``tools`` used CPU for ``quiet``
    seconds; returns the seconds waited. A ferry server indexes a large file a sync uploaded just
    after the upload (for the next delta): without this, that second of CPU lands in whichever
    run comes next (on a 2-core machine: the no-op (b) took 0.39-0.56 s instead of 0.24-0.27 s
    in the repetitions where it followed a ferry first sync closely)."""
    t0 = time.monotonic()
    last = [e.server_cpu(t) for t in tools]
    while time.monotonic() - t0 < limit:
        time.sleep(quiet)
        now = [e.server_cpu(t) for t in tools]
        if now == last:
            break
        last = now
    return time.monotonic() - t0


def tool_env(e: Env, tool: str) -> dict[str, str]:
    """The environment of a tool's command: only ``ferry`` has its resident connection on."""
    return dict(e.env, FERRY_RESIDENT=str(RESIDENT_PERSIST) if tool == "ferry" else "0")


def warm_resident(e: Env) -> int | None:
    """Start the ``ferry`` tool's resident process unless it is there (untimed); its pid."""
    assert e.ferry_tls is not None
    env = tool_env(e, "ferry")
    dest = f"ferry://{USER}@127.0.0.1:{e.ferry_tls.port}/"
    subprocess.run([*FERRY_SCRIPT, "resident", "start", "-q", dest], env=env, timeout=120, check=True)
    out = subprocess.run([*FERRY_SCRIPT, "resident", "list", "--json"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    pids = [json.loads(line)["pid"] for line in out.splitlines() if f'"port": {e.ferry_tls.port}' in line]
    return int(pids[0]) if pids else None


def ssh_cm_cmd(e: Env) -> str:
    """``ssh ...`` with an OpenSSH master connection that stays (ControlMaster/ControlPersist)."""
    assert e.ssh is not None
    path = f"/tmp/fb-cm-{os.getpid()}-%C"  # short: a Unix socket path
    return e.ssh.ssh_cmd + f" -o ControlMaster=auto -o ControlPath={path} -o ControlPersist={RESIDENT_PERSIST}"


def run_tool(e: Env, tool: str, src: Path, case_set: str, *, delete: bool = False, compress: bool = False) -> Sample:
    target, _local = e.dest(tool, case_set)
    resident: int | None = None
    if tool.startswith("ferry"):
        argv = [*FERRY_SCRIPT, "sync", "--json", "-q", f"{src}/", target]
        if tool == "ferry-plain":
            argv.append("--plain")
        if tool == "ferry":
            resident = warm_resident(e)
            if resident is None:
                raise SystemExit("ferry: no resident process after 'ferry resident start'")
    else:
        argv = ["rsync", "-a", "--stats", f"{src}/", target]
        if tool == "rsync-ssh":
            assert e.ssh is not None
            argv[1:1] = ["-e", e.ssh.ssh_cmd]
        elif tool == "rsync-ssh-cm":
            argv[1:1] = ["-e", ssh_cm_cmd(e)]
    if delete:
        argv.insert(len(argv) - 2, "--delete")
    if compress:
        argv.insert(len(argv) - 2, "-z")
    cpu0 = e.server_cpu(tool)
    rcpu0 = cpu_with_children(resident) if resident else None
    r = run_timed(argv, timeout=900, env=tool_env(e, tool))
    cpu1 = e.server_cpu(tool)
    rcpu1 = cpu_with_children(resident) if resident else None
    if not r.ok:
        raise SystemExit(f"{tool}: {r.describe_failure()}")
    client_cpu = r.cpu_seconds
    if rcpu0 is not None and rcpu1 is not None:  # the work ran in the resident process
        client_cpu += rcpu1 - rcpu0
    wire: int | None = None
    if tool.startswith("ferry"):
        summary = [json.loads(x) for x in r.stdout.splitlines() if '"summary"' in x]
        wire = int(summary[-1]["wire_bytes"]) if summary else None
    else:
        sent = re.search(r"Total bytes sent: ([\d,]+)", r.stdout)
        got = re.search(r"Total bytes received: ([\d,]+)", r.stdout)
        if sent and got:
            wire = int(sent.group(1).replace(",", "")) + int(got.group(1).replace(",", ""))
    server = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return Sample(r.seconds, wire, client_cpu, server)


# --- the run -------------------------------------------------------------------------------------


def rotate(tools: list[str], k: int) -> list[str]:
    return tools[k % len(tools) :] + tools[: k % len(tools)]


def one_repetition(e: Env, tools: list[str], rep: int, args: argparse.Namespace, res: Results) -> None:
    src = e.scratch / "src"
    pristine = e.scratch / "big.orig"
    # the source in its first state (restored each repetition)
    shutil.rmtree(src / "small", ignore_errors=True)
    write_small(src, args.small, seed=1)
    shutil.copyfile(pristine, src / "big.bin")
    big_size = pristine.stat().st_size
    for tool in tools:  # every destination starts empty
        _t, local = e.dest(tool, "s")
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True, exist_ok=True)

    timed = set(args.cases)

    def case(name: str, **kw: bool) -> None:
        for tool in rotate(tools, rep + CASES.index(name)):
            waited = wait_servers_idle(e, tools)
            if waited > 1:
                log(f"rep {rep} ({name}): waited {waited:.1f} s for the servers to be idle")
            # Every case that writes a new version of the big file (the first sync, and the deltas
            # of (c) and (d), which assemble it in a new file) gets warm pages first, or whoever
            # runs first after a pause pays ~2 s for fresh memory (seen in (c): 4.1-4.5 s for the
            # first tool of each repetition, 1.4-2.8 s for the others).
            if name in ("a", "c", "d"):
                prewarm(e.scratch, big_size + (args.small * 4096 if name == "a" else 0))
            s = run_tool(e, tool, src, "s", **kw)
            if name in timed:
                res.add(name, tool, s)
            log(f"rep {rep} ({name}) {tool}: {s.seconds:.2f} s, wire {fmt_num(s.wire)} B{'' if name in timed else ' (not timed)'}")

    if timed & set("abcde"):
        case("a")  # (the state every later case starts from)
    if "b" in timed:
        case("b")
    rng = random.Random(100 + rep)
    if "c" in timed:
        # (c) 1% of the small files rewritten, 1 MiB overwritten in the middle of the big file
        step = 100
        for i in range(0, args.small, step):
            small_path(src, i).write_bytes(rng.randbytes(4096))
        with open(src / "big.bin", "r+b") as f:
            f.seek(big_size // 2)
            f.write(rng.randbytes(MiB))
        case("c")
    if "d" in timed:
        # (d) 100 bytes inserted at one third
        tmp = src / ".big.tmp"
        with open(src / "big.bin", "rb") as fin, open(tmp, "wb") as fout:
            third = big_size // 3
            shutil.copyfileobj(_Limited(fin, third), fout, 8 * MiB)
            fout.write(rng.randbytes(100))
            shutil.copyfileobj(fin, fout, 8 * MiB)
        os.replace(tmp, src / "big.bin")
        case("d")
    if "e" in timed:
        # (e) 10% of the small files deleted, --delete
        for i in range(5, args.small, 10):
            small_path(src, i).unlink()
        case("e", delete=True)
    if "f" not in timed:
        return
    # (f) text logs, compressed
    logs = e.scratch / "logs"
    for tool in tools:
        _t, local = e.dest(tool, "f")
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True, exist_ok=True)
    for tool in rotate(tools, rep):
        wait_servers_idle(e, tools)
        prewarm(e.scratch, args.logs_mib * MiB)
        s = run_tool(e, tool, logs, "f", compress=True)
        res.add("f", tool, s)
        log(f"rep {rep} (f) {tool}: {s.seconds:.2f} s, wire {fmt_num(s.wire)} B")


class _Limited:
    """The first ``n`` bytes of a file object (for copyfileobj)."""

    def __init__(self, f: object, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data: bytes = self.f.read(min(size if size > 0 else self.left, self.left))  # type: ignore[attr-defined]
        self.left -= len(data)
        return data


def report(res: Results, tools: list[str], markdown: bool, big_size: int) -> None:
    def cell(case: str, tool: str, attr: str, digits: int = 2) -> str:
        v = res.med(case, tool, attr)
        return "-" if v is None else fmt_num(v, digits)

    headers = ["case", "tool", "wall s", "wire bytes", "client CPU s", "server CPU s"]
    rows = []
    for c in CASES:
        for t in tools:
            if (c, t) not in res.runs:
                continue
            wire = res.med(c, t, "wire")
            rows.append([f"({c}) {CASE_TEXT[c]}", t, cell(c, t, "seconds"), fmt_num(wire), cell(c, t, "client_cpu"), cell(c, t, "server_cpu")])
    print(table(headers, rows, markdown=markdown))
    print()
    pairs = [("ferry", "rsync-ssh"), ("ferry-direct", "rsync-ssh"), ("ferry", "rsync-ssh-cm"), ("ferry-plain", "rsyncd")]
    headers = ["case", "pair", "time ratio", "wire ratio", "target"]
    targets = {"a": "time <= 1", "b": "time <= 0.5", "c": "time <= 1, wire <= 1.5 and < 2% of big",
               "d": "time <= 1, wire <= 1.5 and < 2% of big", "e": "time <= 1", "f": "time <= 1, wire <= 1.2"}  # fmt: skip
    rows = []
    for c in CASES:
        for a, b in pairs:
            ta, tb = res.med(c, a, "seconds"), res.med(c, b, "seconds")
            wa, wb = res.med(c, a, "wire"), res.med(c, b, "wire")
            if ta is None or tb is None:
                continue
            wr = f"{wa / wb:.2f}" if wa and wb else "-"
            extra = f" ({100 * wa / big_size:.2f}% of big)" if c in ("c", "d") and wa else ""
            target = targets[c] if b != "rsync-ssh-cm" else "(for comparison)"
            rows.append([f"({c})", f"{a} / {b}", f"{ta / tb:.2f}", wr + extra, target])
    print(table(headers, rows, markdown=markdown))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=10_000, help="small files (4 KiB each)")
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the big file")
    ap.add_argument("--logs-mib", type=int, default=200, help="text logs for case (f)")
    ap.add_argument("--reps", type=int, default=3, help="round-robin repetitions (medians)")
    ap.add_argument("--tools", default="ferry,ferry-direct,ferry-plain,rsync-ssh,rsync-ssh-cm,rsyncd")
    ap.add_argument("--cases", default=",".join(CASES), help="cases to time, e.g. b,e (default: all)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.cases or not set(args.cases) <= set(CASES):
        ap.error(f"--cases: a comma-separated list of {', '.join(CASES)}")
    tools = args.tools.split(",")
    big = args.big_mib * MiB
    need = big * 2 + args.logs_mib * MiB + len(tools) * (big + args.logs_mib * MiB + args.small * 8192) + GiB // 2
    with scratch_dir(need, prefix="ferry-bench-sync-") as scratch:
        run_dir = scratch / "run"  # the resident process's socket, away from the user's own
        run_dir.mkdir(mode=0o700)
        env = dict(os.environ, FERRY_HOME=str(scratch / "client-home"), FERRY_PASSWORD=PASSWORD, PYTHONUNBUFFERED="1",
                   FERRY_RUNTIME_DIR=str(run_dir))  # fmt: skip
        e = Env(scratch, env)
        compile_source(PROJECT / "src")
        log(f"ferry {source_version()}; data: {args.small} x 4 KiB + {args.big_mib} MiB, logs {args.logs_mib} MiB; "
            f"cases {','.join(args.cases)}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
        (scratch / "src").mkdir()
        from _common import make_big_file

        make_big_file(scratch / "big.orig", big)
        if "f" in args.cases:
            write_logs(scratch / "logs", args.logs_mib * MiB)
        servers: list[Callable[[], None]] = []
        try:
            for tool in tools:
                if not tool.startswith("ferry") or (tool != "ferry-plain" and e.ferry_tls is not None):
                    continue  # ("ferry" and "ferry-direct" share one TLS server)
                root = scratch / ("root-ferry-plain" if tool == "ferry-plain" else "root-ferry")
                ferry_add_user(root, USER, PASSWORD, env=env)
                srv = FerryServer(root, plain=tool == "ferry-plain", env=env).start()
                servers.append(srv.stop)
                if tool == "ferry-plain":
                    e.ferry_plain = srv
                else:
                    e.ferry_tls = srv
            if "rsyncd" in tools:
                rdir = scratch / "rsyncd-run"
                renv = dict(env, PEER_RSYNCD_DIR=str(rdir))
                out = subprocess.run(["bash", str(RSYNCD_SCRIPT), "start", str(scratch / "rsyncd")],
                                     capture_output=True, text=True, timeout=600, env=renv, check=True)  # fmt: skip
                e.rsyncd_port = int(re.search(r"PEER_RSYNCD_PORT=(\d+)", out.stdout).group(1))  # type: ignore[union-attr]
                e.rsyncd_pid = int((rdir / "rsyncd.pid").read_text())
                servers.append(lambda: subprocess.run(["bash", str(RSYNCD_SCRIPT), "stop"], env=renv,
                                                      capture_output=True, timeout=60, check=False))  # fmt: skip
            with ssh_peer() as peer:
                if "rsync-ssh" in tools or "rsync-ssh-cm" in tools:
                    if peer is None:
                        tools[:] = [t for t in tools if not t.startswith("rsync-ssh")]
                    else:
                        e.ssh = peer
                        e.sshd_pid = int(Path(peer.peer_dir, "sshd.pid").read_text())
                res = Results()
                for rep in range(args.reps):
                    one_repetition(e, tools, rep, args, res)
                report(res, tools, args.markdown, big)
                print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            if e.ssh is not None and "rsync-ssh-cm" in tools:  # the ssh master of rsync-ssh-cm
                subprocess.run([*shlex.split(ssh_cm_cmd(e)), "-O", "exit", "root@127.0.0.1"], env=env,
                               capture_output=True, timeout=30, check=False)  # fmt: skip
            if e.ferry_tls is not None and "ferry" in tools:
                subprocess.run([*FERRY_SCRIPT, "resident", "stop"], env=tool_env(e, "ferry"),
                               capture_output=True, timeout=60, check=False)  # fmt: skip
            for stop in servers:
                stop()


if __name__ == "__main__":
    main()
