"""Errors in OpenAI's schema, `{"error": {"message", "type", "param", "code"}}`, with the
HTTP status that each of the router's outcomes (a gRPC status name) maps to."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse


@dataclass(frozen=True)
class HttpStatus:
    status: int
    type: str


# gRPC status name -> HTTP status and OpenAI error type
STATUSES = {
    "INVALID_ARGUMENT": HttpStatus(400, "invalid_request_error"),
    "NOT_FOUND": HttpStatus(404, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": HttpStatus(429, "rate_limit_error"),
    "UNAVAILABLE": HttpStatus(503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": HttpStatus(504, "timeout_error"),
    "CANCELLED": HttpStatus(499, "cancelled_error"),
    "INTERNAL": HttpStatus(500, "internal_error"),
    "UNAUTHENTICATED": HttpStatus(401, "invalid_request_error"),
}
PAYLOAD_TOO_LARGE = HttpStatus(413, "invalid_request_error")


class ApiError(Exception):
    """Ends a request with an OpenAI error body. `code` is the router's gRPC status name
    (the body's `code` is its lower case), `param` the request field at fault, if any."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 status: HttpStatus | None = None, body_code: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param
        self.status = status or STATUSES.get(code, STATUSES["INTERNAL"])
        self.body_code = body_code or code.lower()

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.status.type, "param": self.param,
                          "code": self.body_code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status.status)


def invalid(field: str, message: str) -> ApiError:
    """A 400 naming `field`; the message starts with it, as the gRPC API's do."""
    return ApiError("INVALID_ARGUMENT", f"{field}: {message}", param=field)
