"""Service URLs in messages: a URL may carry a password, which no error or log line repeats."""

from __future__ import annotations

from urllib.parse import unquote_plus


def without_password(text: str, url: str) -> str:
    """`text` with the password of `url` (as written and as decoded) replaced by `***`."""
    userinfo = url.partition("//")[2].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    if password:
        for form in {password, unquote_plus(password)}:
            text = text.replace(form, "***")
    return text
