"""``ferry known-hosts``: the server certificates this client has pinned (``list``, ``forget``).

``forget`` is ``ssh-keygen -R`` for ferry: after a server's certificate was replaced on purpose,
forget the old pin and the next connection pins the new one (and says so).
"""

from __future__ import annotations

import json

import click


@click.group("known-hosts")
def known_hosts() -> None:
    """The server certificates this client pinned ($FERRY_HOME/known_hosts)."""


@known_hosts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of {host, port, fingerprint}.")
def list_cmd(as_json: bool) -> None:
    """List the pinned servers: HOST:PORT and the certificate's SHA256 fingerprint."""
    from ferry.client.known_hosts import KnownHosts

    store = KnownHosts()
    pins = store.pins()
    if as_json:
        rows = [{"host": host, "port": port, "fingerprint": fp} for host, port, fp in pins]
        click.echo(json.dumps(rows, indent=2))
        return
    if not pins:
        click.echo(f"no pinned servers in {store.path}", err=True)
        return
    for host, port, fp in pins:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        click.echo(f"{shown}  {fp}")


@known_hosts.command("forget")
@click.argument("target", metavar="HOST[:PORT]")
def forget_cmd(target: str) -> None:
    """Forget the pinned certificate of HOST[:PORT] (default port 7373; a config alias works too)."""
    from ferry.client.known_hosts import KnownHosts
    from ferry.client.location import parse_target

    loc = parse_target(target[:-1] if target.endswith(":") else target)
    store = KnownHosts()
    if store.forget(loc.host, loc.port):
        click.echo(f"forgot the pinned certificate of {loc.address} ({store.path})")
    else:
        click.echo(f"no pinned certificate for {loc.address} in {store.path}", err=True)
