"""The client side of TLS: encrypt, but trust by pinned fingerprint instead of by CA.

``ferry serve`` uses a self-signed certificate, so CA verification would always fail. Instead the
client records the server's certificate fingerprint on first contact and insists on it afterwards
(trust on first use, exactly like SSH's known_hosts; see :mod:`ferry.client.known_hosts`).
"""

from __future__ import annotations

import ssl
from typing import Literal

from ferry.client.known_hosts import KnownHosts
from ferry.errors import ConnectionBroken
from ferry.tlsbase import TLS12_CIPHERS, fingerprint

__all__ = ["check_peer", "client_ssl_context", "peer_fingerprint"]


def client_ssl_context() -> ssl.SSLContext:
    """A client context with no CA or host-name check (we pin), TLS 1.2 minimum, AEAD ciphers only.

    Callers must check the peer with :func:`check_peer` (or :func:`peer_fingerprint` plus
    :class:`KnownHosts`) right after the handshake and before sending anything secret.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Order matters: CERT_NONE is refused while check_hostname is on.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    return ctx


def peer_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The ``SHA256:...`` fingerprint of the certificate the server presented in the handshake.

    Works with CERT_NONE: ``getpeercert(binary_form=True)`` still returns the DER bytes.
    For asyncio, pass ``transport.get_extra_info("ssl_object")``.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise ConnectionBroken("the server presented no TLS certificate")
    return fingerprint(der)


def check_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    host: str,
    port: int,
    known_hosts: KnownHosts | None = None,
) -> tuple[Literal["known", "new"], str]:
    """Check the server's certificate against known_hosts; returns ``(status, fingerprint)``.

    ``"new"`` means the fingerprint was just pinned: the caller should tell the user (print the
    fingerprint so it can be compared with the one ``ferry serve`` printed). A changed
    certificate raises :class:`ferry.errors.HostKeyMismatch`.
    """
    fp = peer_fingerprint(ssl_object)
    store = known_hosts if known_hosts is not None else KnownHosts()
    return store.check(host, port, fp), fp
