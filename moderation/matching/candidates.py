"""Stage 1 of matching: the candidate entries of one upload, and the classifier stage's contract.

:func:`find_candidates` retrieves, for one upload's frames, the entries near it by cosine
similarity and by PDQ Hamming distance, merged per entry; a :class:`CandidateRefiner` (the
classifier stage, :mod:`moderation.matching.classifier.stage`) may then turn them into
calibrated copy probabilities before :mod:`moderation.matching.decision` applies the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from moderation.matching.policy import CandidateRules, Policy
from moderation.signals.local_features import CANDIDATE_INLIERS
from moderation.signals.pdq import PdqHash
from moderation.signals.vpdq import VpdqFeature, VpdqMatch

if TYPE_CHECKING:
    from moderation.banks.blocklist import Blocklist
    from moderation.banks.index.base import Hit
    from moderation.banks.records import EntryInfo  # annotations only: it imports SQLAlchemy


@dataclass(frozen=True)
class Scope:
    """Whose upload is screened (tenant isolation, :mod:`moderation.banks.tenancy`): the ids of
    the banks that may match it (None: every bank) and its client's policy (None: the
    screener's)."""

    banks: frozenset[int] | None = None
    policy: Policy | None = None

    def admits(self, info: EntryInfo | None) -> bool:
        """Whether ``info`` (an entry of the blocklist, or None when not in it) may match."""
        return info is not None and (self.banks is None or info.bank_id in self.banks)


EVERY_BANK = Scope()


class _Searchable(Protocol):
    def __len__(self) -> int: ...

    def search(self, queries: npt.ArrayLike, k: int, threshold: float) -> list[list[Hit]]: ...


def search_within(
    index: _Searchable,
    queries: npt.ArrayLike,
    k: int,
    threshold: float,
    keep: Callable[[int], bool],
) -> list[list[Hit]]:
    """Per query row, the best ``k`` hits whose id ``keep`` accepts: the search is widened
    (x4 each time, up to the whole index) while hits that are dropped fill all ``k`` slots, so
    another tenant's entries never crowd a client's own entries out of the top ``k``."""
    wanted = k
    while True:
        found = index.search(queries, wanted, threshold)
        kept = [[hit for hit in hits if keep(int(hit.id))] for hits in found]
        crowded = any(
            len(hits) >= wanted and len(mine) < k for hits, mine in zip(found, kept, strict=True)
        )
        if not crowded or wanted >= len(index):
            return [mine[:k] for mine in kept]
        wanted = min(len(index), wanted * 4)


@dataclass
class Candidate:
    """One entry retrieved for a query (merged over frames and signals)."""

    entry: EntryInfo
    cosine: float | None = None
    frame: int = 0
    pdq_distance: int | None = None
    # Best cosine of one of the query's feature-map windows to the entry, when a window
    # retrieved it (find_candidates' ``windows``).
    window_cosine: float | None = None
    probability: float | None = None
    features: dict[str, float] = field(default_factory=dict)
    signals: list[str] = field(default_factory=list)
    # The exact-hash kind (md5, sha1, sha256) whose keyed digest equals the upload's, if any.
    exact: str | None = None
    # A video upload against a vPDQ entry: the match percentages (moderation.banks.vpdq_scan).
    vpdq: VpdqMatch | None = None

    @property
    def ranking_score(self) -> float:
        """Probability when the classifier stage ran, else cosine (PDQ-only, vPDQ-only:
        proxies); an exact-hash match (a byte-identical file) ranks 1.0."""
        if self.exact is not None:
            return 1.0
        if self.probability is not None:
            return self.probability
        if self.cosine is not None:
            return self.cosine
        if self.pdq_distance is not None:
            return 1.0 - self.pdq_distance / 256.0
        assert self.vpdq is not None
        return self.vpdq.query_match_percent / 100.0


@dataclass(frozen=True)
class QueryContext:
    """What the classifier stage may look at for one upload."""

    frames: tuple[Image.Image, ...]
    vectors: npt.NDArray[np.float32]  # (f, d) float32, unit rows: one per frame
    pdq: tuple[tuple[PdqHash, ...], ...]  # per frame, the 8 dihedral variants
    # (f, w, d) float32 unit rows: each frame's feature-map windows; None when not computed.
    windows: npt.NDArray[np.float32] | None = None
    # RANSAC inliers per verified entry (moderation.signals.local_features); None: not computed.
    local: Mapping[int, int] | None = None


