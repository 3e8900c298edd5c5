"""Key ring, key files, envelope encryption, rotation (RELIABILITY.md E3-E5; G4 for blobs)."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from moderation.config import ConfigurationError, Settings, load_settings
from moderation.crypto import envelope
from moderation.crypto import keys as keys_module
from moderation.crypto.aead import decrypt, encrypt
from moderation.crypto.envelope import (
    WrappedKey,
    generate_data_key,
    open_blob,
    rewrap_key,
    seal_blob,
    unwrap_key,
    wrap_key,
)
from moderation.crypto.errors import CryptoError, DecryptionError, UnknownKeyError
from moderation.crypto.keys import KeyRing, load_keyring

K1 = bytes(range(32))
K2 = bytes(range(100, 132))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing({"k1": K1}, "k1")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """A permissive umask, so a 0600 file proves the code sets the mode itself."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


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


# --- key file ----------------------------------------------------------------------------------


def test_key_file_round_trip_mode_0600_atomic(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "keys.json"
    ring = KeyRing({"k1": K1, "k2": K2}, "k2")
    ring.save_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyRing.load_file(path) == ring
    assert os.listdir(tmp_path) == ["keys.json"], "the temp file must be renamed, not left"

    # Overwriting a file that someone made world-readable yields a fresh 0600 file.
    path.chmod(0o644)
    inode = path.stat().st_ino
    ring.with_new_primary("k3").save_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != inode, "save_file must replace the file, not rewrite it in place"
    assert KeyRing.load_file(path).primary_id == "k3"


def test_key_file_save_failure_leaves_old_file(
    tmp_path: Path, ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    ring.save_file(path)
    before = path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ring.with_new_primary("k2").save_file(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keys.json"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o700, 0o620])
def test_key_file_accessible_by_others_is_refused(tmp_path: Path, ring: KeyRing, mode: int) -> None:
    path = tmp_path / "keys.json"
    ring.save_file(path)
    path.chmod(mode)
    if mode & 0o077:
        with pytest.raises(ConfigurationError, match=f"mode {mode:04o}.*chmod 600"):
            KeyRing.load_file(path)
    else:
        assert KeyRing.load_file(path) == ring


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "format"),
        (json.dumps({"format": 2, "primary": "k1", "keys": {}}).encode(), "format"),
        (json.dumps({"format": 1, "primary": "k1", "keys": {}}).encode(), "non-empty"),
        (json.dumps({"format": 1, "primary": "k2", "keys": {"k1": b64(K1)}}).encode(), "'k2'"),
        (json.dumps({"format": 1, "primary": "k1", "keys": {"k1": b64(K1[:8])}}).encode(), "8"),
        (json.dumps({"format": 1, "primary": "k1", "keys": {"k1": 5}}).encode(), "base64"),
    ],
)
def test_key_file_malformed_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=message) as info:
        KeyRing.load_file(path)
    assert str(path) in str(info.value)


def test_key_file_missing_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot open"):
        KeyRing.load_file(tmp_path / "absent.json")


# --- load_keyring ------------------------------------------------------------------------------


def test_load_keyring_without_keys_is_an_error(settings: Settings) -> None:
    with pytest.raises(ConfigurationError, match=r"MODERATION_MASTER_KEYS.*moderation init"):
        load_keyring(settings)
    assert not settings.key_file_path.exists()


