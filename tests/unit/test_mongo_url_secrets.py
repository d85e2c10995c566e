"""A MongoDB URL that pymongo refuses is named in the error without its password."""

from __future__ import annotations

import pytest

from reactor.adapters.mongo_store import MongoStore
from reactor.errors import InvalidInput

PASSWORD = "s3cret%2Fpw"  # noqa: S105 (a test secret: the point is that it does not show)


@pytest.mark.parametrize(
    "url",
    [
        f"mongodb://reactor:{PASSWORD}@127.0.0.1:x/",  # pymongo: ValueError (a port that is not a number)
        # pymongo: InvalidURI, ConfigurationError
        f"mongodb://reactor:{PASSWORD}@127.0.0.1/?tls=true&tlsInsecure=true&tlsAllowInvalidCertificates=true",
        f"mongodb://reactor:{PASSWORD}@h1,h2/?directConnection=true",
    ],
)
async def test_a_refused_mongo_url_is_invalid_input_without_its_password(url: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        async with MongoStore(url):
            pass
    assert raised.value.field == "mongo url"
    for form in (PASSWORD, "s3cret/pw"):
        assert form not in str(raised.value)
        assert form not in raised.value.rule
