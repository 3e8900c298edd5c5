"""Callback URLs and API clients' allowlists of URL prefixes (no SSRF through callbacks).

A callback is POSTed only to a URL under one of its client's allowlisted prefixes
(ARCHITECTURE.md "HTTP upload hook"). Registration validates the prefixes
(:func:`normalise_allowlist_prefix`); submission and every delivery attempt check the URL
(:func:`check_callback_url`, :func:`url_allowed`); the delivery's connection checks the
address the host name resolves to (``moderation.service.callback_http``), RELIABILITY.md S4-S5.

Rules, the same at every step (a URL is refused, never rewritten):

* the URL is printable ASCII without whitespace or backslashes (``urllib.parse`` silently
  drops tabs and newlines, and some clients read ``\\`` as ``/``);
* ``https``; plain ``http`` only where :class:`CallbackPolicy` allows it (development, or a
  loopback host when loopback is allowed). No credentials, no fragment;
* the host is a DNS name or a canonical IP literal: ``127.1``, ``0x7f000001``, ``2130706433``
  and other numeric spellings that resolvers read as IPv4 are refused; an IP literal (and
  ``localhost``, ``*.localhost``: RFC 6761 6.3) must be an address :func:`address_allowed`
  accepts;
* the path is already in normal form: percent-decoding the unreserved characters (RFC 3986
  2.3), upper-casing the other escapes (6.2.2.1) and removing dot segments (5.2.4) leave it
  unchanged, and it has no empty segment (``//``), no dot segment with parameters (``..;x``)
  and no encoded ``/``, ``\\`` or control character. So ``/cb/../admin`` and
  ``/cb/%2e%2e/admin`` never pass a ``/cb`` prefix, whatever the HTTP client or the receiving
  server normalises later.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from moderation.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Encoded "/", "\" and control characters (RFC 3986 2.1): a server decoding them would see
# another path than the one checked.
_FORBIDDEN_ESCAPE = re.compile(r"%(2F|5C|[01][0-9A-F]|7F)", re.IGNORECASE)
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
# NAT64 well-known prefix (RFC 6052 2.1): the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class CallbackUrlError(ValueError):
    """A callback URL or allowlist prefix broke one of the module's rules (the message says
    which)."""


@dataclass(frozen=True)
class CallbackPolicy:
    """What a deployment lets callbacks reach.

    ``require_https``: plain http is refused (production), except to a loopback host when
    ``allow_loopback``. ``allow_loopback``: 127.0.0.0/8, ::1 and ``localhost`` are accepted
    (development and tests, whose receivers listen on 127.0.0.1). Private, link-local,
    unspecified, multicast and reserved addresses are refused always.
    """

    require_https: bool = True
    allow_loopback: bool = False


PRODUCTION = CallbackPolicy()
"""The strictest policy, and the default wherever none is given."""


def callback_policy(settings: Settings) -> CallbackPolicy:
    """The policy of ``settings``: https unless ``environment`` is ``development``; loopback
    only with ``callback_allow_loopback``."""
    return CallbackPolicy(
        require_https=settings.environment != "development",
        allow_loopback=settings.callback_allow_loopback,
    )


class CallbackTarget(NamedTuple):
    """A checked URL's parts: lower-case scheme and host (no trailing dot), port, path."""

    scheme: str
    host: str
    port: int
    path: str


# --- addresses ---------------------------------------------------------------------------------


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries and reaches (IPv4-mapped, 6to4, NAT64), else
    ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip


def address_allowed(ip: IPAddress, policy: CallbackPolicy) -> bool:
    """True when a callback may connect to ``ip``.

    Globally routable unicast only (``ipaddress`` ``is_global``, i.e. not in the IANA
    special-purpose registries, RFC 6890), judged on the IPv4 address an IPv4-mapped, 6to4 or
    NAT64 address embeds. Loopback (127.0.0.0/8, ::1) only when ``policy.allow_loopback``.
    Refused: unspecified (0.0.0.0, ::), private (10/8, 172.16/12, 192.168/16, fc00::/7),
    link-local (169.254/16 with the cloud metadata address, fe80::/10), shared (100.64/10),
    multicast and reserved.
    """
    target = _embedded_ipv4(ip)
    if target.is_loopback:
        return policy.allow_loopback
    return target.is_global and not target.is_multicast and not target.is_reserved


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_loopback_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def _check_host(host: str, policy: CallbackPolicy) -> bool:
    """Check a lower-case host without its trailing dot; True when it is a loopback literal or
    name (the only hosts plain http may reach under a loopback-allowing production policy).

    Raises:
        CallbackUrlError: a refused address, an ambiguous numeric host or a malformed name.
    """
    literal = _ip_literal(host)
    if literal is not None:
        if not address_allowed(literal, policy):
            raise CallbackUrlError(f"callback host {host} is not a public address")
        return _embedded_ipv4(literal).is_loopback
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise CallbackUrlError(f"callback host {host!r} is not a valid DNS name")
    if _NUMERIC_LABEL.match(labels[-1]):
        # Resolvers read 127.1, 0x7f.0.0.1 or 2130706433 as IPv4 (inet_aton): only the
        # canonical dotted quad, handled above, is accepted.
        raise CallbackUrlError(f"callback host {host!r} is an ambiguous numeric address")
    if _is_loopback_name(host):
        if not policy.allow_loopback:
            raise CallbackUrlError(f"callback host {host} is a loopback name")
        return True
    return False


