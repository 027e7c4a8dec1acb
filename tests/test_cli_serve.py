"""``ferry serve`` as a real process: the banner, first start vs restart, signals, certificate pinning."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cli_inproc import run_inproc
from ferry.cli.serve import banner_lines
from ferry.server.app import Banner
from serve_process import ServeProcess, run_ferry


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["FERRY_HOME"] = str(tmp_path / "client-home")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("FERRY_ROOT", None)
    env.update(extra)
    return env


@pytest.mark.timeout(60)
def test_first_start_prints_everything_once_and_signals_stop_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "data"
    env = env_for(tmp_path, FERRY_ROOT=str(root))  # no --root: the default root comes from FERRY_ROOT
    first = ServeProcess(root, env, root_option=False).start()
    try:
        text = "\n".join(first.lines)
        assert first.port > 0 and first.password and first.user == "ferry"
        assert first.fingerprint and first.fingerprint.startswith("SHA256:")
        assert f"data root:       {root}" in text
        assert f"log file:        {root / 'logs' / 'ferry.log'}" in text
        assert f"ferry ls -P {first.port} ferry@127.0.0.1:" in text and "FERRY_PASSWORD" in text
        assert (root / "tls" / "cert.pem").is_file() and (root / "users.db").is_file()
        p = run_inproc(["ls", *first.scp()], dict(env, FERRY_PASSWORD=first.password))
        assert p.returncode == 0, p.stderr
    finally:
        assert first.stop(signal.SIGTERM) == 0

    # Restart: same certificate, no new user, no password printed.
    again = ServeProcess(root, env).start()
    try:
        assert again.password is None and not any("password:" in line for line in again.lines)
        assert again.fingerprint == first.fingerprint
        p = run_inproc(["ls", *again.scp()], dict(env, FERRY_PASSWORD=first.password or ""))
        assert p.returncode == 0, p.stderr
        # a second server cannot take the same port: a clear usage error, not a traceback
        clash = run_inproc(["serve", "--root", str(tmp_path / "other"), "--port", str(again.port)], env)
        assert clash.returncode == 2 and "cannot listen" in clash.stderr
    finally:
        assert again.stop(signal.SIGINT) == 0


@pytest.mark.timeout(60)
def test_plain_banner_warns(tmp_path: Path) -> None:
    srv = ServeProcess(tmp_path / "root", env_for(tmp_path), plain=True).start()
    try:
        text = "\n".join(srv.lines)
        assert "TLS: OFF" in text and srv.fingerprint is None
        assert f"ferry ls -P {srv.port} --plain ferry@127.0.0.1:" in text
    finally:
        assert srv.stop() == 0


@pytest.mark.timeout(60)
def test_pin_notice_then_loud_refusal_when_the_certificate_changes(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    one = ServeProcess(tmp_path / "root1", env).start()
    try:
        cenv = dict(env, FERRY_PASSWORD=one.password or "")
        p = run_inproc(["ls", *one.scp()], cenv)
        assert p.returncode == 0, p.stderr
        assert "first connection" in p.stderr and str(one.fingerprint) in p.stderr
        p = run_inproc(["ls", *one.scp()], cenv)
        assert p.returncode == 0 and p.stderr == ""  # pinned: silent from now on
    finally:
        assert one.stop() == 0

    # Another server (another root: another certificate) on the same host:port.
    two = ServeProcess(tmp_path / "root2", env, port=one.port).start()
    try:
        assert two.fingerprint != one.fingerprint
        p = run_inproc(["ls", *two.scp()], dict(env, FERRY_PASSWORD=two.password or ""))
        # 6 (connection), not 3: the client stopped before sending any password
        assert p.returncode == 6, p.stderr
        assert f"WARNING: the certificate of 127.0.0.1:{one.port} changed!" in p.stderr
        assert str(one.fingerprint) in p.stderr and str(two.fingerprint) in p.stderr
        assert "known_hosts" in p.stderr
    finally:
        assert two.stop() == 0


def test_banner_for_the_default_port_and_a_wildcard_host() -> None:
    banner = Banner("0.0.0.0:7373", Path("/srv/ferry"), True, "SHA256:abc", ("ferry", "pw123"))
    text = "\n".join(banner_lines(banner, "0.0.0.0", plain=False))
    assert text.startswith("ferry serve: listening on 0.0.0.0:7373\n")
    assert "ferry ls ferry@127.0.0.1:" in text and "-P" not in text
    assert "created the first user 'ferry' with password: pw123" in text
    v6 = "\n".join(banner_lines(Banner("[::1]:7000", Path("/r"), True, "SHA256:x", None), "::1", plain=False))
    assert "ferry ls -P 7000 USER@[::1]:" in v6 and "password:" not in v6


def test_banner_repeats_the_root_and_says_how_to_put_ferry_on_path(tmp_path: Path) -> None:
    import sys

    root = Path("/srv/ferry data")
    banner = Banner("127.0.0.1:7000", root, True, "SHA256:x", ("ferry", "pw123"))
    bindir = Path(sys.executable).parent  # where this environment's `ferry` script is
    assert (bindir / "ferry").is_file()
    lines = banner_lines(banner, "127.0.0.1", plain=False, root_option=root, env_path=str(tmp_path))
    text = "\n".join(lines)
    assert "ferry user passwd ferry --root '/srv/ferry data'" in text
    assert "ferry user add NAME --root '/srv/ferry data'" in text
    assert f"'ferry' is not on your PATH: export PATH={bindir}:\"$PATH\"" in text
    assert lines[-1].strip().startswith("stop with")  # still the last line (readers wait for it)
    # a restart (no first user) still tells the root to give `ferry user`
    again = banner_lines(Banner("127.0.0.1:7000", root, True, "SHA256:x", None), "127.0.0.1", False,
                         root_option=root, env_path=str(tmp_path))  # fmt: skip
    assert "ferry user list --root '/srv/ferry data'" in "\n".join(again)
    # no --root given: no --root in the hints; ferry on PATH: no PATH hint
    plain = "\n".join(banner_lines(banner, "127.0.0.1", plain=False, env_path=str(bindir)))
    assert "--root" not in plain and "PATH" not in plain.replace("FERRY_PASSWORD", "")


def test_keep_partials_must_not_be_negative(tmp_path: Path) -> None:
    r = run_inproc(["serve", "--root", str(tmp_path / "root"), "--keep-partials", "-1"], env_for(tmp_path))
    assert r.returncode == 2
    assert "--keep-partials" in r.stderr
    assert not (tmp_path / "root").exists()  # refused before anything was created


def test_serve_limit_options_default_to_the_server_limits() -> None:
    from ferry.cli.serve import SIZE, serve
    from ferry.server.context import Limits

    defaults = {p.name: p.default for p in serve.params}
    lim = Limits()
    for name in (
        "max_sessions",
        "max_sessions_per_user",
        "max_pending_logins",
        "max_pending_logins_per_address",
        "login_timeout",
        "sweep_interval",
        "max_partials",
    ):
        assert defaults[name] == getattr(lim, name), name
    assert defaults["keep_partials"] * 86400 == lim.partial_max_age
    assert SIZE.convert(defaults["max_partial_bytes"], None, None) == lim.max_partial_bytes


@pytest.mark.timeout(60)
def test_max_sessions_per_user_reaches_the_server(tmp_path: Path) -> None:
    import asyncio

    from ferry.client.aclient import AsyncClient
    from ferry.client.known_hosts import KnownHosts

    env = env_for(tmp_path)
    args = ["--max-sessions-per-user", "1", "--login-threads", "3", "--max-pending-logins-per-address", "7"]
    srv = ServeProcess(tmp_path / "root", env, args=args).start()
    try:
        assert srv.password is not None
        log = (tmp_path / "root" / "logs" / "ferry.log").read_text(encoding="utf-8")
        assert "limits: sessions=1000 per-user=1 pending-logins=1024 per-address=7 login-threads=3" in log

        async def main() -> None:
            held = await AsyncClient.connect(
                "127.0.0.1",
                srv.port,
                user="ferry",
                password=srv.password or "",
                known_hosts=KnownHosts(tmp_path / "client-home" / "known_hosts"),
            )
            try:
                p = await asyncio.to_thread(run_ferry, ["ls", *srv.scp()], dict(env, FERRY_PASSWORD=srv.password or ""))
                assert p.returncode == 6, (p.returncode, p.stderr)
                assert "'ferry' already has 1 sessions open (at most 1)" in p.stderr
            finally:
                await held.close()
            for _ in range(20):  # the server ends the closed session within moments
                p = await asyncio.to_thread(run_ferry, ["ls", *srv.scp()], dict(env, FERRY_PASSWORD=srv.password or ""))
                if p.returncode == 0:
                    break
                await asyncio.sleep(0.25)
            assert p.returncode == 0, p.stderr

        asyncio.run(main())
    finally:
        assert srv.stop(signal.SIGTERM) == 0
