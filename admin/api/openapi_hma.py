"""The ``/hma`` paths (:mod:`admin.hma`) of the OpenAPI document: HMA 2.0's shapes."""

from __future__ import annotations

from typing import Any

_SIGNAL_TYPES = [
    "pdq",
    "md5",
    "sha1",
    "sha256",
    "video_md5",
    "photo_md5",
    "video_sha256",
    "vpdq",
]


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HmaError"}}},
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query(name: str, description: str, *, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
    }


_BANKS = _query("banks", "Comma-separated bank names the matches are restricted to.")
_SIGNAL_TYPE = _query("signal_type", f"One of {', '.join(_SIGNAL_TYPES)}.", required=True)
_SIGNAL = _query("signal", "The hash, hex.", required=True)
_BANK_NAME = {"name": "bank_name", "in": "path", "required": True, "schema": {"type": "string"}}
_COMMON_ERRORS = {
    "401": _error("Missing or invalid bearer token."),
    "429": _error("Rate limited; see Retry-After."),
}
_LOOKUP_ERRORS = {
    "400": _error("Unknown signal type or malformed signal."),
    **_COMMON_ERRORS,
    "503": _error("The index (current snapshot) cannot be read yet."),
}
_PHOTO_OR_VIDEO_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "description": "One file: field photo (an image) or video (MP4, MOV, WebM).",
                "properties": {
                    "photo": {"type": "string", "contentMediaType": "image/*"},
                    "video": {"type": "string", "contentMediaType": "video/*"},
                },
            }
        }
    },
}


def _match_with_distance() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["bank_content_id", "distance"],
        "properties": {
            "bank_content_id": {"type": "integer", "description": "The entry id (e_<n>)."},
            "distance": {
                "type": "string",
                "description": "PDQ Hamming distance; 0 exact; vpdq: 'query%[compared%]'.",
            },
        },
    }


def _by_bank() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Bank name -> matches.",
        "additionalProperties": {"type": "array", "items": _match_with_distance()},
    }


def _bank_config() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "matching_enabled_ratio": {"type": "number", "description": "1.0 on, 0.0 off."},
        },
    }


def _raw_lookup() -> dict[str, Any]:
    """``/hma/m/raw_lookup``."""
    include_distance = _query("include_distance", "true: matches with distances.")
    return {
        "get": {
            "operationId": "hmaRawLookup",
            "parameters": [_SIGNAL_TYPE, _SIGNAL, _BANKS, include_distance],
            "responses": {
                "200": _json(
                    "Matching entry ids (with distances if asked).",
                    {
                        "type": "object",
                        "properties": {
                            "matches": {
                                "type": "array",
                                "items": {"oneOf": [{"type": "integer"}, _match_with_distance()]},
                            }
                        },
                    },
                ),
                **_LOOKUP_ERRORS,
            },
        }
    }


def _lookup() -> dict[str, Any]:
    """``/hma/m/lookup``."""
    return {
        "get": {
            "operationId": "hmaLookup",
            "parameters": [_SIGNAL_TYPE, _SIGNAL, _BANKS],
            "responses": {"200": _json("Matches by bank.", _by_bank()), **_LOOKUP_ERRORS},
        },
        "post": {
            "operationId": "hmaLookupUpload",
            "parameters": [_BANKS],
            "requestBody": _PHOTO_OR_VIDEO_UPLOAD,
            "responses": {
                "200": _json(
                    "Signal type -> matches by bank.",
                    {"type": "object", "additionalProperties": _by_bank()},
                ),
                **_LOOKUP_ERRORS,
                "413": _error("Photo or video over its size limit."),
            },
        },
    }


def _hash() -> dict[str, Any]:
    """``/hma/h/hash``."""
    return {
        "post": {
            "operationId": "hmaHash",
            "parameters": [_query("types", "Comma-separated signal types to compute.")],
            "requestBody": _PHOTO_OR_VIDEO_UPLOAD,
            "responses": {
                "200": _json(
                    "Signal type -> hash: hex (pdq, md5, sha1, sha256); vpdq (videos): "
                    "python-threatexchange's VPDQSignal string, a JSON list of "
                    "'pdq_hex,quality,timestamp'.",
                    {"type": "object", "additionalProperties": {"type": "string"}},
                ),
                "400": _error("No photo or video, or it cannot be decoded."),
                **_COMMON_ERRORS,
                "413": _error("Photo or video over its size limit."),
            },
        }
    }


def _banks() -> dict[str, Any]:
    """``/hma/c/banks``."""
    return {
        "get": {
            "operationId": "hmaBanks",
            "responses": {
                "200": _json("Every bank.", {"type": "array", "items": _bank_config()}),
                **_COMMON_ERRORS,
            },
        }
    }


def _bank() -> dict[str, Any]:
    """``/hma/c/bank/{bank_name}``."""
    return {
        "get": {
            "operationId": "hmaBank",
            "parameters": [_BANK_NAME],
            "responses": {
                "200": _json("The bank.", _bank_config()),
                **_COMMON_ERRORS,
                "404": _error("No such bank."),
            },
        }
    }


def _add_signals() -> dict[str, Any]:
    """``/hma/c/bank/{bank_name}/signal``."""
    return {
        "post": {
            "operationId": "hmaAddSignals",
            "parameters": [_BANK_NAME],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "description": "Signal type -> hex; optional note (the "
                            "entry's label, at most 255 characters).",
                            "properties": {"note": {"type": "string", "maxLength": 255}},
                            "additionalProperties": {"type": "string"},
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    "The entry holding the signals (new, or already in the bank).",
                    {
                        "type": "object",
                        "properties": {
                            "id": {"type": "integer"},
                            "signals": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                    },
                ),
                "400": _error("No signals, an unknown signal type or a malformed value."),
                **_COMMON_ERRORS,
                "404": _error("No such bank."),
            },
        }
    }


def hma_paths() -> dict[str, Any]:
    """The ``/hma`` operations (paths relative to the service root)."""
    return {
        "/hma/m/raw_lookup": _raw_lookup(),
        "/hma/m/lookup": _lookup(),
        "/hma/h/hash": _hash(),
        "/hma/c/banks": _banks(),
        "/hma/c/bank/{bank_name}": _bank(),
        "/hma/c/bank/{bank_name}/signal": _add_signals(),
    }


def hma_error_schema() -> dict[str, Any]:
    """HMA's error body."""
    return {
        "type": "object",
        "required": ["message"],
        "properties": {"message": {"type": "string"}},
    }
