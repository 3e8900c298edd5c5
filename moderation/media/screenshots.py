"""The ``screenshot`` edit of the benchmark (BENCHMARKS.md): the photo inside a drawn app screen.

A phone (portrait) or desktop (sidebar) layout with a status bar, an app header, text lines and
buttons, all drawn with Pillow from the caller's seeded :class:`random.Random`; registered in
:data:`moderation.media.edits.EDITS`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from PIL import Image, ImageDraw

from moderation.media.drawing import (
    RGB,
    STICKER_COLOURS,
    WORDS,
    Font,
    default_font,
    jpeg_reencoded,
    random_words,
    scaled,
    text_size,
)


def _ui_palette(rng: random.Random) -> dict[str, RGB]:
    accent = rng.choice(STICKER_COLOURS)
    if rng.random() < 0.5:
        return {
            "bg": (255, 255, 255),
            "bar": (246, 246, 248),
            "text": (20, 20, 20),
            "muted": (200, 200, 205),
            "accent": accent,
        }
    return {
        "bg": (16, 16, 18),
        "bar": (32, 32, 36),
        "text": (235, 235, 235),
        "muted": (80, 80, 88),
        "accent": accent,
    }


def _text_lines(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    rng: random.Random,
    palette: Mapping[str, RGB],
    font: Font,
) -> None:
    """Fill ``box`` with a few lines of real words, then grey placeholder bars (loading text)."""
    left, top, right, bottom = box
    line_h = text_size(draw, "Ag", font)[1] * 1.5
    y = top
    for index in range(rng.randint(1, 3)):
        if y + line_h > bottom:
            return
        colour = palette["text"] if index == 0 else palette["muted"]
        words = random_words(rng, 3, 8)
        while words and text_size(draw, words, font)[0] > right - left:
            words = words.rsplit(" ", 1)[0] if " " in words else ""
        draw.text((left, y), words, font=font, fill=colour)
        y += line_h
    while y + line_h <= bottom:
        bar_right = left + (right - left) * rng.uniform(0.4, 1.0)
        draw.rounded_rectangle(
            (left, y + line_h * 0.2, bar_right, y + line_h * 0.75), radius=3, fill=palette["muted"]
        )
        y += line_h


def _status_bar(
    draw: ImageDraw.ImageDraw,
    width: int,
    height: int,
    palette: Mapping[str, RGB],
    rng: random.Random,
) -> None:
    font = default_font(round(height * 0.55))
    clock = f"{rng.randint(7, 23)}:{rng.randint(0, 59):02d}"
    draw.text((height * 0.8, height / 2), clock, font=font, fill=palette["text"], anchor="lm")
    battery_w, battery_h = height * 1.1, height * 0.5
    x1, y0 = width - height * 0.6, (height - battery_h) / 2
    draw.rounded_rectangle(
        (x1 - battery_w, y0, x1, y0 + battery_h), radius=2, outline=palette["text"]
    )
    level = rng.uniform(0.2, 1.0)
    draw.rectangle(
        (
            x1 - battery_w + 2,
            y0 + 2,
            x1 - battery_w + 2 + (battery_w - 4) * level,
            y0 + battery_h - 2,
        ),
        fill=palette["text"],
    )
    for k in range(4):  # signal bars
        bar_x = x1 - battery_w - height * (1.6 - 0.25 * k)
        draw.rectangle(
            (bar_x, y0 + battery_h * (1 - 0.25 * (k + 1)), bar_x + height * 0.15, y0 + battery_h),
            fill=palette["text"],
        )


def _app_header(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    palette: Mapping[str, RGB],
    rng: random.Random,
) -> None:
    left, top, right, bottom = box
    height = bottom - top
    draw.rectangle(box, fill=palette["bar"])
    middle = (top + bottom) / 2
    draw.line(
        (left + height * 0.45, middle, left + height * 0.25, middle - height * 0.18),
        fill=palette["text"],
        width=3,
    )
    draw.line(
        (left + height * 0.25, middle, left + height * 0.45, middle + height * 0.18),
        fill=palette["text"],
        width=3,
    )
    radius = height * 0.3
    avatar_x = left + height * 0.9
    draw.ellipse(
        (avatar_x, middle - radius, avatar_x + 2 * radius, middle + radius), fill=palette["accent"]
    )
    title = rng.choice(
        ("@" + rng.choice(WORDS) + str(rng.randint(1, 999)), "Photos", "Feed", "Chat")
    )
    draw.text(
        (avatar_x + 2.6 * radius, middle),
        title,
        font=default_font(round(height * 0.38)),
        fill=palette["text"],
        anchor="lm",
    )
    for k in range(3):  # the "more" menu dots
        draw.ellipse(
            (
                right - height * 0.4 - 1.5,
                middle - height * 0.18 + k * height * 0.18 - 1.5,
                right - height * 0.4 + 1.5,
                middle - height * 0.18 + k * height * 0.18 + 1.5,
            ),
            fill=palette["text"],
        )


def _buttons(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    palette: Mapping[str, RGB],
    rng: random.Random,
) -> None:
    """A row of icon-like buttons and one labelled pill button, as under a social media post."""
    left, top, right, bottom = box
    size = bottom - top
    x = left
    for _ in range(3):
        draw.ellipse((x, top, x + size, bottom), outline=palette["text"], width=2)
        x += size * 1.6
    label = rng.choice(("Follow", "Share", "Reply", "Send", "Save"))
    font = default_font(round(size * 0.55))
    label_w = text_size(draw, label, font)[0]
    pill = (right - label_w - size * 1.2, top, right, bottom)
    draw.rounded_rectangle(pill, radius=size / 2, fill=palette["accent"])
    draw.text(
        ((pill[0] + pill[2]) / 2, (top + bottom) / 2),
        label,
        font=font,
        fill=(255, 255, 255),
        anchor="mm",
    )


def screenshot(
    image: Image.Image, rng: random.Random, background: Image.Image | None
) -> Image.Image:
    """A screenshot of the photo in an app: a phone (portrait) or desktop (sidebar) layout with a
    status bar, an app header, text lines and buttons around the photo, which takes 35-60% of the
    canvas area; then a JPEG re-encode at quality 70-90 as when the screenshot is shared."""
    share = rng.uniform(0.35, 0.6)
    palette = _ui_palette(rng)
    photo = scaled(image, rng.uniform(0.8, 1.2))
    unit = max(12, round(max(photo.size) / 22))  # chrome scales with the photo's size
    if rng.random() < 0.6:
        canvas, photo_box = _phone_layout(photo.size, share, unit, palette, rng)
    else:
        canvas, photo_box = _desktop_layout(photo.size, share, unit, palette, rng)
    canvas.paste(photo, photo_box)
    return jpeg_reencoded(canvas, rng.randint(70, 90))


def _phone_layout(
    photo_size: tuple[int, int],
    share: float,
    unit: int,
    palette: Mapping[str, RGB],
    rng: random.Random,
) -> tuple[Image.Image, tuple[int, int]]:
    """A portrait app screen around a ``photo_size`` hole: (canvas, top-left of the photo)."""
    photo_w, photo_h = photo_size
    margin = rng.choice((0, unit // 2))
    canvas_w = photo_w + 2 * margin
    chrome_top = round(unit * 1.1) + round(unit * 2.2)
    min_h = chrome_top + photo_h + round(unit * 1.6) + 2 * unit + round(unit * 2.2)
    # A tall portrait photo at a low share would need a scrolling screenshot taller than
    # phones are (about 2.2:1), so the canvas stops at 2.4:1 and the share rises instead.
    canvas_h = max(min_h, min(round(2.4 * canvas_w), round(photo_w * photo_h / (share * canvas_w))))
    photo_box = (margin, chrome_top + unit // 2)
    canvas = Image.new("RGB", (canvas_w, canvas_h), palette["bg"])
    draw = ImageDraw.Draw(canvas)
    _status_bar(draw, canvas_w, round(unit * 1.1), palette, rng)
    _app_header(draw, (0, round(unit * 1.1), canvas_w, chrome_top), palette, rng)
    below = photo_box[1] + photo_h + unit // 2
    _buttons(
        draw,
        (unit * 0.6, below, canvas_w - unit * 0.6, below + round(unit * 1.1)),
        palette,
        rng,
    )
    nav_top = canvas_h - round(unit * 2.2)
    _text_lines(
        draw,
        (unit * 0.6, below + unit * 1.6, canvas_w - unit * 0.6, nav_top),
        rng,
        palette,
        default_font(round(unit * 0.7)),
    )
    draw.rectangle((0, nav_top, canvas_w, canvas_h), fill=palette["bar"])
    for k in range(5):  # bottom navigation icons
        centre = canvas_w * (k + 0.5) / 5
        draw.rounded_rectangle(
            (
                centre - unit * 0.45,
                nav_top + unit * 0.65,
                centre + unit * 0.45,
                nav_top + unit * 1.55,
            ),
            radius=unit * 0.2,
            outline=palette["text"],
            width=2,
        )
    return canvas, photo_box


def _desktop_layout(
    photo_size: tuple[int, int],
    share: float,
    unit: int,
    palette: Mapping[str, RGB],
    rng: random.Random,
) -> tuple[Image.Image, tuple[int, int]]:
    """A wide app window with a sidebar around a ``photo_size`` hole: (canvas, photo's corner)."""
    photo_w, photo_h = photo_size
    top_bar = round(unit * 2.2)
    canvas_h = top_bar + photo_h + 4 * unit
    sidebar = round(unit * rng.uniform(5, 8))
    min_w = sidebar + photo_w + 2 * unit
    canvas_w = max(min_w, round(photo_w * photo_h / (share * canvas_h)))
    canvas = Image.new("RGB", (canvas_w, canvas_h), palette["bg"])
    draw = ImageDraw.Draw(canvas)
    _app_header(draw, (0, 0, canvas_w, top_bar), palette, rng)
    draw.rectangle((0, top_bar, sidebar, canvas_h), fill=palette["bar"])
    _text_lines(
        draw,
        (unit * 0.5, top_bar + unit, sidebar - unit * 0.5, canvas_h - unit),
        rng,
        palette,
        default_font(round(unit * 0.6)),
    )
    column = canvas_w - sidebar - photo_w
    photo_box = (sidebar + round(column * rng.uniform(0.1, 0.5)), top_bar + unit)
    _buttons(
        draw,
        (
            photo_box[0],
            photo_box[1] + photo_h + unit * 0.8,
            photo_box[0] + photo_w,
            photo_box[1] + photo_h + unit * 1.8,
        ),
        palette,
        rng,
    )
    text_left = photo_box[0] + photo_w + unit
    if canvas_w - text_left > 3 * unit:
        _text_lines(
            draw,
            (text_left, top_bar + unit, canvas_w - unit, canvas_h - unit),
            rng,
            palette,
            default_font(round(unit * 0.7)),
        )
    return canvas, photo_box
