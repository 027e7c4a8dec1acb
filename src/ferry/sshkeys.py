"""OpenSSH keys: parse public keys, verify and make signatures in SSH's formats.

Parsing and the arithmetic are ``cryptography``'s (``load_ssh_public_key``, ``load_ssh_private_key``);
this module only chooses what is accepted and speaks SSH's signature encoding (RFC 4253 6.6,
RFC 5656 3.1.2, RFC 8332, RFC 8709), the same format ssh-agent returns, so the server verifies
signatures from key files and from an agent alike.

Accepted: ``ssh-ed25519``, ``ecdsa-sha2-nistp256/384/521`` and ``ssh-rsa`` keys of at least
:data:`MIN_RSA_BITS` bits; RSA signatures only as ``rsa-sha2-256`` or ``rsa-sha2-512`` (never
SHA-1 ``ssh-rsa`` signatures). It imports ``cryptography`` at once, so the client imports this
module only when it reads a key file (an agent login does not need it).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from ferry.errors import UsageError
from ferry.wire.auth import key_fingerprint, read_ssh_string, ssh_string

__all__ = [
    "KEY_TYPES",
    "MIN_RSA_BITS",
    "KeyError_",
    "PrivateKey",
    "PublicKey",
    "load_private_key",
    "parse_public_blob",
    "parse_public_line",
    "verify",
]

#: Key types ferry accepts, as OpenSSH names them.
KEY_TYPES: Final = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
#: RSA keys below this size are refused (NIST and OpenSSH 9's own minimum for new keys).
MIN_RSA_BITS: Final = 2048

_ECDSA_HASH: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "ecdsa-sha2-nistp256": hashes.SHA256,
    "ecdsa-sha2-nistp384": hashes.SHA384,
    "ecdsa-sha2-nistp521": hashes.SHA512,
}
_RSA_HASH: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "rsa-sha2-256": hashes.SHA256,
    "rsa-sha2-512": hashes.SHA512,
}
_MAX_BLOB: Final = 16384  # a 16384-bit RSA key is ~2 KiB; anything far larger is not a key


class KeyError_(UsageError):
    """A key (line, blob or file) that ferry cannot use; the message says why and what to do."""


def _known_type(key_type: str) -> str:
    if key_type not in KEY_TYPES:
        shown = key_type if key_type.isprintable() and len(key_type) < 64 else "?"
        raise KeyError_(
            f"unsupported key type {shown!r}: use ssh-ed25519 (recommended), ecdsa-sha2-nistp256/384/521 "
            f"or ssh-rsa of at least {MIN_RSA_BITS} bits"
        )
    return key_type


@dataclass(frozen=True)
class PublicKey:
    """A public key: its type, the SSH wire blob, and the comment of the line it came from."""

    type: str
    blob: bytes
    comment: str = ""

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
        return key_fingerprint(self.blob)

    @property
    def line(self) -> str:
        """The ``authorized_keys`` / ``.pub`` line of this key."""
        text = f"{self.type} {base64.b64encode(self.blob).decode('ascii')}"
        return f"{text} {self.comment}" if self.comment else text

    def bits(self) -> int:
        """The key size in bits (256 for Ed25519)."""
        key = _load_public(self.type, self.blob)
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            return key.key_size
        return 256

    def signature_algorithms(self) -> tuple[str, ...]:
        """The signature algorithms accepted for this key, preferred first."""
        if self.type == "ssh-rsa":
            return ("rsa-sha2-512", "rsa-sha2-256")
        return (self.type,)


def _load_public(key_type: str, blob: bytes) -> object:
    try:
        return load_ssh_public_key(key_type.encode() + b" " + base64.b64encode(blob))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyError_(f"malformed {key_type} public key: {exc}") from None


def parse_public_blob(blob: bytes, comment: str = "") -> PublicKey:
    """A :class:`PublicKey` from its SSH wire blob; checks the type and (for RSA) the size."""
    if len(blob) > _MAX_BLOB:
        raise KeyError_("public key too large")
    try:
        name, _ = read_ssh_string(blob, 0)
    except ValueError:
        raise KeyError_("malformed public key") from None
    key_type = _known_type(name.decode("ascii", "replace"))
    key = _load_public(key_type, blob)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise KeyError_(
            f"RSA key of {key.key_size} bits refused: use at least {MIN_RSA_BITS} bits "
            "(or better an Ed25519 key: ssh-keygen -t ed25519)"
        )
    return PublicKey(key_type, blob, comment)


def parse_public_line(line: str) -> PublicKey:
    """A :class:`PublicKey` from an OpenSSH public key line (``TYPE BASE64 [COMMENT]``).

    Lines of ``authorized_keys`` that start with options (``from="..."``, ``command="..."``,
    ``no-pty``, ...) are refused: ferry cannot apply them, and ignoring a restriction would grant
    more than the line says.
    """
    fields = line.strip().split(None, 2)
    if not fields:
        raise KeyError_("empty key line")
    if fields[0] not in KEY_TYPES:
        if (len(fields) >= 2 and fields[1] in KEY_TYPES) or "=" in fields[0] or "," in fields[0]:
            raise KeyError_(
                "the line starts with authorized_keys options, which ferry cannot apply: remove them "
                "(limit what a login may do with read-only tokens or 'ferry user mod --no-exec')"
            )
        _known_type(fields[0])
    if len(fields) < 2:
        raise KeyError_(f"{fields[0]} key line without the key (expected TYPE BASE64 [COMMENT])")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_("the key is not valid base64") from None
    key = parse_public_blob(blob, fields[2].strip() if len(fields) > 2 else "")
    if key.type != fields[0]:
        raise KeyError_(f"the line says {fields[0]} but the key is {key.type}")
    return key


def _mpint(n: int) -> bytes:
    """An SSH ``mpint``: two's complement big-endian, a leading zero byte when the top bit is set."""
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big") if n else b""
    return ssh_string(raw)


