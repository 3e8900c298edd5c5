"""Pillow implementations of the paste, emoji, flip and rotation families for the edit registry
(:mod:`moderation.media.implementations`), each a code path and parameter range of its own.

Every function is an :data:`~moderation.media.edits.EditFn`: RGB image, seeded
:class:`random.Random` and an optional background photo in, RGB image out. Rotations at up to
30° and pastes at 20-60% of the side follow the cases issue 15 found missed by the classifier
(screenshots, 40% pastes, big emoji, flips with padding, 25° rotations).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from moderation.media.drawing import (
    STICKER_COLOURS,
    default_font,
    jpeg_reencoded,
    random_colour,
    scaled,
)
from moderation.media.edits import largest_inscribed, sticker_image


def _need(background: Image.Image | None, name: str) -> Image.Image:
    if background is None:
        raise ValueError(f"{name} needs a background image")
    return background.convert("RGB")


def _side_fraction(rng: random.Random, low: float, high: float) -> float:
    return rng.uniform(low, high)


# --- pastes onto another photo -------------------------------------------------------------------


def paste_anywhere(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """The photo at 20-60% of the background's width, anywhere on it (background kept at its own
    size, shorter side at least the photo's)."""
    back = _need(background, "paste_anywhere")
    back = scaled(back, max(1.0, min(image.size) / min(back.size)))
    photo = scaled(image, _side_fraction(rng, 0.2, 0.6) * back.width / image.width)
    if photo.height > back.height:
        photo = scaled(photo, back.height / photo.height)
    back.paste(
        photo,
        (rng.randint(0, back.width - photo.width), rng.randint(0, back.height - photo.height)),
    )
    return back


