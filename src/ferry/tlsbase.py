"""What both ends of ferry's TLS agree on: the cipher suites, and how a certificate is named.

The server (:mod:`ferry.server.tls`: its certificate and context) and the client
(:mod:`ferry.client.tls`: its context and the pin check) both stand on this module; neither
imports the other.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

__all__ = ["TLS12_CIPHERS", "fingerprint"]

#: TLS 1.2 cipher suites, AES-GCM first (hardware-accelerated almost everywhere, so it is the
#: fastest for bulk transfers), ChaCha20 for CPUs without AES instructions; forward secrecy only.
#: TLS 1.3 suites are not configurable from Python and OpenSSL's defaults are already these.
TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def fingerprint(cert_der: bytes) -> str:
    """``"SHA256:" + base64(sha256(DER))`` without padding: the same format as OpenSSH uses. The
    server prints it at start, the client pins it (known_hosts), key logins sign it."""
    digest = hashlib.sha256(cert_der).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")
