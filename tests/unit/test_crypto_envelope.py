"""Envelope encryption: wrapped data keys, payload encryption and blobs (RELIABILITY.md E3;
G4 for blobs).
"""

from __future__ import annotations

import pytest

from moderation.crypto import envelope
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
from moderation.crypto.keys import KeyRing
from tests.unit.conftest import (
    K1,
    K2,
)

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
