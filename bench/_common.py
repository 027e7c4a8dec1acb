"""Shared helpers for ferry's benchmarks (``bench/*.py``): timing, statistics, tables, RSS, prewarm,
test data, and starting a ``ferry serve`` subprocess or the private loopback sshd.

Benchmarks are not tests: they print numbers for people. The rules they follow anyway:

* loopback only, servers bind port 0 and report the port they got;
* every wait is bounded (subprocess timeouts, bounded polling loops);
* only processes started here are ever signalled, by PID;
* work happens on a tmpfs so the disk is not what is measured.

This machine type has one trap worth knowing (see ``../shared/README.md``): memory freed for more
than ~2 s is reclaimed by the host, and writing into such pages runs ~5x slower. :func:`prewarm`
writes (and frees) as many bytes as the next run will write, immediately before it, so the timed run
lands on warm pages. Call it right before every timed run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: The project checkout (bench/ lives directly under it).
PROJECT = Path(__file__).resolve().parent.parent
#: The shared folder beside the project (reference figures, peers); $FERRY_SHARED for a worktree
#: that does not sit beside it.
SHARED = Path(os.environ.get("FERRY_SHARED") or PROJECT.parent / "shared")
SSHD_SCRIPT = SHARED / "peers" / "sshd-loopback.sh"
#: Python used for ferry subprocesses: the project's venv when present.
PYTHON = (
    str(PROJECT / ".venv" / "bin" / "python")
    if (PROJECT / ".venv" / "bin" / "python").exists()
    else sys.executable
)
#: argv prefix that runs the ferry CLI.
FERRY = [PYTHON, "-m", "ferry"]
#: The command line itself, as the console script ran it before the resident connection (and as
#: it still runs when there is no resident process, after a check of ~1-2 ms): older revisions
#: (``--rev``) have nothing else. ``python -m ferry`` also imports runpy (a few ms more per command).
CONSOLE = "import sys; from ferry.cli import main; sys.exit(main())"
#: What the ``ferry`` console script does now (the generated script in the venv's bin/ is these
#: lines): hand the command to a resident process if there is one (ferry.resident.thin), else the above.
CONSOLE_THIN = "import sys; from ferry.resident.thin import main; sys.exit(main())"
#: argv prefix that runs the ferry CLI as its console script does.
FERRY_SCRIPT = [PYTHON, "-c", CONSOLE_THIN]

# A benchmark's ferry commands connect directly and leave no resident process behind (it would
# log in and idle beside the next timed runs) unless it turns that on for its own commands, as
# bench/sync.py does for its "ferry" tool (docs/cli.md, "The resident connection").
os.environ.setdefault("FERRY_RESIDENT", "0")


# --- statistics and output ----------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (NaN when empty, so a missing tool prints as n/a rather than crashing)."""
    data = list(values)
    return statistics.median(data) if data else float("nan")


def fmt_num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    """A number with thousands separators, or ``n/a`` for None/NaN."""
    if value is None or value != value:  # NaN check without math import
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    """``num / den`` as ``1.23x`` (``n/a`` when either is missing or zero)."""
    if not num or not den or num != num or den != den:
        return "n/a"
    return f"{num / den:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A fixed-width text table (first column left-aligned, the rest right-aligned).

    ``markdown=True`` renders a GitHub-style table instead, ready to paste into docs.
    """
    cols = len(headers)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(cols)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    out = [line(headers)]
    if markdown:
        out.append("|" + "|".join((":" if i == 0 else "-") + "-" * widths[i] + ("-" if i == 0 else ":")
                                  for i in range(cols)) + "|")  # fmt: skip
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def log(msg: str) -> None:
    """Progress output on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


# --- memory: peak RSS ---------------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``...), None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def peak_rss_mib(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of a running process in MiB."""
    kib = proc_status_kib(pid, "VmHWM")
    return None if kib is None else kib / KiB


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a running process has used so far (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0, same user), so the next
    :func:`peak_rss_mib` is the peak of what happened since. False if not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- other people's load ------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already included in user
    return total - idle, total


