"""Benchmark (not a test): the fixed cost of one ``ferry`` command, from process start to exit.

Every ``ferry get/put/ls/...`` pays interpreter start, imports, connect, TLS handshake, login and
interpreter teardown around its real work. This times whole short commands against one running
``ferry serve`` (TLS, production argon2id: the ~22 ms server-side password check is included) on
127.0.0.1, port 0, in a scratch folder on a tmpfs:

* ``python -c pass``: the interpreter's own start and exit (the floor no command can go below);
* ``ferry --version``: start, the CLI's imports, exit (no connection);
* ``ferry ls HOST:`` of a home holding one small file, logging in with a password, and (without
  ``--rev``: older revisions have no key login) with an SSH key file (``-i``), the same key held
  by a real ``ssh-agent``, and a token (``--token-file``);
* ``ferry put`` and ``ferry get`` of one 4 KiB file;
* ``ssh HOST true`` against the private loopback sshd (``../shared/peers/sshd-loopback.sh``) with
  the same ed25519 key, when it can run (``--no-ssh`` skips it).

Commands run as the console script runs them (``from ferry.cli import main; sys.exit(main())``), with
byte-compiled sources (as an installed copy has). ``--rev REV`` measures that commit's ``src/``
(exported) alongside the working tree, interleaved run by run so that load from elsewhere hits both
alike; the server is always the working tree's. ``--imports`` adds the summed top-level
``-X importtime`` of each command (a separate, shorter series). Each command's CPU time (user +
system) is reported beside its wall time: it excludes the server's work and so is steadier. Every loop is bounded; every
subprocess has a timeout; only the server started here is signalled.

    .venv/bin/python bench/cli_startup.py                    # 20 runs of each command
    .venv/bin/python bench/cli_startup.py --rev main --imports --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CONSOLE,
    PROJECT,
    PYTHON,
    FerryServer,
    KiB,
    MiB,
    SshPeer,
    background_busy,
    compile_source,
    export_source,
    ferry_add_user,
    ferry_key_and_token,
    log,
    median,
    resolve_rev,
    scratch_dir,
    source_version,
    ssh_peer,
    table,
)

USER = "bench"
PASSWORD = "bench password 1"
MAX_RUNS = 200


Login = tuple[list[str], list[str]]
"""How a ``ferry ls`` row logs in: an argv prefix (``env VAR=...``) and the options of the method."""


def command_table(port: int, scratch: Path, logins: dict[str, Login] | None = None) -> list[tuple[str, list[str]]]:
    """(label, argv) of each timed command; the ferry ones run through :data:`CONSOLE`.

    ``logins``: extra ``ferry ls`` rows, label -> how that row logs in.
    """
    target = f"{USER}@127.0.0.1:"
    ferry = [PYTHON, "-c", CONSOLE]
    extra = [
        (f"ferry ls ({label})", [*prefix, *ferry, "ls", *opts, "-P", str(port), target])
        for label, (prefix, opts) in (logins or {}).items()
    ]
    return [
        ("python -c pass", [PYTHON, "-c", "pass"]),
        ("ferry --version", [*ferry, "--version"]),
        ("ferry ls", [*ferry, "ls", "-P", str(port), target]),
        *extra,
        ("ferry put (4 KiB)", [*ferry, "put", "-P", str(port), str(scratch / "small.bin"), target]),
        (
            "ferry get (4 KiB)",
            [*ferry, "get", "-P", str(port), target + "small.bin", str(scratch / "got.bin")],
        ),
    ]


def login_methods(
    root: Path, scratch: Path, env: dict[str, str], peer: SshPeer | None, stack: contextlib.ExitStack
) -> tuple[dict[str, Login], list[tuple[str, list[str]]]]:
    """Key, agent and token logins for the bench user, and the ``ssh true`` row with the same key.

    The key is the private sshd's own ed25519 key when it runs (so ssh and ferry use one key),
    else a new one. The agent is a real ``ssh-agent`` on a socket in ``scratch``, killed by PID.
    """
    key, token_file = ferry_key_and_token(
        root, USER, scratch, env, key=Path(peer.peer_dir) / "id" if peer is not None else None
    )
    out = subprocess.run(["ssh-agent", "-s", "-a", str(scratch / "agent.sock")],
                         check=True, timeout=30, capture_output=True, text=True).stdout  # fmt: skip
    agent_pid = int(out.split("SSH_AGENT_PID=", 1)[1].split(";", 1)[0])
    stack.callback(os.kill, agent_pid, signal.SIGTERM)
    agent_env = dict(os.environ, SSH_AUTH_SOCK=str(scratch / "agent.sock"))
    subprocess.run(["ssh-add", str(key)], env=agent_env, check=True, timeout=30, capture_output=True)
    logins: dict[str, Login] = {
        "key -i": ([], ["-i", str(key)]),
        # ferry reads SSH_AUTH_SOCK: env(1) sets it for this row only (one more exec, ~1 ms)
        "ssh-agent": (["env", f"SSH_AUTH_SOCK={scratch / 'agent.sock'}"], []),
        "token": ([], ["--token-file", str(token_file)]),
    }
    ssh_rows: list[tuple[str, list[str]]] = []
    if peer is not None:
        ssh_rows.append(("ssh true (same key)", ["ssh", *peer.opts, "-p", str(peer.port), "root@127.0.0.1", "true"]))
    return logins, ssh_rows


def run_once(argv: list[str], env: dict[str, str], timeout: float = 60.0) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run; raises if it fails (its time would mean nothing).

    CPU is user + system of the command alone (the ``RUSAGE_CHILDREN`` difference: it is the only
    child waited for in between); unlike wall time it leaves out the server's share (argon2, TLS),
    so it shows client-side changes with far less noise.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(
            f"{argv[3:] or argv}: exit {r.returncode}: {r.stderr.decode(errors='replace')[-400:]}"
        )
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_ms(argv: list[str], env: dict[str, str]) -> float:
    """Summed cumulative time (ms) of the top-level imports of one run under ``-X importtime``."""
    r = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    total = 0
    for line in r.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line.split("|")
        if len(fields) == 3 and fields[1].strip().isdigit() and not fields[2][1:].startswith(" "):
            total += int(fields[1])
    return total / 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--runs", type=int, default=20, help=f"runs of each command (default 20, at most {MAX_RUNS})"
    )
    p.add_argument(
        "--rev", default=None, help="also measure this git revision's src/ (exported), interleaved"
    )
    p.add_argument("--imports", action="store_true", help="also report -X importtime totals (5 runs each)")
    p.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs to work in (default /dev/shm)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--no-ssh", action="store_true", help="no ssh row (and no key/agent rows without ssh-keygen)")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= MAX_RUNS:
        p.error(f"--runs must be 1..{MAX_RUNS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch_dir(64 * MiB, prefix="ferry-startup-", base=args.tmpfs) as scratch:
        trees: list[tuple[str, Path]] = []
        if args.rev:
            rev = resolve_rev(args.rev)
            trees.append((source_version(rev=rev), export_source(rev, scratch / "rev")))
        trees.append((f"tree {source_version()}", PROJECT / "src"))
        for _, src in trees:
            compile_source(src)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "SSH_AUTH_SOCK"}
        # HOME without ~/.ssh: the password rows must not try someone's default key files first.
        base_env.update(FERRY_HOME=str(scratch / "home"), FERRY_PASSWORD=PASSWORD, HOME=str(scratch / "no-home"))
        envs = {name: dict(base_env, PYTHONPATH=str(src)) for name, src in trees}
        server_env = envs[trees[-1][0]]
        root = scratch / "root"
        ferry_add_user(root, USER, PASSWORD, env=server_env)
        (scratch / "small.bin").write_bytes(os.urandom(4 * KiB))
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(FerryServer(root, plain=False, env=server_env))
            logins: dict[str, Login] = {}
            ssh_row: list[tuple[str, list[str]]] = []
            if not args.rev:  # an older revision has no key or token login
                peer = None if args.no_ssh else stack.enter_context(ssh_peer(str(scratch / "sshd")))
                logins, ssh_row = login_methods(root, scratch, server_env, peer, stack)
            cmds = command_table(srv.port, scratch, logins) + ssh_row
            for name, env in envs.items():  # pin the certificate and create small.bin remotely
                for _, argv in cmds:
                    run_once(argv, env)
                log(f"{name}: warm-up done")
            samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
            busy: list[float] = []
            for i in range(args.runs):
                busy.append(background_busy(0.1))
                for label, argv in cmds:
                    # alternate which tree goes first so neither always runs right after the other
                    order = list(envs.items()) if i % 2 == 0 else list(reversed(envs.items()))
                    for name, env in order:
                        samples.setdefault((label, name), []).append(run_once(argv, env))
            imports: dict[tuple[str, str], float] = {}
            if args.imports:
                for label, argv in cmds[1:]:
                    for name, env in envs.items():
                        imports[(label, name)] = median(import_ms(argv, env) for _ in range(5))
        names = list(envs)
        headers = ["command"]
        for what in ("wall", "CPU"):
            headers += [f"{n} {what} ms" for n in names]
            if len(names) == 2:
                headers.append(f"saved {what} ms")
        if imports:
            headers += [f"{n} imports ms" for n in names]
        rows = []
        for label, _ in cmds:
            row = [label]
            for k in (0, 1):  # wall, CPU
                meds = [median(s[k] for s in samples[(label, n)]) * 1000 for n in names]
                row += [f"{m:.1f}" for m in meds]
                if len(names) == 2:
                    row.append(f"{meds[0] - meds[1]:.1f}")
            if imports:
                row += [f"{imports[(label, n)]:.1f}" if (label, n) in imports else "-" for n in names]
            rows.append(row)
        print(f"median of {args.runs} runs each; {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{platform.machine()}; background CPU median {median(busy) * 100:.0f} %, max {max(busy) * 100:.0f} %")  # fmt: skip
        print(table(headers, rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
