"""Hash lookup without the encoder: PDQ, vPDQ and exact-hash matching over the current snapshot.

What an HMA-style matcher API needs (look a PDQ, vPDQ or MD5/SHA-1/SHA-256 up, hash an uploaded
photo or video) touches no embedding, so this module builds its index from the snapshot payload
alone (:func:`moderation.banks.versions.read_payload`): the PDQ digests of active image and
hash-list entries with quality >= :data:`~moderation.signals.pdq.PDQ_MIN_QUALITY` in a
:class:`~moderation.banks.pdq_scan.PdqScan` (the answers of a
:class:`~moderation.banks.index.HammingIndex`, without FAISS), the vPDQ signatures of active
hash-list entries in a :class:`~moderation.banks.vpdq_scan.VpdqScan` (matches as
python-threatexchange's ``VPDQIndex`` returns them: query match >= 80 %), and the keyed exact hashes
of active hash-list entries in a table, as :class:`moderation.banks.blocklist.Blocklist` holds them.
Neither the encoder, torch nor FAISS is loaded, so a web process can answer lookups.

:class:`HashLookupCache` keeps one :class:`HashLookup` per process and rebuilds it when the
snapshot version changes (one ``SELECT`` of the newest version per lookup).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
from sqlalchemy.orm import Session

from moderation.banks.hash_entries import UNKNOWN_QUALITY
from moderation.banks.hashlists.records import LIST_SIGNAL_TYPES, SIGNAL_TYPES, check_value
from moderation.banks.hashlists.te import TE_SIGNAL_TYPES
from moderation.banks.pdq_scan import PdqScan
from moderation.banks.records import entry_infos
from moderation.banks.versions import current_snapshot, read_payload, snapshot_exact_key
from moderation.banks.vpdq_scan import VpdqScan
from moderation.crypto.keys import KeyRing
from moderation.media.decode import DecodeLimits, decode_image
from moderation.signals.exact import EXACT_KINDS, digests, keyed
from moderation.signals.pdq import PDQ_MATCH_DISTANCE, PDQ_MIN_QUALITY, pdq_hash
from moderation.signals.vpdq import VpdqCollector, VpdqMatch, parse_signal_str, to_signal_str

if TYPE_CHECKING:
    from moderation.media.video import VideoLimits

#: Most PDQ matches returned for one lookup (HMA returns every match within the threshold; a
#: bound keeps one query from returning a whole bank of near-identical entries).
MAX_PDQ_MATCHES = 1000


class InvalidSignalError(ValueError):
    """An unsupported signal type or a malformed signal value (the message says which)."""


@dataclass(frozen=True)
class HashMatch:
    """One entry matching a looked-up signal.

    ``distance``: Hamming distance in bits (0-256) for PDQ, 0 for an exact hash or vPDQ;
    ``vpdq``: a vPDQ match's query and compared match percentages.
    """

    entry_id: int
    bank: str
    distance: int
    vpdq: VpdqMatch | None = None

    @property
    def distance_str(self) -> str:
        """HMA's ``distance`` (``SignalSimilarityInfo.pretty_str``): the Hamming distance, or
        for vPDQ ``"<query>%[<compared>%]"`` rounded to whole percents
        (python-threatexchange ``VPDQSimilarityInfo.pretty_str``)."""
        if self.vpdq is None:
            return str(self.distance)
        vpdq = self.vpdq
        return f"{vpdq.query_match_percent:.0f}%[{vpdq.compared_match_percent:.0f}%]"


def canonical_signal_type(name: str) -> str:
    """The canonical signal type (:data:`moderation.banks.hashlists.records.LIST_SIGNAL_TYPES`)
    of ``name``,
    which may be a ThreatExchange name (``video_md5`` is ``md5``).

    Raises:
        InvalidSignalError: an unsupported signal type.
    """
    kind = TE_SIGNAL_TYPES.get(name)
    if kind is None:
        raise InvalidSignalError(
            f"No such SignalType '{name}' (supported: {', '.join(LIST_SIGNAL_TYPES)})"
        )
    return kind


def hash_content(
    data: bytes, limits: DecodeLimits, signal_types: Collection[str] = SIGNAL_TYPES
) -> dict[str, str]:
    """The signals of an uploaded photo: canonical signal type -> lowercase hex.

    PDQ is computed on the first decoded frame, upright (EXIF orientation applied), as
    screening does; the exact hashes over the file's bytes. Only ``signal_types`` are computed
    (the photo is decoded only when PDQ is among them).

    Raises:
        moderation.media.decode.UnscannableImage: PDQ was asked for and the file cannot be
            decoded within ``limits``.
    """
    found: dict[str, str] = {}
    if "pdq" in signal_types:
        found["pdq"] = pdq_hash(decode_image(data, limits).frames[0]).hex
    return found | _exact_hashes(data, signal_types)


def _exact_hashes(data: bytes, signal_types: Collection[str]) -> dict[str, str]:
    """The exact hashes among ``signal_types`` of ``data``'s bytes, lowercase hex."""
    return {kind: d.hex() for kind, d in digests(data).items() if kind in signal_types}


