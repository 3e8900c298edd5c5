"""A small Python client for platforms' upload hooks (requests-based).

    client = ModerationClient("https://moderation.internal", token="mod_...")
    sub = client.submit(image_bytes, external_id="post-1", subject_id="user-42",
                        callback_url="https://hooks.example.com/moderation")
    result = client.wait(sub["id"], timeout=30)          # or receive the callback:
    if verify_callback(secret, request.headers["X-Moderation-Signature"], request.body): ...

Errors from the service (``{"error": {"code", "message"}}``) raise :class:`ApiError`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from moderation.service.callbacks import DEFAULT_TOLERANCE_S, verify_signature


class ApiError(Exception):
    """The service answered an error: HTTP ``status``, contract ``code``, ``message``, and
    ``retry_after`` (s) for 429/503 when the service said."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def verify_callback(
    secret: str, signature_header: str, body: bytes, *, tolerance_s: float = DEFAULT_TOLERANCE_S
) -> bool:
    """True when a callback's ``X-Moderation-Signature`` header signs ``body`` (the raw request
    bytes, before any JSON parsing) with ``secret`` and is at most ``tolerance_s`` old."""
    return verify_signature(secret, signature_header, body, tolerance_s=tolerance_s)


class ModerationClient:
    """Calls ``/api/v1`` with a bearer token.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        token: the API client's token (``moderation api-client create``).
        timeout: per-request timeout, s (a ``wait`` request adds its wait).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = session or requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def _check(self, response: requests.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, message = str(error["code"]), str(error["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", response.text[:200]
            retry = response.headers.get("Retry-After")
            raise ApiError(
                response.status_code,
                code,
                message,
                float(retry) if retry and retry.isdigit() else None,
            )
        body: dict[str, Any] = response.json()
        return body

    def submit(
        self,
        image: bytes | Path,
        *,
        external_id: str,
        subject_id: str,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        wait: float = 0.0,
    ) -> dict[str, Any]:
        """POST an image; returns ``{"id", "status"}``, or the full screening when ``wait`` (s,
        at most 10) sufficed.

        Raises:
            ApiError: 400/401/413/415/422/429/503 from the service.
            requests.RequestException: the service could not be reached.
        """
        data = image.read_bytes() if isinstance(image, Path) else image
        fields = {"external_id": external_id, "subject_id": subject_id}
        if callback_url:
            fields["callback_url"] = callback_url
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = {"wait": f"{wait:g}"} if wait > 0 else {}
        response = self.http.post(
            f"{self.base_url}/api/v1/screenings",
            data=fields,
            files={"image": ("image", data, "application/octet-stream")},
            headers=headers,
            params=params,
            timeout=self.timeout + wait,
        )
        return self._check(response)

    def get(self, screening_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        """``GET /api/v1/screenings/{id}`` (``wait`` s at most 10)."""
        params = {"wait": f"{wait:g}"} if wait > 0 else {}
        response = self.http.get(
            f"{self.base_url}/api/v1/screenings/{screening_id}",
            params=params,
            timeout=self.timeout + wait,
        )
        return self._check(response)

    def wait(self, screening_id: str, *, timeout: float = 60.0) -> dict[str, Any]:
        """Poll (with server-side ``wait``) until the screening is done.

        Raises:
            TimeoutError: not done within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"screening {screening_id} not done after {timeout} s")
            view = self.get(screening_id, wait=min(10.0, remaining))
            if view.get("status") == "done":
                return view
