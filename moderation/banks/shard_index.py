"""The FAISS side of sharding (:mod:`moderation.banks.shards`): a shard's answer to a search,
and the screening worker's :class:`ShardedCosineIndex`, whose searches go to the shards."""

from __future__ import annotations

import hashlib

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


class ShardedCosineIndex(CosineIndex):
    """A :class:`CosineIndex` whose ``search`` goes to the shards (:class:`ShardSearch`); its
    size and ``reconstruct`` (the classifier stage's stored vectors) are the local snapshot's.
    Build it with :meth:`over`."""

    _fan_out: ShardSearch
    _snapshot: tuple[str | None, int]
    _nearest: tuple[bytes, list[list[Hit]]] | None

    @classmethod
    def over(
        cls, local: CosineIndex, fan_out: ShardSearch, snapshot_id: str | None, version: int
    ) -> ShardedCosineIndex:
        """Wrap ``local`` (the loaded snapshot's index, shared, not copied) so that searches
        go to ``fan_out``'s shards, which must serve snapshot ``snapshot_id``/``version``."""
        index = cls.__new__(cls)
        index.__dict__.update(vars(local))
        index._fan_out, index._snapshot, index._nearest = fan_out, (snapshot_id, version), None
        return index

    @property
    def shards(self) -> int:
        """Number of shards searched."""
        return self._fan_out.shards

    def search(self, queries: npt.ArrayLike, k: int, threshold: float) -> list[list[Hit]]:
        """Hits with cosine >= ``threshold``, best first, at most ``k`` per query, merged over
        every shard; a top-1 search at threshold -1 for the queries just searched (drift's
        nearest entry) is answered from the shards' last answers.

        Raises:
            ShardUnavailable: see :func:`check_answers`.
            ValueError: malformed queries, ``k`` or threshold.
        """
        matrix = self._vectors(queries, "queries")
        k = check_k(k)
        floor = check_threshold(threshold, -1.0, 1.0, "cosine")
        key = hashlib.blake2b(matrix.tobytes(), digest_size=16).digest()
        if k == 1 and floor == -1.0 and self._nearest is not None and self._nearest[0] == key:
            return [list(row) for row in self._nearest[1]]
        snapshot_id, version = self._snapshot
        answers = check_answers(
            self._fan_out(matrix, k, floor, snapshot_id), self.shards, snapshot_id, version
        )
        nearest = merge_hits([[[h] if h else [] for h in a.nearest] for a in answers], 1)
        self._nearest = (key, _hits(nearest))
        return _hits(merge_hits([a.hits for a in answers], k))

    def use_gpu(self, *, gpus: int | None = None) -> bool:
        """Searches run on the shards: never here."""
        return False


def _hits(rows: list[list[tuple[int, float]]]) -> list[list[Hit]]:
    return [[Hit(i, s) for i, s in row] for row in rows]
