"""OpenAI-shaped errors: every failure a client can see is ``{"error": {message, type, param, code}}``.

Clients (the ``openai`` package, Open WebUI, LangChain) read ``error.message`` and the
status code; llama-cpp-python's server answers 500 for most bad input, and FastAPI
answers 422 with its own ``detail`` list. Here bad input is a 4xx whose message names the
field and what to do, a failure of llama.cpp is a 500, and both have the same shape,
in a JSON response or, once a stream has started, as an SSE event.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Iterable, Optional, Sequence

import jinja2
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from ..errors import ContextFullError, DecodeError, DeRaError

log = logging.getLogger("dera_gguf.serve")

INVALID = "invalid_request_error"


class ApiError(Exception):
    """An error to send to the client as it is: HTTP status plus the OpenAI error fields."""

    def __init__(
        self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None, kind: str = INVALID
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def as_api_error(exc: BaseException) -> ApiError:
    """What the client is told about ``exc``: bad input is a 400, a llama.cpp failure a 500.

    ``ContextFullError`` and ``DecodeError`` are told apart by type; any other ``DeRaError``
    or ``ValueError`` (from llama-cpp-python's own checks) and a chat template that refuses
    the messages (``jinja2.TemplateError``) are the request's fault.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextFullError):
        return ApiError(400, f"{exc} (dera-serve: start it with a larger --n-ctx)", code="context_length_exceeded")
    if isinstance(exc, DecodeError):
        return ApiError(500, str(exc), code="decode_failed", kind="server_error")
    if isinstance(exc, (DeRaError, ValueError)):
        return ApiError(400, str(exc), code="invalid_value")
    if isinstance(exc, jinja2.TemplateError):
        return ApiError(400, f"the model's chat template refused the messages: {exc}", param="messages")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


def describe_validation(errors: Sequence[dict], known: Iterable[str]) -> ApiError:
    """One 400 for pydantic's errors: the first one, by field, with a hint for an unknown field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], list(known), n=1) if loc else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        return ApiError(400, f"unknown field {field!r}: dera-serve does not take it{hint}", field, "unknown_field")
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})")
    where = f"{field}: " if field else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ApiError(400, f"{where}{first['msg']}{more}", field, "invalid_value")


# ------------------------------------------------------------------ handlers


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    known = getattr(request.app.state, "known_fields", {}).get(request.url.path, ())
    return describe_validation(exc.errors(), known).response()


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code).response()


async def _value(request: Request, exc: Exception) -> JSONResponse:
    error = as_api_error(exc)
    log.warning("%s %s: %s", request.method, request.url.path, error.message)
    return error.response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return as_api_error(exc).response()  # Starlette logs the traceback after this answer


def install_handlers(app: Any) -> None:
    """Answer every error in the OpenAI shape (FastAPI's own 422 and 404 bodies included)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    for kind in (DeRaError, ValueError, jinja2.TemplateError):
        app.add_exception_handler(kind, _value)
    app.add_exception_handler(Exception, _unexpected)
