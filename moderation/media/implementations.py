"""Named implementations of the edit families, split into a tuning set and an unseen set.

The benchmark's 17 edits (:data:`moderation.media.edits.EDITS`) are one implementation each of
their family. Issue 15 measured that quality drops on implementations of the same families
written elsewhere (screenshots in other page chrome, pastes at 40%, big emoji, flips with
padding, 25° rotations), so each family here has further implementations with their own code
and parameter ranges, and every implementation belongs to exactly one split:

* ``tuning``: used to make training copies (``moderation classifier train``, the demo, the
  import-time synthetic pairs) and to tune thresholds: the 17 benchmark edits plus
  :data:`TUNING_EXTRA`.
* ``unseen``: never used in training or tuning; ``moderation benchmark`` reports them apart as
  "unseen implementations".

The split is fixed in this module (not drawn at run time), so it is the same in every process.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from PIL import Image

from moderation.media import albumentations_edits as albu
from moderation.media import edit_variants as var
from moderation.media import social_screens as screens
from moderation.media.edits import EDITS, EditFn

Split = Literal["tuning", "unseen"]

BACKGROUND_FAMILY = "overlay_bg_60"
"""The family whose implementations paste the photo onto another photo (need a background)."""


@dataclass(frozen=True)
class Implementation:
    """One implementation of an edit family: ``name`` (unique), ``family`` (a key of
    :data:`~moderation.media.edits.EDITS`), ``split`` and the edit function."""

    name: str
    family: str
    split: Split
    fn: EditFn

    @property
    def needs_background(self) -> bool:
        """Whether :func:`apply_implementation` needs a ``background`` photo."""
        return self.family == BACKGROUND_FAMILY


_EXTRA: tuple[tuple[str, str, Split, EditFn], ...] = (
    # Screenshots of the photo inside social-media pages.
    ("screenshot.feed_post", "screenshot", "tuning", screens.feed_post),
    ("screenshot.chat_bubble", "screenshot", "tuning", screens.chat_bubble),
    ("screenshot.feed_stories", "screenshot", "unseen", screens.feed_stories),
    ("screenshot.story_viewer", "screenshot", "unseen", screens.story_viewer),
    ("screenshot.desktop_lightbox", "screenshot", "unseen", screens.desktop_lightbox),
    # Pastes onto another photo at 20-60% of the side.
    ("paste.anywhere", "overlay_bg_60", "tuning", var.paste_anywhere),
    ("paste.polaroid", "overlay_bg_60", "tuning", var.paste_polaroid),
    ("paste.rotated_feathered", "overlay_bg_60", "unseen", var.paste_rotated_feathered),
    ("paste.collage", "overlay_bg_60", "unseen", var.paste_collage),
    # Emoji and stickers of any size and count.
    ("emoji.many_small", "emoji_overlay", "tuning", var.emoji_many_small),
    ("emoji.glyphs", "emoji_overlay", "tuning", var.emoji_glyphs),
    ("emoji.big", "emoji_overlay", "unseen", var.emoji_big),
    ("emoji.sticker_pack", "emoji_overlay", "unseen", var.emoji_sticker_pack),
    # Flips combined with padding, rotation and crops.
    ("flip.pad", "hflip", "tuning", var.flip_pad),
    ("flip.crop", "hflip", "tuning", var.flip_crop),
    ("flip.rotate_pad", "hflip", "unseen", var.flip_rotate_pad),
    ("flip.albu_affine", "hflip", "unseen", albu.albu_flip_affine),
    # Rotations up to 30° with various fills.
    ("rotate.expand_fill", "rotate_15", "tuning", var.rotate_expand_fill),
    ("rotate.inscribed", "rotate_15", "tuning", var.rotate_inscribed),
    ("rotate.albu_reflect", "rotate_15", "unseen", albu.albu_rotate_reflect),
    ("rotate.blurred_fill", "rotate_15", "unseen", var.rotate_blurred_fill),
    # One implementation by other code for each remaining family.
    ("resize.albu_area", "resize_40", "unseen", albu.albu_resize),
    ("jpeg.albu_webp_jpeg", "jpeg_q15", "unseen", albu.albu_compression),
    ("crop.albu_center", "center_crop_70", "unseen", albu.albu_center_crop),
    ("crop.albu_resized", "corner_crop_60", "unseen", albu.albu_random_crop),
    ("grey.albu", "greyscale", "unseen", albu.albu_grey),
    ("colour.albu", "color_jitter", "unseen", albu.albu_colour),
    ("blur.albu", "blur_r3", "unseen", albu.albu_blur),
    ("text.banner", "text_overlay", "unseen", albu.banner_text),
    ("meme.top_bottom", "meme_caption", "unseen", albu.top_bottom_meme),
    ("border.blurred_fill", "border_25", "unseen", albu.blurred_border),
    ("pixelize.albu", "pixelize", "unseen", albu.albu_pixelize),
    ("perspective.albu", "perspective", "unseen", albu.albu_perspective),
)

IMPLEMENTATIONS: Mapping[str, Implementation] = MappingProxyType(
    {
        **{name: Implementation(name, name, "tuning", fn) for name, fn in EDITS.items()},
        **{name: Implementation(name, family, split, fn) for name, family, split, fn in _EXTRA},
    }
)
"""Every implementation by name: the 17 benchmark edits (their own family, tuning) first."""

TUNING: tuple[str, ...] = tuple(n for n, i in IMPLEMENTATIONS.items() if i.split == "tuning")
"""Names of the tuning implementations, in registry order."""
UNSEEN: tuple[str, ...] = tuple(n for n, i in IMPLEMENTATIONS.items() if i.split == "unseen")
"""Names of the unseen implementations, in registry order (never used for training)."""
TUNING_EXTRA: tuple[str, ...] = tuple(n for n in TUNING if n not in EDITS)
"""Tuning implementations beyond the benchmark's 17 edits."""


def apply_implementation(
    name: str, image: Image.Image, *, seed: int, background: Image.Image | None = None
) -> Image.Image:
    """Apply implementation ``name`` to ``image`` with parameters drawn from
    ``random.Random(seed)``: a new RGB image (the input is not modified), the same for the same
    ``(name, image, seed, background)``.

    Raises:
        ValueError: ``name`` is not in :data:`IMPLEMENTATIONS`, or it pastes onto a background
            (family ``overlay_bg_60``) and ``background`` is None.
    """
    try:
        implementation = IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown edit implementation {name!r}; valid: {', '.join(IMPLEMENTATIONS)}"
        ) from None
    if implementation.needs_background and background is None:
        raise ValueError(f"{name} needs a background image")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    out = implementation.fn(rgb, random.Random(seed), background)  # noqa: S311 (reproducible)
    return out if out.mode == "RGB" else out.convert("RGB")
