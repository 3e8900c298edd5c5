"""The HTTP session callbacks are POSTed with: every connection checks the address it reaches.

A URL that passed ``moderation.service.callback_urls`` at submission can still name a host
that resolves, at delivery time, to a private or metadata address (DNS rebinding: a short TTL
and a second answer). So each new connection resolves the host once (:func:`resolve`), checks
every address it got with :func:`~moderation.service.callback_urls.address_allowed`, and
connects to a checked address itself, not to the name: no second lookup happens between the
check and the connect. The request keeps the name for the ``Host`` header, TLS SNI and
certificate verification (urllib3 takes both from ``HTTPConnection.host``, which stays the
name; only ``_new_conn``, where urllib3 opens the socket, is replaced).

The session ignores proxy and netrc settings of the environment (``trust_env = False``: a proxy
would be the address reached), and the caller sends without redirects.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import create_connection

from moderation.service.callback_urls import CallbackPolicy, address_allowed

Resolver = Callable[[str, int], list[str]]


class ForbiddenAddressError(Exception):
    """A callback host resolved to an address the policy refuses; nothing was sent.

    Deliberately not an ``OSError``: urllib3 and requests let it through unwrapped, so a
    delivery tells it from a network failure (it is refused, not retried).
    """


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for TCP (``socket.getaddrinfo``), without
    duplicates, in the resolver's order.

    Raises:
        socket.gaierror: the name does not resolve.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(
    host: str, port: int, policy: CallbackPolicy, resolver: Resolver
) -> list[str]:
    """The addresses ``host`` resolves to, all of them allowed by ``policy``.

    Raises:
        ForbiddenAddressError: any address refused (one private answer among public ones is
            enough: the resolver's order, not the check, would pick the one used), or none.
        socket.gaierror: the name does not resolve.
    """
    addresses = resolver(host, port)
    refused = [a for a in addresses if not address_allowed(ipaddress.ip_address(a), policy)]
    if refused or not addresses:
        raise ForbiddenAddressError(
            f"callback host {host} resolves to a refused address: {', '.join(refused) or 'none'}"
        )
    return addresses


def _connect(conn: HTTPConnection, policy: CallbackPolicy, resolver: Resolver) -> socket.socket:
    """urllib3's ``_new_conn`` (urllib3 2.x ``connection.py``), connecting to checked
    addresses only."""
    try:
        addresses = checked_addresses(conn._dns_host, conn.port, policy, resolver)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    error: OSError | None = None
    for address in addresses:
        try:
            sock = create_connection(
                (address, conn.port),
                conn.timeout,
                source_address=conn.source_address,
                socket_options=conn.socket_options,
            )
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
            ) from exc
        except OSError as exc:
            error = exc
            continue
        sys.audit("http.client.connect", conn, conn.host, conn.port)
        return sock
    raise NewConnectionError(conn, f"Failed to establish a new connection: {error}")


class _GuardedAdapter(HTTPAdapter):
    """A requests adapter whose pools open connections through :func:`_connect`."""

    def __init__(self, policy: CallbackPolicy, resolver: Resolver) -> None:
        class GuardedHTTPConnection(HTTPConnection):
            def _new_conn(self) -> socket.socket:
                return _connect(self, policy, resolver)

        class GuardedHTTPSConnection(HTTPSConnection):
            def _new_conn(self) -> socket.socket:
                return _connect(self, policy, resolver)

        class GuardedHTTPPool(HTTPConnectionPool):
            ConnectionCls = GuardedHTTPConnection

        class GuardedHTTPSPool(HTTPSConnectionPool):
            ConnectionCls = GuardedHTTPSConnection

        self._pool_classes = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]
        self.poolmanager.pool_classes_by_scheme = self._pool_classes


def guarded_session(policy: CallbackPolicy, resolver: Resolver | None = None) -> requests.Session:
    """A requests session for callbacks: connections only to addresses ``policy`` allows,
    checked at connect time. ``resolver`` (default :func:`resolve`) is replaceable for tests
    of DNS rebinding."""
    session = requests.Session()
    session.trust_env = False
    adapter = _GuardedAdapter(policy, resolver if resolver is not None else resolve)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