class CandidateRefiner(Protocol):
    """The classifier stage: turns candidates into calibrated copy probabilities."""

    version: str
    # Whether the screener should compute feature-map windows for it (QueryContext.windows).
    feature_windows: bool
    # Whether the screener should verify local features for it (QueryContext.local).
    local_features: bool

    def refine_batch(
        self, items: Sequence[tuple[QueryContext, list[Candidate]]], blocklist: Blocklist
    ) -> None:
        """Set ``probability`` (and ``features``/``signals``) on every candidate in place.

        Gets a whole screening batch at once, so extra embeddings (query regions) run batched.
        """


def exact_candidates(
    blocklist: Blocklist, keyed: Mapping[str, bytes], scope: Scope = EVERY_BANK
) -> list[Candidate]:
    """The entries (of the banks ``scope`` admits) whose exact hash equals one of the upload's
    keyed digests (kind -> 32 bytes, :func:`moderation.signals.exact.keyed_digests` under
    ``blocklist.exact_key``)."""
    found: dict[int, Candidate] = {}
    for entry_id, kind in blocklist.exact_matches(keyed):
        info = blocklist.entries.get(entry_id)
        if info is not None and scope.admits(info) and entry_id not in found:
            found[entry_id] = Candidate(entry=info, exact=kind, signals=[f"exact_{kind}"])
    return list(found.values())


def vpdq_candidates(
    blocklist: Blocklist,
    features: Sequence[VpdqFeature],
    rules: CandidateRules,
    scope: Scope = EVERY_BANK,
) -> list[Candidate]:
    """The vPDQ entries (of the banks ``scope`` admits) that share a matching frame with a
    video upload's vPDQ ``features``, at most ``rules.top_k``, highest query match percentage
    first (:meth:`moderation.banks.vpdq_scan.VpdqScan.search`)."""
    found = []
    for entry_id, match in blocklist.vpdq.search(features):
        info = blocklist.entries.get(entry_id)
        if scope.admits(info):
            assert info is not None
            found.append(Candidate(entry=info, vpdq=match))
            if len(found) == rules.top_k:
                break
    return found


def find_candidates(
    blocklist: Blocklist,
    rules: CandidateRules,
    vectors: npt.NDArray[np.float32],
    pdq: Sequence[Sequence[PdqHash]],
    exact: Sequence[Candidate] = (),
    scope: Scope = EVERY_BANK,
    windows: npt.NDArray[np.float32] | None = None,
    window_index: _Searchable | None = None,
) -> list[Candidate]:
    """Stage 1: the top-k entries per frame above ``rules.min_cosine`` plus the PDQ matches
    within ``rules.max_pdq_distance`` (over each frame's dihedral variants, both digests of
    quality >= ``rules.min_pdq_quality``) plus, given ``windows`` and ``window_index`` (the
    entries' paste descriptors, :func:`moderation.banks.paste_rows.paste_index`), each
    feature-map window's top ``rules.window_top_k`` entries at or above
    ``rules.min_window_cosine`` (one batched search; the candidate's ``window_cosine``), merged
    per entry, best cosine first.

    ``vectors`` is float32 (f, d), one unit row per frame; ``pdq`` the 8 variants per frame;
    ``windows`` float32 (f, w, d) unit rows (:mod:`moderation.signals.encoders.feature_windows`).
    Entries found only by PDQ get their cosine too, so every image entry has both signals;
    hash-list entries have no embedding and keep ``cosine`` None. ``exact`` (from
    :func:`exact_candidates`) are merged in. Only entries of the banks ``scope`` admits are
    candidates (:func:`search_within`).
    """
    found: dict[int, Candidate] = {c.entry.entry_id: c for c in exact}
    entries = blocklist.entries

    def keep(entry_id: int) -> bool:
        return scope.admits(entries.get(entry_id))

    hits_per_frame = search_within(blocklist.cosine, vectors, rules.top_k, rules.min_cosine, keep)
    for frame, hits in enumerate(hits_per_frame):
        for hit in hits:
            info = entries.get(hit.id)
            if info is None:
                continue
            cand = found.setdefault(hit.id, Candidate(entry=info))
            if cand.cosine is None or hit.score > cand.cosine:
                cand.cosine, cand.frame = float(hit.score), frame
    if windows is not None and windows.size and window_index is not None:
        _window_candidates(blocklist, window_index, rules, windows, found, keep)
    _pdq_candidates(blocklist, rules, pdq, found, keep)
    for cand in found.values():
        if cand.cosine is None and blocklist.has_vector(cand.entry.entry_id):
            sims = vectors @ blocklist.vector_of(cand.entry.entry_id)
            cand.frame = int(np.argmax(sims))
            cand.cosine = float(sims[cand.frame])
    return sorted(found.values(), key=lambda c: -(c.cosine or -1.0))


