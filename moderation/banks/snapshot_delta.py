"""Delta snapshot payloads: one bank change as a new segment plus tombstones.

A delta version holds what one change added and removed, not the whole bank, so writing it
and applying it take time proportional to the change. Its file is an ordinary snapshot file
(:mod:`moderation.banks.snapshot`: same envelope, key context, version sequence and digest);
only the payload inside differs. A delta payload is a snapshot payload
(:mod:`moderation.banks.snapshot_payload`, never with a stored cosine index) of the added
entries, the *segment*, plus:

======================  =================  ===============================================
field                   dtype, shape       meaning
======================  =================  ===============================================
``tombstones``          int64 (t,)         entries removed from the bank by this change
meta ``kind``           ``"delta"``        a full payload has no ``kind``
meta ``base_version``   int                the version this delta applies on top of
======================  =================  ===============================================

The payload is authenticated with the file (AES-GCM), so ``base_version`` cannot be altered:
a delta applies only on top of its base version, in order (:mod:`moderation.banks.delta_chain`
refuses anything else). The bank at a delta version is its chain composed
(:func:`compose`): the full version the chain starts from, then each delta's tombstones
removed and its segment appended, oldest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from moderation.banks.hash_entries import HashEntries
from moderation.banks.payload import Buffer, decode_payload, encode_payload
from moderation.banks.snapshot_payload import EntrySignals, Payload

DELTA_KIND: Final = "delta"


@dataclass
class DeltaPayload:
    """A decrypted delta payload (see the module docstring).

    ``segment``: the added entries (image entries and hash-list entries) with their active
    masks; ``tombstones``: int64 (t,) ids of the entries this change removed.
    """

    base_version: int
    segment: Payload
    tombstones: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def of_change(
        cls,
        base_version: int,
        encoder_id: str,
        dim: int,
        *,
        added: Sequence[EntrySignals] = (),
        added_hashes: HashEntries | None = None,
        tombstones: Sequence[int] = (),
    ) -> DeltaPayload:
        """The delta of one change; every added entry active (the writer sets the masks)."""
        segment = Payload.empty(encoder_id, dim).with_added(added)
        if added_hashes is not None:
            segment.hashes = segment.hashes.with_added(added_hashes)
        return cls(base_version, segment, np.asarray(tombstones, np.int64).reshape(-1))

    def to_bytes(self) -> bytes:
        """Serialise (no pickle) for encryption."""
        if self.segment.cosine_index is not None or self.segment.vectors_in_index:
            raise ValueError("a delta's segment never carries a stored cosine index")
        arrays, meta = self.segment.encode_parts()
        arrays["tombstones"] = self.tombstones
        meta = {**meta, "kind": DELTA_KIND, "base_version": self.base_version}
        return encode_payload(arrays, meta)

    @classmethod
    def from_bytes(cls, data: Buffer) -> DeltaPayload:
        """Parse a decrypted delta payload.

        Raises:
            ValueError: not a delta payload (a full one included), or inconsistent arrays.
        """
        arrays, meta = decode_payload(data)
        if meta.get("kind") != DELTA_KIND:
            raise ValueError("not a delta payload (a full snapshot's, or corrupted)")
        base = meta.get("base_version")
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise ValueError(f"delta base_version {base!r} is not a version number")
        if "tombstones" not in arrays or "cosine_index" in arrays:
            raise ValueError("a delta payload has tombstones and no stored cosine index")
        tombstones = arrays.pop("tombstones").astype(np.int64, copy=False).reshape(-1)
        rest = {k: v for k, v in meta.items() if k not in {"kind", "base_version"}}
        return cls(base, Payload.from_decoded(arrays, rest), tombstones)

    def __len__(self) -> int:
        """Entries added plus entries removed."""
        return len(self.segment.entry_ids) + len(self.segment.hashes) + len(self.tombstones)


def concat(first: Payload, second: Payload) -> Payload:
    """``first``'s entries followed by ``second``'s (ids must not overlap), full vectors."""
    if first.dim != second.dim:
        raise ValueError(f"payload widths differ: {first.dim} and {second.dim}")
    vectors = [first.full_vectors(), second.full_vectors()]
    return Payload(
        encoder_id=first.encoder_id,
        dim=first.dim,
        entry_ids=np.concatenate([first.entry_ids, second.entry_ids]),
        vectors=np.concatenate(vectors) if len(second.entry_ids) else vectors[0],
        pdq=np.concatenate([first.pdq, second.pdq]),
        pdq_quality=np.concatenate([first.pdq_quality, second.pdq_quality]),
        active=np.concatenate([first.active, second.active]),
        region_entry_ids=np.concatenate([first.region_entry_ids, second.region_entry_ids]),
        region_vectors=np.concatenate([first.region_vectors, second.region_vectors]),
        extra_meta=dict(first.extra_meta),
        hashes=first.hashes.with_added(second.hashes),
    )


def compose(base: Payload, deltas: Sequence[DeltaPayload]) -> Payload:
    """The bank after ``deltas`` (oldest first) on top of ``base``: their segments merged among
    themselves first (time proportional to the deltas), then applied to ``base`` in one pass.

    The result holds full vectors and no stored index. Raises ValueError when a segment's
    width differs from ``base``'s.
    """
    if not deltas:
        return base
    segment = Payload.empty(base.encoder_id, base.dim)
    # As wide as the base's arrays: zero-wide when read without embeddings.
    segment.vectors = np.zeros((0, base.vectors.shape[1]), np.float32)
    segment.region_vectors = np.zeros((0, base.region_vectors.shape[1]), np.float32)
    tombstones: list[Any] = []
    for delta in deltas:
        # A later delta may remove an entry an earlier one added.
        segment = concat(segment.without(delta.tombstones.tolist()), delta.segment)
        tombstones.append(delta.tombstones)
    gone = np.unique(np.concatenate(tombstones))
    return concat(base.without(gone.tolist()), segment)


def without_embeddings(payload: Payload) -> Payload:
    """``payload`` with zero-width embedding arrays, float32 (n, 0) and (m, 0), and no stored
    index: for readers of PDQ digests, exact hashes and active masks only (the web tier's hash
    lookup), which then compose a chain without decoding any embedding."""
    return replace(
        payload,
        vectors=np.zeros((len(payload.entry_ids), 0), np.float32),
        region_vectors=np.zeros((len(payload.region_entry_ids), 0), np.float32),
        cosine_index=None,
        vectors_in_index=False,
    )
