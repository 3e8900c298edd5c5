"""``/hma``: a subset of Meta's Hasher-Matcher-Actioner (HMA 2.0, OpenMediaMatch) HTTP API.

A platform already integrated with HMA points its base URL at ``<service>/hma``. Paths, query
parameters and JSON shapes follow HMA's blueprints (``OpenMediaMatch/blueprints/matching.py``
``/m``, ``hashing.py`` ``/h``, ``curation.py`` ``/c``); README.md "HMA-compatible API" lists
the subset and what differs. Authentication is the upload hook's: a bearer token of an API
client, rate-limited per client (:mod:`admin.api.clients`: hash lookups and bank listings
against the read limit; photo hashing, photo lookups and bank writes against the upload
limit). Errors are HMA's
``{"message": ...}``. Lookups use :class:`moderation.banks.lookup.HashLookupCache` (PDQ and
exact hashes from the snapshot payload; the encoder is never loaded).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from admin.api.clients import ApiError, authenticated_client_id, authenticated_reader_id
from moderation.banks.hash_import import add_signals, signal_record
from moderation.banks.hashlists.records import SIGNAL_TYPES
from moderation.banks.lookup import (
    VIDEO_SIGNAL_TYPES,
    HashLookupCache,
    HashMatch,
    InvalidSignalError,
    hash_content,
    hash_video_content,
)
from moderation.banks.operations import list_banks
from moderation.banks.records import BlocklistError, UnknownBankError
from moderation.banks.snapshot import SnapshotError
from moderation.banks.tenancy import applicable_bank_names, bank_for_client
from moderation.media.decode import UnscannableImage
from moderation.service.runtime import Runtime

logger = logging.getLogger(__name__)

bp = Blueprint("hma", __name__, url_prefix="/hma")

EXTENSION = "moderation.hma"
#: The multipart field of an uploaded photo: HMA names the field by content type.
PHOTO_FIELD = "photo"
#: ... and of an uploaded video (``/h/hash`` only).
VIDEO_FIELD = "video"
#: HMA's limit on a content note (``curation.py`` ``_validate_note``), characters.
MAX_NOTE = 255
MULTIPART_OVERHEAD = 64 * 1024  # part headers around the photo, bytes


class HmaError(Exception):
    """An error answered as HMA does: ``{"message": ...}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _message(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    response = jsonify({"message": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


@bp.record_once
def _setup(state: Any) -> None:
    app: Flask = state.app
    app.extensions[EXTENSION] = HashLookupCache(app.extensions["moderation"].settings.snapshots_dir)


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Any:
    return _message(exc.status, exc.message, exc.headers)


@bp.errorhandler(HmaError)
def _hma_error(exc: HmaError) -> Any:
    return _message(exc.status, exc.message)


@bp.errorhandler(InvalidSignalError)
def _invalid_signal(exc: InvalidSignalError) -> Any:
    return _message(400, str(exc))


@bp.errorhandler(UnknownBankError)
def _unknown_bank(exc: UnknownBankError) -> Any:
    bank_name = (request.view_args or {}).get("bank_name", "")
    return _message(404, f"bank '{bank_name}' not found")


@bp.errorhandler(SnapshotError)
def _index_not_ready(exc: SnapshotError) -> Any:
    logger.error("HMA lookup: the snapshot cannot be read: %s", exc)
    return _message(503, "index not yet ready", {"Retry-After": "30"})


@bp.errorhandler(OperationalError)
def _database_down(exc: OperationalError) -> Any:
    logger.error("database unavailable: %s", exc.orig if exc.orig else exc)
    return _message(503, "the service is unavailable; retry", {"Retry-After": "5"})


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Any:
    return _message(exc.code or 500, exc.description or exc.name)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> Any:
    logger.exception("unexpected HMA API error")
    return _message(500, "internal error")


def _runtime() -> Runtime:
    from admin import runtime

    return runtime()


def _cache() -> HashLookupCache:
    cache = current_app.extensions[EXTENSION]
    assert isinstance(cache, HashLookupCache)
    return cache


def _my_banks(client_id: int) -> frozenset[str]:
    """The names of the banks that apply to the client (:mod:`moderation.banks.tenancy`)."""
    with _runtime().sessions() as session:
        return applicable_bank_names(session, client_id)


def _banks_param(client_id: int) -> set[str]:
    """The banks a lookup searches: those of ``?banks=`` (all when absent) that apply to the
    client; others' banks are left out as if they did not exist."""
    allowed = _my_banks(client_id)
    raw = request.args.get("banks")
    return set(allowed) & set(raw.split(",")) if raw else set(allowed)


def _bool_param(name: str) -> bool:
    # HMA's flask_utils.str_to_bool
    raw = request.args.get(name, "false").lower()
    if raw in ("true", "1"):
        return True
    if raw in ("false", "0"):
        return False
    raise HmaError(400, "invalid boolean parameter - prefer true/false")


def _required(name: str) -> str:
    value = request.args.get(name)
    if not value:
        raise HmaError(400, f"{name} is required")
    return value


def _uploaded_content(fields: tuple[str, ...]) -> tuple[str, bytes]:
    """(field, bytes) of the one uploaded file, whose multipart field (HMA's content type
    name) is one of ``fields``; a video is held to ``max_video_bytes``."""
    settings = _runtime().settings
    limits = {PHOTO_FIELD: settings.max_image_bytes, VIDEO_FIELD: settings.max_video_bytes}
    request.max_content_length = max(limits[f] for f in fields) + MULTIPART_OVERHEAD
    if not request.files:
        raise HmaError(400, "Missing multipart/form-data file upload")
    if len(request.files) > 1 or len(request.files.getlist(next(iter(request.files)))) > 1:
        raise HmaError(400, "Only one file allowed per request")
    field = next(iter(request.files))
    if field not in fields:
        raise HmaError(400, f"no such content_type: '{field}'")
    data = request.files[field].stream.read(limits[field] + 1)
    if len(data) > limits[field]:
        raise HmaError(413, "Content too large")
    return field, data


def _by_bank(matches: list[HashMatch]) -> dict[str, list[dict[str, Any]]]:
    """HMA's ``TMatchByBank``: bank name -> ``[{"bank_content_id", "distance"}]``."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for match in matches:
        grouped.setdefault(match.bank, []).append(
            {"bank_content_id": match.entry_id, "distance": match.distance_str}
        )
    return grouped


def _bank_config(bank: dict[str, Any]) -> dict[str, Any]:
    """HMA's ``BankConfig``: an enabled bank matches everything (ratio 1.0), a disabled none."""
    return {"name": bank["name"], "matching_enabled_ratio": 1.0 if bank["enabled"] else 0.0}


@bp.get("/m/raw_lookup")
def raw_lookup() -> Any:
    """Look a hash up: ``{"matches": [bank_content_id, ...]}``, or with
    ``include_distance=true`` ``{"matches": [{"bank_content_id", "distance"}, ...]}``."""
    client_id = authenticated_reader_id()
    include_distance = _bool_param("include_distance")
    runtime = _runtime()
    with runtime.sessions() as session:
        matches = _cache().lookup(
            session,
            runtime.keyring,
            _required("signal_type"),
            _required("signal"),
            banks=_banks_param(client_id),
        )
    if include_distance:
        return {
            "matches": [
                {"bank_content_id": m.entry_id, "distance": m.distance_str} for m in matches
            ]
        }
    return {"matches": [m.entry_id for m in matches]}


@bp.get("/m/lookup")
def lookup_get() -> Any:
    """Look a hash up: ``{bank name: [{"bank_content_id", "distance"}, ...]}``."""
    client_id = authenticated_reader_id()
    if request.args.get("url"):
        raise HmaError(400, "url lookups are not supported here; upload the file (POST)")
    signal_type, signal = request.args.get("signal_type"), request.args.get("signal")
    if not signal or not signal_type:
        raise HmaError(400, "Either url or both signal and signal_type are required")
    runtime = _runtime()
    with runtime.sessions() as session:
        matches = _cache().lookup(
            session, runtime.keyring, signal_type, signal, banks=_banks_param(client_id)
        )
    return _by_bank(matches)


@bp.post("/m/lookup")
def lookup_post() -> Any:
    """Hash the uploaded photo (multipart field ``photo``) or video (``video``: its vPDQ and
    exact hashes) and look every signal up: ``{signal type: {bank name:
    [{"bank_content_id", "distance"}, ...]}}``."""
    client_id = authenticated_client_id()
    field, data = _uploaded_content((PHOTO_FIELD, VIDEO_FIELD))
    runtime = _runtime()
    try:
        if field == VIDEO_FIELD:
            signals = hash_video_content(data, runtime.video_limits)
        else:
            signals = hash_content(data, runtime.limits)
    except UnscannableImage as exc:
        raise HmaError(400, f"the {field} cannot be hashed: {exc.reason}") from exc
    with runtime.sessions() as session:
        found = _cache().lookup_signals(
            session, runtime.keyring, signals, banks=_banks_param(client_id)
        )
    return {kind: _by_bank(matches) for kind, matches in found.items()}


@bp.post("/h/hash")
def hash_post() -> Any:
    """The signals of the uploaded photo (``{"pdq", "md5", "sha1", "sha256"}``: hex) or video
    (multipart field ``video``: ``{"vpdq": VPDQSignal string, "md5", "sha1", "sha256"}``);
    ``?types=pdq,md5`` selects."""
    authenticated_client_id()
    field, data = _uploaded_content((PHOTO_FIELD, VIDEO_FIELD))
    offered = VIDEO_SIGNAL_TYPES if field == VIDEO_FIELD else SIGNAL_TYPES
    types: tuple[str, ...] = offered
    if request.args.get("types") is not None:
        types = tuple(t.strip() for t in request.args["types"].split(",") if t.strip())
        unknown = [t for t in types if t not in offered]
        if unknown:
            raise HmaError(400, f"signal type '{unknown[0]}' doesn't exist or is disabled")
        if not types:
            raise HmaError(400, "empty signal type selection")
    runtime = _runtime()
    try:
        if field == VIDEO_FIELD:
            return hash_video_content(data, runtime.video_limits, types)
        return hash_content(data, runtime.limits, types)
    except UnscannableImage as exc:
        raise HmaError(400, f"the {field} cannot be hashed: {exc.reason}") from exc


@bp.get("/c/banks")
def banks_index() -> Any:
    """Every bank that applies to the client: ``[{"name", "matching_enabled_ratio"}, ...]``."""
    mine = _my_banks(authenticated_reader_id())
    return jsonify([_bank_config(bank) for bank in list_banks(_runtime()) if bank["name"] in mine])


@bp.get("/c/bank/<bank_name>")
def bank_show_by_name(bank_name: str) -> Any:
    """One bank: ``{"name", "matching_enabled_ratio"}`` (404 for another client's)."""
    mine = _my_banks(authenticated_reader_id())
    for bank in list_banks(_runtime()):
        if bank["name"] == bank_name and bank_name in mine:
            return _bank_config(bank)
    raise HmaError(404, f"bank '{bank_name}' not found")


@bp.post("/c/bank/<bank_name>/signal")
def bank_add_as_signals(bank_name: str) -> Any:
    """Add content by its signals (JSON ``{"pdq": hex, "md5": hex, ..., "note": text}``):
    ``{"id": bank_content_id, "signals": {signal type: hex}}``. Audited (``bank.import_hashes``
    by ``client:<id>``); signals already in the bank return the entry holding them."""
    client_id = authenticated_client_id()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise HmaError(400, "this endpoint expects a json object payload")
    note = body.pop("note", None)
    if note is not None and not isinstance(note, str):
        raise HmaError(400, "note should be a string")
    if note is not None and len(note) > MAX_NOTE:
        raise HmaError(400, f"note must be at most {MAX_NOTE} characters")
    try:
        record = signal_record(body, ref="hma:signal", label=note or "")
    except ValueError as exc:
        raise HmaError(400, str(exc)) from exc
    with _runtime().sessions() as session:
        try:
            bank_for_client(session, bank_name, client_id, write=True)
        except UnknownBankError:
            raise
        except BlocklistError as exc:
            raise HmaError(403, str(exc)) from exc
    report = add_signals(
        _runtime(),
        bank_name,
        [record],
        actor=f"client:{client_id}",
        source="hma-api",
        label="hma-api",
    )
    return {"id": report.entry_ids[0], "signals": record.signals}


@bp.route("/<path:_rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def not_found(_rest: str) -> Any:
    """Paths of HMA's API this service does not offer answer JSON 404."""
    raise HmaError(404, "no such endpoint")
