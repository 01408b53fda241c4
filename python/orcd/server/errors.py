"""Errors the handlers raise before a response starts, and their two JSON shapes:
OpenAI's {"error": {"message", "type", "param", "code"}} for /v1/*, and the worker
API's {"error": {"code", "message"}} for /execute and /cancel."""
from __future__ import annotations

import json
from typing import Dict, Optional

from aiohttp import web

from .. import openai_format as fmt

# HTTP status -> OpenAI's error type
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}

# HTTP status -> the worker API's error code (when the raiser names none)
_WORKER_CODES = {400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 404: "NOT_FOUND", 409: "DUPLICATE_JOB",
                 413: "INVALID_REQUEST", 429: "BUSY", 500: "INTERNAL", 503: "UNAVAILABLE"}


class ApiError(Exception):
    """status: HTTP status; param: the request field at fault; code: a machine-readable
    code (OpenAI's "context_length_exceeded", the worker API's "CONTEXT_OVERFLOW", ...)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def _json(status: int, body: dict, headers: Dict[str, str]) -> web.Response:
    return web.Response(status=status, text=json.dumps(body, ensure_ascii=False), content_type="application/json",
                        headers=headers)


def openai_response(e: ApiError) -> web.Response:
    body = fmt.error(e.message, _TYPES.get(e.status, "server_error"), e.param, e.code)
    return _json(e.status, body, e.headers)


def worker_response(e: ApiError) -> web.Response:
    code = e.code if e.code and e.code.isupper() else _WORKER_CODES.get(e.status, "INTERNAL")
    body = {"error": {"code": code, "message": e.message}}
    if e.param:
        body["error"]["param"] = e.param
    return _json(e.status, body, e.headers)


def busy(what: str = "the request queue is full") -> ApiError:
    return ApiError(429, f"{what}: retry later", code="queue_full", headers={"Retry-After": "1"})


def unavailable(what: str) -> ApiError:
    return ApiError(503, what, code="unavailable", headers={"Retry-After": "5"})
