"""Request context: request id, one structured log line and metrics per request.

A pure ASGI middleware rather than BaseHTTPMiddleware: it does not buffer bodies and works
with streaming requests, which the upload reader relies on.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

logger = logging.getLogger("app.access")

REQUEST_ID_HEADER = "X-Request-ID"
# Accept a caller's id only if it is short and harmless to echo into logs and headers.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def route_label(scope: Scope) -> str:
    """Low-cardinality route name for metrics: the path template, never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if str(scope.get("path", "")).startswith("/static/"):
        return "/static"
    return "unmatched"


CLIENT_CLOSED = "client_closed"  # status label and outcome: the client went away first


def header_bytes(scope: Scope) -> int:
    """Size of the request's header block as received (names, values, separators)."""
    return sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))


async def _send_json(send: Send, status: int, body: dict[str, Any], request_id: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"cache-control", b"no-store"),
                (b"connection", b"close"),
                (REQUEST_ID_HEADER.lower().encode(), request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


class RequestContextMiddleware:
    """Sets ``request.state.request_id``, echoes X-Request-ID, logs and measures.

    Also: refuses oversized header blocks (431), marks every error answer
    ``Cache-Control: no-store``, and records a client that disconnected before its answer as
    ``client_closed`` (info level, its own status label), never as a server error.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, max_header_bytes: int = 16 * 1024) -> None:
        self.app = app
        self.metrics = metrics
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _SAFE_ID.match(incoming) else uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status: int | str = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
                if message["status"] >= 400:
                    # Errors are per request (and may echo what was sent): never cache them.
                    headers["Cache-Control"] = "no-store"
            await send(message)

        try:
            if header_bytes(scope) > self.max_header_bytes:
                status = 431
                state["outcome"] = "rejected:headers_too_large"
                detail = f"request headers larger than {self.max_header_bytes} bytes"
                await _send_json(send, 431, {"detail": detail}, request_id)
            else:
                await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client hung up while its body was being read: nothing to answer, no trace.
            status = CLIENT_CLOSED
            state["outcome"] = CLIENT_CLOSED
        except Exception:
            # Unhandled: log it with the id and answer JSON ourselves, never an HTML trace.
            status = 500
            logger.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if not response_started:
                body = {"detail": "internal server error", "request_id": request_id}
                await _send_json(send, 500, body, request_id)
        finally:
            elapsed = time.perf_counter() - started
            route = route_label(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.latency.labels(route=route, method=method).observe(elapsed)
            logger.info(
                "request",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": method,
                        "path": scope.get("path", ""),
                        "route": route,
                        "status": status,
                        "latency_ms": round(elapsed * 1000.0, 2),
                        "outcome": state.get("outcome", _default_outcome(status)),
                    }
                },
            )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _default_outcome(status: int | str) -> str:
    if isinstance(status, str):
        return status
    if status < 400:
        return "ok"
    return "client_error" if status < 500 else "server_error"
