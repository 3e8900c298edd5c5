"""``/api/v1``: the HTTP upload hook (ARCHITECTURE.md "HTTP upload hook").

Views are thin: authenticate the bearer token, rate-limit per client (uploads and reads in
windows of their own), validate the form, call
``moderation.service.submission.submit_upload`` (which refuses uploads past the queue-depth
bound with 503/429 and ``Retry-After``, and commits the upload before sending its task), and
answer ``202 {"id", "status"}`` or, only with ``?wait=`` and a result in time, ``200``
with it.
Every error is JSON ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from sqlalchemy.exc import OperationalError
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException

from admin.api.clients import ApiError, authenticated_client_id, authenticated_reader_id
from admin.api.openapi import openapi_document
from admin.api.services import services, setup
from moderation.governance.appeals import AppealError, file_appeal
from moderation.service.backpressure import QueueFullError, admit_upload
from moderation.service.results import appeal_json, upload_view
from moderation.service.submission import SubmissionError, submit_upload
from moderation.service.waits import TooManyWaits, wait_for_upload
from moderation.storage.models import Upload

logger = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_FIELD = 500
MAX_IDEMPOTENCY_KEY = 200
MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers around the image, bytes


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


@bp.record_once
def _setup(state: Any) -> None:
    app: Flask = state.app
    runtime = app.extensions["moderation"]
    setup(app, runtime)


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Any:
    return _error(exc.status, exc.code, exc.message, exc.headers)


@bp.errorhandler(SubmissionError)
def _submission_error(exc: SubmissionError) -> Any:
    return _error(exc.status, exc.code, exc.message)


@bp.errorhandler(QueueFullError)
def _queue_full(exc: QueueFullError) -> Any:
    return _error(exc.status, exc.code, exc.message, {"Retry-After": str(exc.retry_after)})


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Any:
    status = exc.code or 500
    code = {
        400: "bad_request",
        404: "not_found",
        405: "method_not_allowed",
        413: "too_large",
    }.get(status, "http_error")
    return _error(status, code, exc.description or exc.name)


@bp.errorhandler(OperationalError)
def _database_down(exc: OperationalError) -> Any:
    logger.error("database unavailable: %s", exc.orig if exc.orig else exc)
    return _error(503, "unavailable", "the service is unavailable; retry", {"Retry-After": "5"})


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> Any:
    logger.exception("unexpected API error")
    return _error(500, "internal", "internal error")


def _runtime() -> Any:
    from admin import runtime

    return runtime()


def _wait_seconds() -> float:
    raw = request.args.get("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad_request", "wait must be a number of seconds") from None
    if not value >= 0:  # also refuses NaN
        raise ApiError(400, "bad_request", "wait must be >= 0")
    return float(min(value, _runtime().settings.api_max_wait))


def _field(name: str, *, required: bool, limit: int = MAX_FIELD) -> str | None:
    values = request.form.getlist(name)
    if len(values) > 1:
        raise ApiError(400, "bad_request", f"the form field {name!r} is given more than once")
    value = values[0] if values else None
    if value is None or value == "":
        if required:
            raise ApiError(400, "bad_request", f"the form field {name!r} is required")
        return None
    if len(value) > limit:
        raise ApiError(400, "bad_request", f"{name} is longer than {limit} characters")
    return value


def _image() -> FileStorage:
    """The one multipart file, ``image``.

    Raises:
        ApiError: 400 no ``image``, ``image`` twice, or another file part (RELIABILITY.md S7:
            which of two images would be screened is not the client's to guess).
    """
    images = request.files.getlist("image")
    if not images:
        raise ApiError(400, "bad_request", "the multipart file field 'image' is required")
    if len(images) > 1:
        raise ApiError(400, "bad_request", "the multipart file field 'image' is given twice")
    others = sorted(set(request.files) - {"image"})
    if others:
        raise ApiError(400, "bad_request", f"unexpected multipart file fields: {others}"[:300])
    return images[0]


def _take_wait_slot(client_id: int, wait: float) -> None:
    """Hold one of the client's concurrent-wait slots until the request ends (RELIABILITY.md
    S2); taken before anything is stored, so a refused upload was not accepted.

    Raises:
        ApiError: 429 when the client holds ``api_max_concurrent_waits_per_client`` already.
    """
    if wait <= 0:
        return
    held = contextlib.ExitStack()
    try:
        held.enter_context(services().wait_slots.hold(str(client_id), wait))
    except TooManyWaits as exc:
        raise ApiError(
            429,
            "too_many_waits",
            "too many concurrent ?wait= requests for this client",
            {"Retry-After": str(int(exc.retry_after + 0.999))},
        ) from None
    g.moderation_wait_slot = held


@bp.teardown_request
def _release_wait_slot(_exc: BaseException | None) -> None:
    held = g.pop("moderation_wait_slot", None)
    if held is not None:
        held.close()


def _answer(upload_id: str, wait: float, *, replayed: bool = False, post: bool = False) -> Any:
    """The upload's view: ``200`` with the result once done, else ``202``; a POST without
    ``?wait=`` always answers ``202`` (README "HTTP upload hook")."""
    runtime = _runtime()
    if wait > 0:
        from admin import request_admission

        with request_admission().idle():  # a long poll holds a greenlet, not a working slot
            wait_for_upload(runtime, upload_id, wait, services().notifier)
    with runtime.sessions() as session:
        upload = session.get(Upload, upload_id)
        if upload is None:
            raise ApiError(404, "not_found", "no such screening")
        view = upload_view(session, upload, runtime.keyring)
    if view["status"] == "done" and (wait > 0 or not post):
        response = jsonify(view)
        response.status_code = 200
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return response
    return _accepted(upload_id, view["status"], replayed=replayed)


def _accepted(upload_id: str, status: str, *, replayed: bool) -> Any:
    """``202 {"id", "status"}`` with the screening's ``Location``."""
    response = jsonify({"id": upload_id, "status": status})
    response.status_code = 202
    response.headers["Location"] = f"/api/v1/screenings/{upload_id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.post("/screenings")
