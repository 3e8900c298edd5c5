"""Local features: find a bank photo pasted small, rotated, feathered or as a collage tile.

A CNN embedding, global or pooled over feature-map windows, describes a photo at one scale and
one orientation, so a photo pasted at 20-60% of another photo's side, possibly tilted, is far
from its entry (README "Local features": the best window-to-paste score is above every
unrelated photo's for 36-40% of the tuning pastes). Local features do not care: SIFT keypoints
(Lowe 2004) are scale- and rotation-invariant, the ratio test keeps distinctive matches, and a
RANSAC similarity transform between an entry's keypoints and the query's (OpenCV's
``estimateAffinePartial2D``) counts the matches that agree geometrically. Unrelated photos
rarely give more than 3-5 such inliers; a pasted copy gives tens.

* :func:`extract`: RootSIFT (Arandjelović and Zisserman 2012: SIFT L1-normalised, square-rooted)
  keypoints of a grey copy of at most ``side`` px, the ``count`` strongest.
* :class:`LocalIndex`: every entry's descriptors in one FLANN k-d tree; a query's descriptors
  are matched by the ratio test, the :data:`VERIFIED_ENTRIES` entries with most matches are
  verified by RANSAC, and :meth:`LocalIndex.verify` returns their inlier counts.
* :class:`BackgroundVerifier`: a screener's uploads verified on a thread of their own, ahead of
  their search, so the verification overlaps decoding, PDQ and the encoder.

Sizes and constants were chosen on photos-dev with the *tuning* paste implementations only
(``paste.anywhere``, ``paste.polaroid``; ``scripts/bench_local_features.py``, README "Local
features"). OpenCV (``cv2``) is installed with albumentations, a core dependency.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:
    import cv2


def _cv2() -> Any:
    """OpenCV, imported on first use: screening imports this module, and only deployments with
    local features on need cv2 (about 25 ms of start-up)."""
    import cv2

    return cv2


ENTRY_SIDE: Final = 256
"""Longest side (px) of the grey copy of a bank entry whose keypoints are stored."""
ENTRY_KEYPOINTS: Final = 128
"""Keypoints kept per entry (the strongest): 128 x 128 float32 = 64 KB held per entry."""
QUERY_SIDE: Final = 320
"""Longest side (px) of the grey copy of a query: a photo pasted at 20% of it is 64 px. OpenCV's
SIFT doubles the image for its first octave, which is most of the detection's cost, so the
side sets the cost more than the keypoint count does (README "Local features")."""
QUERY_KEYPOINTS: Final = 500
"""Keypoints kept per query (the strongest). Tuning pastes (``paste.anywhere``,
``paste.polaroid``, 120 each) verified above every negative, a throw-away sweep on photos-dev
against 60 entries: 0.91 / 0.91 at 320 px and 300 keypoints, 0.95 / 0.95 at 500, 0.97 / 0.96
at 600; 0.93 / 0.94 at 288 px and 500. CPU per query (extraction and verification, 250
entries, one thread): 27.0 ms at 300, 30.5 ms at 500, 32.7 ms at 600."""
RATIO: Final = 0.8
"""Lowe's ratio test: a match counts when its distance is below this share of the second
nearest descriptor's (of any entry)."""
MIN_MATCHES: Final = 4
"""Least ratio-test matches for an entry to be verified (a similarity needs 2; RANSAC
needs some redundancy)."""
REPROJECTION_PX: Final = 5.0
"""RANSAC inlier distance, in query pixels (of the :data:`QUERY_SIDE` copy)."""
RANSAC_ITERATIONS: Final = 500
"""RANSAC iterations per verified entry."""
VERIFIED_ENTRIES: Final = 5
"""Entries verified per query: those with most ratio-test matches (bounds RANSAC's cost)."""
FLANN_CHECKS: Final = 32
"""Leaves the FLANN k-d tree visits per query descriptor (more: slower, more exact)."""
CANDIDATE_INLIERS: Final = 8
"""Least inliers for a verified entry to become a candidate of the classifier stage (60
unrelated photos against 60 entries: at most 5)."""
SKIP_COSINE: Final = 0.78
"""A query whose best candidate already has this global cosine (the default policy's
``block_cosine``: the classifier's safety floor keeps such a match) gets no local features,
to save their CPU (about 25-30 ms per query). On the benchmark's main split 69% of the queries are
below it; in production, where most uploads match nothing, nearly all are. A gate at the
candidates' ``min_cosine`` (0.50, 22% of the queries) kept the throughput but lost most of the
recall: a paste's best candidate is often an unrelated entry above 0.50 (README "Local
features")."""
LOCAL_INDEX_MAX_ENTRIES: Final = 2_000
"""Most entries a :class:`LocalIndex` holds: 2,000 x 128 descriptors of 512 bytes is 131 MB of
RAM (plus the k-d trees). A bigger bank needs an approximate, compressed descriptor index."""


