"""Sharded cosine search (issue 16 item 3) without a broker: shard assignment, the merge, the
sharded index against an unsharded one, answers from another snapshot, the wire format, and the
Celery settings sharding adds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from moderation.banks.index import CosineIndex
from moderation.banks.shard_index import ShardedCosineIndex, answer_queries
from moderation.banks.shards import (
    MAX_QUERIES,
    ShardAnswer,
    ShardUnavailable,
    decode_queries,
    encode_queries,
    merge_hits,
    shard_of,
    shard_of_ids,
)
from moderation.config import ConfigurationError, Settings

MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The reference: Vigna's splitmix64.c ``next()`` for state ``x`` (one step), in Python
    integers."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> npt.NDArray[np.float32]:
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_shard_of_is_splitmix64_mod_s_and_stable() -> None:
    ids = [0, 1, 2, 41, 2**31, 2**40 + 7, 2**63 - 1]
    for shards in (1, 2, 3, 7):
        expected = [splitmix64(i) % shards for i in ids]
        assert shard_of_ids(np.asarray(ids, dtype=np.int64), shards).tolist() == expected
        assert [shard_of(i, shards) for i in ids] == expected
    assert set(shard_of_ids(np.arange(1000), 1).tolist()) == {0}


def test_sequential_ids_spread_evenly() -> None:
    """A bank import allocates ids in a run: each of 4 shards gets 25% +- 1% of 100,000."""
    counts = np.bincount(shard_of_ids(np.arange(1, 100_001), 4), minlength=4)
    assert counts.sum() == 100_000
    assert np.all(np.abs(counts / 100_000 - 0.25) < 0.01), counts


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_shard_count_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="shards"):
        shard_of_ids(np.arange(3), bad)  # type: ignore[arg-type]


def test_negative_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        shard_of_ids(np.asarray([3, -2]), 2)


def split(
    ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32], shards: int
) -> list[CosineIndex | None]:
    owner = shard_of_ids(ids, shards)
    return [
        CosineIndex.build(ids[owner == s], vectors[owner == s]) if np.any(owner == s) else None
        for s in range(shards)
    ]


def fan_out_over(
    parts: list[CosineIndex | None],
    snapshot_id: str | None = "snap",
    calls: list[int] | None = None,
) -> Callable[..., list[ShardAnswer]]:
    """An in-process ShardSearch over ``parts`` (what the Celery fan-out does across workers)."""

    def search(
        queries: npt.NDArray[np.float32], k: int, threshold: float, wanted: str | None
    ) -> list[ShardAnswer]:
        if calls is not None:
            calls.append(k)
        return [
            answer_queries(
                part,
                shard=s,
                snapshot_id=snapshot_id,
                version=3,
                queries=queries,
                k=k,
                threshold=threshold,
            )
            for s, part in enumerate(parts)
        ]

    search.shards = len(parts)  # type: ignore[attr-defined]
    return search


@pytest.mark.parametrize(("shards", "k", "threshold"), [(2, 5, -1.0), (3, 10, 0.1), (4, 1, 0.0)])
def test_merged_shards_equal_the_unsharded_search(shards: int, k: int, threshold: float) -> None:
    rng = np.random.default_rng(shards)
    ids = rng.choice(10**9, size=600, replace=False).astype(np.int64)
    vectors = unit_rows(rng, 600, 32)
    whole = CosineIndex.build(ids, vectors)
    # Queries near some entries, so thresholds above 0 still find hits.
    queries = vectors[:20] + 0.3 * unit_rows(rng, 20, 32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    sharded = ShardedCosineIndex.over(
        whole,
        fan_out_over(split(ids, vectors, shards)),
        "snap",
        3,  # type: ignore[arg-type]
    )
    got = sharded.search(queries, k, threshold)
    want = whole.search(queries, k, threshold)
    assert [[h.id for h in row] for row in got] == [[h.id for h in row] for row in want]
    for got_row, want_row in zip(got, want, strict=True):
        assert [h.score for h in got_row] == pytest.approx([h.score for h in want_row], abs=1e-5)
    assert sum(len(row) for row in got) > 0
    assert len(sharded) == len(whole) and sharded.shards == shards


def bank_over_shards(
    rng: np.random.Generator, n: int, shards: int
) -> tuple[CosineIndex, ShardedCosineIndex, list[int]]:
    """A bank of ``n`` random 16-d entries (ids 1..n), the same split over ``shards``, and the
    list of ``k`` each round trip to the shards asked for."""
    ids = np.arange(1, n + 1, dtype=np.int64)
    vectors = unit_rows(rng, n, 16)
    whole = CosineIndex.build(ids, vectors)
    calls: list[int] = []
    fan_out = fan_out_over(split(ids, vectors, shards), calls=calls)
    return whole, ShardedCosineIndex.over(whole, fan_out, "snap", 3), calls  # type: ignore[arg-type]


def test_nearest_comes_with_the_search_no_second_fan_out() -> None:
    rng = np.random.default_rng(7)
    whole, sharded, calls = bank_over_shards(rng, 200, 2)
    queries = unit_rows(rng, 3, 16)
    assert sharded.search(queries, 5, 0.99) == whole.search(queries, 5, 0.99)
    nearest = sharded.search(queries, 1, -1.0)
    assert calls == [5]  # answered from the first fan-out
    assert [[h.id for h in row] for row in nearest] == [
        [h.id for h in row] for row in whole.search(queries, 1, -1.0)
    ]
    sharded.search(unit_rows(rng, 3, 16), 1, -1.0)  # other queries: a new fan-out
    assert calls == [5, 1]


def test_one_round_trip_answers_a_batch_at_narrower_settings() -> None:
    """prefetch at (k=10, 0.2) serves each row's search at (k<=10, floor>=0.2) with the hits an
    unsharded search gives; a wider search makes a new round trip."""
    rng = np.random.default_rng(11)
    whole, sharded, calls = bank_over_shards(rng, 400, 3)
    vectors = whole.reconstruct(np.arange(1, 7))
    queries = vectors[:6] + 0.2 * unit_rows(rng, 6, 16)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    sharded.prefetch(queries, 10, 0.2)
    for row in range(6):
        for k, floor in ((10, 0.2), (3, 0.5), (1, -1.0)):
            (got,) = sharded.search(queries[row : row + 1], k, floor)
            (want,) = whole.search(queries[row : row + 1], k, floor)
            assert [h.id for h in got] == [h.id for h in want], (row, k, floor)
            assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    assert calls == [10]
    sharded.search(queries[:1], 20, 0.2)
    assert calls == [10, 20]


def test_a_missing_or_stale_shard_is_unavailable() -> None:
    rng = np.random.default_rng(3)
    ids = np.arange(1, 101, dtype=np.int64)
    vectors = unit_rows(rng, 100, 16)
    whole = CosineIndex.build(ids, vectors)
    parts = split(ids, vectors, 2)
    queries = vectors[:1]

    one_shard = fan_out_over(parts[:1])
    one_shard.shards = 2  # type: ignore[attr-defined]
    with pytest.raises(ShardUnavailable, match=r"shard\(s\) \[1\]"):
        ShardedCosineIndex.over(whole, one_shard, "snap", 3).search(queries, 5, 0.5)  # type: ignore[arg-type]

    older = fan_out_over(parts, snapshot_id="older")
    with pytest.raises(ShardUnavailable, match="shard 0 on v3"):
        ShardedCosineIndex.over(whole, older, "snap", 4).search(queries, 5, 0.5)  # type: ignore[arg-type]


def test_merge_keeps_the_best_k_ties_by_id() -> None:
    a = [[(5, 0.9), (2, 0.5)], []]
    b = [[(1, 0.9), (7, 0.8)], [(3, 0.1)]]
    assert merge_hits([a, b], 3) == [[(1, 0.9), (5, 0.9), (7, 0.8)], [(3, 0.1)]]
    assert merge_hits([], 3) == []
    with pytest.raises(ValueError, match="different numbers"):
        merge_hits([a, [[]]], 3)
    with pytest.raises(ValueError, match="k must"):
        merge_hits([a], 0)


def test_empty_shard_answers_empty() -> None:
    queries = unit_rows(np.random.default_rng(1), 2, 8)
    answer = answer_queries(
        None, shard=1, snapshot_id=None, version=0, queries=queries, k=3, threshold=0.0
    )
    assert answer.hits == [[], []] and answer.nearest == [None, None]


def test_queries_and_answers_survive_json() -> None:
    queries = unit_rows(np.random.default_rng(2), 3, 12)
    assert np.array_equal(decode_queries(encode_queries(queries)), queries)
    answer = ShardAnswer(1, "s", 4, [[(3, 0.75)], []], [(3, 0.75), None])
    assert ShardAnswer.from_json(answer.to_json()) == answer
    with pytest.raises(ValueError, match="malformed"):
        ShardAnswer.from_json({"shard": 1})


@pytest.mark.parametrize(
    "obj",
    [
        {"shape": [2, 4], "data": "AAAA"},
        {"shape": [0, 4], "data": ""},
        {"shape": [MAX_QUERIES + 1, 1], "data": "A" * 8},
        {"shape": [1, 1], "data": "not base64!"},
        {"data": ""},
    ],
)
def test_malformed_queries_are_refused(obj: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="shard queries"):
        decode_queries(obj)


def test_celery_settings_for_shards(settings: Settings) -> None:
    from workers.celery_app import celery_config

    one = celery_config(settings)
    assert one["result_backend"] is None
    assert [q.name for q in one["task_queues"]] == ["screening", "maintenance", "callbacks"]
    two = celery_config(
        settings.model_copy(update={"index_shards": 2, "broker_url": "redis://127.0.0.1:1/0"})
    )
    assert two["result_backend"] == "redis://127.0.0.1:1/0"
    assert [q.name for q in two["task_queues"]][-2:] == ["shard-0", "shard-1"]
    assert "workers.shards" in two["include"]
    with pytest.raises(ConfigurationError, match="needs Redis"):
        celery_config(settings.model_copy(update={"index_shards": 2}))
