"""The default encoder's ONNX model files: where they live, their manifest, and the checks a
session passes before it embeds anything (see :mod:`.lite0_onnx` for the scheme). Imports no
torch; :mod:`.lite0_export` builds the files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from moderation.signals.encoders.base import sha256_file
from moderation.signals.encoders.lite0 import (
    EMBED_POOL,
    EMBED_RESIZE,
    INPUT_SIZE,
    LITE0,
    TIMM_ARCH,
    LiteVariant,
    describe,
)
from moderation.signals.encoders.openvino_session import (
    MODEL_OUTPUTS,
    InferencePrecision,
    OpenVinoSession,
)

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "int8"]
#: The inference engines that run the ONNX model on the CPU (``MODERATION_ENCODER_RUNTIME``).
Backend = Literal["onnxruntime", "openvino"]

#: ONNX opset used for export: 17 is the newest the TorchScript exporter fully supports and
#: every onnxruntime >= 1.14 runs.
ONNX_OPSET: Final = 17
#: Version of the manifest layout; a change makes every cached model stale. 2: the model has a
#: second output, the feature map (:data:`MODEL_OUTPUTS`).
MANIFEST_FORMAT: Final = 2

#: Least cosine similarity, per probe row, between a session's and the recorded raw features.
#: The same float32 graph agrees to about 1e-6 (measured min 0.9999999); 0.999 leaves room for
#: kernel-order rounding while any wrong weight or truncated file fails by far.
PROBE_MIN_COSINE: Final = 0.999
#: The same for a session that computes in bfloat16 (:class:`.openvino_session.OpenVinoSession`
#: ``precision="bf16"``): its 8-bit mantissas move the noise probe's features further (measured
#: on the AMD EPYC with AVX512-BF16: least cosine 0.9955 on the probe, 0.9995 on photos), still
#: far above what a wrong weight or a truncated file gives.
PROBE_MIN_COSINE_BF16: Final = 0.98
#: Images the int8 activation ranges are calibrated on (the first ones given).
CALIBRATION_IMAGES: Final = 64
#: The file in a model cache directory that remembers file digests by stat stamp
#: (:func:`cached_sha256`).
DIGESTS_FILE: Final = "digests.json"
#: Folder of a model cache directory where OpenVINO keeps compiled models (its ``CACHE_DIR``),
#: one subfolder per ``.onnx`` digest (:class:`.openvino_session.OpenVinoSession`).
OPENVINO_CACHE: Final = "openvino"
#: Probe batch: rows of seeded uniform noise in the normalised input range [-1, 1].
PROBE_ROWS: Final = 2
PROBE_SEED: Final = 20240607


class FastPathError(RuntimeError):
    """The fast path could not be built or does not reproduce the eager model."""


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` is installed (found without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    """Whether ``openvino`` is installed (found without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def default_cache_dir() -> Path:
    """``<tmp>/moderation-cache-<uid>``, created with mode 0700 and checked to be ours.

    Raises:
        FastPathError: the directory exists but belongs to another user or is group/world
            writable (another user could plant a model file).
    """
    path = Path(tempfile.gettempdir()) / f"moderation-cache-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise FastPathError(f"cache directory {path} is not private to this user")
    return path


def _stamp(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def cached_sha256(path: Path, cache_dir: Path) -> str:
    """SHA-256 (hex) of the file at ``path``, hashed once per version of the file.

    The digest is remembered in ``<cache_dir>/digests.json`` under the file's stat stamp
    (device, inode, size, modification and status-change times in ns) and reused while the
    stamp is unchanged: the start-up cost of the model check (two SHA-256s, 20-40 ms) is paid
    once. Any write, truncation, replacement (new inode) or ``utime`` changes the status-change
    time, which an unprivileged process cannot set back, so a modified file is hashed again.
    The record lives in the private cache directory beside the manifest it backs: whoever
    could forge it could rewrite the manifest as well.

    Raises:
        OSError: ``path`` cannot be read.
    """
    record = cache_dir / DIGESTS_FILE
    key = str(path.resolve())
    stamp = _stamp(path)
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        digest = entry.get("sha256")
        if isinstance(digest, str):
            return digest
    digest = sha256_file(path)
    if _stamp(path) == stamp:  # not changed while it was read
        known[key] = {"stamp": stamp, "sha256": digest}
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(record, json.dumps(known, sort_keys=True).encode())
        except OSError as exc:  # read-only cache: hash again next time
            logger.info("cannot record the digest of %s (%s)", path, exc)
    return digest


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same folder and a rename, so
    readers see the old file or the new one, never a part.

    Raises:
        OSError: the folder is not writable.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def probe_input(size: int = INPUT_SIZE) -> npt.NDArray[np.float32]:
    """Deterministic probe input: float32 (:data:`PROBE_ROWS`, 3, size, size) in [-1, 1]."""
    rng = np.random.default_rng(PROBE_SEED)
    return rng.uniform(-1.0, 1.0, (PROBE_ROWS, 3, size, size)).astype(np.float32)


def min_row_cosine(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Smallest cosine similarity between corresponding rows of two (n, d) arrays."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.min(np.sum(x * y, axis=1) / np.maximum(norms, 1e-12)))


def cpu_count() -> int:
    """Processors this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ort_session(path: Path, *, threads: int = 0) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU provider, all graph optimisations on.

    ``threads`` sets ``intra_op_num_threads``; 0 means one per usable core (:func:`cpu_count`).
    Operators run sequentially
    (``inter_op_num_threads`` 1): this network is a chain, so parallel operators gain nothing.
    Thread-safe: ``InferenceSession.run`` is.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads if threads > 0 else cpu_count()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads sleep instead of spinning: the spin burns the core the pipeline's
    # decode/PDQ thread needs (2 cores, loaded: 2 threads gave 45 images per CPU-second
    # spinning, 65-74 not; README "Speed").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_session(
    path: Path,
    *,
    backend: Backend = "onnxruntime",
    threads: int = 0,
    digest: str | None = None,
    inference_precision: InferencePrecision = "f32",
) -> Any:
    """A session over the ONNX model at ``path``: :func:`ort_session` (float32) or
    :class:`.openvino_session.OpenVinoSession` computing at ``inference_precision``
    (``threads`` 0: one per usable core; 1: one per call, and with OpenVINO as many calls at
    once as there are usable cores, which ONNX Runtime does by itself). ``digest``: the file's
    verified SHA-256, which names OpenVINO's compiled-model cache folder beside it (none
    without)."""
    if backend == "openvino":
        cache = path.parent / OPENVINO_CACHE / digest if digest else None
        streams = cpu_count() if threads == 1 else 1
        return OpenVinoSession(
            path,
            threads=threads if threads > 0 else cpu_count(),
            streams=streams,
            cache_dir=cache,
            precision=inference_precision,
        )
    return ort_session(path, threads=threads)


def probe_min_cosine(session: Any) -> float:
    """The least probe cosine ``session`` must reach: :data:`PROBE_MIN_COSINE_BF16` for a
    bfloat16 OpenVINO session, else :data:`PROBE_MIN_COSINE`."""
    bf16 = getattr(session, "precision", "f32") == "bf16"
    return PROBE_MIN_COSINE_BF16 if bf16 else PROBE_MIN_COSINE


@dataclass(frozen=True)
class ModelFiles:
    """Where one built model lives: ``onnx`` and its JSON ``manifest``."""

    onnx: Path
    manifest: Path

    @classmethod
    def in_cache(
        cls, cache_dir: Path, identity: str, precision: Precision, arch: str = TIMM_ARCH
    ) -> ModelFiles:
        """``<cache_dir>/<arch>-<precision>-<sha256(identity, opset)[:24]>.onnx`` (and
        ``.json``), for an ``identity`` naming the source weights and preprocessing."""
        key = f"{identity}|opset={ONNX_OPSET}|manifest={MANIFEST_FORMAT}|precision={precision}"
        stem = f"{arch}-{precision}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
        return cls(cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json")


def read_manifest(
    files: ModelFiles, *, weights_sha256: str, preprocessing: str, precision: Precision
) -> dict[str, Any] | None:
    """The manifest when it describes these source weights, preprocessing and precision and the
    ``.onnx`` file's SHA-256 (:func:`cached_sha256`) matches it; else None (missing,
    unreadable, stale or tampered)."""
    try:
        manifest: dict[str, Any] = json.loads(files.manifest.read_text())
        onnx_digest = cached_sha256(files.onnx, files.onnx.parent)
    except (OSError, ValueError) as exc:
        logger.info("no usable ONNX model at %s (%s)", files.onnx, exc)
        return None
    expected = {
        "format": MANIFEST_FORMAT,
        "source_weights_sha256": weights_sha256,
        "preprocessing": preprocessing,
        "precision": precision,
        "onnx_sha256": onnx_digest,
        "outputs": list(MODEL_OUTPUTS),
    }
    wrong = [key for key, value in expected.items() if manifest.get(key) != value]
    if wrong:
        logger.warning("ONNX model %s does not match its manifest: %s", files.onnx, wrong)
        return None
    return manifest


def checked_session(
    files: ModelFiles,
    *,
    weights_sha256: str,
    preprocessing: str,
    precision: Precision,
    threads: int,
    backend: Backend = "onnxruntime",
    input_size: int = INPUT_SIZE,
    inference_precision: InferencePrecision = "f32",
) -> Any:
    """A session (``backend``'s, :func:`model_session`) over ``files`` once its digests and
    probe features (:func:`probe_input` of ``input_size``) check out (:func:`probe_min_cosine`),
    else None. An OpenVINO session that fails from its compiled-model cache is tried once more
    with that cache folder removed (compiled afresh)."""
    manifest = read_manifest(
        files, weights_sha256=weights_sha256, preprocessing=preprocessing, precision=precision
    )
    if manifest is None:
        return None
    digest = manifest["onnx_sha256"]
    options: dict[str, Any] = {
        "backend": backend,
        "threads": threads,
        "digest": digest,
        "inference_precision": inference_precision,
    }
    session = _probed_session(files, manifest, options, input_size=input_size)
    compiled = files.onnx.parent / OPENVINO_CACHE / digest
    if session is None and backend == "openvino" and compiled.exists():
        logger.warning("discarding OpenVINO's compiled model %s", compiled)
        shutil.rmtree(compiled, ignore_errors=True)
        session = _probed_session(files, manifest, options, input_size=input_size)
    return session


def _probed_session(
    files: ModelFiles, manifest: dict[str, Any], options: dict[str, Any], *, input_size: int
) -> Any:
    """:func:`model_session` over ``files.onnx`` (with ``options``, its keyword arguments) if
    its probe features match the manifest's and its feature map GeM-pools to its features
    (:func:`.feature_windows.pool_global`)."""
    from moderation.signals.encoders.feature_windows import pool_global

    try:
        session = model_session(files.onnx, **options)
        features, feature_map = session.run(list(MODEL_OUTPUTS), {"x": probe_input(input_size)})
        agreement = min(
            min_row_cosine(features, manifest["probe_features"]),
            min_row_cosine(pool_global(feature_map), features),
        )
    except Exception as exc:  # onnxruntime raises its own types for unreadable files
        logger.warning("ONNX model %s unusable (%s)", files.onnx, exc)
        return None
    if agreement < probe_min_cosine(session):
        logger.warning("ONNX model %s fails its probe (min cosine %.6f)", files.onnx, agreement)
        return None
    return session


def preprocessing_for(precision: Precision, variant: LiteVariant = LITE0) -> str:
    """The encoder id's preprocessing string of ``variant``'s ONNX model at ``precision``."""
    base = describe(EMBED_RESIZE, EMBED_POOL, variant)
    return base if precision == "fp32" else f"{base},precision={precision}"
