"""File-transfer benchmark: ferry against the raw socket limit, scp, sftp and rsync, in one run.

Everything runs on loopback with the data on a tmpfs (so neither the network nor a disk is what
is measured, only the software). One run measures, round-robin within each repetition:

* 1 GiB ``get`` and ``put`` (plain and TLS ferry; raw ``sendfile`` -> ``recv_into``, discarding or
  writing to the tmpfs; the bare Python TLS path of ``tls_bulk_probe.py`` (``raw-tls``); ``scp`` with the
  default cipher and with ``-c aes128-gcm@openssh.com``; ``sftp -b``; ``rsync -a`` over ssh);
* a folder of 10,000 x 4 KiB files, ``get -r`` and ``put -r`` (ferry, ``scp -r``, ``sftp -r``, ``rsync -a``).

Each tool is also timed on an empty file: that is its *setup* cost (process start, connect,
handshake, login, teardown). Rates are given two ways: *wall* (what a user waits for, setup included)
and *stream* (size / (wall - median setup), the steady transfer rate, comparable to the raw limit,
which has no setup). Peak RSS and CPU seconds: the client's through a small wrapper (GNU time, or a
``wait4()`` launcher), ferry's server's from ``/proc/PID`` (``VmHWM`` reset before each run). Results
are medians over ``--repeat`` repetitions; the report says how busy other processes kept the machine.

Usage::

    .venv/bin/python bench/transfer.py                 # full run (1 GiB, 10,000 files, 3 repetitions)
    .venv/bin/python bench/transfer.py --quick         # smoke run (256 MiB, 2,000 files, 1 repetition)
    .venv/bin/python bench/transfer.py --only ferry    # ferry and the raw limit, no ssh peers
    .venv/bin/python bench/transfer.py --profile /tmp/prof   # cProfile ferry's client and server per case
    .venv/bin/python bench/transfer.py --rev HEAD      # one commit's src/, while others edit the tree
    .venv/bin/python bench/transfer.py --only ferry --variants uvloop,si=0.0002 --cases get   # A/B client set-ups

Results go to stdout (``--markdown`` for docs tables, ``--json FILE`` for raw samples); progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import pstats
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    FERRY,
    PROJECT,
    PYTHON,
    FerryServer,
    GiB,
    KiB,
    MiB,
    Run,
    SshPeer,
    compile_source,
    export_source,
    ferry_add_user,
    ferry_has_command,
    fmt_num,
    fmt_ratio,
    log,
    make_big_file,
    make_tree,
    median,
    prewarm,
    proc_status_kib,
    raw_limit_argv,
    resolve_rev,
    run_timed,
    same_file_quick,
    scratch_dir,
    source_version,
    ssh_peer,
    table,
    tree_size,
    wait_quiet,
)

THIS = str(Path(__file__).resolve())
USER = "bench"
PASSWORD = "bench-password-not-secret"
RUN_TIMEOUT = 300.0  # seconds; the slowest expected run (scp -r of 10,000 files) takes ~5 s

# --- what is measured ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One transfer scenario."""

    key: str  # "get", "put", "get-r", "put-r"
    title: str
    tree: bool
    upload: bool


CASES = {
    c.key: c
    for c in (
        Case("get", "download one large file", tree=False, upload=False),
        Case("put", "upload one large file", tree=False, upload=True),
        Case("get-r", "download a folder of small files", tree=True, upload=False),
        Case("put-r", "upload a folder of small files", tree=True, upload=True),
    )
}

FERRY_TOOLS = ("ferry-plain", "ferry-tls")
#: ``--variants``: extra ferry client set-ups measured round-robin with the rest (Python API client,
#: suffix ``+NAME`` on the tool): name -> environment for the ``_client`` driver.
VARIANTS: dict[str, dict[str, str]] = {
    "api": {},  # the library through the API driver on asyncio: compare with the CLI
    "uvloop": {"BENCH_CLIENT_LOOP": "uvloop"},
}


def ferry_base(tool: str) -> str | None:
    """``ferry-plain`` / ``ferry-tls`` for a ferry tool (with or without a ``+variant``), else None."""
    base = tool.split("+", 1)[0]
    return base if base in FERRY_TOOLS else None


def variant_env(tool: str) -> dict[str, str] | None:
    """Extra environment of a ``+variant`` tool (None: not a variant). ``si=S`` sets the client's GIL
    switch interval to S seconds."""
    if "+" not in tool:
        return None
    name = tool.split("+", 1)[1]
    if name.startswith("si="):
        return {"BENCH_SWITCH_INTERVAL": name[3:]}
    return VARIANTS[name]


