"""Sections of :class:`moderation.config.Settings` kept in their own classes so each module stays
readable: video uploads, and the queue, workers, upload-hook API and callbacks. ``Settings``
inherits them; every field is still a ``MODERATION_<NAME>`` variable (pydantic collects fields
from base models)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr


class VideoSettings(BaseModel):
    """Video uploads (issue 16 item 4): :mod:`moderation.media.video`."""

    # --- video uploads (issue 16 item 4): moderation.media.video ----------------------------
    max_video_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1, description="Largest accepted video upload, bytes."
    )
    max_video_duration_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest accepted video, seconds; longer: unscannable too_long.",
    )
    max_video_frames: int = Field(
        default=18_000,
        ge=1,
        description="Most frames decoded from one video; more: unscannable too_many_frames.",
    )
    max_video_side: int = Field(
        default=4096, ge=16, description="Longest accepted video frame side, px."
    )
    max_video_pixels: int = Field(
        default=4096 * 2304, ge=256, description="Largest accepted video frame, pixels."
    )
    max_video_decode_s: float = Field(
        default=60.0,
        gt=0,
        description="Wall-clock budget for decoding one video, seconds (keep it well below "
        "task_time_limit); past it: unscannable decode_timeout.",
    )
    video_screened_frames: int = Field(
        default=32,
        ge=1,
        description="Most frames of a video screened by the image pipeline (fixed-rate and "
        "scene-change frames; past it the most different ones).",
    )
    video_sample_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between fixed-rate frames (vPDQ's seconds_per_hash).",
    )
    video_scene_threshold: float = Field(
        default=30.0,
        gt=0,
        le=255,
        description="Mean absolute difference (0-255) of consecutive 32 x 32 grey thumbnails "
        "that marks a scene change.",
    )


class QueueApiSettings(BaseModel):
    """Queue, workers, upload-hook API and callbacks (issue 3, issue 19)."""

    # --- queue, workers, upload-hook API and callbacks (issue 3) ------------------------------
    task_time_limit: int = Field(
        default=120,
        ge=1,
        description="Seconds before a screening task's child process is killed (hard limit).",
    )
    visibility_timeout: int = Field(
        default=300,
        ge=1,
        description="Seconds Redis waits before redelivering an unacknowledged task; workers "
        "refuse to start unless it exceeds task_time_limit (RELIABILITY.md Q5).",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Screening attempts per upload; one more delivery ends it unscannable "
        "with reason poison.",
    )
    worker_batch_size: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Uploads a screening worker encodes in one batch: its own task's upload "
        "plus fresh queued ones (1: one upload per task).",
    )
    worker_batch_wait_ms: float = Field(
        default=20.0,
        ge=0,
        le=1000,
        description="Bounded wait for more queued uploads when a batch is partly filled, ms.",
    )
    reconcile_after: int = Field(
        default=300,
        ge=1,
        description="Seconds an upload may sit queued or processing (since its last send or "
        "attempt) before the reconciler re-sends it.",
    )
    reconcile_interval: int = Field(
        default=30, ge=1, description="Seconds between reconciler runs (Celery beat)."
    )
    snapshot_poll_interval: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between a worker's checks for a new index snapshot version.",
    )
    snapshot_compact_after: int = Field(
        default=8,
        ge=1,
        description="Delta snapshot versions after a full one at which the compaction job "
        "(Celery beat) writes the chain as one full version.",
    )
    snapshot_compact_fraction: float = Field(
        default=0.05,
        gt=0,
        description="Fraction of the full version's entries added or removed by its deltas at "
        "which the compaction job writes a full version, even before snapshot_compact_after.",
    )
    snapshot_compact_interval: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between runs of the snapshot compaction job (Celery beat).",
    )
    api_rate_limit: str = Field(
        default="600/minute",
        description="Uploads and other writes per API client (POST of a screening or an appeal, "
        "the HMA API's hashing, photo lookups and bank writes), limits library syntax "
        "(e.g. 10/second).",
    )
    api_status_rate_limit: str = Field(
        default="1200/minute",
        description="Reads per API client (GET of a screening, the HMA API's hash lookups and "
        "bank listings), a window of its own: polling never uses up the upload budget.",
    )
    queue_max_depth: int = Field(
        default=3000,
        ge=1,
        description="Uploads accepted but not yet screened (queued or processing), all clients "
        "together, past which the upload hook answers 503 with Retry-After (RELIABILITY.md "
        "S3); about a minute of the workers' throughput.",
    )
    queue_max_depth_per_client: int = Field(
        default=1000,
        ge=1,
        description="The same bound per API client, past which its uploads answer 429 with "
        "Retry-After, so one platform cannot fill the queue for the others.",
    )
    queue_retry_after: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="Retry-After of an upload refused for a full queue, seconds.",
    )
    api_max_wait: float = Field(
        default=10.0, gt=0, le=60, description="Longest ?wait= an upload request may ask, s."
    )
    web_active_requests: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Requests one web process works on at once; more wait for a slot, their "
        "connections held cheaply (admin/admission.py). Probes never wait.",
    )
    database_pool_size: int = Field(
        default=12,
        ge=1,
        le=200,
        description="PostgreSQL connections each process keeps open (SQLAlchemy pool); 8 more "
        "may open under peaks. Keep above web_active_requests.",
    )
    api_max_concurrent_waits_per_client: int = Field(
        default=8,
        ge=1,
        description="?wait= requests one API client may hold open at once (all web processes "
        "together when Redis is set); past it the request answers 429 with Retry-After.",
    )
    callback_max_attempts: int = Field(
        default=8, ge=1, description="Delivery attempts per callback before it is given up."
    )
    callback_backoff: float = Field(
        default=2.0,
        gt=0,
        description="First retry delay of a failed callback, s; doubles per attempt (max 1 h).",
    )
    callback_timeout: float = Field(default=10.0, gt=0, description="Callback HTTP timeout, s.")
    callback_allow_loopback: bool = Field(
        default=False,
        description="Development and tests only: callbacks and allowlist entries may reach "
        "loopback addresses (127.0.0.0/8, ::1, localhost), over plain http too. Private, "
        "link-local and metadata addresses stay refused. Plain http elsewhere needs "
        "environment=development.",
    )
    metrics_dir: Path | None = Field(
        default=None,
        description="prometheus-client multiprocess directory shared by `serve` and `worker` "
        "on one machine; default <data_dir>/metrics.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token that /metrics and the detailed /status require (Prometheus's "
        "`authorization` setting), at least 32 characters; unset, both answer 404. /status/live "
        "and /status/ready stay public and minimal.",
    )
    worker_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port on which `moderation worker` serves its processes' metrics (latency "
        "histograms, decisions) to Prometheus, behind the metrics token; unset: not served "
        "(the web tier's /metrics then carries them only when both share a metrics dir).",
    )


class ShardSettings(BaseModel):
    """The cosine index split across worker groups (issue 16 item 3):
    :mod:`moderation.banks.shards`."""

    # --- sharded cosine search (issue 16 item 3): moderation.banks.shards ----------------------
    index_shards: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Shards of the cosine index. 1: every screening worker searches its own "
        "copy (no fan-out). S > 1: entry -> shard by a stable hash of its id; `moderation worker "
        "--shard i` (queue shard-i) holds shard i only, and screening workers send each upload's "
        "embedding to all S shards and merge the hits (needs Redis).",
    )
    shard_search_timeout: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Seconds a screening task waits for every shard's answer; past it the "
        "upload is retried later (never decided without a shard), s.",
    )