@dataclass(frozen=True)
class Keypoints:
    """Keypoints of one image: ``points`` float32 (n, 2) (x, y) in pixels of the grey copy they
    were found on, ``descriptors`` float32 (n, 128) RootSIFT unit rows."""

    points: npt.NDArray[np.float32]
    descriptors: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.points)


def grey_thumbnail(image: Image.Image, side: int) -> npt.NDArray[np.uint8]:
    """uint8 (h, w) grey copy of ``image``, its longest side at most ``side`` px (box filter)."""
    grey = image.convert("L")
    scale = side / max(grey.size)
    if scale < 1.0:
        size = (max(8, round(grey.width * scale)), max(8, round(grey.height * scale)))
        grey = grey.resize(size, Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.uint8)


def extract(image: Image.Image, side: int, count: int) -> Keypoints:
    """The ``count`` strongest SIFT keypoints of ``image`` seen at most ``side`` px, with
    RootSIFT descriptors (a flat image gives none).

    Raises:
        ValueError: ``side`` < 16 or ``count`` < 1.
    """
    if side < 16 or count < 1:
        raise ValueError(f"need side >= 16 and count >= 1, got {side}, {count}")
    sift = _cv2().SIFT_create(nfeatures=count)
    found, raw = sift.detectAndCompute(grey_thumbnail(image, side), None)
    if raw is None or not len(found):
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    found, raw = found[:count], np.asarray(raw[:count], np.float32)
    root = np.sqrt(raw / np.maximum(raw.sum(axis=1, keepdims=True), np.float32(1e-7)))
    points = np.array([k.pt for k in found], np.float32).reshape(-1, 2)
    return Keypoints(points, np.ascontiguousarray(root, dtype=np.float32))


def extract_query(image: Image.Image) -> Keypoints:
    """A query's keypoints, as screening and the training copies take them: :func:`extract`
    at :data:`QUERY_SIDE` and :data:`QUERY_KEYPOINTS`."""
    return extract(image, QUERY_SIDE, QUERY_KEYPOINTS)


def wanted(best_cosine: float | None) -> bool:
    """Whether a query whose best candidate cosine is ``best_cosine`` (None: no candidate)
    gets local features: below :data:`SKIP_COSINE`."""
    return best_cosine is None or best_cosine < SKIP_COSINE


class LocalIndex:
    """The keypoints of up to ``max_entries`` entries, searchable by a query's keypoints.

    Built once (a FLANN k-d forest over every entry's descriptors, about 1 s per 1,000 entries
    on one core); :meth:`verify` is thread-safe (one query at a time).

    Raises:
        ValueError: more than ``max_entries`` entries (the caller decides what to leave out).
    """

    def __init__(
        self, entries: Mapping[int, Keypoints], max_entries: int = LOCAL_INDEX_MAX_ENTRIES
    ) -> None:
        if len(entries) > max_entries:
            raise ValueError(f"{len(entries)} entries, more than the {max_entries} indexed")
        kept = [(eid, kp) for eid, kp in entries.items() if len(kp)]
        self.entry_ids = np.array([eid for eid, _ in kept], np.int64)
        self.owner = np.concatenate(
            [np.full(len(kp), at, np.int64) for at, (_, kp) in enumerate(kept)]
            or [np.zeros(0, np.int64)]
        )
        self.points = np.concatenate(
            [kp.points for _, kp in kept] or [np.zeros((0, 2), np.float32)]
        )
        self._lock = threading.Lock()
        self._matcher: cv2.FlannBasedMatcher | None = None
        if len(self.owner) >= 2:
            self._matcher = _cv2().FlannBasedMatcher(
                {"algorithm": 1, "trees": 4}, {"checks": FLANN_CHECKS}
            )
            self._matcher.add([np.concatenate([kp.descriptors for _, kp in kept])])
            self._matcher.train()

    def __len__(self) -> int:
        return len(self.entry_ids)

    def _matches(self, query: Keypoints) -> dict[int, list[tuple[int, int]]]:
        """Ratio-test matches per entry position: [(query keypoint, stored keypoint), ...]."""
        if self._matcher is None or len(query) < 2:
            return {}
        with self._lock:
            pairs = self._matcher.knnMatch(query.descriptors, k=2)
        per: dict[int, list[tuple[int, int]]] = {}
        for pair in pairs:
            if len(pair) == 2 and pair[0].distance < RATIO * pair[1].distance:
                stored = pair[0].trainIdx
                per.setdefault(int(self.owner[stored]), []).append((pair[0].queryIdx, stored))
        return per

    def verify(self, query: Keypoints, top: int = VERIFIED_ENTRIES) -> dict[int, int]:
        """Inlier counts {entry id: inliers} of the ``top`` entries with most ratio-test
        matches to ``query`` (at least :data:`MIN_MATCHES`), each the support of the RANSAC
        similarity transform (rotation, uniform scale, translation) from the entry's keypoints
        to the query's. Entries not verified are absent."""
        ranked = sorted(self._matches(query).items(), key=lambda kv: -len(kv[1]))
        out: dict[int, int] = {}
        for at, pairs in ranked[:top]:
            if len(pairs) < MIN_MATCHES:
                break
            src = self.points[[s for _, s in pairs]].astype(np.float32)
            dst = query.points[[q for q, _ in pairs]].astype(np.float32)
            cv = _cv2()
            transform, mask = cv.estimateAffinePartial2D(
                src,
                dst,
                method=cv.RANSAC,
                ransacReprojThreshold=REPROJECTION_PX,
                maxIters=RANSAC_ITERATIONS,
            )
            inliers = 0 if transform is None or mask is None else int(mask.sum())
            out[int(self.entry_ids[at])] = inliers
        return out


