"""Figures of ``moderation demo``: its screened items as benchmark predictions, before and after
the classifier is trained, and the printed before/after table.

The metrics are the benchmark's (:mod:`moderation.benchmark.metrics`, ISC 2021 µAP and recall at
precision 0.99); a demo item's prediction is its best-ranked screening candidate (the order of
the screening explanation: exact match, else classifier probability, else cosine, else a PDQ
proxy, as :attr:`moderation.matching.candidates.Candidate.ranking_score`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moderation.benchmark.metrics import (
    FLAGGED_DECISIONS,
    Prediction,
    micro_ap,
    per_edit_recall_at_decisions,
    recall_at_precision,
)
from moderation.benchmark.protocol import MethodResult

if TYPE_CHECKING:
    from rich.table import Table

    from moderation.matching.decision import ScreeningResult

HIGHLIGHTED_EDITS = ("screenshot", "overlay_bg_60")
"""The edit families the demo calls out: a photo inside a phone screenshot and a photo pasted
onto another photo (:mod:`moderation.media.edits`), the copies a global embedding misses most."""
PDQ_BASELINE = "PDQ alone (screening candidates)"
"""Name of the PDQ-only curve: per item its screening candidate nearest by PDQ Hamming distance
(the screening reports a distance only within its PDQ candidate limit, so an item beyond it
predicts nothing: a PDQ-only matcher's view, not an exhaustive PDQ search)."""


@dataclass(frozen=True)
class DemoItem:
    """One screened demo file: ``kind`` is ``copy``, ``unrelated`` or ``broken``; ``edit`` the
    edit family (``none`` for an unedited photo); ``source`` the bank photo it was made from
    (None for anything but a copy); ``result`` the screening result."""

    path: Path
    kind: str
    edit: str
    source: str | None
    result: ScreeningResult


def top_candidate(result: ScreeningResult) -> dict[str, Any] | None:
    """The best-ranked candidate of the screening explanation (a dict with ``entry_id``,
    ``cosine``, ``pdq_distance``, ``probability``, maybe ``exact``), or None."""
    candidates = result.explanation.get("candidates") or []
    return candidates[0] if candidates else None


def candidate_score(candidate: Mapping[str, Any]) -> float:
    """The candidate's ranking score in [0, 1]-ish: 1.0 for an exact match, else probability,
    else cosine, else ``1 - distance / 256`` (PDQ's 256 bits)."""
    if candidate.get("exact") is not None:
        return 1.0
    for key in ("probability", "cosine"):
        if candidate.get(key) is not None:
            return float(candidate[key])
    return 1.0 - float(candidate["pdq_distance"]) / 256.0


def _prediction(
    item: DemoItem, names: Mapping[str, str], best: Mapping[str, Any] | None
) -> Prediction:
    ref = None if best is None else names.get(str(best["entry_id"]), str(best["entry_id"]))
    score = 0.0 if best is None else candidate_score(best)
    return Prediction(item.path.name, ref, score, item.source, item.edit, item.result.decision)


def predictions(items: Sequence[DemoItem], names: Mapping[str, str]) -> list[Prediction]:
    """One prediction per copy or unrelated photo (not the broken file): the best candidate's
    bank photo (``names`` maps public entry ids such as ``e_3`` to photo names) and score."""
    return [_prediction(i, names, top_candidate(i.result)) for i in items if i.kind != "broken"]


def pdq_predictions(items: Sequence[DemoItem], names: Mapping[str, str]) -> list[Prediction]:
    """The PDQ baseline: per item the candidate with the smallest PDQ distance, scored
    ``1 - distance / 256``; an item with no PDQ candidate predicts nothing."""
    out = []
    for item in items:
        if item.kind == "broken":
            continue
        candidates = item.result.explanation.get("candidates") or []
        found = [c for c in candidates if c.get("pdq_distance") is not None]
        best = min(found, key=lambda c: int(c["pdq_distance"]), default=None)
        pdq_only = (
            None
            if best is None
            else {"entry_id": best["entry_id"], "pdq_distance": best["pdq_distance"]}
        )
        out.append(_prediction(item, names, pdq_only))
    return out


def method_result(name: str, preds: Sequence[Prediction]) -> MethodResult:
    """``preds`` as a benchmark :class:`MethodResult` (µAP, R@P99, per-edit share flagged; no
    timings), so :func:`moderation.benchmark.report.plot_pr_curves` can draw it."""
    recall, threshold = recall_at_precision(preds, 0.99)
    decided = all(p.decision is not None for p in preds)
    return MethodResult(
        name=name,
        predictions=list(preds),
        index_seconds=0.0,
        query_seconds=0.0,
        images_per_second=0.0,
        micro_ap=micro_ap(preds),
        recall_at_p99=recall,
        threshold_at_p99=threshold,
        fpr_block=None,
        negatives_review_rate=None,
        per_edit_recall=per_edit_recall_at_decisions(preds) if decided else {},
    )


@dataclass(frozen=True)
class PhaseFigures:
    """One screening pass's figures: µAP, R@P99, decision counts of copies and of unrelated
    photos, and per edit family ``(flagged, total)`` copies (flagged: block or review)."""

    micro_ap: float
    recall_at_p99: float
    copies: Counter[str]
    unrelated: Counter[str]
    families: dict[str, tuple[int, int]]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "micro_ap": self.micro_ap,
            "recall_at_p99": self.recall_at_p99,
            "copies": dict(self.copies),
            "unrelated": dict(self.unrelated),
            "families": {k: list(v) for k, v in self.families.items()},
        }