#: The limits, measured in the same run: ``sendfile`` into a reader that discards (the issue's raw
#: limit) or writes the tmpfs, and blocking ``SSLSocket``s that write and hash (what a Python TLS
#: receiver can do without an event loop or framing; see bench/tls_bulk_probe.py).
RAW_TOOLS = ("raw-discard", "raw-tmpfs", "raw-tls")
#: Raw tools that write their copy to ``Layout.dst / "raw.bin"``.
RAW_WRITERS = ("raw-tmpfs", "raw-tls")
TLS_PROBE = str(Path(__file__).resolve().with_name("tls_bulk_probe.py"))
SSH_FILE_TOOLS = ("scp", "scp-gcm", "sftp", "rsync-ssh")
SSH_TREE_TOOLS = ("scp", "sftp", "rsync-ssh")
SETUP = "setup"  # pseudo-case: the same command on an empty file


@dataclass
class Layout:
    """Where everything lives in the scratch tmpfs."""

    scratch: Path
    big_size: int
    tree_files: int
    tree_file_size: int

    @property
    def root(self) -> Path:
        """The ferry server root (shared by the plain and the TLS server)."""
        return self.scratch / "root"

    @property
    def home(self) -> Path:
        """The benchmark user's home: holds the download sources; uploads go to ``home/up``."""
        return self.root / "homes" / USER

    @property
    def big(self) -> Path:
        """The large file (source of downloads and of uploads)."""
        return self.home / "big.bin"

    @property
    def empty(self) -> Path:
        """An empty file: timing it gives each tool's fixed setup cost."""
        return self.home / "empty.bin"

    @property
    def tree(self) -> Path:
        """The folder of small files."""
        return self.home / "tree"

    @property
    def up(self) -> Path:
        """Where uploads land (on the server side)."""
        return self.home / "up"

    @property
    def dst(self) -> Path:
        """Where downloads land (on the client side)."""
        return self.scratch / "dst"

    @property
    def client_home(self) -> Path:
        """FERRY_HOME of the clients (known_hosts)."""
        return self.scratch / "client-home"

    def source(self, case: Case | None) -> Path:
        """The source path (a file or folder, absolute) of a case; None = the setup pseudo-case."""
        if case is None:
            return self.empty
        return self.tree if case.tree else self.big

    def dest(self, case: Case | None) -> Path:
        """The destination path (absolute, on whichever side) of a case."""
        name = self.source(case).name
        return (self.up if case is not None and case.upload else self.dst) / name

    def nbytes(self, case: Case | None) -> int:
        """Bytes a case moves."""
        if case is None:
            return 0
        return self.tree_files * self.tree_file_size if case.tree else self.big_size

    def clean_dests(self) -> None:
        """Empty both destination folders (they stay, so tools that need the parent find it)."""
        for d in (self.dst, self.up):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True, exist_ok=True)


@dataclass
class Sample:
    """One timed run."""

    seconds: float  # wall time of the command
    stream_seconds: float | None  # time measured inside (raw limit only)
    client_rss: float  # MiB
    server_rss: float | None  # MiB (ferry only)
    phases: dict[str, float] = field(default_factory=dict)  # ferry API client: where time went
    background: float = 0.0  # share of all CPUs used by other processes just before the run
    client_cpu: float = 0.0  # CPU seconds of the client command
    server_cpu: float | None = None  # CPU seconds the ferry server used during the run


# --- the ferry client driver (API mode; runs as a subprocess of the benchmark) ------------------


