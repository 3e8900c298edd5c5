"""Callback URLs and API clients' allowlists of URL prefixes (no SSRF through callbacks).

A callback is POSTed only to a URL under one of its client's allowlisted prefixes
(ARCHITECTURE.md "HTTP upload hook"). Registration validates the prefixes
(:func:`normalise_allowlist_prefix`); submission and every delivery attempt check the URL
(:func:`url_allowed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"callback URL must be http(s): {url!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("callback URL must not carry credentials")
    if not parts.hostname:
        raise ValueError(f"callback URL has no host: {url!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:  # a non-numeric or out-of-range port
        raise ValueError(f"callback URL has a bad port: {url!r}") from exc
    return scheme, parts.hostname.lower().rstrip("."), port, parts.path or "/"


def normalise_allowlist_prefix(prefix: str) -> str:
    """Validate an allowlist prefix (``https://host[:port][/path]``) and return it trimmed.

    Raises:
        ValueError: not http(s), no host, credentials, a query or a fragment.
    """
    prefix = prefix.strip()
    _origin(prefix)
    parts = urlsplit(prefix)
    if parts.query or parts.fragment:
        raise ValueError(f"allowlist prefix must not have a query or fragment: {prefix!r}")
    return prefix


def url_allowed(url: str, allowlist: Sequence[str]) -> bool:
    """True when ``url`` matches one prefix: same scheme, host and port, and a path that equals
    the prefix's path or continues it at a ``/`` boundary.

    Comparing parsed parts, not strings, refuses the classic bypasses
    (``https://good.example@evil.example/``, ``https://good.example.evil.example/``,
    ``/hooks`` vs ``/hooks-evil``).
    """
    try:
        scheme, host, port, path = _origin(url)
    except ValueError:
        return False
    for prefix in allowlist:
        try:
            p_scheme, p_host, p_port, p_path = _origin(prefix)
        except ValueError:
            continue
        if (scheme, host, port) != (p_scheme, p_host, p_port):
            continue
        boundary = p_path if p_path.endswith("/") else p_path + "/"
        if path == p_path or path.startswith(boundary):
            return True
    return False
