"""Benchmark (not a test): remote command latency and throughput, ferry against OpenSSH.

Measures, in one run, on loopback:

* ``true`` over an already-open :class:`~ferry.client.aclient.AsyncClient` (median per command);
* ``ferry exec HOST -- true`` as a whole process (Python start-up, imports, TCP, TLS, login,
  command), against a server with production argon2id parameters (what users get) and against one
  whose password hash is cheap (to show what the rest costs);
* the same ``ferry exec`` logging in with an SSH key file (``-i``), the same key through a real
  ``ssh-agent``, and a token, against the production server (no argon2 on these paths); the key
  is the private sshd's own ed25519 key, so ``ssh`` below uses the very same key;
* argon2id verification alone with the production parameters (it is part of every fresh login);
* ``ssh HOST true`` fresh, and over a ControlMaster connection, against a private sshd
  (``/work/shared/peers/sshd-loopback.sh``, key authentication);
* stdout throughput of ``cat`` of a large file: ``ferry exec`` (TLS), the same over an open
  client, and ``ssh HOST cat``.

Runs are interleaved (ferry, ssh, ferry, ...) so that load from elsewhere hits both alike, and the
median of several runs is reported. Every loop is bounded in count and every subprocess in time.

    python bench/exec.py                      # 15 latency rounds, 1 GiB, 3 throughput rounds
    python bench/exec.py --rounds 30 --size 256M --no-ssh
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PASSWORD = "bench password 1"
SSHD_SCRIPT = Path("/work/shared/peers/sshd-loopback.sh")
BANNER = re.compile(r"listening on (\S+):(\d+)")
FERRY = [sys.executable, "-m", "ferry"]

# A server like `ferry serve` (same run() entry point, uvloop for TLS) but with a chosen hasher.
_SERVER = """
import sys
from pathlib import Path
from argon2 import PasswordHasher
from ferry.server.app import ServeConfig, run
root, plain = Path(sys.argv[1]), sys.argv[2] == "plain"
cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
config = ServeConfig(root=root, port=0, plain=plain, log_to_console=False, hasher=cheap)
run(config, lambda b: print("listening on", b.address, flush=True))
"""


def parse_size(text: str) -> int:
    """``1G`` / ``256M`` / ``4096`` -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    m = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) * units[m.group(2)]


def median_ms(samples: list[float]) -> float:
    """Median of seconds, in milliseconds."""
    return statistics.median(samples) * 1000


# --- servers -----------------------------------------------------------------------------------


def add_user(root: Path, cheap: bool) -> None:
    """The bench user (exec allowed), hashed with production parameters unless ``cheap``."""
    from argon2 import PasswordHasher

    from ferry.server.accounts import Accounts

    hasher = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1) if cheap else None
    with Accounts(root, hasher=hasher) as acc:
        acc.add("bench", PASSWORD, exec_allowed=True)


