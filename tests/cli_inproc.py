"""Run the ``ferry`` command line in this process (click's runner): no interpreter start per call.

:func:`run_cli` goes through :func:`ferry.cli.main` with an argv, so FerryErrors become the same
one-line messages and exit statuses as in the real program (``main`` raises SystemExit instead of
ending the process). Use a subprocess where the process itself matters (signals, closed pipes,
terminals, descriptors).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from ferry.cli import main


@dataclass(frozen=True)
class CliResult:
    """What one in-process command did."""

    code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes


def run_cli(
    args: list[str], *, env: Mapping[str, str | None] | None = None, input: str | bytes | None = None
) -> CliResult:
    """Run ``ferry ARGS`` with ``env`` overriding the environment and ``input`` as standard input."""
    runner = CliRunner()
    code: int = 0
    with runner.isolation(input=input, env=env) as (out, err, _mixed):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    raw = out.getvalue()
    return CliResult(code, raw.decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace"), raw)


def run_inproc(
    args: list[str],
    env: Mapping[str, str],
    *,
    input: str | bytes | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """:func:`serve_process.run_ferry` in this process: ``env`` is the *whole* environment (as for a
    subprocess: variables it lacks are unset for the call), the result a ``CompletedProcess``.
    ``timeout`` is accepted for the same signature; here pytest-timeout bounds the call."""
    full: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    full.update(env)
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        r = run_cli(args, env=full, input=input)
    return subprocess.CompletedProcess(["ferry", *args], r.code, r.stdout, r.stderr)
