"""RELIABILITY.md I8: one photo stored in every Pillow mode embeds close to the original.

Uses ThreatExchange's ``misc-images/modes`` (skips with the reason when ../shared is absent).
Colour is lost in the grey modes, nothing else: their threshold is lower.
"""

from __future__ import annotations

import pytest

from moderation.media.decode import decode_file
from moderation.signals.encoders import create_encoder
from tests.conftest import shared_path

COLOUR = (
    "CMYK.jpg",
    "HSV.webp",
    "LAB.webp",
    "P.png",
    "PA.webp",
    "RGB.jpg",
    "RGBA.png",
    "YCbCr.jpg",
)
GREY = ("1.png", "L.png", "LA.png", "I.webp", "F.webp")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "minimum"), [(n, 0.98) for n in COLOUR] + [(n, 0.88) for n in GREY]
)
def test_every_mode_embeds_close_to_the_original(name: str, minimum: float) -> None:
    folder = shared_path("threatexchange-pdq", "misc-images", "modes")
    encoder = create_encoder("timm/efficientnet_lite0")
    original = decode_file(folder / "original.jpg").frames[0]
    variant = decode_file(folder / name).frames[0]
    reference, query = encoder.encode([original, variant])
    assert float(reference @ query) >= minimum