def verify(key: PublicKey, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (SSH format: string algorithm, string signature) signs ``data`` by ``key``.

    RSA keys accept ``rsa-sha2-256`` and ``rsa-sha2-512`` only; any other mismatch of key type
    and algorithm is a failed verification, not an exception.
    """
    try:
        algo_b, pos = read_ssh_string(signature, 0)
        sig, end = read_ssh_string(signature, pos)
    except ValueError:
        return False
    algo = algo_b.decode("ascii", "replace")
    if end != len(signature) or algo not in key.signature_algorithms():
        return False
    pub = _load_public(key.type, key.blob)
    try:
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(sig, data)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            r_b, p = read_ssh_string(sig, 0)
            s_b, p = read_ssh_string(sig, p)
            if p != len(sig):
                return False
            r, s = int.from_bytes(r_b, "big"), int.from_bytes(s_b, "big")
            pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(_ECDSA_HASH[algo]()))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, data, padding.PKCS1v15(), _RSA_HASH[algo]())
        else:  # pragma: no cover - parse_public_blob admits no other type
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class PrivateKey:
    """A private key read from a file, able to make SSH-format signatures."""

    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    public: PublicKey

    def sign(self, data: bytes, algorithm: str | None = None) -> bytes:
        """An SSH-format signature of ``data`` (``rsa-sha2-512`` for RSA unless ``algorithm`` says)."""
        algo = algorithm or self.public.signature_algorithms()[0]
        if algo not in self.public.signature_algorithms():
            raise KeyError_(f"a {self.public.type} key cannot sign with {algo}")
        k = self.key
        if isinstance(k, ed25519.Ed25519PrivateKey):
            sig = k.sign(data)
        elif isinstance(k, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(k.sign(data, ec.ECDSA(_ECDSA_HASH[algo]())))
            sig = _mpint(r) + _mpint(s)
        else:
            sig = k.sign(data, padding.PKCS1v15(), _RSA_HASH[algo]())
        return ssh_string(algo) + ssh_string(sig)


def load_private_key(data: bytes, passphrase: bytes | None = None, *, name: str = "key") -> PrivateKey:
    """A :class:`PrivateKey` from an OpenSSH (or PEM) private key file's bytes.

    Raises :class:`KeyError_` for a wrong or missing passphrase (the message says which) or a key
    type ferry does not accept.
    """
    loader = load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data[:64] else load_pem_private_key
    # The RSA validation checks a key against malicious parameters (~100 ms for 3072 bits); this is
    # the user's own key file, and a broken key only makes a signature the server refuses.
    try:
        key = loader(data, passphrase, unsafe_skip_rsa_key_validation=True)
    except TypeError as exc:  # "password-protected, but password was not provided" and the reverse
        if passphrase is None:
            raise KeyError_(f"{name} is protected by a passphrase") from exc
        # a passphrase given for a key that has none: use it as it is
        key = loader(data, None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, UnsupportedAlgorithm) as exc:
        if passphrase is not None:  # cryptography says "Corrupt data: broken checksum"
            raise KeyError_(f"wrong passphrase for {name}") from None
        raise KeyError_(f"cannot read {name}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KeyError_(f"{name}: unsupported key type {type(key).__name__}")
    line = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")
    public = parse_public_line(line)
    return PrivateKey(key, public)
