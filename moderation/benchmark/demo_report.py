"""The HTML report of ``moderation demo``: one self-contained file with the before/after figures,
the precision-recall plot, and per screened item the query beside the bank photo it matched.

A demo artefact only: it embeds thumbnails of the demo's public sample photos. Nothing here is
ever run on a real bank, whose images are never kept (the project stores only encrypted signals).
Text is escaped with :func:`html.escape`; thumbnails are small base64 JPEGs, so the file needs
nothing beside it.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from moderation.benchmark.demo_figures import (
    HIGHLIGHTED_EDITS,
    DemoItem,
    PhaseFigures,
    top_candidate,
)

THUMBNAIL_PX = 120
"""Longest side of a thumbnail, px."""
DECISION_COLOURS = {
    "block": "#c62828",
    "review": "#ef6c00",
    "allow": "#2e7d32",
    "unscannable": "#6a1b9a",
}
"""Background colour of each decision's badge (Material palette 800 shades)."""
DECISIONS = ("block", "review", "allow")
"""Decisions counted in the summary, most severe first."""
_SIGNAL_KEYS = {
    "exact hash": "exact",
    "PDQ": "pdq",
    "embedding": "global_cosine",
    "classifier": "classifier",
    "region match": "region_cosine",
    "local features": "local_features",
}
"""Each signal column's key in the public explanation's ``signals`` object."""
SIGNAL_COLUMNS = tuple(_SIGNAL_KEYS)
"""The signal columns of a row, in order."""
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:center;vertical-align:middle}
.badge{color:#fff;border-radius:4px;padding:2px 8px;font-weight:600}
.yes{color:#2e7d32;font-weight:700}.no{color:#bbb}
.note{background:#fff8e1;border:1px solid #ffe082;padding:.6em 1em}
img{display:block;margin:auto}
"""


def thumbnail_uri(path: Path, size: int = THUMBNAIL_PX) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of the image file (first frame; longest side
    ``size`` px, JPEG quality 80), or None when the file cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=80)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def signals_agreed(signals: Mapping[str, Any]) -> dict[str, bool]:
    """Which of :data:`SIGNAL_COLUMNS` agreed, from a match's public explanation's ``signals``
    object (:func:`moderation.matching.explain.match_explanation`, the same one
    ``moderation screen --json``, the API result and the review page show): a column is ticked
    when its signal is present and ``agreed``."""
    agreed = {}
    for column, key in _SIGNAL_KEYS.items():
        signal = signals.get(key)
        agreed[column] = isinstance(signal, Mapping) and bool(signal.get("agreed"))
    return agreed


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<span class="no">{html.escape(alt)}</span>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _number(value: object, places: int) -> str:
    return "" if value is None else f"{float(value):.{places}f}"  # type: ignore[arg-type]


def _badge(decision: str) -> str:
    colour = DECISION_COLOURS.get(decision, "#455a64")
    return f'<span class="badge" style="background:{colour}">{html.escape(decision)}</span>'


def item_row(
    item: DemoItem,
    names: Mapping[str, str],
    bank_files: Mapping[str, Path],
    before: str | None = None,
) -> str:
    """One ``<tr>``: query thumbnail, matched bank photo thumbnail, decision badge, the
    decision ``before`` training (a badge, if given), cosine, probability, PDQ distance of the
    best candidate, one cell per signal column (whether the top match's signal agreed, from its
    public explanation), the stage that decided the top match, the reason."""
    result = item.result
    best = top_candidate(result)
    matched = None if best is None else names.get(str(best["entry_id"]))
    bank_file = None if matched is None else bank_files.get(matched)
    explained = result.matches[0].to_json() if result.matches else {}
    agreed = signals_agreed(explained.get("signals") or {})
    cells = [
        _img(thumbnail_uri(item.path), item.path.name) + html.escape(item.path.name),
        (_img(thumbnail_uri(bank_file), matched or "") if bank_file else "")
        + html.escape(matched or "no candidate"),
        _badge(result.decision),
        "" if before is None else _badge(before),
        _number(None if best is None else best.get("cosine"), 3),
        _number(None if best is None else best.get("probability"), 3),
        _number(None if best is None else best.get("pdq_distance"), 0),
        *(
            '<span class="yes">&#10003;</span>' if agreed[c] else '<span class="no">-</span>'
            for c in SIGNAL_COLUMNS
        ),
        html.escape(str(explained.get("decided_by") or "")),
        html.escape(result.reason or ""),
    ]
    return '<tr class="item">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _summary_table(before: PhaseFigures, after: PhaseFigures) -> str:
    rows = [
        ("µAP", f"{before.micro_ap:.3f}", f"{after.micro_ap:.3f}"),
        ("recall at precision 0.99", f"{before.recall_at_p99:.3f}", f"{after.recall_at_p99:.3f}"),
    ]
    for kind, b, a in (
        ("copies", before.copies, after.copies),
        ("unrelated", before.unrelated, after.unrelated),
    ):
        rows += [(f"{kind}: {d}", str(b.get(d, 0)), str(a.get(d, 0))) for d in DECISIONS]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return (
        '<table class="summary"><tr><th>figure</th><th>before training</th>'
        f"<th>after training</th></tr>{body}</table>"
    )


def _family_heading(family: str, before: PhaseFigures, after: PhaseFigures) -> str:
    if family not in after.families:
        return f"<h3>{html.escape(family)}</h3>"
    flagged, total = after.families[family]
    was = before.families.get(family, (0, total))[0]
    mark = " (highlighted family)" if family in HIGHLIGHTED_EDITS else ""
    return (
        f"<h3>{html.escape(family)}{mark}: {flagged} of {total} copies flagged after training "
        f"({was} before)</h3>"
    )


def render_report(
    passes: tuple[Sequence[DemoItem], Sequence[DemoItem]],
    names: Mapping[str, str],
    bank_files: Mapping[str, Path],
    figures: tuple[PhaseFigures, PhaseFigures],
    plot: Path,
) -> str:
    """The report's HTML: the demo-artefact note, the summary, the PR plot (``plot``, a PNG,
    embedded), then per edit family (copies first, then unrelated and broken files) a table of
    each item's after-training screening (``passes``: before and after, same items in the same
    order) with its decision before training beside it. ``names`` maps public entry ids to
    photo names, ``bank_files`` photo names to the demo's bank files."""
    before, after = figures
    items = passes[1]
    was = {i.path: i.result.decision for i in passes[0]}
    plot_uri = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode("ascii")
    header = "".join(
        f"<th>{html.escape(h)}</th>"
        for h in (
            "query",
            "matched bank photo",
            "decision",
            "before training",
            "cosine",
            "probability",
            "PDQ distance",
            *SIGNAL_COLUMNS,
            "decided by",
            "reason",
        )
    )
    groups: dict[tuple[str, str], list[DemoItem]] = {}
    for item in items:
        groups.setdefault((item.kind, item.edit), []).append(item)
    order = sorted(groups, key=lambda k: (k[0] != "copy", k[1] not in HIGHLIGHTED_EDITS, k))
    sections = []
    for kind, edit in order:
        title = (
            _family_heading(edit, before, after)
            if kind == "copy"
            else (f"<h3>{html.escape(kind)}: {html.escape(edit)}</h3>")
        )
        rows = "".join(
            item_row(i, names, bank_files, was.get(i.path)) for i in groups[(kind, edit)]
        )
        sections.append(f"{title}<table><tr>{header}</tr>{rows}</table>")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>moderation demo report</title><style>{_STYLE}</style></head><body>"
        "<h1>moderation demo: before and after classifier training</h1>"
        '<p class="note">Demo artefact: the thumbnails are of public sample photos the demo '
        "made. A real bank keeps no images (only encrypted signals), and no such report is "
        "ever produced for one.</p>"
        f"<h2>Summary</h2>{_summary_table(before, after)}"
        f'<img src="{plot_uri}" alt="precision-recall curves before and after training">'
        f"<h2>Screened items (after training)</h2>{''.join(sections)}</body></html>"
    )