def create_screening() -> Any:
    """Accept an image or a video for screening (multipart ``image``, ``external_id``,
    ``subject_id``, optional ``callback_url``; optional ``Idempotency-Key`` header)."""
    client_id = authenticated_client_id()
    api = services()
    wait = _wait_seconds()
    _take_wait_slot(client_id, wait)
    settings = _runtime().settings
    if request.headers.get("Idempotency-Key") is None:
        # Refuse a full queue before parsing the body (S3: refusals must stay cheap under a
        # burst); submit_upload checks again in its transaction, and a replay of an accepted
        # upload (with its key) is answered even when the queue is full.
        with _runtime().sessions() as session:
            admit_upload(session, settings, client_id)
    largest = max(settings.max_image_bytes, settings.max_video_bytes)  # an image or a video
    request.max_content_length = largest + MULTIPART_OVERHEAD
    image = _image()
    data = image.read(largest + 1)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(400, "bad_request", "Idempotency-Key must be 1-200 characters")
    submission = submit_upload(
        _runtime(),
        api.dispatcher,
        client_id=client_id,
        data=data,
        external_id=_field("external_id", required=True),
        subject_id=_field("subject_id", required=True),
        callback_url=_field("callback_url", required=False, limit=2000),
        idempotency_key=key,
        origin=request.remote_addr,
    )
    if wait <= 0:  # always 202: the submission knows the status, no need to read it back
        return _accepted(submission.upload_id, submission.status, replayed=not submission.created)
    return _answer(submission.upload_id, wait, replayed=not submission.created, post=True)


@bp.get("/screenings/<upload_id>")
def get_screening(upload_id: str) -> Any:
    """The upload's status and, once done, its result (``?wait=`` up to 10 s); counted
    against the client's read limit, not its upload limit."""
    client_id = authenticated_reader_id()
    wait = _wait_seconds()
    with _runtime().sessions() as session:
        upload = session.get(Upload, upload_id[:32])
        # Another client's upload is indistinguishable from a missing one.
        if upload is None or upload.client_id != client_id:
            raise ApiError(404, "not_found", "no such screening")
    _take_wait_slot(client_id, wait)
    return _answer(upload.id, wait)


@bp.errorhandler(AppealError)
def _appeal_error(exc: AppealError) -> Any:
    return _error(exc.status, exc.code, str(exc))


@bp.post("/screenings/<upload_id>/appeal")
def appeal_screening(upload_id: str) -> Any:
    """Appeal the screening's current decision (JSON or form field ``reason``): ``201`` with
    the appeal; 404 for another client's upload, 409 when undecided or already appealed."""
    client_id = authenticated_client_id()
    request.max_content_length = MULTIPART_OVERHEAD  # a reason is at most 2000 characters
    body = request.get_json(silent=True)
    reason = body.get("reason") if isinstance(body, dict) else request.form.get("reason")
    appeal = file_appeal(
        _runtime(),
        client_id=client_id,
        upload_id=upload_id,
        reason=reason if isinstance(reason, str) else "",
        origin=request.remote_addr,
    )
    response = jsonify(appeal_json(appeal))
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/screenings/{appeal.upload_id}"
    return response


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 document of this API."""
    return jsonify(openapi_document(current_app.config.get("SERVER_NAME")))


@bp.route("/<path:_rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def not_found(_rest: str) -> Any:
    """Unknown API paths answer JSON, like every API error."""
    raise ApiError(404, "not_found", "no such endpoint")
