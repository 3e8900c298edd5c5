"""Key files (mode 0600, atomic, refused when readable by others) and ``load_keyring``'s
sources: environment, key file, development key.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from moderation.config import ConfigurationError, Settings, load_settings
from moderation.crypto import keys as keys_module
from moderation.crypto.keys import KeyRing, load_keyring
from tests.unit.conftest import (
    K1,
    K2,
    b64,
)

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
