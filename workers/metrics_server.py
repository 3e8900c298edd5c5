"""The worker's own ``/metrics``: its processes' histograms and counters (screening latency per
stage, decisions, redeliveries, callback attempts) for Prometheus, behind the metrics token.

``moderation worker`` writes these to its machine's prometheus-client multiprocess directory;
the web tier's ``/metrics`` reads them only where it shares that directory (one machine). In
containers or on worker-only machines, set ``MODERATION_WORKER_METRICS_PORT``: the worker's
main process then serves them on that port (``GET`` any path, ``Authorization: Bearer
<MODERATION_METRICS_TOKEN>``; 401 otherwise), started from Celery's ``worker_init`` signal.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from moderation.service.metrics import bearer_token_matches

logger = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics: " + format, *args)


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def guarded_app(token: str) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI app serving this machine's worker metrics to ``Bearer <token>`` only (compared in
    constant time), 401 with ``WWW-Authenticate`` otherwise."""
    metrics = make_wsgi_app(_registry())

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not bearer_token_matches(str(environ.get("HTTP_AUTHORIZATION", "")), token):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"the metrics bearer token is required\n"]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


def serve_metrics(port: int, token: str, host: str = "0.0.0.0") -> WSGIServer:  # noqa: S104
    """Serve :func:`guarded_app` on ``host:port`` from a daemon thread; returns the server
    (``shutdown()`` stops it). Raises OSError when the port is taken."""
    server = make_server(host, port, guarded_app(token), handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    logger.info("worker metrics on %s:%d (bearer token required)", host, server.server_port)
    return server
