"""The key ring and its environment value (RELIABILITY.md E4-E5: rotation, retirement,
unknown key ids).
"""

from __future__ import annotations

import pytest

from moderation.config import ConfigurationError
from moderation.crypto.errors import CryptoError, UnknownKeyError
from moderation.crypto.keys import KeyRing
from tests.unit.conftest import (
    K1,
    K2,
    b64,
)

# --- KeyRing ------------------------------------------------------------------------------------


def test_keyring_basics(ring: KeyRing) -> None:
    two = KeyRing({"k1": K1, "k2": K2}, "k2")
    assert two.primary_id == "k2"
    assert two.key_ids == ("k1", "k2")
    assert two.get("k1") == K1
    assert "k2" in two and "k3" not in two
    assert two == KeyRing({"k1": K1, "k2": K2}, "k2")
    assert two != KeyRing({"k1": K1, "k2": K2}, "k1")


def test_keyring_repr_hides_key_material() -> None:
    text = repr(KeyRing({"k1": K1, "k2": K2}, "k1")) + str(KeyRing({"k1": K1}, "k1"))
    assert "k1" in text
    for key in (K1, K2):
        assert b64(key) not in text and key.hex() not in text and repr(key) not in text


@pytest.mark.parametrize(
    ("keys", "primary", "message"),
    [
        ({}, "k1", "at least one"),
        ({"k1": b"short"}, "k1", "32 bytes"),
        ({"k1": K1}, "k2", "not in the key ring"),
        ({"bad id": K1}, "bad id", "invalid key id"),
        ({"a:b": K1}, "a:b", "invalid key id"),
        ({"-k": K1}, "-k", "invalid key id"),
        ({"k" * 65: K1}, "k" * 65, "invalid key id"),
    ],
)
def test_keyring_rejects_invalid(keys: dict[str, bytes], primary: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyRing(keys, primary)


def test_unknown_key_id_is_named(ring: KeyRing) -> None:
    with pytest.raises(UnknownKeyError, match="'k-missing'") as info:
        ring.get("k-missing")
    assert info.value.key_id == "k-missing"


def test_with_new_primary_adds_a_fresh_key(ring: KeyRing) -> None:
    rotated = ring.with_new_primary()
    new_id = rotated.primary_id
    assert new_id != "k1" and rotated.key_ids == ("k1", new_id)
    assert new_id.startswith("k-")
    assert rotated.get("k1") == K1
    assert rotated.get(new_id) != K1 and len(rotated.get(new_id)) == 32
    assert ring.key_ids == ("k1",), "rotation must not mutate the original ring"
    assert ring.with_new_primary("k2").primary_id == "k2"
    with pytest.raises(ValueError, match="already"):
        ring.with_new_primary("k1")


def test_two_generated_keys_differ(ring: KeyRing) -> None:
    a, b = ring.with_new_primary("k2"), ring.with_new_primary("k2")
    assert a.get("k2") != b.get("k2")


def test_without_retires_a_key() -> None:
    two = KeyRing({"k1": K1, "k2": K2}, "k2")
    assert two.without("k1").key_ids == ("k2",)
    with pytest.raises(CryptoError, match="primary"):
        two.without("k2")
    with pytest.raises(UnknownKeyError, match="'k9'"):
        two.without("k9")


# --- environment value -------------------------------------------------------------------------


def test_from_env_value_first_is_primary() -> None:
    ring = KeyRing.from_env_value(f" k1:{b64(K1)} , k2:{b64(K2)}")
    assert ring.primary_id == "k1"
    assert ring.key_ids == ("k1", "k2")
    assert ring.get("k2") == K2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "is empty"),
        ("  ", "is empty"),
        (f"k1{b64(K1)}", "entry 1 has no ':'"),
        (f"k1:{b64(K1)},,k2:{b64(K2)}", "entry 2 is empty"),
        (f"k1:{b64(K1)},k1:{b64(K2)}", "entry 2 .key id 'k1'.: duplicate"),
        ("k1:not base64!", "entry 1 .key id 'k1'.: key is not valid standard base64"),
        (f"k1:{b64(K1[:16])}", "decodes to 16 bytes, expected 32"),
        (f"k1:{b64(K1 + b'x')}", "decodes to 33 bytes"),
        (f"bad id:{b64(K1)}", "entry 1: invalid key id 'bad id'"),
        (f":{b64(K1)}", "entry 1: invalid key id ''"),
    ],
)
def test_from_env_value_errors_are_clear(value: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        KeyRing.from_env_value(value)
    assert "MODERATION_MASTER_KEYS" in str(info.value)
    for key in (K1, K2, K1[:16]):
        assert b64(key) not in str(info.value), "an error message must not echo key material"
