"""PDQ from float32 luma, straight into the ThreatExchange C++ that ``pdqhash`` compiles.

``pdqhash``'s entry points (``compute``, ``compute_dihedral``) take uint8 RGB and spend most of a
photo's hash outside the hashing itself: luma ``0.299 R + 0.587 G + 0.114 B`` in float64 numpy,
cast to float32 (1.2 of 2.5 ms for a 500 x 375 photo, README "Performance"), then the hash
unpacked into 256 Python ints (0.4 ms); and the C++ runs holding the GIL. Here the same float32
luma comes from Pillow's ``convert("F")``, which computes ``(299 R + 587 G + 114 B) / 1000`` in
float32 (``rgb2f`` in Pillow's ``libImaging/Convert.c``): bit-identical to pdqhash's luma for
all 2^24 RGB values (compared exhaustively in ``tests/unit/test_pdq_native.py``), because a
float64 sum of the three products lies within far less than half a float32 unit of the exact
quotient, and no quotient of an integer by 1000 is a float32 rounding tie. The luma then goes
through ``ctypes`` (which releases the GIL) to the functions the extension module exports,
declared in ThreatExchange ``pdq/cpp/hashing/pdqhashing.h``, and each ``Hash256``'s sixteen
16-bit words are read as they are. The digests are therefore pdqhash's, to the bit.

The functions are found by their (Itanium C++ ABI) mangled names, which encode every parameter
type; :func:`native_pdq` also compares one hash of a fixed image against pdqhash's own entry
points before it is used. Where either fails (another build, platform or compiler), it returns
None and :mod:`moderation.signals.pdq` calls pdqhash's entry points as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Final

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

# facebook::pdq::hashing::pdqHash256FromFloatLuma(float*, float*, int, int, float (*)[64],
#     float (*)[64], float (*)[16], Hash256&, int&)
_PLAIN_SYMBOL: Final = (
    "_ZN8facebook3pdq7hashing23pdqHash256FromFloatLumaEPfS2_iiPA64_fS4_PA16_fRNS1_7Hash256ERi"
)
# facebook::pdq::hashing::pdqDihedralHash256esFromFloatLuma(float*, float*, int, int,
#     float (*)[64], float (*)[64], float (*)[16], float (*)[16], Hash256* x 8, int&)
_DIHEDRAL_SYMBOL: Final = (
    "_ZN8facebook3pdq7hashing33pdqDihedralHash256esFromFloatLumaEPfS2_iiPA64_fS4_PA16_fS6_"
    "PNS1_7Hash256ES8_S8_S8_S8_S8_S8_S8_Ri"
)
#: Words of a ThreatExchange ``Hash256`` (``unsigned short w[16]``, ``w[0]`` least significant).
HASH_WORDS: Final = 16
#: Hashes :func:`NativePdq.dihedral` returns, in ThreatExchange's order.
DIHEDRAL_COUNT: Final = 8

_Pointer = ctypes.c_void_p


class NativePdq:
    """The two hashing functions of a loaded ``pdqhash`` extension, called with float32 luma.

    Thread-safe: each call has its own buffers; the C++ reads only its arguments and a constant
    DCT matrix built when the library loaded.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        pointers = [_Pointer, _Pointer, ctypes.c_int, ctypes.c_int, _Pointer, _Pointer, _Pointer]
        self._plain = getattr(library, _PLAIN_SYMBOL)
        self._plain.argtypes = [*pointers, _Pointer, _Pointer]
        self._plain.restype = None
        self._dihedral = getattr(library, _DIHEDRAL_SYMBOL)
        self._dihedral.argtypes = [*pointers, _Pointer] + [_Pointer] * DIHEDRAL_COUNT + [_Pointer]
        self._dihedral.restype = None  # bool in newer ThreatExchange code; always true

    def _call(self, luma: npt.NDArray[np.float32], count: int) -> tuple[list[bytes], int]:
        if luma.dtype != np.float32 or luma.ndim != 2 or not luma.flags.c_contiguous:
            raise ValueError(f"luma must be a C-contiguous 2-D float32 array, got {luma.dtype}")
        if not luma.flags.writeable:
            raise ValueError("luma must be writable: the C++ filters it in place")
        rows, cols = luma.shape
        scratch = np.empty_like(luma)
        blocks = np.empty(64 * 64 + 16 * 64 + 16 * 16 * 2, dtype=np.float32)
        at = blocks.ctypes.data
        words = np.zeros((count, HASH_WORDS), dtype=np.uint16)
        quality = ctypes.c_int(0)
        buffers = (at, at + 4 * 64 * 64, at + 4 * (64 * 64 + 16 * 64))
        hashes = [words.ctypes.data + row * 2 * HASH_WORDS for row in range(count)]
        if count == 1:
            self._plain(
                luma.ctypes.data, scratch.ctypes.data, rows, cols, *buffers, *hashes,
                ctypes.byref(quality),
            )  # fmt: skip
        else:
            aux = at + 4 * (64 * 64 + 16 * 64 + 16 * 16)
            self._dihedral(
                luma.ctypes.data, scratch.ctypes.data, rows, cols, *buffers, aux, *hashes,
                ctypes.byref(quality),
            )  # fmt: skip
        # ThreatExchange's hex prints w[15] first, each word big-endian (Hash256::format).
        raw = words[:, ::-1].astype(">u2").tobytes()
        size = 2 * HASH_WORDS
        return [raw[i * size : (i + 1) * size] for i in range(count)], int(quality.value)

    def plain(self, luma: npt.NDArray[np.float32]) -> tuple[bytes, int]:
        """The 32-byte digest (ThreatExchange's byte order) and quality of ``luma``, a
        C-contiguous, writable float32 (rows, cols) array that the call overwrites."""
        digests, quality = self._call(luma, 1)
        return digests[0], quality

    def dihedral(self, luma: npt.NDArray[np.float32]) -> tuple[list[bytes], int]:
        """The eight dihedral digests (in :data:`moderation.signals.pdq.DIHEDRAL_VARIANTS`
        order) and the quality of ``luma``, as for :meth:`plain`."""
        return self._call(luma, DIHEDRAL_COUNT)


def luma_of(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """pdqhash's float32 luma of uint8 (rows, cols, 3) RGB pixels, computed as it does (float64
    products and sums, then float32): the reference :func:`native_pdq`'s check compares with."""
    weighted = pixels[:, :, 0] * 0.299 + pixels[:, :, 1] * 0.587 + pixels[:, :, 2] * 0.114
    luma: npt.NDArray[np.float32] = weighted.astype(np.float32)
    return luma


@functools.cache
def native_pdq() -> NativePdq | None:
    """The direct entry points into the loaded ``pdqhash`` extension, or None where they are
    not exported or do not reproduce ``pdqhash.compute_dihedral`` on a fixed noise image."""
    import pdqhash
    from pdqhash import bindings

    try:
        native = NativePdq(ctypes.CDLL(bindings.__file__))
    except (OSError, AttributeError) as exc:
        logger.info("pdqhash's C++ functions are not callable directly (%s)", exc)
        return None
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    bits, quality = pdqhash.compute_dihedral(pixels)
    expected = [np.packbits(np.asarray(b, dtype=np.uint8)).tobytes() for b in bits]
    plain = native.plain(luma_of(pixels))
    if native.dihedral(luma_of(pixels)) != (expected, int(quality)) or plain[0] != expected[0]:
        logger.warning("pdqhash's C++ functions disagree with its entry points; not using them")
        return None
    return native
