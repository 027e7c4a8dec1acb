"""Where the object backend keeps its chunks: ``--store s3://BUCKET/PREFIX``, the endpoint and credentials.

Pure parsing and validation (no S3 client is imported here, so ``ferry serve`` can refuse a bad
``--store`` before loading anything): :func:`store_config` turns the command line and the standard
AWS variables into an :class:`S3Config`, or a :class:`~ferry.errors.UsageError` that says what to fix.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ferry.errors import UsageError

__all__ = ["S3Config", "parse_store_url", "store_config"]

# S3's bucket naming rules (3-63 characters, lower case, digits, dots, hyphens, letters or digits at the
# ends); what a store accepts beyond that (weed is laxer) is the store's business.
_BUCKET: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True, slots=True)
class S3Config:
    """Where the chunks live: ``s3://BUCKET/PREFIX`` at ``endpoint`` (None: AWS), with credentials."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"
    #: retries of one request after a transient failure, and the time they may take in all
    max_retries: int = 4
    retry_timeout: float = 15.0
    connect_timeout: float = 5.0
    request_timeout: float = 60.0

    @property
    def url(self) -> str:
        """``s3://BUCKET/PREFIX`` (for messages)."""
        return f"s3://{self.bucket}/{self.prefix}"


def parse_store_url(text: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> ``(bucket, prefix)``; the prefix, when there is one, ends with ``/``."""
    parts = urllib.parse.urlsplit(text)
    hint = "expected s3://BUCKET/PREFIX (e.g. s3://ferry/files)"
    if parts.scheme != "s3" or not parts.netloc:
        raise UsageError(f"invalid --store {text!r}: {hint}")
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise UsageError(
            f"invalid --store {text!r}: {hint}; the endpoint goes in --s3-endpoint and the credentials in "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise UsageError(
            f"invalid bucket name {bucket!r} in --store: 3 to 63 lower-case letters, digits, '.' or '-'"
        )
    prefix = parts.path.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise UsageError(f"invalid prefix {prefix!r} in --store: no empty, '.' or '..' parts")
    return bucket, prefix + "/" if prefix else ""


def _check_endpoint(endpoint: str) -> str:
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(
            f"invalid S3 endpoint {endpoint!r} (--s3-endpoint or FERRY_S3_ENDPOINT): expected "
            "http(s)://HOST[:PORT]"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise UsageError(f"invalid S3 endpoint {endpoint!r}: {exc}") from None
    return endpoint.rstrip("/")


def store_config(url: str, endpoint: str | None, env: Mapping[str, str]) -> S3Config:
    """The store of ``--store URL`` at ``endpoint`` (None: AWS's own), with the credentials in the
    standard variables of ``env`` (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, and
    ``AWS_REGION`` or ``AWS_DEFAULT_REGION``)."""
    bucket, prefix = parse_store_url(url)
    access, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access or not secret:
        missing = " and ".join(n for n, v in (("AWS_ACCESS_KEY_ID", access), ("AWS_SECRET_ACCESS_KEY", secret)) if not v)
        raise UsageError(f"--store needs the object store's credentials: set {missing}")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Config(
        bucket=bucket,
        prefix=prefix,
        endpoint=_check_endpoint(endpoint) if endpoint else None,
        access_key=access,
        secret_key=secret,
        region=region,
    )
