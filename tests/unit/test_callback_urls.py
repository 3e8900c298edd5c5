"""Callback URL rules (RELIABILITY.md S4-S5): path normal form, hosts, addresses, policy."""

from __future__ import annotations

import ipaddress

import pytest

from moderation.config import Settings, load_settings
from moderation.service.callback_urls import (
    PRODUCTION,
    CallbackPolicy,
    CallbackUrlError,
    address_allowed,
    callback_policy,
    check_callback_url,
    check_url,
    normalise_allowlist_prefix,
    normalise_path,
    remove_dot_segments,
    url_allowed,
)

LOOPBACK = CallbackPolicy(require_https=True, allow_loopback=True)
DEVELOPMENT = CallbackPolicy(require_https=False, allow_loopback=False)
ALLOW = ["https://hooks.example.com/cb"]


# --- paths (S4) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # RFC 3986 5.2.4's own examples, then 5.4.2's abnormal ones reduced to paths.
        ("/a/b/c/./../../g", "/a/g"),
        ("mid/content=5/../6", "mid/6"),
        ("/../g", "/g"),
        ("/./g", "/g"),
        ("/g.", "/g."),
        ("/..g", "/..g"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("../../x", "x"),
        ("", ""),
    ],
)
def test_remove_dot_segments_follows_rfc_3986(path: str, expected: str) -> None:
    assert remove_dot_segments(path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/cb/%2e%2e/admin", "/admin"),
        ("/cb/%2E./admin", "/admin"),
        ("/cb/%7euser", "/cb/~user"),
        ("/cb/%41", "/cb/A"),
        ("/cb/%c3%a9", "/cb/%C3%A9"),
        ("/cb/%2f", "/cb/%2F"),
        ("", "/"),
    ],
)
def test_normalise_path_decodes_unreserved_and_removes_dots(path: str, expected: str) -> None:
    assert normalise_path(path) == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/cb/../admin",
        "https://hooks.example.com/cb/%2e%2e/admin",
        "https://hooks.example.com/cb/%2E%2E/admin",
        "https://hooks.example.com/cb/.%2e/admin",
        "https://hooks.example.com/cb/./x",
        "https://hooks.example.com/cb/..",
        "https://hooks.example.com/cb//x",
        "https://hooks.example.com//cb/x",
        "https://hooks.example.com/cb\\..\\admin",
        "https://hooks.example.com/cb/%5c../admin",
        "https://hooks.example.com/cb/%2f../admin",
        "https://hooks.example.com/cb/%2F",
        "https://hooks.example.com/cb/%00x",
        "https://hooks.example.com/cb/..;/admin",
        "https://hooks.example.com/cb/%7Ex",
        "https://hooks.example.com/cb/%zz",
        "https://hooks.example.com/cb/\t../admin",  # urlsplit drops tabs silently
        "https://hooks.example.com/cb/x\n",
        "https://hooks.example.com/cb/x y",
        "https://hooks.example.com/cb/é",
        "https://hooks.example.com/cb#frag",
        "https://hooks.example.com\\@evil.example/cb",
        "https://hooks.example.com:0/cb",
        "https://hooks.example.com:99999/cb",
        "https://hooks.example.com:x/cb",
    ],
)
def test_paths_escaping_or_not_in_normal_form_are_refused(url: str) -> None:
    with pytest.raises(CallbackUrlError):
        check_url(url)
    assert not url_allowed(url, ALLOW)
    if url == url.strip():  # registration trims the ends of a prefix
        with pytest.raises(CallbackUrlError):
            normalise_allowlist_prefix(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/cb",
        "https://hooks.example.com/cb/",
        "https://hooks.example.com/cb/in/%C3%A9?x=../y",
        "https://HOOKS.example.com:443/cb/a",
        "https://hooks.example.com./cb/a",
    ],
)
def test_normal_paths_under_the_prefix_pass(url: str) -> None:
    assert url_allowed(url, ALLOW)


def test_a_stored_prefix_no_longer_valid_matches_nothing() -> None:
    # An allowlist saved before these rules: its entries are re-checked at every use.
    assert not url_allowed("https://hooks.example.com/cb/x", ["https://hooks.example.com/cb/.."])
    assert not url_allowed("http://hooks.example.com/cb/x", ["http://hooks.example.com/cb"])


