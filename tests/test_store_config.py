"""``--store s3://BUCKET/PREFIX``, ``--s3-endpoint`` and the AWS variables, parsed and checked."""

from __future__ import annotations

import pytest

from ferry.errors import UsageError
from ferry.store.config import parse_store_url, store_config

KEYS = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://ferry", "ferry", ""),
        ("s3://ferry/", "ferry", ""),
        ("s3://ferry/files", "ferry", "files/"),
        ("s3://my.bucket-1/a/b/", "my.bucket-1", "a/b/"),
    ],
)
def test_store_urls(url: str, bucket: str, prefix: str) -> None:
    assert parse_store_url(url) == (bucket, prefix)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ferry/files", "expected s3://BUCKET/PREFIX"),
        ("http://ferry/files", "expected s3://BUCKET/PREFIX"),
        ("s3:///files", "expected s3://BUCKET/PREFIX"),
        ("s3://key:secret@ferry/x", "AWS_ACCESS_KEY_ID"),
        ("s3://ferry:9000/x", "--s3-endpoint"),
        ("s3://Ferry/x", "invalid bucket name"),
        ("s3://ab/x", "invalid bucket name"),
        ("s3://ferry/a//b", "no empty, '.' or '..' parts"),
        ("s3://ferry/a/../b", "no empty, '.' or '..' parts"),
    ],
)
def test_bad_store_urls_say_what_is_expected(url: str, why: str) -> None:
    with pytest.raises(UsageError, match=r"--store|bucket|prefix") as info:
        parse_store_url(url)
    assert why in str(info.value)


def test_credentials_region_and_endpoint() -> None:
    config = store_config("s3://ferry/p", "http://127.0.0.1:8333/", {**KEYS, "AWS_DEFAULT_REGION": "eu-west-3"})
    assert (config.bucket, config.prefix, config.endpoint, config.region) == ("ferry", "p/", "http://127.0.0.1:8333", "eu-west-3")
    assert (config.access_key, config.secret_key) == ("id", "secret")
    assert store_config("s3://ferry", None, {**KEYS, "AWS_REGION": "x", "AWS_DEFAULT_REGION": "y"}).region == "x"
    with pytest.raises(UsageError, match=r"set AWS_SECRET_ACCESS_KEY$"):
        store_config("s3://ferry", None, {"AWS_ACCESS_KEY_ID": "id"})
    for endpoint in ("127.0.0.1:8333", "ftp://h", "http://h/path", "http://h:99999"):
        with pytest.raises(UsageError, match="S3 endpoint"):
            store_config("s3://ferry", endpoint, KEYS)
