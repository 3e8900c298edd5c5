"""PDQ perceptual hashes (via ``pdqhash``) in ThreatExchange's format, and Hamming distance.

PDQ is Meta's 256-bit perceptual photo hash (ThreatExchange ``hashing/hashing.pdf``; reference
code in ``facebook/ThreatExchange`` ``pdq/cpp``). ``pdqhash`` (faustomorales/pdqhash-python)
binds that C++ code; this module fixes the bit order so that :attr:`PdqHash.hex` equals the hex
digest ThreatExchange, HMA and python-threatexchange print and exchange.

Hashing takes already-decoded pixels. PDQ itself knows nothing of EXIF orientation: the caller
decodes with EXIF orientation applied (the upright image a person sees), then hashes. Hashing
the raw stored pixels of a rotated JPEG gives the hash of a rotated image, which is one of the
eight :func:`pdq_hash_dihedral` variants of the upright image's hash.

Where it can, hashing skips pdqhash's Python entry points and calls its compiled ThreatExchange
functions with float32 luma from Pillow (:mod:`moderation.signals.pdq_native`): the same digests,
in about a third of the time outside the C++, without holding the GIL.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pdqhash
from PIL import Image

from moderation.signals.pdq_native import native_pdq

logger = logging.getLogger(__name__)

#: Hamming distance at or below which two PDQ hashes are considered a match. ThreatExchange's
#: recommended starting point: ``pdq/README.md`` ("Distance Threshold to consider two hashes to
#: be similar/matching: <=31") and ``PDQ_CONFIDENT_MATCH_THRESHOLD = 31`` in
#: ``python-threatexchange/threatexchange/signal_type/pdq/pdq_utils.py``.
PDQ_MATCH_DISTANCE: Final = 31

#: Hashes with a quality below this are too unreliable to match on (flat or tiny images).
#: ThreatExchange ``pdq/README.md`` ("Quality Threshold where we recommend discarding hashes:
#: <=49") and ``QUALITY_THRESHOLD = 50`` in
#: ``python-threatexchange/threatexchange/signal_type/pdq/signal.py``.
PDQ_MIN_QUALITY: Final = 50

#: Images whose longer side exceeds this (px) are downsampled before hashing. PDQ's two-pass
#: Jarosz box filter costs O(pixels); ThreatExchange's reference tools resize to 512 px first
#: for the same reason (``DOWNSAMPLE_DIMS = 512`` in ``pdq/cpp/io/pdqio.cpp``: "The two-pass
#: Jarosz filter is prohibitively expensive for larger images"). We keep the aspect ratio and
#: resample bicubically: of the Pillow filters and sizes tried, this reproduced the reference
#: digests of ThreatExchange's ``pdq/data`` images in the project's conformance set exactly
#: (distance 0; 10 bits on ``q0003.jpg``, a quality-3 image whose hash is unstable), where
#: full-size hashing was up to 12 bits off and a 512x512 squash up to 10. On 4032x3024 photos
#: it makes hashing several times faster; near 512 px it changes little.
PDQ_DOWNSAMPLE_MAX_SIDE: Final = 512

#: Length of a PDQ digest (bytes) and hash (bits).
PDQ_DIGEST_BYTES: Final = 32
PDQ_BITS: Final = 256

#: Names of the eight dihedral variants, in the order :func:`pdq_hash_dihedral` returns them and
#: ThreatExchange's ``pdqDihedralHash256esFromFloatLuma`` (``pdq/cpp/hashing/pdqhashing.h``)
#: computes them, matching the files ``pdq/data/reg-test-input/dih/bridge-{1..8}-*.jpg``. In
#: Pillow's terms: ``rot90`` = ``Transpose.ROTATE_90`` (counter-clockwise), ``flipx`` (mirror
#: about the x axis) = ``FLIP_TOP_BOTTOM``, ``flipy`` = ``FLIP_LEFT_RIGHT``, ``flip_plus1``
#: (mirror about the main diagonal) = ``TRANSPOSE``, ``flip_minus1`` = ``TRANSVERSE``.
DIHEDRAL_VARIANTS: Final = (
    "original",
    "rot90",
    "rot180",
    "rot270",
    "flipx",
    "flipy",
    "flip_plus1",
    "flip_minus1",
)

_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
# Pillow first box-reduces by an integer factor while the image stays at least this many times
# the target size, then resamples: faster on large photos and, measured on ThreatExchange's
# regression images, the same digests as a plain bicubic resize.
_REDUCING_GAP: Final = 2.0


@dataclass(frozen=True)
class PdqHash:
    """A PDQ hash and its quality.

    ``digest`` is 32 bytes, most significant bit first in ThreatExchange's order, so
    ``digest.hex()`` is ThreatExchange's 64-character hex digest. ``quality`` is PDQ's 0-100
    gradient-energy score; below :data:`PDQ_MIN_QUALITY` the hash should not be matched on.

    Raises:
        ValueError: ``digest`` is not 32 bytes or ``quality`` is outside 0-100.
    """

    digest: bytes
    quality: int

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != PDQ_DIGEST_BYTES:
            raise ValueError(f"a PDQ digest is {PDQ_DIGEST_BYTES} bytes, got {self.digest!r}")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int):
            raise ValueError(f"PDQ quality must be an int, got {self.quality!r}")
        if not 0 <= self.quality <= 100:
            raise ValueError(f"PDQ quality must be in 0-100, got {self.quality}")

    @property
    def hex(self) -> str:
        """The 64 lowercase hex characters ThreatExchange uses for this hash."""
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str, quality: int = 100) -> PdqHash:
        """Parse ThreatExchange's 64-hex-character form (either case; no whitespace).

        Raises:
            ValueError: ``text`` is not exactly 64 hex digits, or ``quality`` is out of range.
        """
        if not isinstance(text, str) or _HEX_RE.fullmatch(text) is None:
            raise ValueError(f"a PDQ hash is 64 hex characters, got {text!r}")
        return cls(bytes.fromhex(text), quality)

    @property
    def is_matchable(self) -> bool:
        """Whether ``quality`` reaches :data:`PDQ_MIN_QUALITY`."""
        return self.quality >= PDQ_MIN_QUALITY

    def distance(self, other: PdqHash) -> int:
        """Hamming distance (bits, 0-256) to ``other``."""
        return hamming_distance(self.digest, other.digest)

    def as_array(self) -> npt.NDArray[np.uint8]:
        """The digest as a ``(32,)`` uint8 array, the row format of the Hamming index."""
        return np.frombuffer(self.digest, dtype=np.uint8).copy()


def _hashable(image: Image.Image, max_side: int | None) -> Image.Image:
    if image.mode != "RGB":
        raise ValueError(
            f"PDQ hashing takes a decoded RGB image, got mode {image.mode!r}; "
            "decode (with EXIF orientation applied) and convert to RGB first"
        )
    if max_side is not None:
        if max_side < 64:
            # PDQ reduces to 64x64 before its DCT; fewer pixels than that discards detail.
            raise ValueError(f"max_side must be at least 64 px or None, got {max_side}")
        width, height = image.size
        longest = max(width, height)
        if longest > max_side:
            scale = max_side / longest
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=_REDUCING_GAP)
    return image


def _luma(image: Image.Image) -> npt.NDArray[np.float32]:
    # pdqhash's float32 luma, bit for bit (moderation.signals.pdq_native explains why), as a
    # writable array: the hashing filters it in place.
    return np.array(image.convert("F"), dtype=np.float32)


def _pack(bits: npt.NDArray[np.integer]) -> bytes:
    # pdqhash returns the 256 bits most significant first (bit 255 of ThreatExchange's Hash256
    # at index 0; see ``hash_to_vector`` in pdqhash's ``bindings.pyx``), and Hash256::format()
    # prints the 16-bit words from w[15] down to w[0]: packing big-endian gives TE's hex.
    return np.packbits(bits.astype(np.uint8, copy=False)).tobytes()


def pdq_hash(image: Image.Image, *, max_side: int | None = PDQ_DOWNSAMPLE_MAX_SIDE) -> PdqHash:
    """PDQ hash of a decoded RGB image.

    Args:
        image: Pillow image in mode ``RGB``, already decoded with EXIF orientation applied
            (PDQ does not read EXIF).
        max_side: downsample (bicubic, aspect kept) so the longer side is at most this many px
            before hashing, as ThreatExchange's reference tools do (see
            :data:`PDQ_DOWNSAMPLE_MAX_SIDE`); ``None`` hashes at full size.

    Returns:
        The hash; images smaller than 5 px on a side, or flat ones, get quality 0.

    Raises:
        ValueError: the image is not RGB, or ``max_side`` is below 64.
    """
    image = _hashable(image, max_side)
    native = native_pdq()
    if native is not None:
        digest, quality = native.plain(_luma(image))
        return PdqHash(digest, quality)
    bits, quality = pdqhash.compute(np.asarray(image, dtype=np.uint8))
    return PdqHash(_pack(bits), int(quality))


def pdq_hash_dihedral(
    image: Image.Image, *, max_side: int | None = PDQ_DOWNSAMPLE_MAX_SIDE
) -> tuple[PdqHash, ...]:
    """PDQ hashes of the eight rotations and mirrorings of a decoded RGB image.

    The variants are computed in the DCT domain from one pass over the pixels
    (ThreatExchange ``pdqDihedralHash256esFromFloatLuma``), in the order of
    :data:`DIHEDRAL_VARIANTS`: original, rot90, rot180, rot270, flipx, flipy, flip_plus1,
    flip_minus1. Index 0 equals :func:`pdq_hash` of the same image. A variant is close to, not
    always equal to, the hash of the actually transformed pixels (ThreatExchange's ``dih``
    regression images: 0-18 bits).

    Args:
        image: as for :func:`pdq_hash`.
        max_side: as for :func:`pdq_hash`.

    Returns:
        Eight hashes, all with the image's quality.

    Raises:
        ValueError: the image is not RGB, or ``max_side`` is below 64.
    """
    image = _hashable(image, max_side)
    native = native_pdq()
    if native is not None:
        digests, quality = native.dihedral(_luma(image))
        return tuple(PdqHash(digest, quality) for digest in digests)
    variants, quality = pdqhash.compute_dihedral(np.asarray(image, dtype=np.uint8))
    return tuple(PdqHash(_pack(bits), int(quality)) for bits in variants)


def hamming_distance(a: bytes, b: bytes) -> int:
    """Number of differing bits between two equal-length digests (e.g. 32-byte PDQ digests).

    Raises:
        ValueError: the lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"digests differ in length: {len(a)} and {len(b)} bytes")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


def hamming_distances(
    query: npt.NDArray[np.uint8], digests: npt.NDArray[np.uint8]
) -> npt.NDArray[np.int64]:
    """Hamming distances from one digest to many, by exhaustive scan.

    Args:
        query: ``(b,)`` uint8 digest (``b`` = 32 for PDQ).
        digests: ``(n, b)`` uint8 digests.

    Returns:
        ``(n,)`` int64 distances in bits.

    Raises:
        ValueError: wrong dtype, rank or width.
    """
    if query.dtype != np.uint8 or digests.dtype != np.uint8:
        raise ValueError(f"digests must be uint8, got {query.dtype} and {digests.dtype}")
    if query.ndim != 1 or digests.ndim != 2 or digests.shape[1] != query.shape[0]:
        raise ValueError(f"expected (b,) and (n, b) arrays, got {query.shape} and {digests.shape}")
    distances: npt.NDArray[np.int64] = np.bitwise_count(np.bitwise_xor(digests, query)).sum(
        axis=1, dtype=np.int64
    )
    return distances