# --- paths -------------------------------------------------------------------------------------


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 "Remove Dot Segments", step by step as the RFC writes it."""
    output: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith("./"):
            path = path[2:]
        elif path.startswith("/./") or path == "/.":
            path = "/" + path[3:]
        elif path.startswith("/../") or path == "/..":
            path = "/" + path[4:]
            if output:
                output.pop()
        elif path in (".", ".."):
            path = ""
        else:
            end = path.find("/", 1)
            end = len(path) if end == -1 else end
            output.append(path[:end])
            path = path[end:]
    return "".join(output)


def normalise_path(path: str) -> str:
    """``path`` in normal form: escapes of unreserved characters decoded (RFC 3986 2.3), other
    escapes upper-cased (6.2.2.1), dot segments removed (5.2.4); ``""`` becomes ``/``.

    Raises:
        CallbackUrlError: a ``%`` not followed by two hex digits.
    """
    if _BAD_ESCAPE.search(path):
        raise CallbackUrlError(f"callback URL path has a malformed percent escape: {path!r}")

    def decode(match: re.Match[str]) -> str:
        char = chr(int(match[1], 16))
        return char if char in _UNRESERVED else "%" + match[1].upper()

    return remove_dot_segments(_ESCAPE.sub(decode, path)) or "/"


def _check_path(path: str) -> str:
    path = path or "/"
    if _FORBIDDEN_ESCAPE.search(path):
        raise CallbackUrlError("callback URL path has an encoded slash, backslash or control")
    if "//" in path:
        raise CallbackUrlError("callback URL path has an empty segment (//)")
    if normalise_path(path) != path:
        raise CallbackUrlError(
            "callback URL path is not in normal form (dot segments, encoded unreserved "
            f"characters or lower-case escapes): {path!r}"
        )
    if any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/")):
        # Servlet containers read "..;x" as "..": /cb/..;/admin would leave /cb there.
        raise CallbackUrlError(f"callback URL path has a dot segment with parameters: {path!r}")
    return path


# --- URLs --------------------------------------------------------------------------------------


def check_url(url: str, policy: CallbackPolicy = PRODUCTION) -> CallbackTarget:
    """Check a callback URL (or allowlist prefix) against the module's rules.

    Returns:
        Its scheme, host, port (default 80/443) and path.

    Raises:
        CallbackUrlError: the rule broken.
    """
    if not url.isascii() or not url.isprintable() or " " in url or "\\" in url:
        raise CallbackUrlError("callback URL must be printable ASCII, without spaces or \\")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced or invalid [IPv6] host
        raise CallbackUrlError(f"callback URL is malformed: {url!r}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise CallbackUrlError(f"callback URL must be http(s): {url!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise CallbackUrlError("callback URL must not carry credentials")
    if parts.fragment or "#" in url:
        raise CallbackUrlError("callback URL must not have a fragment")
    if not parts.hostname:
        raise CallbackUrlError(f"callback URL has no host: {url!r}")
    try:
        port = parts.port if parts.port is not None else _DEFAULT_PORTS[scheme]
    except ValueError as exc:  # a non-numeric or out-of-range port
        raise CallbackUrlError(f"callback URL has a bad port: {url!r}") from exc
    if port == 0:
        raise CallbackUrlError(f"callback URL has a bad port: {url!r}")
    host = parts.hostname.lower().rstrip(".")
    loopback = _check_host(host, policy)
    if scheme == "http" and policy.require_https and not (policy.allow_loopback and loopback):
        raise CallbackUrlError("callback URL must be https")
    return CallbackTarget(scheme, host, port, _check_path(parts.path))


def normalise_allowlist_prefix(prefix: str, policy: CallbackPolicy = PRODUCTION) -> str:
    """Validate an allowlist prefix (``https://host[:port][/path]``) and return it trimmed.

    Raises:
        CallbackUrlError: (a ``ValueError``) any rule of :func:`check_url`, or a query.
    """
    prefix = prefix.strip()
    check_url(prefix, policy)
    if urlsplit(prefix).query or "?" in prefix:
        raise CallbackUrlError(f"allowlist prefix must not have a query: {prefix!r}")
    return prefix


def _under(target: CallbackTarget, prefix: CallbackTarget) -> bool:
    if target[:3] != prefix[:3]:
        return False
    boundary = prefix.path if prefix.path.endswith("/") else prefix.path + "/"
    return target.path == prefix.path or target.path.startswith(boundary)


def check_callback_url(
    url: str, allowlist: Sequence[str], policy: CallbackPolicy = PRODUCTION
) -> CallbackTarget:
    """Check ``url`` (:func:`check_url`) and that it lies under one prefix of ``allowlist``:
    same scheme, host and port, and a path equal to the prefix's or continuing it at a ``/``.

    Comparing parsed, normal-form parts, not strings, refuses the classic bypasses
    (``https://good.example@evil.example/``, ``https://good.example.evil.example/``,
    ``/hooks`` vs ``/hooks-evil``, ``/hooks/../admin``). Prefixes that no longer pass the
    policy match nothing.

    Raises:
        CallbackUrlError: a broken rule, or no prefix matches.
    """
    target = check_url(url, policy)
    for prefix in allowlist:
        try:
            if _under(target, check_url(prefix, policy)):
                return target
        except CallbackUrlError:
            continue
    raise CallbackUrlError("callback_url does not match this client's callback allowlist")


def url_allowed(url: str, allowlist: Sequence[str], policy: CallbackPolicy = PRODUCTION) -> bool:
    """True when :func:`check_callback_url` accepts ``url``."""
    try:
        check_callback_url(url, allowlist, policy)
    except CallbackUrlError:
        return False
    return True
