"""Screenshot implementations of the edit registry (:mod:`moderation.media.implementations`):
the photo inside drawn social-media pages, each a code path of its own.

* :func:`feed_post` (tuning): a feed post: status bar, app bar, avatar and user name, the photo
  at 80-100% of the width, a like/comment/share row, a likes count, a caption, bottom navigation.
* :func:`chat_bubble` (tuning): a messenger thread, the photo inside a bubble among text bubbles.
* :func:`feed_stories` (unseen): a dark or light feed with a stories row of avatars, the photo
  with rounded corners at 55-90% of the width, the next post's header cut off, downscaled as a
  phone screenshot sent on.
* :func:`story_viewer` (unseen): a full-screen 9:16 story: blurred photo or gradient behind the
  photo, progress bars, a reply pill, a text sticker.
* :func:`desktop_lightbox` (unseen): a browser window (tabs, address bar), a dimmed page behind a
  lightbox with the photo at 20-45% of the area and a comments panel.

Every random parameter comes from the caller's :class:`random.Random`; text uses Pillow's
default font, so no system font is needed.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFilter

from moderation.media.drawing import (
    RGB,
    STICKER_COLOURS,
    WORDS,
    default_font,
    jpeg_reencoded,
    random_words,
    scaled,
)

_LIGHT = {"bg": (255, 255, 255), "panel": (242, 242, 245), "text": (18, 18, 18)}
_DARK = {"bg": (0, 0, 0), "panel": (28, 28, 30), "text": (240, 240, 240)}


def _theme(rng: random.Random, dark_share: float = 0.5) -> dict[str, RGB]:
    return dict(_DARK if rng.random() < dark_share else _LIGHT)


def _user(rng: random.Random) -> str:
    return f"{rng.choice(WORDS).strip('#@')}_{rng.choice(WORDS).strip('#@')}{rng.randint(1, 99)}"


def _avatar(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, rng: random.Random) -> None:
    """A round avatar centred at (x, y): a coloured disc with a ring (story) or not."""
    colour = rng.choice(STICKER_COLOURS)
    if rng.random() < 0.5:
        draw.ellipse(
            (x - r * 1.15, y - r * 1.15, x + r * 1.15, y + r * 1.15), outline=colour, width=2
        )
    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    draw.ellipse((x - r * 0.35, y - r * 0.55, x + r * 0.35, y + r * 0.1), fill=(255, 255, 255))


def _icon_row(
    draw: ImageDraw.ImageDraw, x: float, y: float, size: float, colour: RGB, rng: random.Random
) -> None:
    """Heart, speech bubble and paper plane outlines, as under a post."""
    heart_fill = (237, 73, 86) if rng.random() < 0.4 else None
    draw.polygon(
        [(x, y + size * 0.3), (x + size / 2, y + size), (x + size, y + size * 0.3)],
        outline=colour,
        fill=heart_fill,
    )
    draw.ellipse((x, y, x + size / 2, y + size * 0.55), outline=colour, fill=heart_fill)
    draw.ellipse((x + size / 2, y, x + size, y + size * 0.55), outline=colour, fill=heart_fill)
    bx = x + size * 1.7
    draw.ellipse((bx, y, bx + size, y + size), outline=colour, width=2)
    px = bx + size * 1.7
    draw.polygon(
        [(px, y + size * 0.4), (px + size, y), (px + size * 0.6, y + size)], outline=colour
    )


def feed_post(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A social feed post around the photo (photo at 80-100% of the canvas width)."""
    theme = _theme(rng)
    photo = scaled(image, rng.uniform(0.7, 1.1))
    width = round(photo.width / rng.uniform(0.8, 1.0))
    unit = max(10, width // 24)
    top = unit * 4 + unit * 3  # status bar + app bar, then the post header
    height = top + photo.height + unit * 7 + unit * 2
    canvas = Image.new("RGB", (width, height), theme["bg"])
    draw = ImageDraw.Draw(canvas)
    font = default_font(round(unit * 0.9))
    draw.text(
        (unit, unit),
        f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}",
        fill=theme["text"],
        font=font,
    )
    draw.text(
        (unit, unit * 2.4),
        rng.choice(("Instagrid", "Snapfeed", "Pixly")),
        fill=theme["text"],
        font=default_font(unit * 2),
    )
    _avatar(draw, unit * 1.8, unit * 5.5, unit * 0.9, rng)
    draw.text((unit * 3.3, unit * 5), _user(rng), fill=theme["text"], font=font)
    canvas.paste(photo, ((width - photo.width) // 2, top))
    y = top + photo.height + unit * 0.6
    _icon_row(draw, unit, y, unit * 1.4, theme["text"], rng)
    draw.text(
        (unit, y + unit * 2.2), f"{rng.randint(2, 9999)} likes", fill=theme["text"], font=font
    )
    draw.text((unit, y + unit * 3.6), random_words(rng, 3, 7), fill=theme["text"], font=font)
    draw.rectangle((0, height - unit * 2, width, height), fill=theme["panel"])
    return jpeg_reencoded(canvas, rng.randint(75, 92))


def chat_bubble(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A messenger thread: text bubbles, then the photo in a bubble at 50-75% of the width."""
    theme = _theme(rng)
    share = rng.uniform(0.5, 0.75)
    photo = scaled(image, rng.uniform(0.6, 1.0))
    width = round(photo.width / share)
    unit = max(10, width // 26)
    n_before, n_after = rng.randint(1, 3), rng.randint(0, 2)
    height = unit * 5 + (n_before + n_after) * unit * 3 + photo.height + unit * 5
    canvas = Image.new("RGB", (width, height), theme["bg"])
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, unit * 4), fill=theme["panel"])
    _avatar(draw, unit * 2, unit * 2, unit * 1.1, rng)
    font = default_font(round(unit * 0.9))
    draw.text((unit * 3.8, unit * 1.4), _user(rng), fill=theme["text"], font=font)
    accent = rng.choice(STICKER_COLOURS)
    y = unit * 5
    mine = rng.random() < 0.5
    for k in range(n_before + 1 + n_after):
        left_side = (k % 2 == 0) != mine
        if k == n_before:
            x = unit if left_side else width - unit - photo.width
            draw.rounded_rectangle(
                (x - 4, y - 4, x + photo.width + 4, y + photo.height + 4), radius=unit, fill=accent
            )
            canvas.paste(photo, (x, y))
            y += photo.height + unit * 2
            continue
        text = random_words(rng, 2, 5)
        text_w = draw.textlength(text, font=font)
        x = unit if left_side else round(width - unit * 3 - text_w)
        fill = theme["panel"] if left_side else accent
        draw.rounded_rectangle((x, y, x + text_w + unit * 2, y + unit * 2), radius=unit, fill=fill)
        draw.text((x + unit, y + unit * 0.5), text, fill=theme["text"], font=font)
        y += unit * 3
    return jpeg_reencoded(canvas, rng.randint(70, 92))


def _rounded(photo: Image.Image, radius: int, bg: RGB) -> Image.Image:
    mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).rounded_rectangle(
        (0, 0, photo.width - 1, photo.height - 1), radius=radius, fill=255
    )
    out = Image.new("RGB", photo.size, bg)
    out.paste(photo, (0, 0), mask)
    return out


def feed_stories(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A feed with a stories row above a rounded-corner photo and the next post cut off; the
    screenshot is then downscaled to 50-85% and JPEG-encoded at quality 55-85."""
    theme = _theme(rng, dark_share=0.7)
    share = rng.uniform(0.55, 0.9)
    photo = scaled(image, rng.uniform(0.8, 1.2))
    width = round(photo.width / share)
    unit = max(10, width // 28)
    stories_h = unit * 5
    top = unit * 3 + stories_h + unit * 4
    height = top + photo.height + unit * 9
    canvas = Image.new("RGB", (width, height), theme["bg"])
    draw = ImageDraw.Draw(canvas)
    font = default_font(round(unit * 0.85))
    draw.text(
        (unit, unit * 0.6),
        rng.choice(("For you", "Following", "Home")),
        fill=theme["text"],
        font=default_font(round(unit * 1.5)),
    )
    for k in range(rng.randint(4, 7)):
        _avatar(draw, unit * (2 + 3.6 * k), unit * 5, unit * 1.4, rng)
    draw.line((0, unit * 7.6, width, unit * 7.6), fill=theme["panel"], width=2)
    draw.text(
        (unit * 1.5, unit * 8.6),
        _user(rng) + " · " + f"{rng.randint(1, 23)}h",
        fill=theme["text"],
        font=font,
    )
    x = round((width - photo.width) * rng.uniform(0.0, 1.0))
    canvas.paste(_rounded(photo, unit, theme["bg"]), (x, top))
    y = top + photo.height + unit
    draw.text(
        (x, y), f"♡ {rng.randint(1, 999)}   ⌁ {rng.randint(0, 99)}", fill=theme["text"], font=font
    )
    draw.text((x, y + unit * 1.8), random_words(rng, 4, 9), fill=theme["text"], font=font)
    next_top = y + unit * 4.5
    _avatar(draw, unit * 2, next_top + unit * 1.5, unit, rng)
    draw.rectangle(
        (unit, next_top + unit * 3.2, width - unit, height), fill=rng.choice(STICKER_COLOURS)
    )
    small = scaled(canvas, rng.uniform(0.5, 0.85))
    return jpeg_reencoded(small, rng.randint(55, 85))


def _gradient(size: tuple[int, int], top: RGB, bottom: RGB) -> Image.Image:
    column = Image.new("RGB", (1, 256))
    for y in range(256):
        t = y / 255
        column.putpixel(
            (0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        )
    return column.resize(size, Image.Resampling.BILINEAR)


def story_viewer(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A full-screen 9:16 story: the photo at 70-100% of the width over its own blurred copy or
    a gradient, progress bars, a user line, a text sticker and a reply pill."""
    photo_w = round(image.width * rng.uniform(0.6, 1.0))
    width = round(photo_w / rng.uniform(0.7, 1.0))
    height = max(round(width * 16 / 9), round(photo_w * image.height / image.width) + width // 2)
    photo = image.resize(
        (photo_w, round(photo_w * image.height / image.width)), Image.Resampling.BICUBIC
    )
    if rng.random() < 0.5:
        back = image.resize((width, height), Image.Resampling.BILINEAR).filter(
            ImageFilter.GaussianBlur(width / 20)
        )
    else:
        back = _gradient((width, height), rng.choice(STICKER_COLOURS), rng.choice(STICKER_COLOURS))
    canvas = back.copy()
    canvas.paste(
        photo, ((width - photo_w) // 2, round((height - photo.height) * rng.uniform(0.3, 0.6)))
    )
    draw = ImageDraw.Draw(canvas)
    unit = max(2, width // 30)
    bars = rng.randint(2, 5)
    segment = (width - 2 * unit) / bars
    gap = min(2.0, segment / 4)
    for k in range(bars):
        x0 = unit + k * segment
        draw.rectangle((x0 + gap, unit, x0 + segment - gap, unit + 3), fill=(255, 255, 255))
    _avatar(draw, unit * 2, unit * 3.2, unit, rng)
    draw.text((unit * 3.6, unit * 2.6), _user(rng), fill=(255, 255, 255), font=default_font(unit))
    sticker_font = default_font(round(unit * rng.uniform(1.2, 2.2)))
    draw.text(
        (rng.uniform(unit, width / 2), rng.uniform(height * 0.1, height * 0.3)),
        random_words(rng, 1, 3),
        fill=rng.choice(STICKER_COLOURS),
        font=sticker_font,
        stroke_width=2,
        stroke_fill=(255, 255, 255),
    )
    pill = (unit, height - unit * 3.5, width - unit * 4, height - unit)
    draw.rounded_rectangle(pill, radius=unit, outline=(255, 255, 255), width=2)
    draw.text(
        (unit * 2, height - unit * 2.8),
        "Send message",
        fill=(255, 255, 255),
        font=default_font(unit),
    )
    return jpeg_reencoded(canvas, rng.randint(65, 90))


def desktop_lightbox(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A browser window: tab strip and address bar, a dimmed page, a lightbox with the photo at
    20-45% of the window's area and a comments panel to its right."""
    photo = scaled(image, rng.uniform(0.8, 1.1))
    share = rng.uniform(0.2, 0.45)
    panel_w = round(photo.width * rng.uniform(0.45, 0.7))
    unit = max(2, photo.width // 30)
    chrome_h = unit * 5
    area = photo.width * photo.height / share
    height = max(chrome_h + photo.height + unit * 4, round((area * 10 / 16) ** 0.5))
    width = max(photo.width + panel_w + unit * 4, round(area / height))
    canvas = Image.new("RGB", (width, height), (rng.randint(200, 250),) * 3)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, chrome_h), fill=(222, 225, 230))
    for k in range(rng.randint(2, 5)):
        draw.rounded_rectangle(
            (unit + k * unit * 9, unit * 0.5, unit * 9.5 + k * unit * 9, unit * 2.2),
            radius=4,
            fill=(250, 250, 250) if k == 0 else (205, 208, 214),
        )
    draw.rounded_rectangle(
        (unit * 4, unit * 2.7, width - unit * 4, unit * 4.5), radius=unit, fill=(255, 255, 255)
    )
    url = f"https://www.{rng.choice(WORDS).strip('#@')}.com/p/{rng.randint(10**5, 10**6)}"
    draw.text((unit * 5, unit * 3.1), url, fill=(60, 60, 60), font=default_font(unit))
    page = Image.new("RGB", (width, height - chrome_h), (0, 0, 0))
    canvas.paste(
        Image.blend(canvas.crop((0, chrome_h, width, height)), page, rng.uniform(0.5, 0.8)),
        (0, chrome_h),
    )
    box_w = photo.width + panel_w
    x = round((width - box_w) * rng.uniform(0.3, 0.7))
    y = chrome_h + round((height - chrome_h - photo.height) * rng.uniform(0.3, 0.7))
    canvas.paste(photo, (x, y))
    theme = _theme(rng)
    draw.rectangle((x + photo.width, y, x + box_w, y + photo.height), fill=theme["bg"])
    font = default_font(round(unit * 0.8))
    for k in range(rng.randint(2, 6)):
        cy = y + unit * (1.5 + 2.6 * k)
        if cy > y + photo.height - unit:
            break
        _avatar(draw, x + photo.width + unit * 1.5, cy, unit * 0.8, rng)
        draw.text(
            (x + photo.width + unit * 3, cy - unit * 0.5),
            random_words(rng, 2, 4),
            fill=theme["text"],
            font=font,
        )
    return jpeg_reencoded(canvas, rng.randint(70, 92))