def test_load_keyring_creates_dev_key_file_with_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture, umask_zero: None
) -> None:
    with caplog.at_level(logging.WARNING, logger="moderation.crypto.keys"):
        ring = load_keyring(settings, create_dev=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "DEVELOPMENT ONLY" in warnings[0].getMessage()
    path = settings.key_file_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ring.primary_id.startswith("dev-")
    assert os.listdir(path.parent) == ["keys.json"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moderation.crypto.keys"):
        again = load_keyring(settings, create_dev=True)
    assert again == ring, "an existing key file must be loaded, never replaced"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert load_keyring(settings) == ring


def test_dev_key_creation_never_replaces_an_existing_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The race where another process creates the key file first: its keys win."""
    path = tmp_path / "keys.json"
    KeyRing({"k1": K1}, "k1").save_file(path)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="moderation.crypto.keys"):
        keys_module._create_dev_key_file(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keys.json"]
    assert not caplog.records


def test_load_keyring_from_key_file(settings: Settings) -> None:
    settings.key_file_path.parent.mkdir(parents=True)
    KeyRing({"k1": K1}, "k1").save_file(settings.key_file_path)
    assert load_keyring(settings).get("k1") == K1


def test_load_keyring_refuses_readable_key_file(settings: Settings) -> None:
    settings.key_file_path.parent.mkdir(parents=True)
    KeyRing({"k1": K1}, "k1").save_file(settings.key_file_path)
    settings.key_file_path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="group or others"):
        load_keyring(settings, create_dev=True)


def test_load_keyring_env_wins_over_file(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings.key_file_path.parent.mkdir(parents=True)
    KeyRing({"file-key": K1}, "file-key").save_file(settings.key_file_path)
    env_settings = load_settings(data_dir=settings.data_dir, master_keys=f"env-key:{b64(K2)}")
    with caplog.at_level(logging.INFO, logger="moderation.crypto.keys"):
        ring = load_keyring(env_settings, create_dev=True)
    assert ring.key_ids == ("env-key",) and ring.get("env-key") == K2
    assert any("ignored" in r.getMessage() for r in caplog.records)
    assert all(b64(K2) not in r.getMessage() for r in caplog.records)


def test_load_keyring_bad_env_value(settings: Settings) -> None:
    bad = load_settings(data_dir=settings.data_dir, master_keys="k1:short")
    with pytest.raises(ConfigurationError, match="MODERATION_MASTER_KEYS"):
        load_keyring(bad, create_dev=True)
    assert not bad.key_file_path.exists(), "a bad env value must not fall back to a dev key"


# --- wrapping -----------------------------------------------------------------------------------


def test_wrap_unwrap_round_trip(ring: KeyRing) -> None:
    data_key = generate_data_key()
    wrapped = wrap_key(data_key, ring, context="upload:1")
    assert wrapped.key_id == "k1" and len(wrapped.blob) == 60
    assert data_key not in wrapped.blob
    assert unwrap_key(wrapped, ring, context="upload:1") == data_key


def test_wrapped_key_is_bound_to_its_context(ring: KeyRing) -> None:
    wrapped = wrap_key(generate_data_key(), ring, context="upload:1")
    with pytest.raises(DecryptionError, match="upload:2"):
        unwrap_key(wrapped, ring, context="upload:2")


def test_wrapped_key_is_bound_to_its_key_id() -> None:
    """Relabelling a wrap with another id that holds the same bytes still fails (id in AAD)."""
    ring = KeyRing({"k1": K1, "k1-copy": K1}, "k1")
    wrapped = wrap_key(generate_data_key(), ring, context="c")
    relabelled = WrappedKey("k1-copy", wrapped.blob)
    with pytest.raises(DecryptionError, match="'k1-copy'"):
        unwrap_key(relabelled, ring, context="c")


def test_unknown_key_id_is_never_tried_blindly(ring: KeyRing) -> None:
    """E5: the right key bytes under another id are not used; the error names the id."""
    wrapped = wrap_key(generate_data_key(), ring, context="c")
    same_bytes_other_id = KeyRing({"k-other": K1}, "k-other")
    with pytest.raises(UnknownKeyError, match="'k1'") as info:
        unwrap_key(wrapped, same_bytes_other_id, context="c")
    assert info.value.key_id == "k1"


def test_another_deployments_key_with_the_same_id_fails(ring: KeyRing) -> None:
    wrapped = wrap_key(generate_data_key(), ring, context="c")
    other = KeyRing({"k1": K2}, "k1")
    with pytest.raises(DecryptionError, match="'k1'"):
        unwrap_key(wrapped, other, context="c")


def test_wrap_rejects_bad_arguments(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        wrap_key(b"short", ring, context="c")
    with pytest.raises(ValueError, match="context"):
        wrap_key(generate_data_key(), ring, context="")


def test_wrapped_key_bytes_round_trip_and_every_bit_flip_fails(ring: KeyRing) -> None:
    data_key = generate_data_key()
    wrapped = wrap_key(data_key, ring, context="c")
    encoded = wrapped.to_bytes()
    assert WrappedKey.from_bytes(encoded) == wrapped
    for bit in range(len(encoded) * 8):
        flipped = bytearray(encoded)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CryptoError):
            unwrap_key(WrappedKey.from_bytes(bytes(flipped)), ring, context="c")


@pytest.mark.parametrize("data", [b"", b"MWK\x01", b"MWK\x02\x02k1" + bytes(60), b"XXXX\x02k1"])
def test_wrapped_key_from_bytes_rejects_malformed(data: bytes) -> None:
    with pytest.raises(CryptoError, match="malformed wrapped key"):
        WrappedKey.from_bytes(data)


def test_wrapped_key_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="60"):
        WrappedKey("k1", b"x")
    with pytest.raises(ValueError, match="invalid key id"):
        WrappedKey("k 1", bytes(60))


def test_rewrap_moves_the_data_key_to_the_primary(ring: KeyRing) -> None:
    """E4 for wrapped keys: add k2, make it primary, re-wrap, retire k1."""
    data_key = generate_data_key()
    old = wrap_key(data_key, ring, context="c")
    rotated = ring.with_new_primary("k2")
    new = rewrap_key(old, rotated, context="c")
    assert new.key_id == "k2" and new.blob != old.blob
    retired = rotated.without("k1")
    assert unwrap_key(new, retired, context="c") == data_key
    with pytest.raises(UnknownKeyError, match="'k1'"):
        unwrap_key(old, retired, context="c")
    # Re-running rotation is a no-op for keys already under the primary.
    assert rewrap_key(new, retired, context="c") is new


def test_rewrap_verifies_keys_already_under_the_primary(ring: KeyRing) -> None:
    wrapped = wrap_key(generate_data_key(), ring, context="c")
    with pytest.raises(DecryptionError):
        rewrap_key(wrapped, ring, context="other")


# --- payload encryption ---------------------------------------------------------------------------


def test_encrypt_decrypt_round_trip() -> None:
    data_key = generate_data_key()
    sealed = encrypt(b"vectors", data_key, b"aad")
    assert len(sealed) == 12 + len(b"vectors") + 16
    assert b"vectors" not in sealed
    assert decrypt(sealed, data_key, b"aad", context="obj") == b"vectors"
    assert decrypt(memoryview(sealed), data_key, b"aad", context="obj") == b"vectors"
    assert decrypt(encrypt(b"", data_key, b""), data_key, b"", context="obj") == b""


def test_decrypt_failures_name_the_object() -> None:
    data_key = generate_data_key()
    sealed = encrypt(b"vectors", data_key, b"aad")
    with pytest.raises(DecryptionError, match="snapshot x"):
        decrypt(sealed, data_key, b"other aad", context="snapshot x")
    with pytest.raises(DecryptionError, match="snapshot x"):
        decrypt(sealed, generate_data_key(), b"aad", context="snapshot x")
    with pytest.raises(DecryptionError, match="too short"):
        decrypt(sealed[:27], data_key, b"aad", context="snapshot x")
    for index in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x80
        with pytest.raises(DecryptionError):
            decrypt(bytes(tampered), data_key, b"aad", context="snapshot x")


def test_encrypt_rejects_a_short_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt(b"x", bytes(16), b"")


def test_nonces_unique_over_100000_encryptions() -> None:
    """E3: random 96-bit nonces never repeat for one data key."""
    data_key = generate_data_key()
    nonces = {encrypt(b"", data_key, b"")[:12] for _ in range(100_000)}
    assert len(nonces) == 100_000


def test_data_keys_are_fresh() -> None:
    keys = {generate_data_key() for _ in range(1000)}
    assert len(keys) == 1000 and all(len(k) == 32 for k in keys)


# --- blobs (uploads) ------------------------------------------------------------------------------


def test_seal_open_blob_round_trip(ring: KeyRing) -> None:
    sealed, wrapped = seal_blob(b"jpeg bytes", ring, context="upload:u1")
    assert b"jpeg bytes" not in sealed
    assert open_blob(sealed, wrapped, ring, context="upload:u1") == b"jpeg bytes"
    # The wrapped key survives its DB column round trip.
    again = WrappedKey.from_bytes(wrapped.to_bytes())
    assert open_blob(sealed, again, ring, context="upload:u1") == b"jpeg bytes"


def test_open_blob_wrong_context_or_wrong_key_fails(ring: KeyRing) -> None:
    sealed, wrapped = seal_blob(b"jpeg bytes", ring, context="upload:u1")
    _, other_wrapped = seal_blob(b"jpeg bytes", ring, context="upload:u2")
    with pytest.raises(DecryptionError, match="upload:u2"):
        open_blob(sealed, wrapped, ring, context="upload:u2")
    with pytest.raises(DecryptionError, match="upload:u1"):
        open_blob(sealed, other_wrapped, ring, context="upload:u1")
    with pytest.raises(DecryptionError, match="upload:u2"):
        open_blob(sealed, other_wrapped, ring, context="upload:u2")
    with pytest.raises(DecryptionError):
        open_blob(sealed[:-1] + bytes([sealed[-1] ^ 1]), wrapped, ring, context="upload:u1")


def test_blob_payload_is_bound_to_its_context(
    ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Besides the wrap, the payload's own associated data names the blob."""
    data_key = generate_data_key()
    monkeypatch.setattr(envelope, "generate_data_key", lambda: data_key)
    sealed, _ = seal_blob(b"jpeg bytes", ring, context="upload:u1")
    aad = envelope._blob_aad
    assert decrypt(sealed, data_key, aad("upload:u1"), context="u1") == b"jpeg bytes"
    with pytest.raises(DecryptionError, match="u2"):
        decrypt(sealed, data_key, aad("upload:u2"), context="u2")


def test_blob_is_unreadable_once_its_wrapped_key_is_destroyed(
    ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crypto-shredding (G4) by construction: the wrapped key holds the only copy of the data
    key. The sealed bytes contain neither the data key nor anything derived from it that
    unlocks them; deleting the wrapped key (the DB row) leaves only keys that fail."""
    issued: list[bytes] = []
    original = envelope.generate_data_key

    def recording() -> bytes:
        issued.append(original())
        return issued[-1]

    monkeypatch.setattr(envelope, "generate_data_key", recording)
    sealed, wrapped = seal_blob(b"personal data", ring, context="upload:u1")
    resealed, rewrapped = seal_blob(b"personal data", ring, context="upload:u1")
    assert len(issued) == 2 and issued[0] != issued[1], "every blob gets its own data key"
    assert issued[0] not in sealed and issued[0] not in wrapped.blob
    del wrapped  # erasure: the wrapped key's row is deleted
    # What is left (the ring, the other blob's wrapped key, new keys) cannot open the copy.
    with pytest.raises(DecryptionError):
        open_blob(sealed, rewrapped, ring, context="upload:u1")
    with pytest.raises(DecryptionError):
        decrypt(sealed, generate_data_key(), b"", context="upload:u1")
    with pytest.raises(DecryptionError):
        decrypt(sealed, ring.get("k1"), envelope._blob_aad("upload:u1"), context="upload:u1")
    assert open_blob(resealed, rewrapped, ring, context="upload:u1") == b"personal data"