@dataclass(frozen=True)
class Verified:
    """A query's :meth:`LocalIndex.verify` result (``inliers``: {entry id: inliers}) and the
    ``index`` it came from (a blocklist update may have built another one since)."""

    index: LocalIndex
    inliers: dict[int, int]


class BackgroundVerifier:
    """Verifies queries against a :class:`LocalIndex` on one background thread: keypoints
    (:func:`extract_query`) and :meth:`LocalIndex.verify`. A screener starts each upload once
    it is decoded and hashed, so the work runs on a core that decoding, PDQ, embedding and the
    search leave idle (OpenCV releases the GIL), then takes the result only for a query its
    search wants it for (:func:`wanted`) and cancels the rest (``Future.cancel``; one already
    running finishes unused).

    The thread starts on the first :meth:`submit` and ends with the process or :meth:`close`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _verify(self, image: Image.Image, index: LocalIndex) -> Verified:
        return Verified(index, index.verify(extract_query(image)))

    def submit(self, image: Image.Image, index: LocalIndex) -> Future[Verified]:
        """``image`` verified against ``index``, to come (the future raises what
        :func:`extract_query` raises).

        Raises:
            RuntimeError: the interpreter is shutting down."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="local-features")
            return self._pool.submit(self._verify, image, index)

    def close(self) -> None:
        """Stop the thread (pending work is cancelled); a later :meth:`submit` starts another."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


DESCRIPTOR_DIM: Final = 128
"""Values per SIFT descriptor."""


def packed_rows(count: int, dim: int) -> int:
    """Rows of width ``dim`` that :func:`pack` writes for ``count`` keypoints: one row of
    coordinates, then ``dim // 128`` descriptors per row."""
    per = dim // DESCRIPTOR_DIM
    return 1 + -(-count // per)


def pack(keypoints: Keypoints, dim: int) -> npt.NDArray[np.float32]:
    """``keypoints`` as float32 (:func:`packed_rows`, ``dim``) rows, to be stored as an entry's
    region rows (:mod:`moderation.banks.paste_rows`): row 0 holds the count and the (x, y)
    pairs, the next rows ``dim // 128`` descriptors each, zero-padded. Values stay exact in
    float16 to about 0.1 px (coordinates < 256) and 5e-4 (descriptor values <= 1).

    Raises:
        ValueError: ``dim`` < 128, or the coordinates do not fit in one row (``dim`` < 1 + 2n).
    """
    n = len(keypoints)
    if dim < DESCRIPTOR_DIM or 1 + 2 * n > dim:
        raise ValueError(f"{n} keypoints do not pack into rows of {dim}")
    out = np.zeros((packed_rows(n, dim), dim), np.float32)
    out[0, 0] = n
    out[0, 1 : 1 + 2 * n] = keypoints.points.reshape(-1)
    per, used = dim // DESCRIPTOR_DIM, (dim // DESCRIPTOR_DIM) * DESCRIPTOR_DIM
    body = np.zeros(((len(out) - 1) * per, DESCRIPTOR_DIM), np.float32)
    body[:n] = keypoints.descriptors
    out[1:, :used] = body.reshape(len(out) - 1, used)
    return out


def unpack(rows: npt.ArrayLike) -> Keypoints:
    """The :class:`Keypoints` that :func:`pack` wrote into float (r, dim) ``rows`` (float16
    rows from a spilled row file are widened); no rows give none.

    Raises:
        ValueError: the rows are too few for the count in row 0.
    """
    matrix = np.asarray(rows, np.float32)
    if not len(matrix):
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_DIM), np.float32))
    n, dim = round(float(matrix[0, 0])), matrix.shape[1]
    if n < 0 or len(matrix) < packed_rows(n, dim) or 1 + 2 * n > dim:
        raise ValueError(f"{len(matrix)} rows of {dim} do not hold {n} packed keypoints")
    points = matrix[0, 1 : 1 + 2 * n].reshape(n, 2)
    used = (dim // DESCRIPTOR_DIM) * DESCRIPTOR_DIM
    descriptors = matrix[1:, :used].reshape(-1, DESCRIPTOR_DIM)[:n]
    return Keypoints(np.ascontiguousarray(points), np.ascontiguousarray(descriptors))