def background_busy(interval: float = 0.2) -> float:
    """Fraction (0..1) of all CPUs busy over ``interval`` seconds while this benchmark does nothing:
    other people's work on a shared machine, which slows every number measured now."""
    b0, t0 = _cpu_jiffies()
    time.sleep(interval)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def wait_quiet(max_wait: float, threshold: float = 0.15, interval: float = 0.2) -> float:
    """Wait (at most ``max_wait`` seconds) until background CPU use is below ``threshold``.

    Returns the last measured background fraction so the caller can record how noisy the run was.
    """
    deadline = time.monotonic() + max_wait
    busy = background_busy(interval)
    while busy > threshold and time.monotonic() < deadline:
        busy = background_busy(interval)
    return busy


# --- running commands ---------------------------------------------------------------------------


@dataclass
class Run:
    """One finished subprocess: wall time, exit status, peak RSS, output."""

    argv: list[str]
    seconds: float
    returncode: int
    maxrss_mib: float  # peak RSS of the command (or its largest waited-for descendant)
    stdout: str
    stderr: str
    timed_out: bool = False
    cpu_seconds: float = 0.0  # user + system CPU of the command and the descendants it waited for

    @property
    def ok(self) -> bool:
        """True when the command exited 0 in time."""
        return self.returncode == 0 and not self.timed_out

    def describe_failure(self) -> str:
        """One line saying why the run failed (for logs)."""
        why = "timed out" if self.timed_out else f"exit {self.returncode}"
        tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-3:]
        return f"{shlex.join(self.argv)}: {why}: {' | '.join(tail)}"


#: Runs ``argv[2:]`` and writes its peak RSS in KiB to the file ``argv[1]``: the fallback when GNU
#: time is missing. Started from this small interpreter, the child's peak is its own (see run_timed).
_SPAWN_SCRIPT = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_utime} {usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""
_GNU_TIME = "/usr/bin/time"


def _rss_wrapper(report: str) -> list[str]:
    """argv prefix that runs a command and writes its peak RSS (KiB) to ``report``."""
    if os.access(_GNU_TIME, os.X_OK):
        return [_GNU_TIME, "-q", "-f", "%M %U %S", "-o", report]
    return [sys.executable, "-S", "-c", _SPAWN_SCRIPT, report]


def run_timed(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    stdin_data: bytes | None = None,
    cwd: str | Path | None = None,
) -> Run:
    """Run ``argv`` to completion and measure its wall time and peak RSS.

    Why a wrapper for RSS: Linux keeps a process's peak RSS across ``fork``/``execve``, so a command
    started straight from this (large) benchmark process would report at least the benchmark's own
    size. GNU time (or a tiny Python launcher) is small; the command it starts reports its own peak,
    including descendants it waited for (scp's ssh). Wall time is measured here (the wrapper adds ~1 ms).
    The whole process group (ours) is killed after ``timeout`` seconds. Output goes to temporary
    files so a chatty child never blocks on a full pipe.
    """
    argv = list(argv)
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", suffix=".rss") as rss,
    ):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*_rss_wrapper(rss.name), *argv],
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,  # own process group: a timeout kills scp *and* its ssh
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            if stdin_data is not None:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(stdin_data)
                proc.stdin.close()
            proc.wait()
            seconds = time.perf_counter() - t0
        finally:
            timer.cancel()
        try:
            # GNU time may print a status line first; the last line is ours: "KiB user sys"
            fields = rss.read().strip().splitlines()[-1].split()
            maxrss_kib, cpu = int(fields[0]), float(fields[1]) + float(fields[2])
        except (ValueError, IndexError):
            maxrss_kib, cpu = 0, 0.0
        out.seek(0)
        err.seek(0)
        return Run(
            argv,
            seconds,
            proc.returncode,
            maxrss_kib / KiB,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            timed_out.is_set(),
            cpu,
        )


