"""Broker URLs: reading a list of them, checking each, and hiding the password.

Pure functions (no pika, no I/O): ``split_urls`` and ``check_url`` raise ``ConfigError``
naming the bad URL, its password hidden by ``redact``, which is also how every URL
reaches a log or a message.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

from fibrpc.errors import ConfigError


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, safe for logs and messages; the
    rest as written (a bad port too: it is what an error about the URL is about)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def split_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """The broker URLs in ``value``: one URL, several separated by commas (a comma in a
    password is written ``%2C``), or a sequence of either. Each must be an ``amqp://`` or
    ``amqps://`` URL with a host; raises ``ConfigError`` naming the first that is not
    (its password hidden)."""
    items = [value] if isinstance(value, str) else list(value)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"A broker URL is a string; got {type(item).__name__}.")
        urls += [part.strip() for part in item.split(",") if part.strip()]
    if not urls:
        raise ConfigError("No broker URL given (amqp://USER:PASSWORD@HOST:5672/VHOST).")
    for url in urls:
        check_url(url)
    return tuple(urls)


def check_url(url: str) -> str:
    """``url`` if it is an AMQP URL fibrpc can use; else ``ConfigError`` naming it (its
    password hidden) and the form it should have."""
    return _check(
        url,
        "broker URL",
        ("amqp", "amqps"),
        "is not an AMQP URL: it must read amqp://USER:PASSWORD@HOST:5672/VHOST (or amqps:// "
        "for TLS)",
    )


def check_management_url(url: str) -> str:
    """``url`` if it can name RabbitMQ's management API: ``http://`` or ``https://``, a
    host, and a port that is a number other than 0 (or none); else ``ConfigError`` naming
    it, its password hidden (urllib's own errors say neither what nor where)."""
    _check(
        url,
        "management URL",
        ("http", "https"),
        "is not an http:// or https:// URL with a host, such as http://broker:15672",
    )
    if urllib.parse.urlsplit(url).port == 0:
        raise ConfigError(f"The management URL {redact(url)} names port 0.", url=redact(url))
    return url


def _check(url: str, what: str, schemes: tuple[str, ...], form: str) -> str:
    """``url`` if it reads as a URL of one of ``schemes`` with a host and a port that is a
    number (or none); else ``ConfigError``: "The ``what`` URL cannot be read: ..." or
    "The ``what`` ... ``form``."."""
    where = redact(url)
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        raise ConfigError(f"The {what} {where} cannot be read: {exc}.", url=where) from exc
    if parts.scheme not in schemes or not host:
        raise ConfigError(f"The {what} {where} {form}.", url=where)
    return url
