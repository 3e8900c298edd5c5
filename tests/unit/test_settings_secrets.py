"""Settings from Docker/Kubernetes secret files (``MODERATION_SECRETS_DIR``) and the database
password kept out of the URL (issue 16 item 5: secrets from the environment or Docker secrets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moderation.config import ConfigurationError, load_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("MODERATION_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_secret_files_fill_settings_and_the_environment_wins(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "moderation_metrics_token").write_text("t" * 40 + "\n")
    (tmp_path / "moderation_secret_key").write_text("from-file-" + "k" * 40)
    clean_env.setenv("MODERATION_SECRETS_DIR", str(tmp_path))
    clean_env.setenv("MODERATION_SECRET_KEY", "from-env-" + "e" * 40)
    settings = load_settings()
    assert settings.metrics_token is not None
    assert settings.metrics_token.get_secret_value() == "t" * 40  # trailing newline dropped
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == "from-env-" + "e" * 40


def test_a_missing_secrets_dir_is_a_clear_error(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("MODERATION_SECRETS_DIR", str(tmp_path / "absent"))
    with pytest.raises(ConfigurationError, match="MODERATION_SECRETS_DIR"):
        load_settings()


def test_the_database_password_is_added_to_a_url_without_one(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "moderation_database_password").write_text("p@ss:w/rd\n")
    clean_env.setenv("MODERATION_SECRETS_DIR", str(tmp_path))
    url = "postgresql://moderation@postgres:5432/moderation"
    settings = load_settings(database_url=url)
    assert settings.sqlalchemy_url == (
        "postgresql://moderation:p%40ss%3Aw%2Frd@postgres:5432/moderation"
    )
    # A URL that names its own password keeps it; no URL keeps SQLite.
    own = "postgresql://moderation:own@postgres/moderation"
    assert load_settings(database_url=own).sqlalchemy_url == own
    assert load_settings(data_dir=tmp_path).sqlalchemy_url.startswith("sqlite:///")


def test_the_database_password_connects_to_postgresql(clean_env: pytest.MonkeyPatch) -> None:
    """The URL the app builds really authenticates (trust auth accepts any password, so this
    checks the URL parses and connects with the password in place)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    settings = load_settings(
        database_url="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        database_password="any-password",
    )
    engine = create_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("select 1")).scalar() == 1
    except OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc.orig}")
    finally:
        engine.dispose()
    assert engine.url.password == "any-password"
