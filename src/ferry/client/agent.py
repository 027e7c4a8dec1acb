"""A small ssh-agent client: list the agent's keys and have it sign (draft-miller-ssh-agent).

Why our own and not asyncssh's or paramiko's: a login needs exactly two requests of the agent
protocol (REQUEST_IDENTITIES, SIGN_REQUEST with the rsa-sha2-256/512 flags), about 100 lines,
while importing asyncssh costs more than the whole ``ferry exec HOST -- true`` budget allows
(measured in docs/cli.md). No cryptography is involved: the agent holds the keys and returns
SSH-format signatures that the server verifies. The framing is checked strictly (lengths,
message types, trailing bytes) and every reply is bounded. Tested against the real
``ssh-agent`` (tests/test_login_agent.py).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Final

from ferry.errors import FerryError
from ferry.wire.auth import key_fingerprint, read_ssh_string, ssh_string

__all__ = ["Agent", "AgentError", "AgentKey", "agent_socket"]

SSH_AGENT_FAILURE: Final = 5
SSH_AGENTC_REQUEST_IDENTITIES: Final = 11
SSH_AGENT_IDENTITIES_ANSWER: Final = 12
SSH_AGENTC_SIGN_REQUEST: Final = 13
SSH_AGENT_SIGN_RESPONSE: Final = 14
SSH_AGENT_RSA_SHA2_256: Final = 2
SSH_AGENT_RSA_SHA2_512: Final = 4

_MAX_REPLY: Final = 256 * 1024  # OpenSSH's own agent limit for a message
_MAX_KEYS: Final = 1024


class AgentError(FerryError):
    """The agent could not be reached, refused, or answered something malformed."""


@dataclass(frozen=True)
class AgentKey:
    """A key held by the agent: its public blob and comment."""

    blob: bytes
    comment: str

    @property
    def type(self) -> str:
        """The key type named in the blob (``ssh-ed25519``, ``ssh-rsa``, ...)."""
        try:
            return read_ssh_string(self.blob, 0)[0].decode("ascii", "replace")
        except ValueError:
            return "?"

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-add -l`` prints it."""
        return key_fingerprint(self.blob)

    def algorithm(self) -> str:
        """The signature algorithm to ask the agent for (never SHA-1 ``ssh-rsa``)."""
        return "rsa-sha2-512" if self.type == "ssh-rsa" else self.type


def agent_socket(env: dict[str, str] | None = None) -> str | None:
    """The agent's socket from ``$SSH_AUTH_SOCK``, or None when no agent is running."""
    path = (os.environ if env is None else env).get("SSH_AUTH_SOCK", "")
    return path or None


class Agent:
    """One connection to an ssh-agent (``async with Agent(path) as agent``), one request at a time."""

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        #: seconds for one answer; signing may wait for the user to confirm (ssh-add -c)
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Agent:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        except OSError as exc:
            raise AgentError(f"cannot reach ssh-agent at {self.path}: {exc.strerror or exc}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass

    async def _request(self, kind: int, body: bytes) -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None, "use 'async with Agent(...)'"
        message = bytes([kind]) + body
        try:
            self._writer.write(len(message).to_bytes(4, "big") + message)
            async with asyncio.timeout(self.timeout):
                await self._writer.drain()
                size = int.from_bytes(await self._reader.readexactly(4), "big")
                if not 1 <= size <= _MAX_REPLY:
                    raise AgentError(f"ssh-agent sent a message of {size} bytes")
                reply = await self._reader.readexactly(size)
        except TimeoutError as exc:
            raise AgentError(f"ssh-agent did not answer within {self.timeout:g} s") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise AgentError(f"lost the connection to ssh-agent: {exc}") from exc
        return reply[0], reply[1:]

    async def keys(self) -> list[AgentKey]:
        """The keys the agent holds, in its order."""
        kind, body = await self._request(SSH_AGENTC_REQUEST_IDENTITIES, b"")
        if kind != SSH_AGENT_IDENTITIES_ANSWER:
            raise AgentError(f"ssh-agent refused to list its keys (answer {kind})")
        try:
            if len(body) < 4:
                raise ValueError("truncated")
            count = int.from_bytes(body[:4], "big")
            if count > _MAX_KEYS:
                raise ValueError(f"{count} keys")
            pos, keys = 4, []
            for _ in range(count):
                blob, pos = read_ssh_string(body, pos)
                comment, pos = read_ssh_string(body, pos)
                keys.append(AgentKey(blob, comment.decode("utf-8", "replace")))
            if pos != len(body):
                raise ValueError("trailing bytes")
        except ValueError as exc:
            raise AgentError(f"malformed key list from ssh-agent: {exc}") from exc
        return keys

    async def sign(self, key: AgentKey, data: bytes) -> bytes:
        """The agent's SSH-format signature of ``data`` with ``key`` (RSA: rsa-sha2-512)."""
        flags = SSH_AGENT_RSA_SHA2_512 if key.type == "ssh-rsa" else 0
        kind, body = await self._request(
            SSH_AGENTC_SIGN_REQUEST, ssh_string(key.blob) + ssh_string(data) + flags.to_bytes(4, "big")
        )
        if kind != SSH_AGENT_SIGN_RESPONSE:
            raise AgentError(f"ssh-agent refused to sign with {key.fingerprint} (answer {kind})")
        try:
            signature, pos = read_ssh_string(body, 0)
            if pos != len(body):
                raise ValueError("trailing bytes")
            algorithm = read_ssh_string(signature, 0)[0].decode("ascii", "replace")
        except ValueError as exc:
            raise AgentError(f"malformed signature from ssh-agent: {exc}") from exc
        if algorithm != key.algorithm():
            raise AgentError(f"ssh-agent signed with {algorithm}, not {key.algorithm()} as asked")
        return signature