# --- scratch space and data ---------------------------------------------------------------------


def tmpfs_free(path: str | Path) -> int:
    """Bytes free on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_tmpfs(path: str | Path) -> bool:
    """True when ``path`` lives on a tmpfs (by /proc/mounts, longest matching mount point)."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    return fstype == "tmpfs"


@contextlib.contextmanager
def scratch_dir(
    need: int, prefix: str = "ferry-bench-", base: str | None = None, allow_disk: bool = False
) -> Iterator[Path]:
    """A fresh folder on a tmpfs with at least ``need`` bytes free; removed afterwards, whatever happens.

    ``base`` defaults to /dev/shm; ``allow_disk`` accepts any filesystem (to measure a real disk on
    purpose). Raises SystemExit with a clear message when there is no room.
    """
    base = base or "/dev/shm"
    if not allow_disk and not is_tmpfs(base):
        raise SystemExit(
            f"{base} is not a tmpfs; pass a tmpfs (e.g. mount -t tmpfs) to keep the disk out of it"
        )
    free = tmpfs_free(base)
    if free < need:
        raise SystemExit(f"{base} has {free / GiB:.1f} GiB free, the benchmark needs {need / GiB:.1f} GiB")
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_big_file(path: Path, size: int, block: int = 64 * MiB) -> None:
    """Write ``size`` bytes of incompressible data quickly.

    One ``os.urandom`` block is reused with a different 16-byte header per repetition: nothing in
    the path compresses or deduplicates, so repeated blocks measure the same as fresh random data.
    """
    base = bytearray(os.urandom(min(block, size)))
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            n = min(len(base), size - written)
            base[:16] = i.to_bytes(8, "little") + os.urandom(8)
            f.write(memoryview(base)[:n])
            written += n
            i += 1


def make_tree(root: Path, count: int, size: int, per_dir: int = 1000) -> int:
    """Create ``count`` files of ``size`` random bytes under ``root`` (``per_dir`` per subfolder, as
    real trees have folders). Returns the total bytes."""
    root.mkdir(parents=True, exist_ok=True)
    pool = os.urandom(size + count)  # distinct content per file by sliding the window
    for i in range(count):
        sub = root / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            sub.mkdir(exist_ok=True)
        with open(sub / f"f{i:05d}.bin", "wb") as f:
            f.write(pool[i : i + size])
    return count * size


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) of regular files under ``root`` (0, 0 if it does not exist)."""
    files = total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            total += st.st_size
    return files, total


def read_through(paths: Iterable[Path], bufsize: int = 8 * MiB) -> int:
    """Read files (or every file of folders) once, discarding the data; returns bytes read."""
    buf = bytearray(bufsize)
    total = 0
    for p in paths:
        files = [p] if p.is_file() else [Path(d) / n for d, _s, ns in os.walk(p) for n in ns]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return total


def prewarm(dest_dir: Path, nbytes: int, sources: Iterable[Path] = ()) -> None:
    """Get the machine ready for a timed run that reads ``sources`` and writes ``nbytes`` under ``dest_dir``.

    Reads the sources once, then writes ``nbytes`` (plus 10 %) into a scratch file on the destination
    filesystem and deletes it: the kernel hands those just-freed, host-backed pages to the run that
    follows (freshly touched pages are ~5x slower on these VMs). Call it immediately before timing.
    """
    read_through(sources)
    dest_dir.mkdir(parents=True, exist_ok=True)
    scratch = dest_dir / ".prewarm"
    block = bytearray(os.urandom(min(16 * MiB, max(nbytes, 1))))
    want = nbytes + nbytes // 10
    with open(scratch, "wb", buffering=0) as f:
        done = 0
        while done < want:
            done += f.write(memoryview(block)[: min(len(block), want - done)])
    scratch.unlink()


def same_file_quick(a: Path, b: Path, probe: int = MiB) -> bool:
    """Cheap identity check for a copy: same size and identical first/middle/last ``probe`` bytes."""
    sa, sb = a.stat().st_size, b.stat().st_size
    if sa != sb:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in {0, max(sa // 2 - probe // 2, 0), max(sa - probe, 0)}:
            fa.seek(off)
            fb.seek(off)
            if fa.read(probe) != fb.read(probe):
                return False
    return True


# --- the raw socket limit -----------------------------------------------------------------------

#: Runs in a fresh interpreter: sendfile() ``argv[1]`` over loopback TCP into a forked receiver that
#: recv_into()s into one buffer and discards it (or writes it to ``argv[2]``). Prints seconds, from
#: the accepted connection to the receiver acknowledging the last byte.
RAW_SCRIPT = r"""
import os, socket, sys, time
path = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else ""
size = os.path.getsize(path)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
pid = os.fork()
if pid == 0:
    c = socket.create_connection(ls.getsockname())
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if out else -1
    got = 0
    while got < size:
        n = c.recv_into(buf)
        if not n:
            break
        if fd >= 0:
            os.write(fd, view[:n])
        got += n
    c.sendall(b"k")
    os._exit(0 if got == size else 1)
