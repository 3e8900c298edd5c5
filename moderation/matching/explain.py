"""Why an entry matched and which stage decided: one record per match, one public view of it.

Screening computes, per match, what each signal measured and which threshold it passed
(:func:`match_evidence`, at decision time, under the policy then in force); the match row's
``signals`` JSON stores it (:meth:`moderation.matching.decision.MatchResult.record`).
:func:`match_explanation` turns a stored record into the public match fields (``level``,
``decided_by`` and the ``signals`` object) and :func:`result_decided_by` names the stage that
decided the whole result. ``moderation screen --json``, the API result, its callbacks
(:mod:`moderation.service.results`) and the review page
(:mod:`moderation.governance.review_display`) all call these two functions, so they cannot
drift apart. Records written before the evidence was stored (only ``agreed``, ``level``,
``frame`` and a video's ``timestamp_s``) still render: what they lack is null, and the stage is
inferred from their agreeing signals (:func:`_inferred_stage`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moderation.matching.candidates import Candidate
    from moderation.matching.policy import CategoryRules

MATCH_STAGES: tuple[str, ...] = (
    "exact_hash",
    "cosine",
    "pdq",
    "vpdq",
    "classifier",
    "classifier_band",
    "flood_control",
)
"""What may decide a match's level: the upload's bytes are a listed file (``exact_hash``); the
global cosine similarity, the PDQ Hamming distance or a video's vPDQ match percentages reached
the category's thresholds (``cosine``, ``pdq``, ``vpdq``); the classifier's probability
thresholds (``classifier``); the policy's classifier band, the safety floor, kept the level
away from the classifier's (``classifier_band``); a quarantined entry only sends to review
(``flood_control``)."""

RESULT_STAGES: tuple[str, ...] = (*MATCH_STAGES, "allow_bank", "no_match", "unscannable")
"""What may decide a whole result: its top match's stage, an allow-bank match that suppressed
the block matches (``allow_bank``), nothing reaching a level (``no_match``), or an upload that
could not be decoded (``unscannable``)."""

# Classifier feature -> the region kind the public object names
# (moderation.matching.classifier.features.FEATURE_NAMES).
_REGION_KINDS: dict[str, str] = {
    "region_to_global": "query_view",
    "global_to_region": "entry_window",
    "region_to_region": "view_window",
    "window_to_paste": "feature_window",
}
# The agreeing-signal names (moderation.matching.classifier.stage.agreed_signals) that mean a
# region or view agreed.
_REGION_AGREED = ("query_region", "entry_region", "feature_window")

_AGREED_KINDS = {
    "query_region": "query_view",
    "entry_region": "entry_window",
    "feature_window": "feature_window",
}


def _passed(
    value: float | None, block: float | None, review: float | None, *, lower: bool = False
) -> tuple[str, float | None]:
    """("block" | "review" | "none", the threshold passed or None) for ``value``: at or above
    the thresholds (``lower``: at or below, for a distance); a threshold of None never passes."""
    for name, threshold in (("block", block), ("review", review)):
        if value is None or threshold is None:
            continue
        if (value <= threshold) if lower else (value >= threshold):
            return name, threshold
    return "none", None


def _vpdq_passed(rules: CategoryRules, cand: Candidate) -> tuple[str, float | None]:
    """:func:`_passed` of a vPDQ match: its query match percentage against the category's
    ``block_vpdq_percent``/``review_vpdq_percent``, only while its compared match percentage
    reaches ``vpdq_compared_percent`` (``VPDQSignal.compare_hash``, as
    :func:`moderation.matching.decision.vpdq_reaches`)."""
    match = cand.vpdq
    if match is None or match.compared_match_percent < rules.vpdq_compared_percent:
        return "none", None
    return _passed(match.query_match_percent, rules.block_vpdq_percent, rules.review_vpdq_percent)


def _region(features: Mapping[str, float]) -> dict[str, Any] | None:
    """The best region or view cosine when it beats the global cosine, else None; on a tie
    the simpler kind (``region_to_region`` is at least the other two, so it is named only
    when a view against a window scored higher than either alone)."""
    best: tuple[float, str] | None = None
    for feature, kind in _REGION_KINDS.items():
        value = features.get(feature)
        if value is not None and (best is None or value > best[0]):
            best = (value, kind)
    if best is None or best[0] <= features.get("cosine", -1.0):
        return None
    return {"kind": best[1], "cosine": best[0], "views": int(features.get("views", 0))}


def match_stage(rules: CategoryRules, cand: Candidate, *, held: bool, quarantined: bool) -> str:
    """Which of :data:`MATCH_STAGES` set ``cand``'s level under ``rules``
    (:func:`moderation.matching.decision.match_step`): ``held`` the band clamped the classifier,
    ``quarantined`` flood control lowered a block to review. Between cosine, PDQ and vPDQ, the
    one whose own step is highest (in that order on a tie)."""
    if quarantined:
        return "flood_control"
    if cand.exact is not None:
        return "exact_hash"
    if held:
        return "classifier_band"
    if cand.probability is not None and rules.block_probability is not None:
        return "classifier"
    order = ("none", "review", "block")
    steps = {
        "cosine": _passed(cand.cosine, rules.block_cosine, rules.review_cosine)[0],
        "pdq": _passed(
            cand.pdq_distance, rules.block_pdq_distance, rules.review_pdq_distance, lower=True
        )[0],
        "vpdq": _vpdq_passed(rules, cand)[0],
    }
    return max(steps, key=lambda name: order.index(steps[name]))


def match_evidence(rules: CategoryRules, cand: Candidate, stage: str) -> dict[str, Any]:
    """The stored evidence of one match (merged into the match row's ``signals`` JSON):
    ``decided_by`` (``stage``), ``passed`` and ``thresholds`` per signal (``cosine``, ``pdq``,
    ``vpdq``, ``probability``: which of the category's block/review thresholds the value
    reached, and that threshold), the best ``region`` (``kind``, ``cosine``, ``views``) when
    the classifier stage found one above the global cosine, ``local_inliers`` when the
    upload's keypoints were verified, and the ``exact`` hash kind."""
    passed: dict[str, str] = {}
    thresholds: dict[str, float | None] = {}
    if cand.cosine is not None:
        passed["cosine"], thresholds["cosine"] = _passed(
            cand.cosine, rules.block_cosine, rules.review_cosine
        )
    if cand.pdq_distance is not None:
        passed["pdq"], thresholds["pdq"] = _passed(
            cand.pdq_distance, rules.block_pdq_distance, rules.review_pdq_distance, lower=True
        )
    if cand.vpdq is not None:
        passed["vpdq"], thresholds["vpdq"] = _vpdq_passed(rules, cand)
    if cand.probability is not None:
        passed["probability"], thresholds["probability"] = _passed(
            cand.probability, rules.block_probability, rules.review_probability
        )
    evidence: dict[str, Any] = {"decided_by": stage, "passed": passed, "thresholds": thresholds}
    region = _region(cand.features)
    if region is not None:
        evidence["region"] = region
    if "inliers" in cand.features:
        evidence["local_inliers"] = int(cand.features["inliers"])
    if cand.exact is not None:
        evidence["exact"] = cand.exact
    return evidence


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _measured(
    record: Mapping[str, Any], key: str, value: float | None, agreed: bool | None
) -> dict[str, Any] | None:
    """``{"value", "passed", "threshold", "agreed"}`` of one thresholded signal, or None when
    it was not measured; ``passed``/``threshold`` null for a record without evidence. A signal
    that agreed without a value of its own (the classifier stage's PDQ of a view of the
    upload, which the candidate search does not keep) shows ``agreed`` with null values."""
    if value is None:
        return (
            {"value": None, "passed": None, "threshold": None, "agreed": True} if agreed else None
        )
    passed = _mapping(record, "passed")
    return {
        "value": int(value) if key == "pdq" else _round(value),
        "passed": passed.get(key),
        "threshold": _mapping(record, "thresholds").get(key),
        "agreed": agreed,
    }


def _vpdq_json(record: Mapping[str, Any], agreed: bool) -> dict[str, Any] | None:
    """The ``vpdq`` signal of a video matched on a vPDQ entry: ``value`` (query match
    percentage), ``compared`` (compared match percentage), ``passed``, ``threshold``,
    ``agreed``; None for other matches."""
    stored = _mapping(record, "vpdq")
    if "query_match_percent" not in stored:
        return None
    return {
        "value": stored["query_match_percent"],
        "compared": stored.get("compared_match_percent"),
        "passed": _mapping(record, "passed").get("vpdq"),
        "threshold": _mapping(record, "thresholds").get("vpdq"),
        "agreed": agreed,
    }


def _mapping(record: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = record.get(key)
    return value if isinstance(value, Mapping) else {}


def _exact_kind(record: Mapping[str, Any], agreed: Sequence[str]) -> str | None:
    kind = record.get("exact")
    if isinstance(kind, str):
        return kind
    return next((s.removeprefix("exact_") for s in agreed if s.startswith("exact_")), None)


def _inferred_stage(agreed: Sequence[str]) -> str | None:
    """The stage of a record stored without ``decided_by``, from its agreeing signals."""
    tags = set(agreed)
    if "quarantined" in tags:
        return "flood_control"
    if any(s.startswith("exact_") for s in agreed):
        return "exact_hash"
    for tag, stage in (
        ("classifier_band", "classifier_band"),
        ("classifier", "classifier"),
        ("cosine", "cosine"),
        ("pdq", "pdq"),
        ("vpdq", "vpdq"),
    ):
        if tag in tags:
            return stage
    return None


def _local_json(record: Mapping[str, Any], agreed: Sequence[str]) -> dict[str, Any] | None:
    """``{"inliers", "agreed"}`` when the upload's keypoints were verified against the entry's
    (local features), else None."""
    inliers = record.get("local_inliers")
    if not isinstance(inliers, int):
        return None
    return {"inliers": inliers, "agreed": "local_features" in agreed}


def _region_json(record: Mapping[str, Any], agreed: Sequence[str]) -> dict[str, Any] | None:
    region = record.get("region")
    region_agreed = any(s in agreed for s in _REGION_AGREED)
    if isinstance(region, Mapping):
        return {
            "kind": region.get("kind"),
            "value": _round(region.get("cosine")),
            "agreed": region_agreed,
        }
    if region_agreed:  # a record without evidence: the kind from its tag, no value
        tag = next(s for s in agreed if s in _REGION_AGREED)
        return {
            "kind": _AGREED_KINDS[tag],
            "value": None,
            "agreed": True,
        }
    return None


def match_explanation(
    record: Mapping[str, Any] | None,
    *,
    cosine: float | None,
    pdq_distance: int | None,
    probability: float | None,
) -> dict[str, Any]:
    """The public fields of one match, bank and entry aside, from its stored ``record`` (a
    match row's ``signals`` JSON, or None) and its measured values: ``cosine``,
    ``pdq_distance``, ``probability`` (rounded to 4 places), ``exact`` (the hash kind, only for
    an exact-hash match), ``timestamp_s`` (videos only: the matched frame's time, s), ``vpdq``
    (a video matched on a vPDQ entry: ``query_match_percent``, ``compared_match_percent``),
    ``level``,
    ``decided_by`` (one of :data:`MATCH_STAGES`; null when unknown) and ``signals``::

        {"global_cosine": {"value", "passed", "threshold", "agreed"} | null,
         "region_cosine": {"kind", "value", "agreed"} | null,
         "pdq": {"value" (Hamming distance, bits), "passed", "threshold", "agreed"} | null,
         "vpdq": {"value" (query match %), "compared" (%), "passed", "threshold",
                  "agreed"} | null,
         "exact": {"kind", "agreed"} | null,
         "local_features": {"inliers" (RANSAC inliers of the entry's SIFT keypoints in the
                            upload), "agreed"} | null (keypoints not verified),
         "classifier": {"value" (probability), "passed", "threshold", "agreed"} | null,
         "frame": int | null (the screened frame that matched; null for an exact-hash
                  match alone), "timestamp_s": float (videos only)}

    ``passed`` is "block", "review" or "none" and ``threshold`` the one passed (both null for a
    record stored before thresholds were; the classifier's ``agreed`` too);
    ``region_cosine.kind`` is ``query_view`` (a view of the upload against the entry),
    ``entry_window`` (the upload against a window of the entry), ``view_window`` or
    ``feature_window`` (a window of the upload's feature map against the entry seen pasted
    small, :mod:`moderation.banks.paste_rows`). Nothing
    here names a bank or an entry (the tenancy rule of
    :func:`moderation.service.results.match_json`).
    """
    record = record if isinstance(record, Mapping) else {}
    agreed = [s for s in record.get("agreed", []) if isinstance(s, str)]
    exact = _exact_kind(record, agreed)
    signals = _signals(record, agreed, exact, cosine, pdq_distance, probability)
    extra: dict[str, Any] = {"exact": exact} if exact is not None else {}
    if "timestamp_s" in signals:
        extra["timestamp_s"] = signals["timestamp_s"]
    if signals["vpdq"] is not None:
        extra["vpdq"] = dict(_mapping(record, "vpdq"))
    stage = record.get("decided_by")
    return {
        "cosine": _round(cosine),
        "pdq_distance": pdq_distance,
        "probability": _round(probability),
        **extra,
        "level": record.get("level"),
        "decided_by": stage if isinstance(stage, str) else _inferred_stage(agreed),
        "signals": signals,
    }


def _signals(
    record: Mapping[str, Any],
    agreed: Sequence[str],
    exact: str | None,
    cosine: float | None,
    pdq_distance: int | None,
    probability: float | None,
) -> dict[str, Any]:
    """The ``signals`` object of :func:`match_explanation`."""
    passed = _mapping(record, "passed")
    signals: dict[str, Any] = {
        "global_cosine": _measured(
            record, "cosine", cosine, "cosine" in agreed or "global_cosine" in agreed
        ),
        "region_cosine": _region_json(record, agreed),
        "pdq": _measured(record, "pdq", pdq_distance, "pdq" in agreed),
        "vpdq": _vpdq_json(record, "vpdq" in agreed),
        "exact": None if exact is None else {"kind": exact, "agreed": True},
        "local_features": _local_json(record, agreed),
        "classifier": _measured(
            record,
            "probability",
            probability,
            passed["probability"] in ("block", "review") if "probability" in passed else None,
        ),
        # An exact-hash or vPDQ match alone matched the whole file, no frame of it.
        "frame": None if cosine is None and pdq_distance is None else record.get("frame"),
    }
    timestamp = record.get("timestamp_s")
    if isinstance(timestamp, (int, float)):
        signals["timestamp_s"] = timestamp
    return signals


def result_decided_by(
    decision: str, reason: str | None, matches: Sequence[Mapping[str, Any]]
) -> str | None:
    """Which of :data:`RESULT_STAGES` decided a result: ``unscannable``, ``allow_bank`` (its
    ``reason``), the top match's ``decided_by`` (``matches`` as :func:`match_explanation` gives
    them, most severe first), or ``no_match``."""
    if decision == "unscannable":
        return "unscannable"
    if reason == "allow_bank":
        return "allow_bank"
    if matches:
        stage = matches[0].get("decided_by")
        return stage if isinstance(stage, str) else None
    return "no_match"
