"""ferry's ssh-agent client against the real ssh-agent, and key login through it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.client.agent import Agent, AgentError
from ferry.server.accounts import Accounts
from ferry.server.credentials import Credentials
from ferry.sshkeys import parse_public_line, verify
from ferry_server import CHEAP_HASHER, PASSWORD, ServerThread
from login_support import KeySet, ssh_add, ssh_agent
from transfer_support import connect_with


@pytest.fixture
def agent(tmp_path: Path, keys: KeySet) -> Iterator[str]:
    with ssh_agent(tmp_path) as (sock, env):
        ssh_add(env, keys.ed25519, keys.ecdsa, keys.rsa)
        yield sock


def test_list_and_sign_with_the_real_agent(agent: str, keys: KeySet) -> None:
    async def main() -> None:
        async with Agent(agent) as a:
            listed = await a.keys()
            assert [k.fingerprint for k in listed] == [keys.ed25519.fingerprint, keys.ecdsa.fingerprint, keys.rsa.fingerprint]
            assert [k.type for k in listed] == ["ssh-ed25519", "ecdsa-sha2-nistp384", "ssh-rsa"]
            for k, key in zip(listed, (keys.ed25519, keys.ecdsa, keys.rsa), strict=True):
                signature = await a.sign(k, b"data to sign")
                public = parse_public_line(key.pub)
                assert verify(public, b"data to sign", signature)
                assert not verify(public, b"other data", signature)
            # RSA: the agent was asked for rsa-sha2-512, never SHA-1 ssh-rsa.
            assert (await a.sign(listed[2], b"x"))[4:16] == b"rsa-sha2-512"

    asyncio.run(main())


def test_agent_errors_are_clear(tmp_path: Path, keys: KeySet) -> None:
    async def main() -> None:
        with pytest.raises(AgentError, match="cannot reach ssh-agent"):
            async with Agent(str(tmp_path / "no-such-socket")):
                pass
        with ssh_agent(tmp_path) as (sock, _env):
            async with Agent(sock) as a:
                assert await a.keys() == []
                from ferry.client.agent import AgentKey

                stranger = AgentKey(parse_public_line(keys.stranger.pub).blob, "")
                with pytest.raises(AgentError, match="refused to sign"):
                    await a.sign(stranger, b"x")  # a key the agent does not hold

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_login_through_the_agent(server: ServerThread, tmp_path: Path, keys: KeySet, agent: str, kind: str) -> None:
    key = getattr(keys, kind)
    with Accounts(server.root, hasher=CHEAP_HASHER) as acc:
        Credentials(acc).add_keys("alice", key.pub)  # only this one of the agent's three keys

    async def main() -> None:
        c = await connect_with(server, tmp_path, agent=agent)
        assert c.info is not None and c.info.login_detail == f"key {key.fingerprint} (ssh-agent)"
        await c.close()

    asyncio.run(main())


def test_agent_without_a_matching_key_falls_back_to_the_password(server: ServerThread, tmp_path: Path, agent: str) -> None:
    async def main() -> None:
        c = await connect_with(server, tmp_path, agent=agent, password=PASSWORD)
        assert c.info is not None and c.info.login_method == "password"
        await c.close()

    asyncio.run(main())