s, _ = ls.accept()
t0 = time.perf_counter()
with open(path, "rb") as f:
    s.sendfile(f)
ack = s.recv(1)
dt = time.perf_counter() - t0
_, status = os.waitpid(pid, 0)
if ack != b"k" or status:
    sys.exit("raw receiver failed")
print(f"{dt:.6f}")
"""


def raw_limit_argv(path: Path, write_to: Path | None = None) -> list[str]:
    """argv for one raw run (see :data:`RAW_SCRIPT`); its stdout is the transfer time in seconds."""
    return [sys.executable, "-c", RAW_SCRIPT, str(path), *([str(write_to)] if write_to else [])]


# --- a ferry server subprocess ------------------------------------------------------------------

_BANNER = re.compile(r"ferry serve: listening on (\[[^\]]+\]|[^\s:]+):(\d+)")

#: Used when the ``ferry serve`` CLI does not exist (yet): the library entry point with the same banner.
#: ``argv[1]`` = root, ``argv[2]`` = "plain" or "tls"; optional ``argv[3]`` = a cProfile output file.
_SERVE_SCRIPT = r"""
import sys
from pathlib import Path
from ferry.server.app import ServeConfig, run
cfg = ServeConfig(root=Path(sys.argv[1]), host="127.0.0.1", port=0, plain=sys.argv[2] == "plain",
                  log_to_console=False)
def ready(b):
    print(f"ferry serve: listening on {b.address}", flush=True)
if len(sys.argv) > 3:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        run(cfg, ready)
    finally:
        prof.disable()
        prof.dump_stats(sys.argv[3])
else:
    run(cfg, ready)
"""


@functools.cache
def _has_command(name: str, pythonpath: str) -> bool:
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    r = subprocess.run(
        [*FERRY, name, "--help"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    return r.returncode == 0 and "Usage:" in r.stdout


def ferry_has_command(name: str, env: Mapping[str, str] | None = None) -> bool:
    """True when the ferry CLI (as ``env``'s PYTHONPATH finds it) has the command ``name`` (``serve``, ``get``).

    Asks ``ferry NAME --help`` (imports only that command's module, so a half-edited unrelated module
    in a shared tree cannot make the answer wrong).
    """
    return _has_command(name, (env or os.environ).get("PYTHONPATH", ""))


def resolve_rev(rev: str) -> str:
    """The full commit hash of ``rev`` now (HEAD moves while others commit)."""
    r = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--verify", rev + "^{commit}"],
                       capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"unknown git revision {rev!r}: {r.stderr.strip()}")
    return r.stdout.strip()


def export_source(rev: str, dest: Path) -> Path:
    """Extract ``src/`` of git revision ``rev`` into ``dest`` and return the folder to put on PYTHONPATH.

    Measures one commit while others keep editing the shared tree (the repository is only read).
    """
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(PROJECT), "archive", "--format=tar", rev, "src"],
                             capture_output=True, timeout=120, check=False)  # fmt: skip
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, timeout=120, check=True)
    return dest / "src"


def compile_source(src: Path) -> None:
    """Byte-compile ferry's sources under ``src`` once, as an installation does.

    Each ``ferry`` command is a fresh interpreter: without ``.pyc`` files (an exported revision, or
    any tree when PYTHONDONTWRITEBYTECODE is set, as in some CI and sandbox shells) it recompiles
    every module on every run, ~0.1 s that no installed copy pays. ``pip install`` writes them.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], capture_output=True,
                   timeout=300, check=False)  # fmt: skip