def phase_figures(items: Sequence[DemoItem], result: MethodResult) -> PhaseFigures:
    """The figures of one pass over ``items`` whose predictions made ``result``."""
    families: dict[str, tuple[int, int]] = {}
    for item in items:
        if item.kind != "copy":
            continue
        flagged, total = families.get(item.edit, (0, 0))
        hit = item.result.decision in FLAGGED_DECISIONS
        families[item.edit] = (flagged + hit, total + 1)
    return PhaseFigures(
        micro_ap=result.micro_ap,
        recall_at_p99=result.recall_at_p99,
        copies=Counter(i.result.decision for i in items if i.kind == "copy"),
        unrelated=Counter(i.result.decision for i in items if i.kind == "unrelated"),
        families=families,
    )


def _counts(counter: Counter[str]) -> str:
    return " / ".join(str(counter.get(d, 0)) for d in ("block", "review", "allow"))


def _share(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return "-"
    flagged, total = pair
    return f"{flagged}/{total} ({100.0 * flagged / total:.0f}%)"


def before_after_table(before: PhaseFigures, after: PhaseFigures) -> Table:
    """A rich table: one row per figure, columns before and after training; the highlighted
    families' rows are bold."""
    from rich.table import Table

    table = Table("figure", "before training", "after training", title="classifier training")
    table.add_row("µAP", f"{before.micro_ap:.3f}", f"{after.micro_ap:.3f}")
    table.add_row(
        "recall at precision 0.99", f"{before.recall_at_p99:.3f}", f"{after.recall_at_p99:.3f}"
    )
    table.add_row("copies block / review / allow", _counts(before.copies), _counts(after.copies))
    table.add_row(
        "unrelated block / review / allow", _counts(before.unrelated), _counts(after.unrelated)
    )
    for family in sorted(after.families, key=lambda f: (f not in HIGHLIGHTED_EDITS, f)):
        style = "bold" if family in HIGHLIGHTED_EDITS else None
        table.add_row(
            f"{family} copies flagged",
            _share(before.families.get(family)),
            _share(after.families.get(family)),
            style=style,
        )
    return table


def caught_lines(before: PhaseFigures, after: PhaseFigures) -> list[str]:
    """``caught N of M screenshot copies (before training: K)`` per highlighted family."""
    lines = []
    for family in HIGHLIGHTED_EDITS:
        if family not in after.families:
            continue
        flagged, total = after.families[family]
        was = before.families.get(family, (0, total))[0]
        lines.append(f"caught {flagged} of {total} {family} copies (before training: {was})")
    return lines