#: What :func:`hash_video_content` computes: the vPDQ signature and the exact hashes.
VIDEO_SIGNAL_TYPES: Final = ("vpdq", "md5", "sha1", "sha256")


def hash_video_content(
    data: bytes, limits: VideoLimits, signal_types: Collection[str] = VIDEO_SIGNAL_TYPES
) -> dict[str, str]:
    """The signals of an uploaded video: ``vpdq`` as python-threatexchange's ``VPDQSignal``
    string (:func:`moderation.signals.vpdq.to_signal_str`, frames every
    ``limits.sample_interval_s`` s, decoded as screening does), and the exact hashes of the
    file's bytes. Only ``signal_types`` are computed (the video is decoded only for ``vpdq``).

    Raises:
        moderation.media.decode.UnscannableImage: vPDQ was asked for and the video cannot be
            decoded within ``limits``.
    """
    found: dict[str, str] = {}
    if "vpdq" in signal_types:
        # PyAV (FFmpeg) loads only when a video is hashed: not in every web process.
        from moderation.media.video import decode_video

        collector = VpdqCollector()
        decode_video(data, limits, on_fixed_frame=collector)
        found["vpdq"] = to_signal_str(collector.features)
    return found | _exact_hashes(data, signal_types)


@dataclass
class HashLookup:
    """PDQ and exact-hash lookup over one snapshot version (active entries only)."""

    version: int
    pdq: PdqScan
    exact_key: bytes | None = None
    vpdq: VpdqScan = field(default_factory=VpdqScan.empty)
    _exact: dict[tuple[int, bytes], list[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Session, keyring: KeyRing, snapshots_dir: Path) -> HashLookup:
        """Decrypt the current snapshot's payload and build the lookup (empty before the first
        snapshot).

        Raises:
            moderation.banks.snapshot.SnapshotError: the snapshot cannot be read or verified,
                or its exact hashes' key is gone.
        """
        row = current_snapshot(session)
        if row is None:
            return cls(version=0, pdq=PdqScan(np.empty(0, np.int64), np.empty((0, 32), np.uint8)))
        payload = read_payload(session, keyring, snapshots_dir, row, embeddings=False)
        hashes = payload.hashes
        images = payload.active & (payload.pdq_quality >= PDQ_MIN_QUALITY)
        # A list that gave no quality vouched for its digests (as Blocklist.pdq_of counts it).
        quality = np.where(hashes.pdq_quality == UNKNOWN_QUALITY, 100, hashes.pdq_quality)
        listed = hashes.active & hashes.has_pdq & (quality >= PDQ_MIN_QUALITY)
        pdq = PdqScan(
            np.concatenate([payload.entry_ids[images], hashes.entry_ids[listed]]),
            np.concatenate([payload.pdq[images], hashes.pdq[listed]]),
        )
        active = set(hashes.entry_ids[hashes.active].tolist())
        return cls(
            version=row.version,
            pdq=pdq,
            exact_key=snapshot_exact_key(session, keyring, row, payload),
            vpdq=VpdqScan.of(hashes, hashes.entry_ids[hashes.active]),
            _exact=hashes.exact_owners(active),
        )

    def lookup(
        self,
        session: Session,
        signal_type: str,
        signal: str,
        *,
        banks: Collection[str] | None = None,
        max_distance: int = PDQ_MATCH_DISTANCE,
    ) -> list[HashMatch]:
        """Entries matching ``signal`` (hex; vPDQ: a ``VPDQSignal`` string) of ``signal_type``,
        nearest first, then by id.

        PDQ matches are within ``max_distance`` bits (default ThreatExchange's 31, at most
        :data:`MAX_PDQ_MATCHES`); exact hashes match only themselves; vPDQ entries match as
        ``VPDQIndex.query`` matches them (:meth:`VpdqScan.search`, then
        :meth:`~moderation.signals.vpdq.VpdqMatch.is_match` with ``VPDQSignal``'s thresholds),
        highest query match percentage first. ``banks`` restricts the
        matches to those banks; entries deleted since the snapshot are left out.

        Raises:
            InvalidSignalError: an unsupported signal type or a malformed value.
        """
        kind = canonical_signal_type(signal_type)
        try:
            value = check_value(kind, signal)
        except ValueError as exc:
            raise InvalidSignalError(f"invalid signal: {exc}") from exc
        if kind == "vpdq":
            return self._lookup_vpdq(session, value, banks)
        digest = bytes.fromhex(value)
        if kind == "pdq":
            found = self.pdq.search(digest, MAX_PDQ_MATCHES, max_distance)
        elif self.exact_key is None:
            found = []
        else:
            key = (EXACT_KINDS.index(kind), keyed(self.exact_key, kind, digest))
            found = [(eid, 0) for eid in sorted(self._exact.get(key, ()))]
        infos = entry_infos(session, [eid for eid, _ in found])
        return [
            HashMatch(eid, infos[eid].bank_name, distance)
            for eid, distance in found
            if eid in infos and (banks is None or infos[eid].bank_name in banks)
        ]

    def _lookup_vpdq(
        self, session: Session, signal: str, banks: Collection[str] | None
    ) -> list[HashMatch]:
        found = [(eid, m) for eid, m in self.vpdq.search(parse_signal_str(signal)) if m.is_match()]
        infos = entry_infos(session, [eid for eid, _ in found])
        return [
            HashMatch(eid, infos[eid].bank_name, 0, vpdq=match)
            for eid, match in found
            if eid in infos and (banks is None or infos[eid].bank_name in banks)
        ]


class HashLookupCache:
    """The :class:`HashLookup` of the current snapshot version, rebuilt when it changes;
    thread-safe (one rebuild at a time; lookups wait for it)."""

    def __init__(self, snapshots_dir: Path) -> None:
        self.snapshots_dir = snapshots_dir
        self._lock = threading.Lock()
        self._current: HashLookup | None = None

    def current(self, session: Session, keyring: KeyRing) -> HashLookup:
        """The lookup of the newest snapshot version.

        Raises:
            moderation.banks.snapshot.SnapshotError: as :meth:`HashLookup.load`.
        """
        row = current_snapshot(session)
        version = row.version if row is not None else 0
        with self._lock:
            if self._current is None or self._current.version != version:
                self._current = HashLookup.load(session, keyring, self.snapshots_dir)
            return self._current

    def lookup(
        self,
        session: Session,
        keyring: KeyRing,
        signal_type: str,
        signal: str,
        *,
        banks: Collection[str] | None = None,
    ) -> list[HashMatch]:
        """:meth:`HashLookup.lookup` on the newest snapshot version.

        Raises:
            InvalidSignalError: an unsupported signal type or a malformed value.
            moderation.banks.snapshot.SnapshotError: the snapshot cannot be read.
        """
        return self.current(session, keyring).lookup(session, signal_type, signal, banks=banks)

    def lookup_content(
        self,
        session: Session,
        keyring: KeyRing,
        data: bytes,
        limits: DecodeLimits,
        *,
        banks: Collection[str] | None = None,
    ) -> dict[str, list[HashMatch]]:
        """Hash an uploaded photo (:func:`hash_content`) and look every signal up: canonical
        signal type -> matches.

        Raises:
            moderation.media.decode.UnscannableImage: the photo cannot be decoded.
            moderation.banks.snapshot.SnapshotError: the snapshot cannot be read.
        """
        return self.lookup_signals(session, keyring, hash_content(data, limits), banks=banks)

    def lookup_signals(
        self,
        session: Session,
        keyring: KeyRing,
        signals: Mapping[str, str],
        *,
        banks: Collection[str] | None = None,
    ) -> dict[str, list[HashMatch]]:
        """Look every signal of an upload up (``signals``: canonical signal type -> value, as
        :func:`hash_content` or :func:`hash_video_content` give): signal type -> matches.

        Raises:
            InvalidSignalError: a malformed value.
            moderation.banks.snapshot.SnapshotError: the snapshot cannot be read.
        """
        lookup = self.current(session, keyring)
        return {
            kind: lookup.lookup(session, kind, value, banks=banks)
            for kind, value in signals.items()
        }