@contextlib.contextmanager
def server(argv: list[str], env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """Run a server subprocess until the block ends; yields its port (from the banner) and pid."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        port = 0
        while not port and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server {argv} exited early")
            if m := BANNER.search(line):
                port = int(m.group(2))
        if not port:
            raise RuntimeError("server did not start")
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def private_sshd(workdir: Path) -> Iterator[tuple[int, list[str], int] | None]:
    """Start the shared loopback sshd script with a private directory; yields (port, options, pid)."""
    if not SSHD_SCRIPT.exists():
        yield None
        return
    env = dict(os.environ, PEER_DIR=str(workdir / "sshd"))
    out = subprocess.run(
        ["bash", str(SSHD_SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=600
    )
    if out.returncode != 0:
        print(f"sshd not available: {out.stderr.strip()[-300:]}", file=sys.stderr)
        yield None
        return
    port = int(re.search(r"PEER_SSH_PORT=(\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    opts = shlex.split(re.search(r"PEER_SSH_OPTS='([^']*)'", out.stdout).group(1))  # type: ignore[union-attr]
    pid = int((workdir / "sshd" / "sshd.pid").read_text())
    try:
        yield port, opts, pid
    finally:
        subprocess.run(["bash", str(SSHD_SCRIPT), "stop"], env=env, timeout=60, capture_output=True)


# --- measurements ------------------------------------------------------------------------------


def time_process(argv: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL) -> float:
    """Wall time of one process run (must exit 0)."""
    t0 = time.perf_counter()
    r = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, timeout=300
    )
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.decode()[-300:]}")
    return took


def login_runs(
    root: Path,
    port: int,
    work: Path,
    env: dict[str, str],
    sshd: tuple[int, list[str], int] | None,
    stack: contextlib.ExitStack,
) -> dict[str, Callable[[], float]]:
    """``ferry exec -- true`` rows that log in with a key file, ssh-agent (a real one, killed by
    PID at the end) and a token; the key is the private sshd's when it runs (the same key as ssh)."""
    key = work / "sshd" / "id" if sshd is not None else work / "id_ed25519"
    if sshd is None:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
    user = [*FERRY, "user"]
    subprocess.run([*user, "key", "add", "bench", f"{key}.pub", "--root", str(root)],
                   env=env, check=True, timeout=60, capture_output=True)  # fmt: skip
    token = subprocess.run([*user, "token", "add", "bench", "--root", str(root)],
                           env=env, check=True, timeout=60, capture_output=True, text=True).stdout.strip()  # fmt: skip
    sock = work / "agent.sock"
    out = subprocess.run(["ssh-agent", "-s", "-a", str(sock)], check=True, timeout=30, capture_output=True, text=True)
    agent_pid = int(out.stdout.split("SSH_AGENT_PID=", 1)[1].split(";", 1)[0])
    stack.callback(os.kill, agent_pid, 15)
    agent_env = dict(env, SSH_AUTH_SOCK=str(sock))
    subprocess.run(["ssh-add", str(key)], env=agent_env, check=True, timeout=30, capture_output=True)
    target = [f"ferry://bench@127.0.0.1:{port}", "--", "true"]
    return {
        "ferry exec (key -i)": lambda: time_process([*FERRY, "exec", "-i", str(key), *target], env),
        "ferry exec (ssh-agent)": lambda: time_process([*FERRY, "exec", *target], agent_env),
        "ferry exec (token)": lambda: time_process([*FERRY, "exec", *target], dict(env, FERRY_TOKEN=token)),
    }


def open_client_latency(port: int, rounds: int, home: Path) -> dict[str, float]:
    """Median ``true`` over one open TLS connection: shell form and argv form."""
    from ferry.aio import run
    from ferry.client.aclient import AsyncClient
    from ferry.client.known_hosts import KnownHosts

    async def main() -> dict[str, float]:
        client = await AsyncClient.connect(
            "127.0.0.1", port, user="bench", password=PASSWORD, known_hosts=KnownHosts(home / "known_hosts")
        )
        out: dict[str, float] = {}
        async with client:
            for label, cmd in (("sh", "true"), ("argv", ["true"])):
                for _ in range(5):  # warm-up
                    await client.run(cmd)
                samples = []
                for _ in range(rounds * 4):  # cheap: more samples
                    t0 = time.perf_counter()
                    r = await client.run(cmd)
                    samples.append(time.perf_counter() - t0)
                    assert r.exit_code == 0
                out[label] = median_ms(samples)
        return out

    return run(main())


def open_client_throughput(port: int, path: Path, home: Path) -> float:
    """Seconds to stream ``cat path`` over an open TLS connection (output discarded)."""
    from ferry.aio import run
    from ferry.client.aclient import AsyncClient
    from ferry.client.known_hosts import KnownHosts

    async def main() -> float:
        client = await AsyncClient.connect(
            "127.0.0.1", port, user="bench", password=PASSWORD, known_hosts=KnownHosts(home / "known_hosts")
        )
        async with client:
            n = 0
            t0 = time.perf_counter()
            stream = client.stream(["cat", str(path)])
            async for _kind, data in stream:
                n += len(data)
            took = time.perf_counter() - t0
            assert n == path.stat().st_size and stream.exit_code == 0
            return took

    return run(main())


def proc_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and its reaped children (utime, stime, cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def with_cpu(fn: Callable[[], float], server_pid: int) -> Callable[[], tuple[float, float]]:
    """Wrap a measurement: (wall seconds, CPU seconds of client + server side, incl. `cat`).

    CPU time does not depend on what else runs on the machine, so it compares ferry and ssh even
    when wall times are disturbed by other load.
    """

    def run() -> tuple[float, float]:
        srv0, own0 = proc_cpu(server_pid), own_cpu()
        wall = fn()
        # sshd's per-connection processes may still be exiting: their CPU time reaches the
        # listener's counters only once it has reaped them.
        children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
        deadline = time.monotonic() + 3
        while children.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.01)
        return wall, (proc_cpu(server_pid) - srv0) + (own_cpu() - own0)

    return run


def argon2_ms(rounds: int = 5) -> float:
    """Median production argon2id verification (the server's default hasher)."""
    from ferry.server.accounts import default_hasher

    ph = default_hasher()
    h = ph.hash(PASSWORD)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ph.verify(h, PASSWORD)
        samples.append(time.perf_counter() - t0)
    return median_ms(samples)


def interleaved(runs: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Run every measurement once per round, in turn, ``rounds`` times."""
    out: dict[str, list[T]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            out[name].append(fn())
    return out


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ssh_v = (
        subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
        if shutil.which("ssh")
        else "-"
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
        f"{ssh_v}, loopback; load average at start {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (default 15)")
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="throughput file size (default 1G)")
    ap.add_argument("--tput-rounds", type=int, default=5, help="throughput rounds (default 5)")
    ap.add_argument("--no-ssh", action="store_true", help="skip the OpenSSH comparison")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

    print(f"machine: {machine()}", flush=True)
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="ferry-bench-exec-") as tmp:
        work = Path(tmp)
        prod_root, cheap_root = work / "prod", work / "cheap"
        add_user(prod_root, cheap=False)
        add_user(cheap_root, cheap=True)
        big = work / "big.bin"
        with big.open("wb") as f:  # random: nothing on the way can compress it
            chunk = os.urandom(1 << 20)
            for i in range(args.size >> 20):
                f.write(chunk[i % 7 :] + chunk[: i % 7])
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        # HOME without ~/.ssh: the password rows must not try someone's default key files first.
        env.update(FERRY_HOME=str(work / "client"), FERRY_PASSWORD=PASSWORD, HOME=str(work / "no-home"))
        results["argon2_ms"] = argon2_ms()
        print(f"argon2id verify (production parameters): {results['argon2_ms']:.0f} ms", flush=True)

        with (
            server([*FERRY, "serve", "--root", str(prod_root), "--port", "0"], env) as (prod_port, _),
            server([sys.executable, "-c", _SERVER, str(cheap_root), "tls"], env) as (cheap_port, cheap_pid),
            private_sshd(work) as sshd,
            contextlib.ExitStack() as stack,
        ):
            # Pin both certificates once (the first connection prints a notice).
            for port in (prod_port, cheap_port):
                time_process([*FERRY, "exec", f"ferry://bench@127.0.0.1:{port}", "--", "true"], env)
            results["open_client_ms"] = open_client_latency(prod_port, args.rounds, work / "client")
            print(f"(a) open client: {results['open_client_ms']}", flush=True)

            runs: dict[str, Callable[[], float]] = {
                "ferry exec (argon2 prod)": lambda: time_process(
                    [*FERRY, "exec", f"ferry://bench@127.0.0.1:{prod_port}", "--", "true"], env
                ),
                "ferry exec (cheap hash)": lambda: time_process(
                    [*FERRY, "exec", f"ferry://bench@127.0.0.1:{cheap_port}", "--", "true"], env
                ),
            }
            runs.update(login_runs(prod_root, prod_port, work, env, sshd, stack))
            ssh_base: list[str] = []
            control = work / "cm.sock"
            if sshd is not None and not args.no_ssh:
                ssh_port, opts, sshd_pid = sshd
                ssh_base = ["ssh", *opts, "-p", str(ssh_port), "root@127.0.0.1"]
                subprocess.run(
                    ["ssh", *opts, "-p", str(ssh_port), "-o", "ControlMaster=yes", "-o", f"ControlPath={control}",
                     "-o", "ControlPersist=600", "-N", "-f", "root@127.0.0.1"],
                    check=True, timeout=30, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                runs["ssh (fresh)"] = lambda: time_process([*ssh_base, "true"], env)
                runs["ssh (ControlMaster)"] = lambda: time_process(
                    [
                        "ssh",
                        *opts,
                        "-p",
                        str(ssh_port),
                        "-o",
                        f"ControlPath={control}",
                        "root@127.0.0.1",
                        "true",
                    ],
                    env,
                )
            try:
                lat = interleaved(runs, args.rounds)
                results["latency_ms"] = {k: median_ms(v) for k, v in lat.items()}
                for k, v in results["latency_ms"].items():
                    print(f"(b) {k}: {v:.1f} ms", flush=True)

                size = big.stat().st_size
                with open(os.devnull, "wb") as null:
                    tput: dict[str, Callable[[], tuple[float, float]]] = {
                        "ferry exec cat (TLS, process)": with_cpu(
                            lambda: time_process(
                                [*FERRY, "exec", f"ferry://bench@127.0.0.1:{cheap_port}", "--", "cat", str(big)],
                                env,
                                null,
                            ),
                            cheap_pid,
                        ),
                        "ferry cat (TLS, open client)": with_cpu(
                            lambda: open_client_throughput(cheap_port, big, work / "client"), cheap_pid
                        ),
                    }
                    if ssh_base:
                        tput["ssh cat"] = with_cpu(
                            lambda: time_process([*ssh_base, "cat", str(big)], env, null), sshd_pid
                        )
                    t = interleaved(tput, args.tput_rounds)
                gib = size / (1 << 30)
                results["throughput_MBps"] = {
                    k: size / statistics.median(w for w, _ in v) / 1e6 for k, v in t.items()
                }
                results["cpu_s_per_GiB"] = {k: statistics.median(c for _, c in v) / gib for k, v in t.items()}
                for k in t:
                    print(
                        f"throughput {k}: {results['throughput_MBps'][k]:.0f} MB/s, "
                        f"{results['cpu_s_per_GiB'][k]:.2f} CPU s/GiB",
                        flush=True,
                    )
            finally:
                if ssh_base:
                    subprocess.run(
                        ["ssh", "-o", f"ControlPath={control}", "-O", "exit", "root@127.0.0.1"],
                        timeout=30, capture_output=True,
                    )  # fmt: skip
    results["load_end"] = os.getloadavg()[0]
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(r: dict[str, Any], args: argparse.Namespace) -> None:
    """The markdown table for docs/exec.md."""
    print()
    print(f"Machine: {r['machine']}; load average at end {r['load_end']:.1f}.")
    print()
    print("| measurement | median |")
    print("|---|---|")
    oc = r["open_client_ms"]
    print(f"| (a) `true` over an open client, `sh -c` form | {oc['sh']:.2f} ms |")
    print(f"| (a) `true` over an open client, argv form | {oc['argv']:.2f} ms |")
    for k, v in r.get("latency_ms", {}).items():
        print(f"| (b) {k} `true`, whole process | {v:.0f} ms |")
    print(f"| argon2id verification alone (production parameters) | {r['argon2_ms']:.0f} ms |")
    size = args.size / (1 << 20)
    for k, v in r.get("throughput_MBps", {}).items():
        cpu = r["cpu_s_per_GiB"][k]
        print(f"| {k} of {size:.0f} MiB | {v:.0f} MB/s ({cpu:.2f} CPU s/GiB, both ends) |")


if __name__ == "__main__":
    main()
