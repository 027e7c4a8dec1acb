"""What a key login signs, and the SSH wire encoding it uses (I/O-free, no cryptography).

A key login is a challenge-response: the server's :class:`~ferry.wire.messages.Welcome` carries a
fresh random nonce, and the client signs :func:`key_transcript`, which binds the signature to

* this server and this connection: the server nonce (fresh per connection) and the client nonce;
* the account: the user name;
* the protocol: a fixed purpose string and the negotiated protocol version;
* the TLS channel: the fingerprint of the server certificate the client *pinned*. Python's ``ssl``
  cannot export TLS keying material (RFC 5705 / 9266 channel bindings), so the certificate is the
  strongest binding available: a man in the middle must present its own certificate (it does not
  have the server's key), so the signature it relays carries the wrong fingerprint and the real
  server refuses it. On a ``--plain`` connection the fingerprint is empty: nothing binds the
  signature to the channel there (see docs/security.md);
* the key and the signature algorithm, as SSH does, so a signature cannot be presented for
  another key or reinterpreted under another algorithm.

Every field is an SSH ``string`` (a 4-byte big-endian length, then the bytes), the encoding
ssh-agent signs and OpenSSH keys use, so field boundaries are unambiguous.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

__all__ = [
    "KEY_LOGIN_PURPOSE",
    "NONCE_SIZE",
    "key_fingerprint",
    "key_transcript",
    "read_ssh_string",
    "ssh_string",
]

#: First field of every transcript: a signature made for ferry cannot be one for anything else
#: (an SSH session, a git commit signature) and vice versa.
KEY_LOGIN_PURPOSE: Final = b"ferry key login"

#: Bytes of the server's and the client's nonce.
NONCE_SIZE: Final = 32


def ssh_string(data: bytes | str) -> bytes:
    """``data`` as an SSH ``string``: uint32 big-endian length, then the bytes (UTF-8 for str)."""
    raw = data.encode() if isinstance(data, str) else data
    return len(raw).to_bytes(4, "big") + raw


def read_ssh_string(buf: bytes | memoryview, pos: int) -> tuple[bytes, int]:
    """The SSH ``string`` at ``pos`` of ``buf`` and the position after it; ValueError if truncated."""
    if pos + 4 > len(buf):
        raise ValueError("truncated SSH string length")
    n = int.from_bytes(buf[pos : pos + 4], "big")
    end = pos + 4 + n
    if end > len(buf):
        raise ValueError("truncated SSH string")
    return bytes(buf[pos + 4 : end]), end


def key_fingerprint(blob: bytes) -> str:
    """``SHA256:<base64, no padding>`` of a public key blob: the form ``ssh-keygen -l`` prints."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def key_transcript(
    *,
    version: int,
    server_nonce: bytes,
    client_nonce: bytes,
    user: str,
    server_fingerprint: str,
    public_key: bytes,
    algorithm: str,
) -> bytes:
    """The bytes a client signs to log in with a key (see the module docstring for each field).

    ``server_fingerprint`` is the ``SHA256:...`` fingerprint of the certificate the client pinned,
    or ``""`` on a ``--plain`` connection.
    """
    return b"".join(
        (
            ssh_string(KEY_LOGIN_PURPOSE),
            version.to_bytes(4, "big"),
            ssh_string(server_nonce),
            ssh_string(client_nonce),
            ssh_string(user),
            ssh_string(server_fingerprint),
            ssh_string(public_key),
            ssh_string(algorithm),
        )
    )
