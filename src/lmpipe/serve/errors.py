"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a 4xx status
for anything the client can fix, `server_error` for the rest."""

from __future__ import annotations


class RequestError(ValueError):
    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


ERROR_TYPES = {
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None):
    from starlette.responses import JSONResponse

    kind = "server_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse(error_body(message, kind, param, code), status, headers=headers)
