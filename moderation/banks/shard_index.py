"""The FAISS side of sharding (:mod:`moderation.banks.shards`): a shard's answer to a search,
and the screening worker's :class:`ShardedCosineIndex`, whose searches go to the shards."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moderation.banks.index import CosineIndex, Hit
from moderation.banks.index.base import check_k, check_threshold
from moderation.banks.shards import ShardAnswer, ShardSearch, check_answers, merge_hits


def answer_queries(
    index: CosineIndex | None,
    *,
    shard: int,
    snapshot_id: str | None,
    version: int,
    queries: npt.NDArray[np.float32],
    k: int,
    threshold: float,
) -> ShardAnswer:
    """Search one shard's index (None: the shard holds no entry) for ``queries`` (float32
    ``(q, d)``, unit rows): the top ``k`` per query with cosine >= ``threshold``, and the
    nearest entry per query.

    Raises:
        ValueError: malformed queries, ``k`` or threshold.
    """
    rows = queries.shape[0]
    if index is None or len(index) == 0:
        return ShardAnswer(shard, snapshot_id, version, [[] for _ in range(rows)], [None] * rows)
    hits = [[(h.id, h.score) for h in row] for row in index.search(queries, k, threshold)]
    nearest = [(row[0].id, row[0].score) if row else None for row in index.search(queries, 1, -1.0)]
    return ShardAnswer(shard, snapshot_id, version, hits, nearest)


@dataclass(frozen=True)
class _Answered:
    """One query row's merged answer: its top ``k`` with cosine >= ``floor``, and its nearest
    entry at any cosine (None: no entry at all)."""

    k: int
    floor: float
    hits: list[Hit]
    nearest: Hit | None

    def serves(self, k: int, floor: float) -> bool:
        """Whether the top ``k`` at ``floor`` follow from this answer: a prefix of its hits
        when ``k`` <= its ``k`` and ``floor`` >= its floor; the nearest entry at floor -1."""
        return (k <= self.k and floor >= self.floor) or (k == 1 and floor == -1.0)

    def top(self, k: int, floor: float) -> list[Hit]:
        """The top ``k`` at ``floor`` (when :meth:`serves` them)."""
        if k == 1 and floor == -1.0:
            return [] if self.nearest is None else [self.nearest]
        return [hit for hit in self.hits if hit.score >= floor][:k]


class ShardedCosineIndex(CosineIndex):
    """A :class:`CosineIndex` whose ``search`` goes to the shards (:class:`ShardSearch`); its
    size and ``reconstruct`` (the classifier stage's stored vectors) are the local snapshot's.
    Build it with :meth:`over`.

    The last round trip's answers are kept per query row, so a screening batch makes one
    round trip (:meth:`prefetch`), and the drift monitor's top-1 search of rows just searched
    makes none.
    """

    _fan_out: ShardSearch
    _snapshot: tuple[str | None, int]
    _answered: dict[bytes, _Answered]

    @classmethod
    def over(
        cls, local: CosineIndex, fan_out: ShardSearch, snapshot_id: str | None, version: int
    ) -> ShardedCosineIndex:
        """Wrap ``local`` (the loaded snapshot's index, shared, not copied) so that searches
        go to ``fan_out``'s shards, which must serve snapshot ``snapshot_id``/``version``."""
        index = cls.__new__(cls)
        index.__dict__.update(vars(local))
        index._fan_out, index._snapshot, index._answered = fan_out, (snapshot_id, version), {}
        return index

    @property
    def shards(self) -> int:
        """Number of shards searched."""
        return self._fan_out.shards

    def prefetch(self, queries: npt.ArrayLike, k: int, threshold: float) -> None:
        """Search every row of float32 ``(q, d)`` ``queries`` in one round trip to the shards;
        later searches of these rows with at most ``k`` hits at ``threshold`` or above are
        answered from it.

        Raises:
            ShardUnavailable: see :func:`check_answers`.
            ValueError: malformed queries, ``k`` or threshold.
        """
        matrix = self._vectors(queries, "queries")
        self._ask(matrix, check_k(k), check_threshold(threshold, -1.0, 1.0, "cosine"))

    def search(self, queries: npt.ArrayLike, k: int, threshold: float) -> list[list[Hit]]:
        """Hits with cosine >= ``threshold``, best first, at most ``k`` per query, merged over
        every shard (from the last round trip when it answered these rows).

        Raises:
            ShardUnavailable: see :func:`check_answers`.
            ValueError: malformed queries, ``k`` or threshold.
        """
        matrix = self._vectors(queries, "queries")
        k = check_k(k)
        floor = check_threshold(threshold, -1.0, 1.0, "cosine")
        keys = [_row_key(row) for row in matrix]
        known = [self._answered.get(key) for key in keys]
        if not all(a is not None and a.serves(k, floor) for a in known):
            answered = self._ask(matrix, k, floor)
            known = [answered[key] for key in keys]
        return [a.top(k, floor) for a in known if a is not None]

    def _ask(self, matrix: npt.NDArray[np.float32], k: int, floor: float) -> dict[bytes, _Answered]:
        """One round trip for ``matrix``'s rows; their answers replace the kept ones."""
        snapshot_id, version = self._snapshot
        answers = check_answers(
            self._fan_out(matrix, k, floor, snapshot_id), self.shards, snapshot_id, version
        )
        hits = _hits(merge_hits([a.hits for a in answers], k))
        nearest = _hits(merge_hits([[[h] if h else [] for h in a.nearest] for a in answers], 1))
        self._answered = {
            _row_key(row): _Answered(k, floor, row_hits, row_nearest[0] if row_nearest else None)
            for row, row_hits, row_nearest in zip(matrix, hits, nearest, strict=True)
        }
        return self._answered

    def serves_version(self, snapshot_id: str | None, version: int) -> None:
        """Ask the shards for snapshot ``snapshot_id`` / ``version`` from now on (the
        blocklist applied a delta in place); the kept answers, of the previous version, go.
        Shards still on the previous version are refused as stale until they load this one."""
        self._snapshot, self._answered = (snapshot_id, version), {}

    def use_gpu(self, *, gpus: int | None = None) -> bool:
        """Searches run on the shards: never here."""
        return False


def _row_key(row: npt.NDArray[np.float32]) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


def _hits(rows: list[list[tuple[int, float]]]) -> list[list[Hit]]:
    return [[Hit(i, s) for i, s in row] for row in rows]
