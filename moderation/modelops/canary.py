"""The golden-set canary: screen the golden set, measure recall and false positives, hold them to
the policy's SLOs.

:func:`run_canary` screens every usable item of the golden set (:mod:`moderation.matching.
golden`) with the full pipeline (decode, PDQ, embedding, candidate search, classifier stage,
policy) and reports µAP (ISC 2021's micro average precision, :func:`moderation.modelops.metrics.
micro_ap`, over each item's top candidates), recall at the policy's block and review thresholds
(share of labelled copies decided ``block``, resp. ``block`` or ``review``, with the right
match), and the false-positive rate (share of negatives decided ``block`` or ``review``).
:func:`check_slo` raises :class:`SloViolation` below the policy's ``slo`` section. Runs are
stored (:class:`~moderation.storage.models.CanaryRun`) and exported as gauges
(:mod:`moderation.modelops.gauges`). :func:`request_canary_run` asks for an asynchronous run
through the process's registered change listener (Celery in the workers and the console).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from moderation.audit.log import record_event
from moderation.banks.versions import current_snapshot
from moderation.matching.decision import ScreeningResult
from moderation.matching.golden import prune_blobs, read_item, usable_items
from moderation.matching.policy import Policy
from moderation.modelops.metrics import Prediction, micro_ap
from moderation.service.model_events import notify_change
from moderation.storage.db import transaction
from moderation.storage.modelops import CanaryItem, CanaryRun
from moderation.storage.models import Bank

if TYPE_CHECKING:
    from moderation.matching.classifier.model import CopyModel
    from moderation.matching.screening import Screener
    from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

FLAGGED = frozenset({"block", "review"})


class CanaryError(Exception):
    """The canary cannot run (empty golden set, no snapshot for the encoder)."""


class SloViolation(Exception):
    """A canary report is below the policy's SLOs; the message gives the figures."""

    def __init__(self, message: str, report: CanaryReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class CanaryReport:
    """One canary run. Figures are shares in [0, 1] (``micro_ap`` None without positives,
    ``false_positive_rate`` None without negatives); ``pairs`` the items screened, ``seconds``
    the wall time of the run; ``passed_slo`` whether the figures meet the policy's ``slo``
    (``failures`` says which do not)."""

    micro_ap: float | None
    recall_block: float | None
    recall_review: float | None
    false_positive_rate: float | None
    pairs: int
    seconds: float
    passed_slo: bool
    positives: int = 0
    negatives: int = 0
    encoder_id: str = ""
    snapshot_version: int = 0
    classifier_version: str | None = None
    policy: str = ""
    slo: dict[str, float | None] = field(default_factory=dict)
    failures: tuple[str, ...] = ()
    missed: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready figures (rounded to 4 places)."""
        doc = asdict(self)
        for key in ("micro_ap", "recall_block", "recall_review", "false_positive_rate"):
            if doc[key] is not None:
                doc[key] = round(doc[key], 4)
        doc["seconds"] = round(self.seconds, 3)
        doc["failures"] = list(self.failures)
        return doc

    def summary(self) -> str:
        """One line with every figure and the objectives, for refusals and logs."""

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        return (
            f"canary on {self.pairs} items ({self.positives} copies, {self.negatives} negatives): "
            f"recall at review {fmt(self.recall_review)} (SLO >= {self.slo.get('min_recall')}), "
            f"recall at block {fmt(self.recall_block)}"
            f" (SLO >= {self.slo.get('min_block_recall')}), false-positive rate "
            f"{fmt(self.false_positive_rate)} (SLO <= {self.slo.get('max_false_positive_rate')}), "
            f"µAP {fmt(self.micro_ap)}"
        )


def slo_failures(
    policy: Policy,
    recall_review: float | None,
    recall_block: float | None,
    false_positive_rate: float | None,
) -> list[str]:
    """Which of the policy's ``slo`` objectives the figures miss (empty: all met; a figure that
    could not be measured, None, meets its objective)."""
    slo = policy.slo
    failures = []
    if recall_review is not None and recall_review < slo.min_recall:
        failures.append(f"recall at review {recall_review:.4f} < min_recall {slo.min_recall}")
    if (
        slo.min_block_recall is not None
        and recall_block is not None
        and recall_block < slo.min_block_recall
    ):
        failures.append(
            f"recall at block {recall_block:.4f} < min_block_recall {slo.min_block_recall}"
        )
    if false_positive_rate is not None and false_positive_rate > slo.max_false_positive_rate:
        failures.append(
            f"false-positive rate {false_positive_rate:.4f} > max_false_positive_rate "
            f"{slo.max_false_positive_rate}"
        )
    return failures


def check_slo(report: CanaryReport, policy: Policy) -> None:
    """Raise :class:`SloViolation` (its message gives every figure) when ``report`` misses
    ``policy.slo``.

    Raises:
        SloViolation: a figure is below (above, for the false-positive rate) its objective.
    """
    failures = slo_failures(
        policy, report.recall_review, report.recall_block, report.false_positive_rate
    )
    if failures:
        raise SloViolation(f"{'; '.join(failures)} ({report.summary()})", report)


def request_canary_run(reason: str) -> None:
    """Ask for an asynchronous canary run (after a snapshot, classifier, policy or encoder
    change): the process's registered listeners (:func:`moderation.service.model_events.
    add_change_listener`; the workers' enqueues ``moderation.canary``) are called with
    ``reason``. Without one, the beat's change check runs it within a minute."""
    notify_change(reason)


def _target(item: CanaryItem, bank_names: dict[int, str]) -> str:
    """What a labelled copy must match: its entry, else its bank, else any block bank."""
    if item.entry_id is not None:
        return f"e_{item.entry_id}"
    if item.bank_id is not None:
        return f"bank:{bank_names.get(item.bank_id, item.bank_id)}"
    return "*"


def _key(target: str, entry_id: str, bank: str) -> str:
    """A candidate's key in the same terms as ``target``."""
    if target.startswith("bank:"):
        return f"bank:{bank}"
    return "*" if target == "*" else entry_id


def _predictions(
    item_id: str, target: str | None, result: ScreeningResult, block_banks: set[str]
) -> list[Prediction]:
    """µAP predictions of one item: its block-bank candidates (the explanation's top five),
    scored by probability, else cosine (PDQ-only: 1 - distance / 256), best per key."""
    best: dict[str, float] = {}
    for cand in result.explanation.get("candidates", []):
        if cand.get("bank") not in block_banks:
            continue
        score = cand.get("probability")
        if score is None:
            score = cand.get("cosine")
        if score is None:
            score = 1.0 - (cand.get("pdq_distance") or 256) / 256
        key = _key(target or "", cand["entry_id"], cand["bank"])
        best[key] = max(best.get(key, -2.0), float(score))
    return [
        Prediction(item_id, key, score, target, "canary") for key, score in sorted(best.items())
    ]


def _correct(target: str, result: ScreeningResult, levels: frozenset[str]) -> bool:
    """Whether ``result`` has a match at one of ``levels`` on ``target``."""
    for match in result.matches:
        key = _key(target, match.entry.public_id, match.entry.bank_name)
        if match.level in levels and key == target:
            return True
    return False


def _screener(
    runtime: Runtime, encoder_name: str | None, classifier_model: CopyModel | None
) -> tuple[Runtime, Screener]:
    """The runtime and a screener over the current snapshot, with ``classifier_model`` instead
    of the active one when given. An ``encoder_name`` other than the serving encoder (an
    encoder migration's target, or the previous encoder kept for rollback) is measured against
    its own snapshot chain (:meth:`Runtime.shadow_screener`; no classifier stage: its models
    belong to one encoder).

    Raises:
        CanaryError: the snapshot cannot be used with that encoder.
    """
    from moderation.banks.records import BlocklistError
    from moderation.banks.snapshot import SnapshotError

    if encoder_name is not None and encoder_name != runtime.encoder.name:
        try:
            return runtime, runtime.shadow_screener(encoder_name)
        except (BlocklistError, SnapshotError) as exc:
            raise CanaryError(f"no snapshot for encoder {encoder_name}: {exc}") from exc
    refiner = None
    if classifier_model is not None:
        from moderation.matching.classifier.stage import ClassifierStage

        refiner = ClassifierStage(
            classifier_model,
            runtime.encoder,
            batch_size=runtime.settings.batch_size,
            local_features=runtime.settings.classifier_local_features,
        )
    try:
        return runtime, runtime.screener(refiner=refiner)
    except BlocklistError as exc:
        raise CanaryError(f"no snapshot for encoder {runtime.encoder.name}: {exc}") from exc


@dataclass
class _Tally:
    positives: int = 0
    negatives: int = 0
    flagged: int = 0
    blocked: int = 0
    false_positives: int = 0
    predictions: list[Prediction] = field(default_factory=list)
    missed: dict[str, int] = field(default_factory=dict)

    def add(self, item: CanaryItem, target: str | None, result: ScreeningResult) -> None:
        if target is None:
            self.negatives += 1
            self.false_positives += result.decision in FLAGGED and bool(result.matches)
            return
        self.positives += 1
        flagged = result.decision in FLAGGED and _correct(target, result, FLAGGED)
        self.flagged += flagged
        self.blocked += result.decision == "block" and _correct(
            target, result, frozenset({"block"})
        )
        if not flagged:
            self.missed[item.edit or "operator"] = self.missed.get(item.edit or "operator", 0) + 1


def run_canary(
    runtime: Runtime,
    *,
    encoder_name: str | None = None,
    classifier_model: CopyModel | None = None,
) -> CanaryReport:
    """Screen the golden set and measure it (see the module docstring).

    Args:
        runtime: the process's runtime (database, keys, settings, policy).
        encoder_name: measure this encoder against its own snapshot (default: the runtime's).
        classifier_model: measure this model instead of the active one (activation checks).

    Returns:
        the report; it is not stored (:func:`record_run` does) and its ``passed_slo`` is
        against ``runtime.policy``.

    Raises:
        CanaryError: the golden set is empty, or the encoder has no snapshot.
    """
    start = time.perf_counter()
    run_runtime, screener = _screener(runtime, encoder_name, classifier_model)
    keyring, data_dir = runtime.keyring, runtime.settings.resolved_data_dir
    with runtime.sessions() as session:
        items = usable_items(session)
        bank_names = {b.id: b.name for b in session.scalars(select(Bank))}
        block_banks = {b.name for b in session.scalars(select(Bank)) if b.kind == "block"}
    if not items:
        raise CanaryError(
            "the golden set is empty: import a bank (copies are made at import) or "
            "`moderation canary add FILE --label match|no-match`"
        )
    tally = _Tally()
    batch = max(1, runtime.settings.batch_size)
    for offset in range(0, len(items), batch):
        chunk = items[offset : offset + batch]
        results = screener.screen_bytes([read_item(i, keyring, data_dir) for i in chunk])
        for item, result in zip(chunk, results, strict=True):
            target = _target(item, bank_names) if item.label == "match" else None
            tally.add(item, target, result)
            tally.predictions.extend(_predictions(item.id, target, result, block_banks))
    return _report(run_runtime, screener, tally, len(items), time.perf_counter() - start)


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def _report(
    runtime: Runtime, screener: Screener, tally: _Tally, pairs: int, seconds: float
) -> CanaryReport:
    policy = screener.policy
    recall_review = _share(tally.flagged, tally.positives)
    recall_block = _share(tally.blocked, tally.positives)
    fpr = _share(tally.false_positives, tally.negatives)
    failures = slo_failures(policy, recall_review, recall_block, fpr)
    ap = micro_ap(tally.predictions) if tally.positives else None
    return CanaryReport(
        micro_ap=ap,
        recall_block=recall_block,
        recall_review=recall_review,
        false_positive_rate=fpr,
        pairs=pairs,
        seconds=seconds,
        passed_slo=not failures,
        positives=tally.positives,
        negatives=tally.negatives,
        encoder_id=str(screener.encoder.id),
        snapshot_version=screener.blocklist.version,
        classifier_version=screener.refiner.version if screener.refiner else None,
        policy=policy.name,
        slo=policy.slo.model_dump(),
        failures=tuple(failures),
        missed=tally.missed,
    )


def fingerprint(report_or_state: dict[str, Any]) -> str:
    """SHA-256 (hex) of what a run measured: snapshot version, classifier version, policy
    (its whole validated content) and encoder id."""
    return hashlib.sha256(json.dumps(report_or_state, sort_keys=True).encode()).hexdigest()


def current_state(runtime: Runtime) -> dict[str, Any]:
    """What a canary run would measure now (cheap: no screening): ``snapshot`` version,
    ``classifier`` version, ``policy`` content, ``encoder`` id and the ``golden`` set's size and
    newest item."""
    from moderation.matching.classifier.model import active_model_version

    with runtime.sessions() as session:
        row = current_snapshot(session)
        encoder_id = row.encoder_id if row else ""
        classifier = active_model_version(session, encoder_id) if row else None
        golden = session.execute(
            select(func.count(CanaryItem.id), func.max(CanaryItem.created_at))
        ).one()
    return {
        "snapshot": row.version if row else 0,
        "classifier": classifier,
        "policy": runtime.policy.model_dump(mode="json"),
        "encoder": encoder_id,
        "golden": [int(golden[0]), str(golden[1])],
    }


def record_run(
    runtime: Runtime,
    report: CanaryReport,
    *,
    reason: str,
    actor: str,
    state: str | None = None,
) -> CanaryRun:
    """Store ``report`` with ``state``, the fingerprint of what it measured (taken before the
    run; default: now), and audit it (``canary.run``)."""
    state = state or fingerprint(current_state(runtime))
    with transaction(runtime.sessions) as session:
        row = CanaryRun(
            reason=reason,
            encoder_id=report.encoder_id,
            fingerprint=state,
            figures=report.to_json(),
            passed_slo=report.passed_slo,
        )
        session.add(row)
        record_event(
            session,
            actor=actor,
            action="canary.run",
            target=f"encoder:{report.encoder_id}",
            outcome="success" if report.passed_slo else "failure",
            details={"reason": reason, **report.to_json()},
        )
    if not report.passed_slo:
        logger.error("canary below SLO: %s", report.summary())
    return row


def run_if_changed(runtime: Runtime, *, reason: str, force: bool = False) -> CanaryReport | None:
    """Run and record the canary when what it measures changed since the last run (or
    ``force``: the schedule, an operator); None when unchanged or the golden set is empty."""
    measured = current_state(runtime)
    state = fingerprint(measured)
    with runtime.sessions() as session:
        last = session.scalar(
            select(CanaryRun.fingerprint)
            .where(CanaryRun.encoder_id == measured["encoder"])
            .order_by(CanaryRun.id.desc())
        )
    if not force and last == state:
        logger.debug("canary skipped (%s): nothing changed since the last run", reason)
        return None
    try:
        report = run_canary(runtime)
    except CanaryError as exc:
        logger.warning("canary not run (%s): %s", reason, exc)
        return None
    record_run(runtime, report, reason=reason, actor="canary", state=state)
    prune_blobs(runtime)
    return report


def canary_gate(runtime: Runtime) -> Callable[[CopyModel], tuple[bool, str, dict[str, Any]]]:
    """An activation gate for :func:`moderation.matching.classifier.training.train`: runs the
    canary with the candidate model and refuses it below the policy's SLOs (the reason gives
    the figures). An empty golden set refuses nothing (the reason says it was not measured)."""

    def gate(model: CopyModel) -> tuple[bool, str, dict[str, Any]]:
        try:
            report = run_canary(runtime, classifier_model=model)
        except CanaryError as exc:
            return True, f"canary not measured: {exc}", {}
        try:
            check_slo(report, runtime.policy)
        except SloViolation as exc:
            return False, f"refused by the canary: {exc}", report.to_json()
        return True, f"canary passed: {report.summary()}", report.to_json()

    return gate