async def _client_op(op: str, port: int, plain: bool, src: str, dst: str) -> dict[str, float]:
    from ferry.client.aclient import AsyncClient

    phases: dict[str, float] = {}
    t = time.perf_counter()
    client = await AsyncClient.connect("127.0.0.1", port, user=USER, password=os.environ["FERRY_PASSWORD"],
                                       plain=plain)  # fmt: skip
    phases["connect+login"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        if op == "get":
            await client.get(src, dst)
        elif op == "put":
            await client.put(src, dst)
        elif op == "get-r":
            await client.get_tree(src, dst)
        elif op == "put-r":
            await client.put_tree(src, dst)
        else:
            raise SystemExit(f"unknown op {op}")
        phases["transfer"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        await client.close()
        phases["close"] = time.perf_counter() - t
    return phases


def client_main(argv: list[str]) -> int:
    """``transfer.py _client OP PORT plain|tls SRC DST``: one transfer with the Python API.

    Used with ``--client api`` and by ``--profile``. Prints the time spent per phase as JSON;
    ``startup`` is interpreter start + imports (the parent passes its clock in ``BENCH_T0``).
    The event loop is asyncio's, as in the CLI, or uvloop with ``BENCH_CLIENT_LOOP=uvloop``.
    """
    t_main = time.time()
    op, port, mode, src, dst = argv
    import ferry.client.aclient
    import ferry.client.transfer  # noqa: F401

    phases = {"startup": time.time() - float(os.environ.get("BENCH_T0", t_main))}
    phases["imports"] = time.time() - t_main
    if os.environ.get("BENCH_SWITCH_INTERVAL"):  # experiment: GIL hand-over latency (default 5 ms)
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    coro = _client_op(op, int(port), mode == "plain", src, dst)
    if os.environ.get("BENCH_CLIENT_LOOP") == "uvloop":
        import uvloop

        phases.update(uvloop.run(coro))
    else:
        phases.update(asyncio.run(coro))  # what the ferry get/put CLI does
    print(json.dumps(phases))
    return 0


# --- command lines per tool ---------------------------------------------------------------------


class Bench:
    """Runs the cases for every tool, round-robin, and reports."""

    def __init__(self, args: argparse.Namespace, layout: Layout) -> None:
        self.args = args
        self.L = layout
        self.servers: dict[str, FerryServer] = {}
        self.peer: SshPeer | None = None
        self.env = dict(os.environ, FERRY_HOME=str(layout.client_home), FERRY_PASSWORD=PASSWORD,
                        FERRY_USER=USER, PYTHONUNBUFFERED="1")  # fmt: skip
        self.env.pop("FERRY_ROOT", None)
        if args.pythonpath:
            self.env["PYTHONPATH"] = args.pythonpath
        self.env["BENCH_CLIENT_LOOP"] = args.client_loop
        self.use_cli = args.client == "cli" or (args.client == "auto" and ferry_has_command("get", self.env))
        self.samples: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
        self.failures: list[str] = []
        self.idle_rss: dict[str, float] = {}  # server RSS (MiB) right after start, before any client

    # ferry -------------------------------------------------------------------------------------

    def ferry_argv(self, tool: str, case: Case | None, profile_to: Path | None = None) -> list[str]:
        """The client command line for a ferry tool (ferry-plain / ferry-tls, maybe ``+variant``) and a case."""
        L = self.L
        base = ferry_base(tool)
        assert base is not None
        server = self.servers[base]
        plain = base == "ferry-plain"
        src, dst = L.source(case), L.dest(case)
        op = "get" if case is None else case.key
        upload = case is not None and case.upload
        # remote paths are relative to the home
        if upload:
            remote_src, remote_dst = str(src), str(dst.relative_to(L.home))
        else:
            remote_src, remote_dst = str(src.relative_to(L.home)), str(dst)
        if self.use_cli and profile_to is None and variant_env(tool) is None:
            # `ferry get [-r] [--plain] --json --port P USER@HOST:REMOTE LOCAL` / `ferry put ... LOCAL USER@HOST:REMOTE`
            # (--json: one result line that carries the transfer's own seconds)
            verb = "put" if upload else "get"
            argv = [*FERRY, verb, "--json", "--port", str(server.port)]
            if case is not None and case.tree:
                argv.append("-r")
            if plain:
                argv.append("--plain")
            loc = f"{USER}@127.0.0.1:"
            argv += [remote_src, loc + remote_dst] if upload else [loc + remote_src, remote_dst]
            return argv
        prof = ["-m", "cProfile", "-o", str(profile_to)] if profile_to else []
        return [PYTHON, *prof, THIS, "_client", op, str(server.port), "plain" if plain else "tls",
                remote_src, remote_dst]  # fmt: skip

    # ssh peers ---------------------------------------------------------------------------------

    def peer_argv(self, tool: str, case: Case | None) -> tuple[list[str], bytes | None] | None:
        """(argv, stdin) for an ssh-based tool and a case; None if the tool does not do that case."""
        peer = self.peer
        if peer is None:
            return None
        L = self.L
        tree = case is not None and case.tree
        upload = case is not None and case.upload
        src, dst = L.source(case), L.dest(case)
        if tool in ("scp", "scp-gcm"):
            if tool == "scp-gcm" and tree:
                return None
            argv = ["scp", "-q", *peer.opts, "-P", str(peer.port)]
            if tool == "scp-gcm":
                argv += ["-c", "aes128-gcm@openssh.com"]
            if tree:
                argv.append("-r")
            argv += [str(src), peer.target(dst)] if upload else [peer.target(src), str(dst)]
            return argv, None
        if tool == "sftp":
            flag = " -r" if tree else ""
            batch = f"{'put' if upload else 'get'}{flag} {src} {dst}\n"
            return [
                "sftp",
                "-q",
                *peer.opts,
                "-P",
                str(peer.port),
                "-b",
                "-",
                "root@127.0.0.1",
            ], batch.encode()
        if tool == "rsync-ssh":
            s, d = (str(src) + "/", str(dst) + "/") if tree else (str(src), str(dst))
            argv = ["rsync", "-a", "-e", peer.ssh_cmd]
            argv += [s, peer.target(d)] if upload else [peer.target(s), d]
            return argv, None
        raise ValueError(tool)

    # one timed run -----------------------------------------------------------------------------

    def tools_for(self, case: Case | None) -> list[str]:
        """Tools measured for a case (None = the setup pseudo-case), in the base order."""
        tools = list(FERRY_TOOLS)
        tools += [f"{t}+{v}" for v in self.args.variants for t in FERRY_TOOLS]
        if case is not None and case.key == "get":
            tools += RAW_TOOLS
        if self.peer is not None:
            tools += SSH_TREE_TOOLS if case is not None and case.tree else SSH_FILE_TOOLS
        return tools

    def run_one(self, tool: str, case: Case | None) -> Sample | None:
        """Prewarm, run one tool on one case, verify the copy, clean up; None on failure."""
        L = self.L
        L.clean_dests()
        src, dst = L.source(case), L.dest(case)
        base = ferry_base(tool)
        server = self.servers.get(base) if base else None
        cpu0: float | None = None
        background = wait_quiet(self.args.quiet_wait) if self.args.quiet_wait > 0 else 0.0
        stream: float | None = None
        if tool in RAW_TOOLS:
            out = L.dst / "raw.bin" if tool in RAW_WRITERS else None
            prewarm(L.dst, L.nbytes(case) if out else 0, [src])
            argv = (
                [PYTHON, TLS_PROBE, "--once", str(src), str(out)]
                if tool == "raw-tls"
                else raw_limit_argv(src, out)
            )
            r = run_timed(argv, timeout=RUN_TIMEOUT)
            if r.ok:
                stream = float(r.stdout.strip())
        else:
            extra: dict[str, str] = {}
            if base is not None:
                argv, stdin = self.ferry_argv(tool, case), None
                extra = variant_env(tool) or {}
            else:
                spec = self.peer_argv(tool, case)
                if spec is None:
                    return None
                argv, stdin = spec
            prewarm(dst.parent, L.nbytes(case), [src])
            if server is not None:
                server.reset_peak()
                cpu0 = server.cpu()
            env = dict(self.env, **extra, BENCH_T0=repr(time.time()))
            r = run_timed(argv, timeout=RUN_TIMEOUT, env=env, stdin_data=stdin)
        srv_rss = server.peak_mib() if server is not None else None
        srv_cpu = None
        if server is not None:
            cpu1 = server.cpu()
            srv_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
        ok = r.ok and self.verify(tool, case, r)
        L.clean_dests()
        if not ok:
            msg = f"{tool} {case.key if case else SETUP}: {r.describe_failure() if not r.ok else 'copy differs'}"
            self.failures.append(msg)
            log("  FAILED " + msg)
            return None
        phases: dict[str, float] = {}
        if base is not None:
            try:
                rec = json.loads(r.stdout.strip().splitlines()[-1])
                via_cli = self.use_cli and variant_env(tool) is None
                phases = {"transfer": float(rec["seconds"])} if via_cli else rec
            except (ValueError, IndexError, KeyError, TypeError):
                phases = {}
        return Sample(r.seconds, stream, r.maxrss_mib, srv_rss, phases, background, r.cpu_seconds, srv_cpu)

    def verify(self, tool: str, case: Case | None, r: Run) -> bool:
        """The copy exists and matches (quick check for files, count and bytes for folders)."""
        L = self.L
        if tool == "raw-discard":
            return True
        if tool in RAW_WRITERS:
            return same_file_quick(L.source(case), L.dst / "raw.bin")
        src, dst = L.source(case), L.dest(case)
        if case is not None and case.tree:
            return tree_size(dst) == tree_size(src)
        return dst.is_file() and same_file_quick(src, dst)

    # the whole run -----------------------------------------------------------------------------

    def run(self) -> None:
        """All repetitions, round-robin: every case, and within a case every tool in a rotated order."""
        cases = [CASES[k] for k in self.args.cases]
        for rep in range(self.args.repeat):
            log(f"repetition {rep + 1}/{self.args.repeat}")
            plan: list[Case | None] = [None, *cases]
            for case in plan:
                tools = self.tools_for(case)
                if case is None:  # setup: only tools with a fixed cost worth subtracting
                    tools = [t for t in tools if t not in RAW_TOOLS]
                shift = rep % len(tools)
                for tool in tools[shift:] + tools[:shift]:
                    name = case.key if case else SETUP
                    sample = self.run_one(tool, case)
                    if sample is not None:
                        self.samples[name][tool].append(sample)
                        srv = f", server {sample.server_rss:.0f} MiB" if sample.server_rss else ""
                        log(
                            f"  {name:6} {tool:12} {sample.seconds:7.3f} s, client {sample.client_rss:.0f} MiB{srv}"
                        )

    # reporting ---------------------------------------------------------------------------------

    def setup_s(self, tool: str) -> float | None:
        """Median setup seconds of a tool (None for the raw limit, which has none)."""
        if tool in RAW_TOOLS:
            return None
        s = self.samples[SETUP].get(tool)
        return median(x.seconds for x in s) if s else None

    def wall_s(self, key: str, tool: str) -> float | None:
        """Median wall seconds of a tool on a case."""
        s = self.samples[key].get(tool)
        return median(x.seconds for x in s) if s else None

    def stream_rate(self, key: str, tool: str) -> float | None:
        """Median steady rate in MiB/s: bytes / (wall - setup), or the raw limit's inside time."""
        s = self.samples[key].get(tool)
        if not s:
            return None
        size = self.L.nbytes(CASES[key])
        if tool in RAW_TOOLS:
            return median(size / MiB / x.stream_seconds for x in s if x.stream_seconds)
        setup = self.setup_s(tool) or 0.0
        return median(size / MiB / max(x.seconds - setup, 1e-6) for x in s)

    def wall_rate(self, key: str, tool: str) -> float | None:
        """Median wall rate in MiB/s (setup included)."""
        s = self.samples[key].get(tool)
        if not s:
            return None
        size = self.L.nbytes(CASES[key])
        return median(size / MiB / x.seconds for x in s)

    def cpu(self, key: str, tool: str, side: str) -> float | None:
        """Median CPU seconds of a tool on a case; side = client or server (ferry only)."""
        s = self.samples[key].get(tool)
        vals = [x.client_cpu if side == "client" else x.server_cpu for x in s or []]
        vals2 = [v for v in vals if v is not None]
        return median(vals2) if vals2 else None

    def rss(self, key: str, tool: str, side: str) -> float | None:
        """Largest peak RSS (MiB) over the runs of a tool on a case; side = client or server."""
        s = self.samples[key].get(tool)
        vals = [x.client_rss if side == "client" else x.server_rss for x in s or []]
        vals2 = [v for v in vals if v is not None]
        return max(vals2) if vals2 else None

    def report(self, markdown: bool) -> str:
        """Tables per case, ratios, the setup costs, ferry's phases, and the targets."""
        out: list[str] = []
        L = self.L
        out.append(
            f"data: {L.big_size / MiB:,.0f} MiB file; {L.tree_files:,} files x {L.tree_file_size // KiB} KiB; "
            f"{self.args.repeat} repetition(s), medians"
        )
        servers = {s.via_cli for s in self.servers.values()}
        bg = [x.background for d in self.samples.values() for v in d.values() for x in v]
        noisy = sum(b > 0.15 for b in bg)
        out.append(
            f"background CPU (other processes, share of all cores) just before each run: median "
            f"{median(bg) * 100:.0f} %, max {max(bg, default=0) * 100:.0f} %; {noisy} of {len(bg)} runs started above 15 %"
        )
        if self.idle_rss:
            idle = ", ".join(f"{t} {v:.0f} MiB" for t, v in self.idle_rss.items())
            out.append(f"server RSS at start (before any login): {idle}")
        out.append(
            f"ferry {source_version(rev=self.args.rev)}: client {'ferry get/put CLI' if self.use_cli else 'Python API (transfer.py _client)'}, "
            f"server {'ferry serve CLI' if servers == {True} else 'library entry point (ferry.server.app.run)'}"
        )
        for key in self.args.cases:
            case = CASES[key]
            tools = [t for t in self.tools_for(case) if self.samples[key].get(t)]
            if not tools:
                continue
            out.append(f"\n{key}: {case.title} ({L.nbytes(case) / MiB:,.0f} MiB)")
            if case.tree:
                headers = ["tool", "wall s", "setup s", "files/s", "client CPU s", "server CPU s",
                           "client RSS MiB", "server RSS MiB", "plain is x faster", "tls is x faster"]  # fmt: skip
            else:
                headers = ["tool", "wall s", "setup s", "wall MiB/s", "stream MiB/s", "client CPU s", "server CPU s",
                           "client RSS MiB", "server RSS MiB", "plain/this", "tls/this"]  # fmt: skip
            rows = []
            for tool in tools:
                wall = self.wall_s(key, tool)
                setup = self.setup_s(tool)
                crss, srss = self.rss(key, tool, "client"), self.rss(key, tool, "server")
                ccpu, scpu = (
                    fmt_num(self.cpu(key, tool, "client"), 2),
                    fmt_num(self.cpu(key, tool, "server"), 2),
                )
                if case.tree:
                    files_s = L.tree_files / wall if wall else None
                    rows.append([tool, fmt_num(wall, 3), fmt_num(setup, 3), fmt_num(files_s), ccpu, scpu,
                                 fmt_num(crss), fmt_num(srss),
                                 fmt_ratio(wall, self.wall_s(key, "ferry-plain")),
                                 fmt_ratio(wall, self.wall_s(key, "ferry-tls"))])  # fmt: skip
                else:
                    stream = self.stream_rate(key, tool)
                    rows.append([tool, fmt_num(wall, 3), fmt_num(setup, 3), fmt_num(self.wall_rate(key, tool)),
                                 fmt_num(stream), ccpu, scpu, fmt_num(crss), fmt_num(srss),
                                 fmt_ratio(self.stream_rate(key, "ferry-plain"), stream),
                                 fmt_ratio(self.stream_rate(key, "ferry-tls"), stream)])  # fmt: skip
            out.append(table(headers, rows, markdown))
        phases = self.phase_table(markdown)
        if phases:
            out.append("\nferry client phases (median seconds; rest = wall - transfer)")
            out.append(phases)
        out.append("\ntargets (same run; stream = setup subtracted, wall = as a user waits)")
        out.append(self.targets(markdown))
        limits = self.limits(markdown)
        if limits:
            out.append("\nwhat the limits allow in this run (stream MiB/s ratios; context, not targets)")
            out.append(limits)
        if self.failures:
            out.append("\nfailed runs (left out of the medians):")
            out.extend("  " + f for f in self.failures)
        return "\n".join(out)

    def phase_table(self, markdown: bool) -> str:
        """Median seconds per phase of ferry's client: startup, connect+login, transfer, close (API
        client), or transfer as the CLI reports it; ``rest`` = wall - transfer (start, login, exit)."""
        names = ["startup", "connect+login", "transfer", "close"]
        if self.use_cli and not self.args.variants:
            names = ["transfer"]
        rows = []
        for key in [SETUP, *self.args.cases]:
            for tool in [t for t in self.tools_for(None) if ferry_base(t)]:
                s = [x for x in self.samples[key].get(tool, []) if x.phases]
                if not s:
                    continue
                meds = [median(x.phases.get(n, float("nan")) for x in s) for n in names]
                rest = median(x.seconds - x.phases.get("transfer", float("nan")) for x in s)
                wall = median(x.seconds for x in s)
                rows.append(
                    [f"{key} {tool}", *(fmt_num(v, 3) for v in meds), fmt_num(rest, 3), fmt_num(wall, 3)]
                )
        return table(["case", *names, "rest", "wall"], rows, markdown) if rows else ""

    def targets(self, markdown: bool) -> str:
        """Each target with its measured ratio and a verdict."""
        rows: list[list[str]] = []

        def add(
            name: str, value: float | None, need: float, shown: str, higher_is_better: bool = True
        ) -> None:
            if value is None or value != value:
                rows.append([name, "n/a", shown, "NOT MEASURED"])
                return
            ok = value >= need if higher_is_better else value <= need
            rows.append([name, f"{value:.2f}", shown, "met" if ok else "MISSED"])

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a and b else None

        raw = self.stream_rate("get", "raw-discard") if "get" in self.args.cases else None
        for kind, fn in (("stream", self.stream_rate), ("wall", self.wall_rate)):
            if "get" not in self.args.cases:
                break
            plain_get = fn("get", "ferry-plain")
            add(f"plain get / raw limit ({kind})", ratio(plain_get, raw), 0.85, ">= 0.85")
            add(
                f"TLS get / scp aes128-gcm ({kind})",
                ratio(fn("get", "ferry-tls"), fn("get", "scp-gcm")),
                1.5,
                ">= 1.50",
            )
        for key in ("get-r", "put-r"):
            if key not in self.args.cases:
                continue
            tls = self.wall_s(key, "ferry-tls")
            add(
                f"{key} TLS: rsync-ssh time / ferry time",
                ratio(self.wall_s(key, "rsync-ssh"), tls),
                1.0,
                "> 1.00",
            )
            add(f"{key} TLS: scp -r time / ferry time", ratio(self.wall_s(key, "scp"), tls), 10.0, ">= 10.00")
        for side in ("client", "server"):
            peaks = [self.rss(k, t, side) for k in self.args.cases for t in FERRY_TOOLS]
            vals = [p for p in peaks if p is not None]
            add(
                f"ferry peak RSS, {side} (MiB)",
                max(vals) if vals else None,
                200.0,
                "< 200",
                higher_is_better=False,
            )
        return table(["target", "measured", "needed", "verdict"], rows, markdown)

    def limits(self, markdown: bool) -> str:
        """Ratios that say how far the bare limits themselves reach in this run: a receiver that
        writes the file (raw-tmpfs) against the discarding raw limit, and the bare Python TLS path
        (raw-tls) against scp, next to ferry's share of each."""
        if "get" not in self.args.cases:
            return ""
        rate = functools.partial(self.stream_rate, "get")
        pairs = [
            ("raw-tmpfs / raw-discard (a writing receiver vs the raw limit)", "raw-tmpfs", "raw-discard"),
            ("ferry-plain / raw-tmpfs", "ferry-plain", "raw-tmpfs"),
            ("raw-tls / scp-gcm (bare Python TLS vs the TLS peer)", "raw-tls", "scp-gcm"),
            ("ferry-tls / raw-tls", "ferry-tls", "raw-tls"),
        ]
        rows = [[name, fmt_ratio(rate(a), rate(b))] for name, a, b in pairs if rate(a) and rate(b)]
        return table(["ratio", "measured"], rows, markdown) if rows else ""

    def dump_json(self, path: Path) -> None:
        """Every sample, for later analysis."""
        data = {k: {t: [asdict(s) for s in v] for t, v in d.items()} for k, d in self.samples.items()}
        meta = {"big_size": self.L.big_size, "tree_files": self.L.tree_files, "tree_file_size": self.L.tree_file_size,
                "repeat": self.args.repeat, "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "ferry": source_version(rev=self.args.rev)}  # fmt: skip
        path.write_text(json.dumps({"meta": meta, "samples": data, "failures": self.failures}, indent=1))


# --- profiling pass -----------------------------------------------------------------------------


def profile_pass(bench: Bench, out_dir: Path, top: int) -> str:
    """Run each ferry case once with the client and a dedicated server under cProfile; summarise.

    cProfile sees the event-loop thread only: time in executor threads (pread/pwrite/blake3, which
    release the GIL) shows up as waiting in the loop (``select``/``epoll``), which is itself a finding.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    L = bench.L
    report: list[str] = []
    for tool in FERRY_TOOLS:
        plain = tool == "ferry-plain"
        for key in bench.args.cases:
            case = CASES[key]
            sprof = out_dir / f"server-{tool}-{key}.prof"
            cprof = out_dir / f"client-{tool}-{key}.prof"
            with FerryServer(L.root, plain=plain, env=bench.env, profile_to=sprof) as srv:
                saved = bench.servers[tool]
                bench.servers[tool] = srv
                try:
                    L.clean_dests()
                    argv = bench.ferry_argv(tool, case, profile_to=cprof)
                    prewarm(L.dest(case).parent, L.nbytes(case), [L.source(case)])
                    r = run_timed(argv, timeout=RUN_TIMEOUT, env=dict(bench.env, BENCH_T0=repr(time.time())))
                    L.clean_dests()
                finally:
                    bench.servers[tool] = saved
            if not r.ok:
                report.append(f"{tool} {key}: failed: {r.describe_failure()}")
                continue
            report.append(f"\n=== {tool} {key}: wall {r.seconds:.3f} s; phases {r.stdout.strip()}")
            for side, path in (("client", cprof), ("server", sprof)):
                if not path.exists():
                    report.append(f"--- {side}: no profile written")
                    continue
                report.append(f"--- {side} (top {top} by own time; {path})")
                report.append(_pstats_text(path, top))
    return "\n".join(report)


def _pstats_text(path: Path, top: int) -> str:
    """The top functions of a cProfile dump by own time, as text."""
    import io

    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.sort_stats("tottime").print_stats(top)
    lines = buf.getvalue().splitlines()
    # Drop pstats' preamble up to the column header; keep totals line.
    keep = [ln for ln in lines if ln.strip()]
    start = next((i for i, ln in enumerate(keep) if "function calls" in ln), 0)
    return "\n".join(keep[start:])


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 2,000 files, 1 repetition")
    p.add_argument("--repeat", type=int, default=None, help="repetitions per case (default 3, --quick 1)")
    p.add_argument("--size-mib", type=int, default=None, help="large file size in MiB (default 1024)")
    p.add_argument("--files", type=int, default=None, help="files in the folder (default 10,000)")
    p.add_argument("--only", choices=["all", "ferry"], default="all",
                   help="'ferry': ferry and the raw limit only, no ssh peers")  # fmt: skip
    p.add_argument(
        "--cases", default="get,put,get-r,put-r", help="comma-separated subset of get,put,get-r,put-r"
    )
    p.add_argument("--client", choices=["auto", "api", "cli"], default="auto",
                   help="ferry client: the ferry CLI when it has 'get' (auto), or the Python API")  # fmt: skip
    p.add_argument("--variants", default="",
                   help="extra ferry client set-ups measured alongside (API client): api, uvloop, si=SECONDS")  # fmt: skip
    p.add_argument("--client-loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="event loop of the API client (experiments; the CLI decides its own)")  # fmt: skip
    p.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs to work in (default /dev/shm)")
    p.add_argument("--disk", default=None, metavar="DIR",
                   help="work in DIR on a disk-backed filesystem instead of a tmpfs (fsync costs show)")  # fmt: skip
    p.add_argument(
        "--rev", default=None, help="measure this git revision's src/ (exported; default: the working tree)"
    )
    p.add_argument("--quiet-wait", type=float, default=5.0, metavar="S",
                   help="before each run wait up to S seconds for other processes to go quiet (0: off)")  # fmt: skip
    p.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    p.add_argument("--json", type=Path, default=None, help="also write every sample to this file")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="instead of timing: cProfile ferry's client and server once per case, dumps in DIR")  # fmt: skip
    p.add_argument("--top", type=int, default=25, help="functions shown per profile (default 25)")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick or args.profile else 3)
    args.size_mib = args.size_mib or (256 if args.quick else 1024)
    args.files = args.files or (2000 if args.quick else 10_000)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    badv = [v for v in args.variants if v not in VARIANTS and not v.startswith("si=")]
    if badv:
        p.error(f"unknown --variants {badv}; known: {', '.join(VARIANTS)}, si=SECONDS")
    args.pythonpath = None
    bad = [c for c in args.cases if c not in CASES]
    if bad or args.repeat < 1 or args.size_mib < 1 or args.files < 1:
        p.error(f"bad --cases {bad}" if bad else "sizes and --repeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point (also dispatches the hidden ``_client`` driver)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return client_main(argv[1:])
    args = parse_args(argv)
    size = args.size_mib * MiB
    tree_bytes = args.files * 4 * KiB
    # source + one destination + the prewarm file (1.1x) + folders and their inode overhead + slack
    need = int(size * 3.2) + tree_bytes * 4 + 256 * MiB
    if need > 6 * GiB:
        raise SystemExit(
            f"this would use {need / GiB:.1f} GiB of tmpfs (limit 6 GiB); use a smaller --size-mib"
        )
    with scratch_dir(need, base=args.disk or args.tmpfs, allow_disk=args.disk is not None) as scratch:
        L = Layout(scratch, size, args.files, 4 * KiB)
        if args.rev:
            args.rev = resolve_rev(args.rev)  # pin it: HEAD may move during the run
            args.pythonpath = str(export_source(args.rev, scratch / "source"))
        compile_source(Path(args.pythonpath) if args.pythonpath else PROJECT / "src")
        bench = Bench(args, L)
        log(f"scratch {scratch}; creating {size / MiB:,.0f} MiB file and {args.files:,} files")
        L.client_home.mkdir(parents=True)
        ferry_add_user(L.root, USER, PASSWORD, env=bench.env)
        make_big_file(L.big, size)
        L.empty.write_bytes(b"")
        make_tree(L.tree, args.files, 4 * KiB)
        L.clean_dests()
        started: list[FerryServer] = []
        try:
            for tool in FERRY_TOOLS:
                srv = FerryServer(L.root, plain=tool == "ferry-plain", env=bench.env).start()
                started.append(srv)
                bench.servers[tool] = srv
                log(
                    f"{tool}: pid {srv.pid} port {srv.port} ({'ferry serve' if srv.via_cli else 'library entry point'})"
                )
                bench.idle_rss[tool] = (proc_status_kib(srv.pid, "VmRSS") or 0) / KiB
            if args.profile is not None:
                print(profile_pass(bench, args.profile, args.top))
                return 0
            peer_cm = ssh_peer() if args.only == "all" else contextlib.nullcontext(None)
            with peer_cm as peer:
                bench.peer = peer
                if args.only == "all" and peer is None:
                    print("peers: sshd could not be started; scp/sftp/rsync are left out of this run")
                bench.run()
            print(bench.report(args.markdown))
            if args.json:
                bench.dump_json(args.json)
        finally:
            for srv in started:
                srv.stop()
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
