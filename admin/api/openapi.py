"""The OpenAPI 3.1 document served at ``/api/v1/openapi.json`` (with the ``/hma`` paths,
:mod:`admin.api.openapi_hma`)."""

from __future__ import annotations

from typing import Any

from admin.api.openapi_appeals import appeal_operation, appeal_schema, statement_schema
from admin.api.openapi_hma import hma_error_schema, hma_paths
from moderation import __version__
from moderation.matching.explain import MATCH_STAGES, RESULT_STAGES


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


WAIT_PARAMETER = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "Seconds to wait for the result (at most 10). With a result in time the "
    "answer is 200 with it; otherwise 202 (a POST without it always answers 202). A client "
    "holding its cap of concurrent waits gets 429 (code too_many_waits, Retry-After) before "
    "anything is stored.",
    "schema": {"type": "number", "minimum": 0, "maximum": 10},
}


def _thresholded(value: str, **extra: Any) -> dict[str, Any]:
    """A signal measured against the category's block and review thresholds (``extra``: more
    properties)."""
    return {
        "type": ["object", "null"],
        "description": "Null when not measured. passed: the threshold the value reached "
        "(none: neither); passed, threshold (and the classifier's agreed) are null for "
        "screenings recorded before they were stored.",
        "properties": {
            "value": {"type": ["number", "null"], "description": value},
            "passed": {"enum": ["block", "review", "none", None]},
            "threshold": {"type": ["number", "null"]},
            "agreed": {"type": ["boolean", "null"]},
            **extra,
        },
    }


def _signals_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Each signal of this match: its value, the threshold it passed and "
        "whether it agreed (moderation/matching/explain.py, the same object as "
        "`moderation screen --json` and the review page).",
        "properties": {
            "global_cosine": _thresholded("Cosine similarity of the whole upload."),
            "region_cosine": {
                "type": ["object", "null"],
                "description": "The best region or view cosine when it beat the global one.",
                "properties": {
                    "kind": {
                        "enum": ["query_view", "entry_window", "view_window", "feature_window"]
                    },
                    "value": {"type": ["number", "null"]},
                    "agreed": {"type": "boolean"},
                },
            },
            "pdq": _thresholded("PDQ Hamming distance (bits, 0-256)."),
            "vpdq": _thresholded(
                "A video against a vPDQ entry: the query match percentage (0-100).",
                compared={"type": "number", "description": "Compared match percentage."},
            ),
            "exact": {
                "type": ["object", "null"],
                "properties": {"kind": {"enum": ["md5", "sha1", "sha256"]}},
            },
            "local_features": {
                "type": ["object", "null"],
                "description": "Null unless the upload's SIFT keypoints were verified against "
                "the entry's (local features): the RANSAC inliers, agreed from 8.",
                "properties": {
                    "inliers": {"type": "integer", "minimum": 0},
                    "agreed": {"type": "boolean"},
                },
            },
            "classifier": _thresholded("The classifier's calibrated copy probability."),
            "frame": {"type": ["integer", "null"], "description": "Screened frame index."},
            "timestamp_s": {"type": "number", "description": "Videos only."},
        },
    }


def _match_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "bank": {"type": ["string", "null"]},
            "entry_id": {"type": ["string", "null"], "examples": ["e_12"]},
            "label": {"type": ["string", "null"]},
            "cosine": {"type": ["number", "null"]},
            "pdq_distance": {"type": ["integer", "null"]},
            "probability": {"type": ["number", "null"]},
            "exact": {
                "enum": ["md5", "sha1", "sha256"],
                "description": "Exact-hash matches only: the hash kind that matched.",
            },
            "timestamp_s": {
                "type": "number",
                "description": "Videos only: the time (s) of the frame this entry matched.",
            },
            "vpdq": {
                "type": "object",
                "description": "A video matched on a vPDQ entry: its match percentages (0-100).",
                "properties": {
                    "query_match_percent": {"type": "number"},
                    "compared_match_percent": {"type": "number"},
                },
            },
            "level": {"enum": ["block", "review", None]},
            "decided_by": {
                "enum": [*MATCH_STAGES, None],
                "description": "The stage that set this match's level (classifier_band: the "
                "policy's safety band held it; flood_control: a quarantined entry).",
            },
            "signals": {"$ref": "#/components/schemas/MatchSignals"},
        },
    }


def _result_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["decision", "policy", "matches", "timings_ms"],
        "properties": {
            "decision": {"enum": ["allow", "review", "block", "unscannable"]},
            "policy": {"type": "string"},
            "score": {"type": ["number", "null"]},
            "reason": {
                "type": ["string", "null"],
                "description": "Why unscannable (e.g. too_large, poison; videos also too_long, "
                "unsupported_codec, no_video_stream, multiple_video_streams, decode_timeout) or "
                "allow_bank.",
            },
            "category": {"type": ["string", "null"]},
            "decided_by": {
                "enum": [*RESULT_STAGES, None],
                "description": "The stage that decided: the top match's, or allow_bank, "
                "no_match, unscannable.",
            },
            "matches": {"type": "array", "items": {"$ref": "#/components/schemas/Match"}},
            "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
            "index_version": {"type": ["integer", "null"]},
            "statement_of_reasons": {"$ref": "#/components/schemas/StatementOfReasons"},
        },
    }


