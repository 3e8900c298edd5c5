"""The cosine index split into shards held by separate worker groups (issue 16 item 3).

With ``index_shards = S > 1`` every active entry with an embedding belongs to exactly one shard,
``shard_of(entry_id) = splitmix64(entry_id) mod S``: a stable hash, so an entry never moves
while S is unchanged, and ids allocated in runs (one bank import) spread evenly. A shard worker
(``moderation worker --shard i``) builds the cosine index of its shard only
(:func:`moderation.banks.shard_loading.load_shard`); a screening worker keeps the rest of the
snapshot (entry metadata, PDQ, the vectors the classifier stage reads) and searches cosine
through a :class:`~moderation.banks.shard_index.ShardedCosineIndex`, whose ``search`` sends
the upload's embeddings to every shard (a :class:`ShardSearch`, the Celery fan-out in
``workers/shards.py``) and merges their
hits: top ``k`` by cosine similarity over the union, which equals the unsharded top ``k``
because every shard returns its own top ``k`` above the same threshold.

Fail closed: an answer missing (a shard down, past the bounded wait) or one from another
snapshot raises :class:`ShardUnavailable`; the upload is retried later, never decided on part
of the blocklist.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

# splitmix64's increment and finaliser multipliers (Steele, Lea & Flood, "Fast splittable
# pseudorandom number generators", OOPSLA 2014; constants as in Vigna's splitmix64.c).
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX2: Final = np.uint64(0x94D049BB133111EB)
#: One hit as it travels between workers: (entry id, cosine similarity).
Pair: TypeAlias = tuple[int, float]
# Most queries (frames) one shard request may carry: an animation's or video's screened frames.
MAX_QUERIES: Final = 1024


class ShardUnavailable(Exception):
    """A shard did not answer in time, or answered from another snapshot: retry the upload."""


def shard_of_ids(ids: npt.ArrayLike, shards: int) -> npt.NDArray[np.int64]:
    """The shard (0 .. ``shards`` - 1) of each entry id: splitmix64 of the id, modulo ``shards``.

    Args:
        ids: ``(n,)`` non-negative integer entry ids.
        shards: number of shards, at least 1.

    Returns:
        ``(n,)`` int64 shard numbers.

    Raises:
        ValueError: ``shards`` < 1, or ids that are not non-negative integers.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
    arr = np.asarray(ids)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or int(arr.min()) < 0):
        raise ValueError("entry ids must be non-negative integers")
    z = arr.astype(np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the algorithm
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(shards)).astype(np.int64)


def shard_of(entry_id: int, shards: int) -> int:
    """The shard of one entry id (see :func:`shard_of_ids`)."""
    return int(shard_of_ids(np.asarray([entry_id], dtype=np.int64), shards)[0])


def merge_hits(parts: Sequence[Sequence[Sequence[Pair]]], k: int) -> list[list[Pair]]:
    """Merge the shards' hits: per query, the best ``k`` (entry id, cosine) pairs by cosine
    similarity, ties by id (as :meth:`~moderation.banks.index.CosineIndex.search` orders them).

    Args:
        parts: one element per shard, each ``q`` lists of pairs (every shard the same ``q``).
        k: hits kept per query, at least 1.

    Raises:
        ValueError: shards disagree on the number of queries, or ``k`` < 1.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not parts:
        return []
    counts = {len(part) for part in parts}
    if len(counts) != 1:
        raise ValueError(f"shards answered for different numbers of queries: {sorted(counts)}")
    merged: list[list[Pair]] = []
    for per_query in zip(*parts, strict=True):
        hits = [hit for shard_hits in per_query for hit in shard_hits]
        hits.sort(key=lambda h: (-h[1], h[0]))
        merged.append(hits[:k])
    return merged


def encode_queries(matrix: npt.NDArray[np.float32]) -> dict[str, Any]:
    """A float32 ``(q, d)`` matrix as JSON-safe data (Celery sends JSON only)."""
    data = np.ascontiguousarray(matrix, dtype=np.float32)
    return {"shape": list(data.shape), "data": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_queries(obj: Mapping[str, Any]) -> npt.NDArray[np.float32]:
    """The inverse of :func:`encode_queries`: float32 ``(q, d)``.

    Raises:
        ValueError: malformed data, a shape that does not match it, or more than
            :data:`MAX_QUERIES` rows.
    """
    try:
        rows, dim = (int(v) for v in obj["shape"])
        raw = base64.b64decode(obj["data"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed shard queries: {exc}") from exc
    if not 1 <= rows <= MAX_QUERIES or dim < 1 or len(raw) != rows * dim * 4:
        raise ValueError(f"shard queries of shape ({rows}, {dim}) do not match their data")
    return np.frombuffer(raw, dtype=np.float32).reshape(rows, dim)


@dataclass(frozen=True)
class ShardAnswer:
    """One shard's answer: which snapshot it searched, its hits (``q`` lists of (entry id,
    cosine) pairs, best first, at most ``k`` each, cosine >= the threshold) and the nearest
    entry per query at any cosine (None: the shard is empty), which drift monitoring reads
    without a second fan-out."""

    shard: int
    snapshot_id: str | None
    version: int
    hits: list[list[Pair]]
    nearest: list[Pair | None]

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (the shard task's return value)."""
        return {
            "shard": self.shard,
            "snapshot_id": self.snapshot_id,
            "version": self.version,
            "hits": [[list(h) for h in row] for row in self.hits],
            "nearest": [None if h is None else list(h) for h in self.nearest],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardAnswer:
        """Parse :meth:`to_json` output. Raises ValueError when malformed."""
        try:
            return cls(
                shard=int(data["shard"]),
                snapshot_id=None if data["snapshot_id"] is None else str(data["snapshot_id"]),
                version=int(data["version"]),
                hits=[[(int(i), float(s)) for i, s in row] for row in data["hits"]],
                nearest=[None if h is None else (int(h[0]), float(h[1])) for h in data["nearest"]],
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"malformed shard answer: {exc}") from exc


class ShardSearch(Protocol):
    """Sends one search to every shard and gathers the answers (``workers/shards.py``)."""

    shards: int

    def __call__(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        threshold: float,
        snapshot_id: str | None,
    ) -> list[ShardAnswer]:
        """Every shard's answer for float32 ``(q, d)`` ``queries``, in any order.

        Raises:
            ShardUnavailable: a shard did not answer within the bounded wait (names it).
        """


def check_answers(
    answers: Sequence[ShardAnswer], shards: int, snapshot_id: str | None, version: int
) -> list[ShardAnswer]:
    """The answers ordered by shard, once every shard answered from snapshot ``snapshot_id``.

    Raises:
        ShardUnavailable: a shard is missing or answered from another snapshot version.
    """
    by_shard = {a.shard: a for a in answers}
    missing = [i for i in range(shards) if i not in by_shard]
    if missing:
        raise ShardUnavailable(f"no answer from shard(s) {missing} of {shards}")
    stale = [a for a in by_shard.values() if a.snapshot_id != snapshot_id]
    if stale:
        shown = ", ".join(f"shard {a.shard} on v{a.version}" for a in stale)
        raise ShardUnavailable(f"{shown}; this worker screens with v{version}")
    return [by_shard[i] for i in range(shards)]
