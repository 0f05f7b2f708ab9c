"""Errors in the OpenAI error envelope, each with a message a person can act on.

`{"error": {"message": ..., "type": ..., "param": null, "code": ...}}` is what OpenAI's API and
llama-server answer, so the `openai` package raises its usual exception classes for them
(404 NotFoundError, 429 RateLimitError, ...). Nothing here ever carries a traceback.
"""

from __future__ import annotations

from aiohttp import web

# HTTP status -> the envelope's `type`, as OpenAI and llama-server name them.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 502: "server_error", 503: "unavailable_error",
          504: "server_error"}


class GatewayError(Exception):
    """A request the gateway answers with `status` and `message` instead of an upstream's."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def envelope(status: int, message: str, code: str) -> dict[str, object]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": None, "code": code}}


def error_response(exc: GatewayError) -> web.Response:
    return web.json_response(envelope(exc.status, exc.message, exc.code), status=exc.status)


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request")


def internal_error() -> GatewayError:
    """What a client gets for a bug in the gateway; the traceback goes to the journal only."""
    return GatewayError(500, "internal error in mi50d's gateway; see the journal (journalctl -u "
                        "mi50d)", "internal")
