"""``ferry resident start|list|stop``: the resident connections of this user (docs/cli.md).

A resident process holds one logged-in connection and runs later commands for its destination
(:mod:`ferry.resident`). Commands start one on their own when the feature is on; these commands
start one explicitly (logging in here, with prompts), show them, and end them.
"""

from __future__ import annotations

import json
import os
import time

import click

from ferry.cli.common import login_options, open_client
from ferry.cli.files import Common, common_options, resident_spec, run, target_location
from ferry.errors import ConnectionBroken
from ferry.resident import runtime, spawn
from ferry.textsafe import safe_name


@click.group(short_help="Start, list or stop resident connections.")
def resident() -> None:
    """Resident connections: a background process per destination that stays logged in and runs
    later sync, get, put, ls, stat, mkdir, rm, mv and df commands for it (much faster starts).

    Commands leave one behind on their own (FERRY_RESIDENT=0, --no-resident or the config's
    [defaults] resident = false turn that off); it leaves after its idle time. See docs/cli.md.
    """


@resident.command("start")
@click.argument("target", metavar="[USER@]HOST")
@click.option(
    "--persist",
    type=click.IntRange(1, runtime.MAX_PERSIST),
    default=None,
    metavar="SECONDS",
    help=f"Idle seconds before it leaves (default: FERRY_RESIDENT, the config, else {runtime.DEFAULT_PERSIST}).",
)
@common_options
def start(target: str, persist: int | None, common: Common) -> None:
    """Log in to TARGET and leave a resident connection for it (no-op if one is there)."""
    loc = target_location(target, common.port)
    seconds = persist or spawn.persist_seconds() or runtime.DEFAULT_PERSIST
    out = common.output()

    async def main() -> spawn.Spec:
        login = login_options(
            password_file=common.password_file,
            token_file=common.token_file,
            identities=common.identities,
            verbose=common.verbose,
        )
        client = await open_client(loc, plain=common.plain, verbose=common.verbose, login=login)
        try:
            return resident_spec(loc, common, client, login, seconds)
        finally:
            await client.close()

    spec = run(main(), bulk=False)
    why = spawn.start(spec, wait=True)
    if why is not None:
        raise ConnectionBroken(f"no resident connection to {safe_name(loc.address)}: {safe_name(why)}")
    found = {info.get("pid") for path, info in spawn.residents() if path == runtime.socket_path(spec.key, os.environ)}
    pid = next(iter(found), None)
    out.result(
        f"resident connection to {spec.user}@{safe_name(loc.address)} ready (process {pid}; leaves after {seconds} s idle)",
        {"op": "resident-start", "user": spec.user, "host": spec.host, "port": spec.port, "pid": pid, "persist": seconds},
    )


@resident.command("list")
@click.option("--json", "json_mode", is_flag=True, help="One JSON object per resident connection.")
def list_(json_mode: bool) -> None:
    """Show this user's resident connections."""
    for _path, info in spawn.residents():
        if json_mode:
            click.echo(json.dumps(info))
            continue
        where = f"{info.get('user')}@{info.get('host')}:{info.get('port')}" + (" (plain)" if info.get("plain") else "")
        state = "busy" if info.get("busy") else f"idle {info.get('idle')} s of {info.get('persist')}"
        click.echo(
            f"{info.get('pid'):>8}  {safe_name(where)}  {state}, {info.get('commands')} commands, "
            f"up {time.time() - float(info.get('started') or 0):.0f} s, {safe_name(str(info.get('login')))}"  # type: ignore[arg-type]
        )


@resident.command("stop")
@click.argument("target", metavar="[USER@]HOST", required=False)
@click.option("-P", "--port", type=click.IntRange(1, 65535), default=None, help="The server's port.")
def stop(target: str | None, port: int | None) -> None:
    """End the resident connection to TARGET (all of them without TARGET); one running a command
    ends after it."""
    loc = target_location(target, port) if target else None
    stopped = 0
    for path, info in spawn.residents():
        if loc is not None and (info.get("host"), info.get("port")) != (loc.host, loc.port):
            continue
        if loc is not None and loc.user is not None and info.get("user") != loc.user:
            continue
        if spawn.ask(path, b"stop") is not None:
            stopped += 1
    click.echo(f"stopped {stopped} resident connection{'s' if stopped != 1 else ''}", err=True)