def paste_polaroid(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A white-bordered print of the photo (25-55% of the side) with a drop shadow, tilted by up
    to 12°, on the background fitted to the photo's size."""
    back = ImageOps.fit(_need(background, "paste_polaroid"), image.size, Image.Resampling.BICUBIC)
    photo = scaled(image, _side_fraction(rng, 0.25, 0.55))
    border = max(2, photo.width // 18)
    framed = ImageOps.expand(
        photo, border=(border, border, border, border * 3), fill=(250, 250, 248)
    )
    tile = framed.convert("RGBA").rotate(
        rng.uniform(-12, 12), Image.Resampling.BICUBIC, expand=True
    )
    shadow = Image.new("RGBA", tile.size, (0, 0, 0, 0))
    shadow.putalpha(
        tile.getchannel("A").point(lambda a: a // 2).filter(ImageFilter.GaussianBlur(border))
    )
    x = rng.randint(0, max(0, back.width - tile.width))
    y = rng.randint(0, max(0, back.height - tile.height))
    out = back.convert("RGBA")
    out.alpha_composite(
        shadow,
        (
            min(x + border, max(0, out.width - tile.width)),
            min(y + border, max(0, out.height - tile.height)),
        ),
    )
    out.alpha_composite(tile, (x, y))
    return out.convert("RGB")


def paste_rotated_feathered(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """The photo at 25-60% of the side, soft-edged (feathered alpha) and rotated by up to 25°, on
    the background cropped to a random 3:4 to 16:9 frame."""
    back = _need(background, "paste_rotated_feathered")
    aspect = rng.uniform(0.75, 1.78)
    side = max(image.size)
    frame = (round(side * min(1.0, aspect)), round(side / max(1.0, aspect)))
    back = ImageOps.fit(
        back, frame, Image.Resampling.BILINEAR, centering=(rng.random(), rng.random())
    )
    photo = scaled(image, _side_fraction(rng, 0.25, 0.6) * min(frame) / min(image.size))
    mask = Image.new("L", photo.size, 0)
    feather = max(1, min(photo.size) // rng.randint(8, 16))
    ImageDraw.Draw(mask).rectangle(
        (feather, feather, photo.width - feather, photo.height - feather), fill=255
    )
    rgba = photo.convert("RGBA")
    rgba.putalpha(mask.filter(ImageFilter.GaussianBlur(feather / 2)))
    rgba = rgba.rotate(rng.uniform(-25, 25), Image.Resampling.BICUBIC, expand=True)
    if rgba.width > back.width or rgba.height > back.height:
        rgba = scaled(rgba, min(back.width / rgba.width, back.height / rgba.height))
    out = back.convert("RGBA")
    out.alpha_composite(
        rgba, (rng.randint(0, out.width - rgba.width), rng.randint(0, out.height - rgba.height))
    )
    return jpeg_reencoded(out.convert("RGB"), rng.randint(70, 92))


def paste_collage(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A 2x2 or 3x2 collage with gutters: one tile is the photo (fitted, 17-25% of the area),
    the others are crops of the background."""
    back = _need(background, "paste_collage")
    cols, rows = rng.choice(((2, 2), (3, 2), (2, 3)))
    tile_w = max(16, image.width // 2)
    tile_h = max(16, round(tile_w * rng.uniform(0.7, 1.2)))
    gap = max(1, tile_w // rng.randint(15, 40))
    out = Image.new(
        "RGB",
        (cols * tile_w + (cols + 1) * gap, rows * tile_h + (rows + 1) * gap),
        random_colour(rng),
    )
    mine = rng.randrange(cols * rows)
    for k in range(cols * rows):
        if k == mine:
            tile = ImageOps.fit(image, (tile_w, tile_h), Image.Resampling.BICUBIC)
        else:
            tile = ImageOps.fit(
                back,
                (tile_w, tile_h),
                Image.Resampling.BILINEAR,
                centering=(rng.random(), rng.random()),
            )
            tile = (
                tile.rotate(rng.choice((0, 90, 180, 270))).resize((tile_w, tile_h))
                if rng.random() < 0.5
                else tile
            )
        col, row = k % cols, k // cols
        out.paste(tile, (gap + col * (tile_w + gap), gap + row * (tile_h + gap)))
    return out


# --- emoji and stickers --------------------------------------------------------------------------


def _place(out: Image.Image, sticker: Image.Image, rng: random.Random, overhang: float) -> None:
    """Composite ``sticker`` at a random position; up to ``overhang`` of it may leave the frame."""
    dx, dy = round(sticker.width * overhang), round(sticker.height * overhang)
    x = rng.randint(-dx, max(-dx, out.width - sticker.width + dx))
    y = rng.randint(-dy, max(-dy, out.height - sticker.height + dy))
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    layer.paste(sticker, (x, y), sticker)
    out.alpha_composite(layer)


def _scatter(
    image: Image.Image,
    rng: random.Random,
    count: tuple[int, int],
    share: tuple[float, float],
    make: Callable[[int, random.Random], Image.Image],
    turn: float,
    overhang: float,
) -> Image.Image:
    """``count`` stickers from ``make``, each a ``share`` of the shorter side, turned by up to
    ``turn`` degrees, at random positions (``overhang`` as :func:`_place`)."""
    out = image.convert("RGBA")
    for _ in range(rng.randint(*count)):
        sticker = make(max(8, round(min(out.size) * rng.uniform(*share))), rng)
        _place(out, sticker.rotate(rng.uniform(-turn, turn), expand=True), rng, overhang)
    return out.convert("RGB")


def emoji_many_small(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Four to ten small stickers (8-20% of the shorter side), turned by up to 40°."""
    return _scatter(image, rng, (4, 10), (0.08, 0.2), sticker_image, 40, 0.0)


_GLYPHS = (":)", "<3", "LOL", "!!", "#1", "OMG", "XD", "?!", "100", ":D", "wow", "+1")


def emoji_glyphs(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """One to four text glyphs (":)", "<3", "LOL" ...) 15-40% of the height tall, in sticker
    colours with a white or black outline."""
    out = image.convert("RGBA")
    for _ in range(rng.randint(1, 4)):
        size = max(8, round(out.height * rng.uniform(0.15, 0.4)))
        font = default_font(size)
        text = rng.choice(_GLYPHS)
        stroke = max(1, size // 12)
        box = ImageDraw.Draw(out).textbbox((0, 0), text, font=font, stroke_width=stroke)
        glyph = Image.new("RGBA", (round(box[2]) + 2, round(box[3]) + 2), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text(
            (1, 1), text, font=font, fill=(*rng.choice(STICKER_COLOURS), 255),
            stroke_width=stroke, stroke_fill=rng.choice(((255, 255, 255), (0, 0, 0))),
        )  # fmt: skip
        _place(out, glyph.rotate(rng.uniform(-25, 25), expand=True), rng, 0.1)
    return out.convert("RGB")


def _face(size: int, rng: random.Random) -> Image.Image:
    """A big round face sticker drawn unlike :func:`~moderation.media.edits.sticker_image`:
    flat colour, a rim, heart or crescent eyes, an open mouth or tongue."""
    face = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(face)
    skin = rng.choice(((255, 214, 10), (255, 176, 46), (255, 230, 120), (120, 200, 255)))
    draw.ellipse(
        (0, 0, size - 1, size - 1),
        fill=(*skin, 255),
        outline=(190, 120, 0, 255),
        width=max(1, size // 30),
    )
    eye = size * 0.11
    for ex in (size * 0.32, size * 0.68):
        if rng.random() < 0.5:
            draw.polygon(
                [(ex - eye, size * 0.36), (ex + eye, size * 0.36), (ex, size * 0.48)],
                fill=(230, 30, 60, 255),
            )
        else:
            draw.arc(
                (ex - eye, size * 0.3, ex + eye, size * 0.45),
                180,
                360,
                fill=(60, 40, 0, 255),
                width=max(2, size // 25),
            )
    mouth = (size * 0.25, size * 0.52, size * 0.75, size * 0.82)
    draw.chord(mouth, 0, 180, fill=(90, 20, 20, 255))
    if rng.random() < 0.5:
        draw.ellipse(
            (size * 0.42, size * 0.66, size * 0.58, size * 0.86), fill=(255, 110, 130, 255)
        )
    return face


def emoji_big(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """One or two big face stickers, 40-65% of the shorter side, anywhere (up to 15% of each
    outside the frame)."""
    out = image.convert("RGBA")
    for _ in range(rng.randint(1, 2)):
        size = max(8, round(min(out.size) * rng.uniform(0.4, 0.65)))
        _place(out, _face(size, rng).rotate(rng.uniform(-20, 20), expand=True), rng, 0.15)
    return out.convert("RGB")


def _pack_sticker(size: int, rng: random.Random) -> Image.Image:
    """Flower, speech bubble with a word, ring or drop: shapes the tuning stickers never draw."""
    big = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(big)
    colour = (*rng.choice(STICKER_COLOURS), 255)
    kind = rng.choice(("flower", "bubble", "ring", "drop"))
    if kind == "flower":
        r = size / 4
        for k in range(6):
            a = k * math.pi / 3
            cx, cy = size / 2 + r * math.cos(a), size / 2 + r * math.sin(a)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        draw.ellipse((size * 0.38, size * 0.38, size * 0.62, size * 0.62), fill=(255, 230, 0, 255))
    elif kind == "bubble":
        draw.rounded_rectangle(
            (0, 0, size - 1, size * 0.7),
            radius=size // 6,
            fill=(255, 255, 255, 255),
            outline=colour,
            width=max(2, size // 20),
        )
        draw.polygon(
            [(size * 0.2, size * 0.68), (size * 0.45, size * 0.68), (size * 0.15, size * 0.98)],
            fill=(255, 255, 255, 255),
        )
        draw.text(
            (size / 2, size * 0.35),
            rng.choice(("hi!", "wow", "lol", "yes")),
            anchor="mm",
            fill=colour,
            font=default_font(size // 4),
        )
    elif kind == "ring":
        draw.ellipse((0, 0, size - 1, size - 1), outline=colour, width=max(3, size // 7))
    else:
        draw.polygon(
            [(size / 2, 0), (size * 0.85, size * 0.6), (size * 0.15, size * 0.6)], fill=colour
        )
        draw.ellipse((size * 0.15, size * 0.3, size * 0.85, size - 1), fill=colour)
    alpha = rng.choice((255, 255, 200))
    big.putalpha(big.getchannel("A").point(lambda a: min(a, alpha)))
    return big


def emoji_sticker_pack(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Three to six stickers of :func:`_pack_sticker`, 15-45% of the shorter side, turned."""
    return _scatter(image, rng, (3, 6), (0.15, 0.45), _pack_sticker, 30, 0.1)


# --- flips combined with padding, rotation, crops ------------------------------------------------


def flip_pad(image: Image.Image, rng: random.Random, background: Image.Image | None) -> Image.Image:
    """Mirror, then pad one to four sides by 5-30% of the side with one solid colour."""
    out = ImageOps.mirror(image)
    w, h = out.size
    pads = [round(s * rng.uniform(0.05, 0.3)) if rng.random() < 0.7 else 0 for s in (w, h, w, h)]
    if not any(pads):
        pads[rng.randrange(4)] = round(max(w, h) * 0.2)
    return ImageOps.expand(out, border=tuple(pads), fill=random_colour(rng))


def flip_crop(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Mirror, then keep a random window of 65-95% of each side."""
    out = ImageOps.mirror(image)
    w, h = out.size
    cw, ch = round(w * rng.uniform(0.65, 0.95)), round(h * rng.uniform(0.65, 0.95))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return out.crop((x, y, x + cw, y + ch))


def flip_rotate_pad(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Mirror, rotate by 5-20° either way with the corners filled in one colour, then pad to a
    square (letterbox) in another colour and re-encode as JPEG."""
    out = ImageOps.mirror(image)
    out = out.rotate(
        rng.choice((-1, 1)) * rng.uniform(5, 20),
        Image.Resampling.BICUBIC,
        expand=True,
        fillcolor=random_colour(rng),
    )
    side = max(out.size)
    square = Image.new("RGB", (side, side), random_colour(rng))
    square.paste(out, ((side - out.width) // 2, (side - out.height) // 2))
    return jpeg_reencoded(square, rng.randint(70, 92))


# --- rotations -----------------------------------------------------------------------------------


def rotate_expand_fill(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Rotate by 5-30° either way, keeping the whole photo, corners in a random solid colour."""
    angle = rng.choice((-1, 1)) * rng.uniform(5, 30)
    return image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=random_colour(rng))


def rotate_inscribed(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Rotate by 5-30° either way and crop to the largest rectangle without fill."""
    angle = rng.choice((-1, 1)) * rng.uniform(5, 30)
    turned = image.rotate(angle, Image.Resampling.BILINEAR, expand=True)
    crop_w, crop_h = largest_inscribed(*image.size, math.radians(abs(angle)))
    cx, cy = turned.width / 2, turned.height / 2
    return turned.crop(
        (
            math.ceil(cx - crop_w / 2),
            math.ceil(cy - crop_h / 2),
            math.floor(cx + crop_w / 2),
            math.floor(cy + crop_h / 2),
        )
    )


def rotate_blurred_fill(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """Rotate by 10-30° either way at 75-95% scale over a blurred, enlarged copy of the photo
    (the fill social apps use), same size as the input."""
    w, h = image.size
    back = image.resize((round(w * 1.3), round(h * 1.3)), Image.Resampling.BILINEAR)
    back = back.crop(
        (
            (back.width - w) // 2,
            (back.height - h) // 2,
            (back.width - w) // 2 + w,
            (back.height - h) // 2 + h,
        )
    )
    back = back.filter(ImageFilter.GaussianBlur(max(2, w // 25)))
    photo = scaled(image, rng.uniform(0.75, 0.95)).convert("RGBA")
    photo = photo.rotate(
        rng.choice((-1, 1)) * rng.uniform(10, 30), Image.Resampling.BICUBIC, expand=True
    )
    if photo.width > w or photo.height > h:
        photo = scaled(photo, min(w / photo.width, h / photo.height))
    out = back.convert("RGBA")
    out.alpha_composite(photo, ((w - photo.width) // 2, (h - photo.height) // 2))
    return out.convert("RGB")