def merge_verified(
    blocklist: Blocklist,
    found: list[Candidate],
    vectors: npt.NDArray[np.float32],
    local: Mapping[int, int],
    scope: Scope = EVERY_BANK,
) -> list[Candidate]:
    """``found`` plus the entries that local features verified with at least
    :data:`~moderation.signals.local_features.CANDIDATE_INLIERS` inliers (``local``: inliers
    per entry id, :meth:`~moderation.signals.local_features.LocalIndex.verify`) and ``scope``
    admits, each new one with its cosine to the best of ``vectors`` (float32 (f, d)), best
    cosine first."""
    have = {c.entry.entry_id for c in found}
    added = []
    for entry_id, inliers in local.items():
        info = blocklist.entries.get(entry_id)
        if entry_id in have or inliers < CANDIDATE_INLIERS or info is None:
            continue
        if not scope.admits(info) or not blocklist.has_vector(entry_id):
            continue
        sims = vectors @ blocklist.vector_of(entry_id)
        frame = int(np.argmax(sims))
        added.append(Candidate(entry=info, cosine=float(sims[frame]), frame=frame))
    if not added:
        return found
    return sorted([*found, *added], key=lambda c: -(c.cosine or -1.0))


def pdq_query_rows(variants: Sequence[PdqHash], min_quality: int) -> npt.NDArray[np.uint8] | None:
    """uint8 (n, 32) digests of the ``variants`` (a frame's dihedral PDQ hashes) of quality
    >= ``min_quality``, as rows for a Hamming index search; None when none is."""
    usable = [v for v in variants if v.quality >= min_quality]
    if not usable:
        return None
    return np.stack([np.frombuffer(v.digest, np.uint8) for v in usable])


def _pdq_candidates(
    blocklist: Blocklist,
    rules: CandidateRules,
    pdq: Sequence[Sequence[PdqHash]],
    found: dict[int, Candidate],
    keep: Callable[[int], bool],
) -> None:
    """Add to ``found`` the PDQ matches within ``rules.max_pdq_distance`` of each frame's
    dihedral variants (``pdq``: 8 per frame), both digests of quality >=
    ``rules.min_pdq_quality``; an entry's least Hamming distance is kept."""
    entries = blocklist.entries
    for frame, variants in enumerate(pdq):
        queries = pdq_query_rows(variants, rules.min_pdq_quality)
        if queries is None:
            continue
        for hits in search_within(
            blocklist.pdq, queries, rules.top_k, rules.max_pdq_distance, keep
        ):
            for hit in hits:
                info = entries.get(hit.id)
                if info is None:
                    continue
                _, quality = blocklist.pdq_of(hit.id)
                if quality < rules.min_pdq_quality:
                    continue
                cand = found.setdefault(hit.id, Candidate(entry=info, frame=frame))
                distance = int(hit.score)
                if cand.pdq_distance is None or distance < cand.pdq_distance:
                    cand.pdq_distance = distance


def _window_candidates(
    blocklist: Blocklist,
    index: _Searchable,
    rules: CandidateRules,
    windows: npt.NDArray[np.float32],
    found: dict[int, Candidate],
    keep: Callable[[int], bool],
) -> None:
    """Merge the entries whose paste descriptors ``windows`` (f, w, d) retrieve into
    ``found``, in place: each keeps its best window cosine (and, when new, the frame of that
    window)."""
    per_frame = windows.shape[1]
    rows = windows.reshape(-1, windows.shape[-1])
    hits_per_row = search_within(index, rows, rules.window_top_k, rules.min_window_cosine, keep)
    for row, hits in enumerate(hits_per_row):
        for hit in hits:
            info = blocklist.entries.get(hit.id)
            if info is None:
                continue
            cand = found.setdefault(hit.id, Candidate(entry=info, frame=row // per_frame))
            if cand.window_cosine is None or hit.score > cand.window_cosine:
                cand.window_cosine = float(hit.score)
