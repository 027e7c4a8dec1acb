"""The server's TLS identity: a self-signed certificate made on first start, and the SSL context.

There is no CA: clients pin the certificate's fingerprint on first contact, like SSH host keys
(see :mod:`ferry.client.known_hosts`). So the certificate must stay stable: it is created once
under ``<root>/tls/`` with 10 years of validity and reused on every start.

The key is EC P-256: every OpenSSL that Python's ``ssl`` links against accepts it for TLS 1.2 and
1.3, signatures are fast, and files are small (Ed25519 certificates are still refused by some
TLS 1.2 stacks).

``cryptography`` (and tempfile, shutil) are imported only when a certificate has to be generated.
The cipher suites and the fingerprint format are shared with the client: :mod:`ferry.tlsbase`.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ferry import paths
from ferry.errors import FerryError
from ferry.errtext import os_reason
from ferry.fskit import write_new
from ferry.tlsbase import TLS12_CIPHERS, fingerprint

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "DEFAULT_HOSTNAMES",
    "ensure_certificate",
    "fingerprint_file",
    "generate_certificate",
    "server_ssl_context",
]

#: Names the certificate is always valid for (plus ``socket.gethostname()``). Clients do not check
#: names (they pin), but tools like ``openssl s_client`` or a browser show them.
DEFAULT_HOSTNAMES: Final = ("localhost", "127.0.0.1", "::1")

#: Validity of a generated certificate: long, because a new certificate means a new fingerprint
#: and every client would see a (loud) pin mismatch.
VALIDITY_DAYS: Final = 3650

def fingerprint_file(cert: Path) -> str:
    """The fingerprint of a PEM certificate file (what ``ferry serve`` prints at start-up)."""
    try:
        pem = cert.read_text("ascii")
        return fingerprint(ssl.PEM_cert_to_DER_cert(pem))
    except OSError as exc:
        raise FerryError(f"cannot read the TLS certificate {cert}: {os_reason(exc)}") from exc
    except ValueError as exc:
        raise FerryError(f"cannot read the TLS certificate {cert}: {exc}") from exc


def _subject_alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    from cryptography import x509

    sans: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in names:
        name = raw.strip().lower().rstrip(".")
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        try:
            # A host name with non-ASCII characters must be stored as its IDNA "xn--" form.
            sans.append(x509.DNSName(name.encode("idna").decode("ascii")))
        except (UnicodeError, ValueError):
            continue  # an odd gethostname() must not stop the server from starting
    return sans


def generate_certificate(hostnames: Iterable[str] = DEFAULT_HOSTNAMES) -> tuple[bytes, bytes]:
    """A new self-signed EC P-256 certificate for ``hostnames``; returns ``(cert_pem, key_pem)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = list(hostnames)
    key = ec.generate_private_key(ec.SECP256R1())
    # CN is limited to 64 characters; it is only informative.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ferry {socket.gethostname()}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    sans = _subject_alt_names(names)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated a day so a client whose clock is a little behind does not see "not yet valid".
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # the server must start unattended; the file is 0600 instead
    )
    return cert_pem, key_pem


def ensure_certificate(root: Path, hostnames: Iterable[str] = DEFAULT_HOSTNAMES) -> tuple[Path, Path]:
    """Return ``(cert, key)`` under ``<root>/tls/``, generating them on first start.

    Existing files are reused as they are (a new certificate would break every client's pin).
    The pair is written to a staging folder and renamed into place, so a crash or a second
    server starting at the same moment can never leave a certificate that does not match its key.
    """
    root = Path(root)
    cert, key = paths.cert_file(root), paths.key_file(root)
    if cert.is_file() and key.is_file():
        try:
            os.chmod(key, paths.PRIVATE_FILE_MODE)  # in case someone copied it in with a loose mode
        except PermissionError:
            pass
        return cert, key
    hosts = [*hostnames, socket.gethostname()]
    # Not at the top: the client imports this module, and these pull in bz2, lzma, random (~6 ms).
    import shutil
    import tempfile

    try:
        paths.ensure_private_dir(root)
        cert_pem, key_pem = generate_certificate(hosts)
        staging = Path(tempfile.mkdtemp(prefix=".tls-", dir=root))  # mode 0700
        moved = False
        try:
            new_key, new_cert = staging / key.name, staging / cert.name
            write_new(new_key, key_pem, mode=paths.PRIVATE_FILE_MODE, fsync=True)  # no empty key after a crash
            write_new(new_cert, cert_pem, mode=0o644, fsync=True)  # public anyway
            try:
                # Atomic "both or nothing": fails if tls/ exists and is not empty.
                os.rename(staging, paths.tls_dir(root))
                moved = True
            except OSError:
                if cert.is_file() and key.is_file():
                    return cert, key  # another server won the race; use its pair
                # tls/ exists but lacks a file (an admin deleted one to force a new certificate).
                os.replace(new_key, key)
                os.replace(new_cert, cert)
        finally:
            if not moved:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise FerryError(f"cannot create the TLS certificate under {paths.tls_dir(root)}: {os_reason(exc)}") from exc
    return cert, key


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 minimum (1.3 preferred), forward-secret AEAD ciphers only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    # Our order (AES-GCM first) rather than the client's; compression is a known attack surface.
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    try:
        # An empty passphrase rather than OpenSSL's default of asking on the terminal: a server starts
        # unattended, and an encrypted key given with --key must fail with a message, not wait.
        ctx.load_cert_chain(certfile=cert, keyfile=key, password=lambda: b"")
    except (OSError, ssl.SSLError) as exc:
        hint = ""
        with contextlib.suppress(OSError):
            if b"ENCRYPTED" in key.read_bytes()[:4096]:
                hint = " (the key is encrypted: ferry serve needs it unencrypted, readable only by the server)"
        raise FerryError(f"cannot load the TLS certificate {cert} / key {key}: {os_reason(exc)}{hint}") from exc
    return ctx