# --- hosts and addresses (S5) ------------------------------------------------------------------


REFUSED_ADDRESSES = [
    "0.0.0.0",
    "::",
    "169.254.169.254",  # cloud metadata
    "169.254.0.1",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.0.1",
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "febf::1",
    "::ffff:127.0.0.1",  # IPv4-mapped IPv6
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:a00:1::",  # 6to4 of 10.0.0.1 (is_global says True for the IPv6 address itself)
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "100.64.0.1",  # shared address space (carrier-grade NAT)
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",  # documentation
    "::10.0.0.1",  # IPv4-compatible (deprecated)
]
PUBLIC_ADDRESSES = [
    "93.184.216.34",
    "8.8.8.8",
    "172.32.0.1",  # just outside 172.16/12
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_non_public_addresses_are_refused(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not address_allowed(ip, PRODUCTION)
    assert not address_allowed(ip, DEVELOPMENT)
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(CallbackUrlError):
        check_url(f"https://{host}/cb")
    with pytest.raises(CallbackUrlError):
        normalise_allowlist_prefix(f"https://{host}/cb")


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_pass(address: str) -> None:
    assert address_allowed(ipaddress.ip_address(address), PRODUCTION)
    host = f"[{address}]" if ":" in address else address
    assert check_url(f"https://{host}/cb").port == 443


@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"])
def test_loopback_only_when_the_policy_allows_it(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not address_allowed(ip, PRODUCTION)
    assert address_allowed(ip, LOOPBACK)


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "0.0.0.0", "fe80::1"])
def test_allowing_loopback_allows_nothing_else(address: str) -> None:
    assert not address_allowed(ipaddress.ip_address(address), LOOPBACK)


@pytest.mark.parametrize(
    "host",
    ["127.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "10.1", "1.2.3.999"],
)
def test_numeric_hosts_resolvers_read_as_ipv4_are_refused(host: str) -> None:
    with pytest.raises(CallbackUrlError, match="numeric"):
        check_url(f"https://{host}/cb", LOOPBACK)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "hooks.localhost", "localhost."])
def test_localhost_names_are_loopback(host: str) -> None:
    with pytest.raises(CallbackUrlError, match="loopback"):
        check_url(f"https://{host}/cb")
    assert check_url(f"https://{host}/cb", LOOPBACK).host.endswith("localhost")
    assert check_url(f"http://{host}/cb", LOOPBACK).scheme == "http"


@pytest.mark.parametrize("host", ["bad_host-.example", "a..example", "ex%61mple.com", "-a.example"])
def test_malformed_host_names_are_refused(host: str) -> None:
    with pytest.raises(CallbackUrlError):
        check_url(f"https://{host}/cb")


# --- plain http and the policy of the settings -----------------------------------------------


def test_plain_http_only_in_development_or_to_loopback() -> None:
    with pytest.raises(CallbackUrlError, match="https"):
        check_url("http://hooks.example.com/cb")
    with pytest.raises(CallbackUrlError, match="https"):
        check_url("http://hooks.example.com/cb", LOOPBACK)  # loopback allowed, not http to all
    assert check_url("http://hooks.example.com/cb", DEVELOPMENT).port == 80
    assert check_url("http://127.0.0.1:8080/cb", LOOPBACK).port == 8080
    with pytest.raises(CallbackUrlError):
        check_url("http://127.0.0.1:8080/cb", DEVELOPMENT)  # development is not loopback


def test_policy_from_settings(settings: Settings) -> None:
    assert settings.environment == "production" and not settings.callback_allow_loopback
    assert callback_policy(settings) == PRODUCTION
    dev = load_settings(
        data_dir=settings.data_dir, environment="development", callback_allow_loopback=True
    )
    assert callback_policy(dev) == CallbackPolicy(require_https=False, allow_loopback=True)


def test_check_callback_url_says_why() -> None:
    with pytest.raises(CallbackUrlError, match="allowlist"):
        check_callback_url("https://hooks.example.com/other", ALLOW)
    with pytest.raises(CallbackUrlError, match="normal form"):
        check_callback_url("https://hooks.example.com/cb/../admin", ALLOW)
    assert check_callback_url("https://hooks.example.com/cb/x", ALLOW).path == "/cb/x"