def source_version(path: Path = PROJECT, rev: str | None = None) -> str:
    """Identification of the code measured: ``rev``'s short commit, or the checkout's HEAD plus
    ``+dirty`` if src/ has uncommitted changes (numbers from a shared tree should say what they measured)."""
    try:
        if rev is not None:
            return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", rev],
                                  capture_output=True, text=True, timeout=30, check=True).stdout.strip()  # fmt: skip
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def ferry_add_user(root: Path, name: str, password: str, env: Mapping[str, str] | None = None) -> None:
    """``ferry user add NAME --root ROOT --password-stdin`` (production password hashing)."""
    r = subprocess.run(
        [*FERRY, "user", "add", name, "--root", str(root), "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env) if env is not None else None,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"ferry user add failed: {r.stderr.strip() or r.stdout.strip()}")


def ferry_key_and_token(
    root: Path, name: str, scratch: Path, env: Mapping[str, str], key: Path | None = None
) -> tuple[Path, Path]:
    """Register an ed25519 key (``key``, else a new one made in ``scratch``) and a new token for
    user ``name`` of the data root ``root``; returns (the key file, a token file of mode 0600)."""
    if key is None:
        key = scratch / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
    user_cmd = [*FERRY, "user"]
    subprocess.run([*user_cmd, "key", "add", name, f"{key}.pub", "--root", str(root)],
                   env=dict(env), check=True, timeout=60, capture_output=True)  # fmt: skip
    token = subprocess.run([*user_cmd, "token", "add", name, "--root", str(root)],
                           env=dict(env), check=True, timeout=60, capture_output=True, text=True).stdout.strip()  # fmt: skip
    token_file = scratch / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return key, token_file


@dataclass
class FerryServer:
    """A ``ferry serve`` subprocess on 127.0.0.1, port 0. Use as a context manager or call :meth:`stop`.

    Uses the ``ferry serve`` CLI when it exists, else the library entry point ``ferry.server.app.run``
    (same banner line). ``profile_to`` runs the server under cProfile (library entry point only) and
    writes the stats there when it stops.
    """

    root: Path
    plain: bool
    env: Mapping[str, str] | None = None
    profile_to: Path | None = None
    #: more ``ferry serve`` options (limits...), passed when the CLI is used
    args: Sequence[str] = ()
    start_timeout: float = 60.0
    port: int = 0
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)
    via_cli: bool = False

    def start(self) -> FerryServer:
        """Start and wait (bounded) for the banner line; raises RuntimeError if it does not come."""
        use_cli = self.profile_to is None and ferry_has_command("serve", self.env)
        if use_cli:
            argv = [*FERRY, "serve", "--root", str(self.root), "--host", "127.0.0.1", "--port", "0"]
            if self.plain:
                argv.append("--plain")
            argv += list(self.args)
        else:
            argv = [PYTHON, "-c", _SERVE_SCRIPT, str(self.root), "plain" if self.plain else "tls"]
            if self.profile_to is not None:
                argv.append(str(self.profile_to))
        self.via_cli = use_cli
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # the server also logs to ROOT/logs/ferry.log
            text=True,
            env=env,
            start_new_session=True,  # a ^C of the benchmark must not reach it before we stop it
        )
        assert self.proc.stdout is not None
        # A reader thread with a deadline: readline() on a pipe cannot time out by itself.
        lines: list[str] = []
        found = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line)
                match = _BANNER.search(line)
                if match:
                    self.port = int(match.group(2))
                    found.set()
            found.set()  # EOF: the server exited

        threading.Thread(target=read, daemon=True).start()
        found.wait(self.start_timeout)
        if not self.port:
            self.stop()
            raise RuntimeError(f"ferry serve did not start: {''.join(lines)[-500:]!r}")
        return self

    @property
    def pid(self) -> int:
        """The server's PID."""
        assert self.proc is not None
        return self.proc.pid

    def reset_peak(self) -> None:
        """Start a new peak-RSS measurement window."""
        reset_peak_rss(self.pid)

    def cpu(self) -> float | None:
        """CPU seconds the server has used so far."""
        return cpu_seconds(self.pid)

    def peak_mib(self) -> float | None:
        """Peak RSS (MiB) since the last :meth:`reset_peak` (or since start)."""
        return peak_rss_mib(self.pid)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (the server shuts down cleanly), then SIGKILL after ``grace`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> FerryServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the private loopback sshd (scp / sftp / rsync peers) ---------------------------------------


@dataclass
class SshPeer:
    """The private OpenSSH server from ``../shared/peers/sshd-loopback.sh`` (key auth, loopback only)."""

    port: int
    opts: list[str]
    peer_dir: str

    @property
    def ssh_cmd(self) -> str:
        """The ``ssh ...`` command line for ``rsync -e``."""
        return shlex.join(["ssh", *self.opts, "-p", str(self.port)])

    def target(self, path: str | Path) -> str:
        """``root@127.0.0.1:PATH`` as scp/rsync want it."""
        return f"root@127.0.0.1:{path}"


@contextlib.contextmanager
def ssh_peer(peer_dir: str = "/tmp/ferry-bench-sshd") -> Iterator[SshPeer | None]:
    """Start the private sshd (installing it if needed), yield it (or None if it cannot run), stop it.

    A private ``PEER_DIR`` keeps it apart from other people's sshd instances on the same machine.
    """
    env = dict(os.environ, PEER_DIR=peer_dir)
    env.pop("PEER_SSH_PORT", None)
    if not SSHD_SCRIPT.exists():
        log(f"peers: {SSHD_SCRIPT} not found; skipping scp/sftp/rsync")
        yield None
        return
    try:
        r = subprocess.run(["bash", str(SSHD_SCRIPT), "start"], capture_output=True, text=True,
                           timeout=600, env=env, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        log("peers: sshd start timed out; skipping scp/sftp/rsync")
        yield None
        return
    port = re.search(r"PEER_SSH_PORT=(\d+)", r.stdout)
    opts = re.search(r"PEER_SSH_OPTS='([^']*)'", r.stdout)
    peer: SshPeer | None = None
    if r.returncode == 0 and port and opts:
        peer = SshPeer(int(port.group(1)), shlex.split(opts.group(1)), peer_dir)
        check = subprocess.run(["ssh", *peer.opts, "-p", str(peer.port), "root@127.0.0.1", "true"],
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        if check.returncode != 0:
            log(f"peers: ssh to the private sshd fails ({check.stderr.strip()}); skipping scp/sftp/rsync")
            peer = None
    else:
        log(f"peers: cannot start sshd ({(r.stderr or r.stdout).strip()[-300:]}); skipping scp/sftp/rsync")
    try:
        yield peer
    finally:
        subprocess.run(
            ["bash", str(SSHD_SCRIPT), "stop"], capture_output=True, timeout=60, env=env, check=False
        )