def _screening_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "status"],
        "properties": {
            "id": {"type": "string"},
            "external_id": {"type": ["string", "null"]},
            "status": {"enum": ["queued", "processing", "done"]},
            "received_at": {"type": "string", "format": "date-time"},
            "result": {"oneOf": [{"$ref": "#/components/schemas/Result"}, {"type": "null"}]},
            "appeal": {"$ref": "#/components/schemas/Appeal"},
            "review": {
                "type": "object",
                "description": "Present once a reviewer decided.",
                "properties": {
                    "state": {"type": "string"},
                    "decision": {"type": ["string", "null"]},
                    "decided_at": {"type": "string", "format": "date-time"},
                },
            },
        },
    }


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                },
            }
        },
    }


def _accepted_response() -> dict[str, Any]:
    return {
        "description": "Accepted; the result comes by callback or GET.",
        "headers": {"Location": {"schema": {"type": "string"}}},
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["id", "status"],
                    "properties": {
                        "id": {"type": "string"},
                        "status": {"enum": ["queued", "processing"]},
                    },
                }
            }
        },
    }


def _done_response() -> dict[str, Any]:
    return {
        "description": "The result (with ?wait= when ready in time).",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Screening"}}},
    }


def _upload_form_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["image", "external_id", "subject_id"],
        "properties": {
            "image": {
                "type": "string",
                "contentMediaType": "application/octet-stream",
                "description": "An image (JPEG, PNG, WebP, GIF, BMP or TIFF) or a video (MP4, "
                "MOV or WebM; H.264, HEVC, MPEG-4, VP8, VP9 or AV1), told apart by magic bytes.",
            },
            "external_id": {"type": "string", "maxLength": 500},
            "subject_id": {
                "type": "string",
                "maxLength": 500,
                "description": "The uploader; stored pseudonymised.",
            },
            "callback_url": {
                "type": "string",
                "format": "uri",
                "description": "Must lie under a prefix of the client's allowlist, with "
                "its path in normal form (no dot segments, //, backslashes, encoded slashes or "
                "encoded unreserved characters), https, and a host that is not a loopback, "
                "private, link-local or unspecified address.",
            },
        },
    }


def _create_screening() -> dict[str, Any]:
    """``POST /api/v1/screenings``."""
    return {
        "operationId": "createScreening",
        "parameters": [
            WAIT_PARAMETER,
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Repeats with the same key, image and fields return the first "
                "upload; another image, external_id, subject_id or callback_url is 422.",
                "schema": {"type": "string", "maxLength": 200},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _upload_form_schema()}},
        },
        "responses": {
            "200": _done_response(),
            "202": _accepted_response(),
            "400": _error_response(
                "Malformed request: no image part, two, another file part, or a field twice."
            ),
            "401": _error_response("Missing or invalid bearer token."),
            "413": _error_response("Image or video over its size limit."),
            "415": _error_response("Not an allowed image or video type (magic bytes)."),
            "422": _error_response(
                "callback_url refused, or Idempotency-Key reused with another request."
            ),
            "429": _error_response(
                "rate_limited (the client's upload rate limit) or client_queue_full (the "
                "client's share of the queue is full); nothing was stored. See Retry-After."
            ),
            "503": _error_response(
                "queue_full (the queue-depth bound; nothing was stored) or unavailable; "
                "retry after Retry-After."
            ),
        },
    }


def _get_screening() -> dict[str, Any]:
    """``GET /api/v1/screenings/{id}``."""
    return {
        "operationId": "getScreening",
        "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
            WAIT_PARAMETER,
        ],
        "responses": {
            "200": _done_response(),
            "202": _accepted_response(),
            "401": _error_response("Missing or invalid bearer token."),
            "404": _error_response("No such screening for this client."),
            "429": _error_response("Over the client's read rate limit; see Retry-After."),
        },
    }


def openapi_document(server: str | None = None) -> dict[str, Any]:
    """The document (paths, schemas, bearer security scheme)."""
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "moderation upload hook",
            "version": __version__,
            "description": "Submit images for near-duplicate screening against encrypted "
            "blocklists; results by signed callback (X-Moderation-Signature: "
            't=<unix>,v1=<hex HMAC-SHA256(secret, t + "." + body)>) or by polling.',
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/screenings": {"post": _create_screening()},
            "/api/v1/screenings/{id}": {"get": _get_screening()},
            "/api/v1/screenings/{id}/appeal": {"post": appeal_operation(_error_response)},
            **hma_paths(),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _error_schema(),
                "HmaError": hma_error_schema(),
                "Match": _match_schema(),
                "MatchSignals": _signals_schema(),
                "Result": _result_schema(),
                "Screening": _screening_schema(),
                "Appeal": appeal_schema(),
                "StatementOfReasons": statement_schema(),
            },
        },
    }
    if server:
        document["servers"] = [{"url": f"https://{server}"}]
    return document
