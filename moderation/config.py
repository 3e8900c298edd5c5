"""One typed settings object for every entry point (CLI, workers, admin console).

Precedence, lowest to highest: the defaults below, then an optional TOML file named by
``MODERATION_CONFIG_FILE``, then ``MODERATION_*`` environment variables (for example
``MODERATION_DATA_DIR=/srv/moderation``). Flask and Celery both build from :class:`Settings`.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from moderation.config_sections import QueueApiSettings, ShardSettings, VideoSettings

CONFIG_FILE_ENV = "MODERATION_CONFIG_FILE"
SECRETS_DIR_ENV = "MODERATION_SECRETS_DIR"
"""A folder of one file per setting (Docker secrets' /run/secrets), read after the environment."""
ENV_PREFIX = "MODERATION_"
MIN_METRICS_TOKEN_LENGTH = 32
"""Characters of ``metrics_token``; ``secrets.token_urlsafe(32)`` gives 43."""

# Pillow's own default (``PIL.Image.MAX_IMAGE_PIXELS``): about 89.5 Mpx, a 0.25 GiB RGB bitmap.
# Pillow raises DecompressionBombError at twice this and warns above it; we treat the warning as
# an error, so this is the effective cap.
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


class ConfigurationError(Exception):
    """A setting, policy or key is missing or invalid; raised at start-up, never mid-request."""


def _default_policies_dir() -> Path:
    """``policies/`` beside the package in a checkout, else the copy packed into the wheel."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "policies"
    return checkout if checkout.is_dir() else here / "_policies"


class Settings(QueueApiSettings, VideoSettings, ShardSettings, BaseSettings):
    """Every knob of the service. Field names map to ``MODERATION_<NAME>`` variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # --- state -------------------------------------------------------------------------
    data_dir: Path = Field(
        default=Path("./var"),
        description="SQLite database, key file, encrypted snapshots and blobs live here.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite:///<data_dir>/moderation.db.",
    )
    database_password: SecretStr | None = Field(
        default=None,
        description="Password added to database_url when the URL names none (keeps the "
        "password out of the URL, e.g. from a Docker secret).",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker, e.g. redis://127.0.0.1:6379/0; unset runs in-process.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis for rate limits and caches; default: broker_url when it is Redis.",
    )

    # --- keys ------------------------------------------------------------------------------
    master_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated key_id:base64(32 bytes); the first is primary.",
    )
    key_file: Path | None = Field(
        default=None,
        description="JSON key ring file (mode 0600); default <data_dir>/keys.json.",
    )

    # --- detection ---------------------------------------------------------------------------
    encoder: str = Field(
        default="timm/efficientnet_lite0",
        description=(
            "Encoder name: timm/efficientnet_lite0 (default), timm/efficientnet_lite1, "
            "timm/efficientnet_lite2 or open_clip/<arch>/<tag-or-file>."
        ),
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    encoder_runtime: Literal["auto", "onnxruntime", "openvino", "torch", "eager"] = Field(
        default="auto",
        description="Forward path of the default encoder: auto (on the CPU OpenVINO when "
        "installed, else ONNX Runtime, else torch), onnxruntime, openvino (both run the same "
        "ONNX model, same embeddings), torch (channels_last) or eager.",
    )
    encoder_precision: Literal["fp32", "int8"] = Field(
        default="fp32",
        description="ONNX Runtime encoder precision: fp32, or int8 (static quantisation "
        "calibrated on MODERATION_ENCODER_CALIBRATION_DIR; evaluated, not the default: README "
        "'Torch-free serving'). int8 embeddings differ, so its encoder id differs.",
    )
    inference_precision: Literal["auto", "f32", "bf16"] = Field(
        default="f32",
        description="Arithmetic of the default encoder on OpenVINO (CPU): f32 (default), bf16, "
        "or auto (bfloat16 where the CPU computes it natively, AVX512-BF16 or AMX; else "
        "float32). Same model and encoder id; bfloat16 is about 1.8x cheaper per photo but "
        "lowers near-duplicate cosines a little and failed the precision rule of issue 20 "
        "(README 'Inference precision'). ONNX Runtime always computes in float32.",
    )
    encoder_calibration_dir: Path | None = Field(
        default=None,
        description="Images (e.g. the bank's) that calibrate the int8 encoder when it is built.",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="Encoder threads (torch, or ONNX Runtime / OpenVINO inference threads); 0: "
        "one per core for ONNX Runtime and OpenVINO (one for `moderation screen` of 64 photos or "
        "more), torch's own default for torch.",
    )
    faiss_threads: int = Field(
        default=1,
        ge=0,
        description="FAISS OpenMP threads; 1 avoids OpenMP spin overhead on one-query searches; "
        "0 keeps FAISS's default.",
    )
    policy: str = Field(default="default", description="Active policy: policies/<name>.yaml.")
    policies_dir: Path = Field(default_factory=_default_policies_dir)
    batch_size: int = Field(default=32, ge=1, le=1024, description="Images per encoder batch.")
    classifier: bool = Field(
        default=True,
        description="Classifier stage: region embeddings and synthetic training pairs at bank "
        "import, and the active classifier model (moderation classifier train) when screening.",
    )
    classifier_windows: bool = Field(
        default=False,
        description="Query windows: queries whose best cosine is just below review up to block "
        "(0.60-0.78) also embed a grid of 14 multi-scale windows (classifier stage only; off: "
        "they cost 38% of its throughput on the benchmark).",
    )
    classifier_feature_windows: bool = Field(
        default=True,
        description="Feature-map windows: the encoder's last feature map pooled over 25 "
        "3 x 3-cell windows in the same pass, searched against the entries' paste descriptors "
        "(stored at import: one more model pass per image) as an extra candidate source and "
        "given to the classifier (window_to_paste); also for training copies.",
    )
    classifier_local_features: bool = Field(
        default=True,
        description="Local features: each entry's 128 strongest SIFT keypoints stored as 14 "
        "more region rows (with the feature-map windows only; while the banks hold fewer than "
        "2,000 image entries, past which they are not searched), a query's keypoints verified by "
        "RANSAC against the entries they match, as a candidate source and the local_inliers "
        "feature, instead of the straight-edge views; also for training copies. About 25 ms of "
        "CPU per query below cosine 0.78, on a background thread beside decoding and the "
        "encoder (README 'Local features').",
    )
    classifier_edits_per_entry: int = Field(
        default=2,
        ge=0,
        le=17,
        description="Edited copies of each imported image made for training, before the "
        "original is discarded (each costs about one embedding at import).",
    )
    canary_edits_per_entry: int = Field(
        default=1,
        ge=0,
        le=17,
        description="Edited copies of each imported image kept (encrypted) in the golden set "
        "for the canary, made with canary-only seeds; 0: none (banks of illegal content may "
        "prefer operator-labelled files only, `moderation canary add`).",
    )
    canary_negatives_per_entry: int = Field(
        default=1,
        ge=0,
        le=17,
        description="Edited background photos (never bank images) added to the golden set as "
        "negatives per imported image.",
    )
    canary_interval: float = Field(
        default=21600.0, gt=0, description="Seconds between scheduled canary runs (beat)."
    )
    classifier_background_dir: Path | None = Field(
        default=None,
        description="Folder of non-banned photos: score normalisation and hard negatives; "
        "default: scikit-image's sample photos.",
    )

    # --- input limits ------------------------------------------------------------------------
    max_image_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1, description="Largest accepted upload, bytes."
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="Largest accepted frame, pixels."
    )
    max_frames: int = Field(
        default=1000, ge=1, description="More frames than this: unscannable too_many_frames."
    )
    sampled_frames: int = Field(
        default=8,
        ge=1,
        description="Frames of an animation that are screened: the most different ones.",
    )
    # --- admin console (issue 5) ------------------------------------------------------------
    environment: Literal["production", "development"] = Field(
        default="production",
        description="production refuses to start the console without a strong secret key or "
        "with Flask debug on; development generates a throw-away secret key.",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Console secret (signs CSRF tokens); at least 32 characters in production.",
    )
    console_plain_http_localhost: bool = Field(
        default=False,
        description="Serve the console over plain HTTP on localhost: session cookies lose "
        "Secure and requests for any other host are refused. Never in production.",
    )
    console_trusted_proxies: int = Field(
        default=0,
        ge=0,
        le=5,
        description="Reverse proxies in front of the console whose X-Forwarded-For/-Proto are "
        "trusted (werkzeug ProxyFix); 0 trusts none.",
    )
    trusted_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the web tier answers to (comma-separated; '.example.org' "
        "matches its subdomains); a request for any other Host gets 400 (RELIABILITY.md S10). "
        "Unset: localhost only in production, any host in development.",
    )
    console_session_hours: float = Field(
        default=8.0, gt=0, description="Absolute lifetime of a console session, hours."
    )
    console_session_idle_minutes: float = Field(
        default=30.0, gt=0, description="A console session unused this long ends, minutes."
    )
    console_step_up_seconds: int = Field(
        default=300,
        ge=0,
        description="Destructive actions need a password (and TOTP) check this recent, seconds.",
    )
    console_login_rate_limit: str = Field(
        default="10 per minute",
        description="Login and TOTP attempts per client address (Flask-Limiter syntax); "
        "more answer 429.",
    )
    console_max_import_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=1,
        description="Largest bank zip accepted by the console, bytes.",
    )
    review_lease_seconds: int = Field(
        default=600,
        ge=10,
        description="A claimed review item returns to the queue after this long, seconds.",
    )
    review_daily_exposure_limit: int = Field(
        default=200,
        ge=1,
        description="Review items one reviewer may be shown per UTC day (reviewer wellness).",
    )

    # --- logging -----------------------------------------------------------------------------
    log_level: str = Field(default="INFO")

    # --- audit log and GDPR erasure (issue 6) -----------------------------------------------
    audit_checkpoint_every: int = Field(
        default=1000,
        ge=1,
        description="`moderation audit checkpoint --if-due` signs the chain head once this many "
        "events were appended since the last checkpoint (bounds undetectable tail truncation).",
    )
    audit_checkpoint_max_age: int = Field(
        default=3600,
        ge=60,
        description="s: the workers' beat also signs a newer chain head once the last "
        "checkpoint is this old, so a quiet deployment's tail is not left unsigned.",
    )
    erasure_deadline_days: int = Field(
        default=25,
        ge=1,
        le=31,
        description="Open erasure requests older than this many days are overdue (GDPR Art. "
        "12(3): answer within one month).",
    )

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # an empty variable (compose's ${VAR:-}) means unset
        if len(value.get_secret_value()) < MIN_METRICS_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_METRICS_TOKEN_LENGTH} characters")
        return value

    @field_validator("trusted_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment's comma-separated form
            value = value.split(",")
        if isinstance(value, list):  # browsers send Host in lower case
            return [str(part).strip().lower() for part in value if str(part).strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        secrets_dir = os.environ.get(SECRETS_DIR_ENV)
        if secrets_dir:
            if not Path(secrets_dir).is_dir():
                raise ConfigurationError(f"{SECRETS_DIR_ENV}={secrets_dir}: no such directory")
            # One file per setting, named like its variable (moderation_master_keys...): what
            # Docker and Kubernetes secrets mount (pydantic-settings' secrets source).
            sources.append(SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir))
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigurationError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived -----------------------------------------------------------------------------
    @cached_property
    def resolved_data_dir(self) -> Path:
        """Absolute data directory (not created here)."""
        return self.data_dir.expanduser().resolve()

    @cached_property
    def sqlalchemy_url(self) -> str:
        """The database URL in use: ``database_url`` or the SQLite file in the data dir."""
        if self.database_url:
            if self.database_password is None:
                return self.database_url
            from sqlalchemy.engine import make_url

            url = make_url(self.database_url)
            if url.password is not None:
                return self.database_url
            password = self.database_password.get_secret_value()
            return url.set(password=password).render_as_string(hide_password=False)
        return f"sqlite:///{self.resolved_data_dir / 'moderation.db'}"

    @cached_property
    def key_file_path(self) -> Path:
        """Where the key ring file lives (used only when ``master_keys`` is unset)."""
        return (self.key_file or self.resolved_data_dir / "keys.json").expanduser().resolve()

    @cached_property
    def snapshots_dir(self) -> Path:
        """Encrypted index snapshots."""
        return self.resolved_data_dir / "snapshots"

    @cached_property
    def blobs_dir(self) -> Path:
        """Encrypted uploads."""
        return self.resolved_data_dir / "blobs"

    @cached_property
    def effective_redis_url(self) -> str | None:
        """``redis_url``, else ``broker_url`` when that is a Redis URL."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None

    @cached_property
    def effective_broker_url(self) -> str:
        """``broker_url``, else Celery on kombu's SQLAlchemy transport over a SQLite file in the
        data dir (one machine, no Redis: the same worker code runs)."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{self.resolved_data_dir / 'broker.sqlite'}"

    @cached_property
    def metrics_path(self) -> Path:
        """prometheus-client multiprocess directory."""
        return (self.metrics_dir or self.resolved_data_dir / "metrics").expanduser().resolve()

    def ensure_dirs(self) -> None:
        """Create the data directory tree (mode 0700)."""
        for path in (self.resolved_data_dir, self.snapshots_dir, self.blobs_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from defaults, the optional file and the environment.

    Keyword overrides win over everything (tests and the CLI's options use them).

    Raises:
        ConfigurationError: the file named by ``MODERATION_CONFIG_FILE`` is missing, or a value
            does not validate (the message names the field).
    """
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid settings: {problems}") from exc
