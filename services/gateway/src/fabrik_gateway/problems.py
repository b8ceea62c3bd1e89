"""RFC 9457 problem details: every error the gateway answers, including Litestar's own.

Each error is `application/problem+json` with `type`, `title`, `status`, `detail` and `instance`
(the request path); validation failures add `errors: [{field, rule}]` naming every invalid field.
`ProblemError` is what the API code raises; the exception handlers below turn it, Litestar's
`HTTPException`s (404 on unknown routes, 405, 413, validation of query parameters) and any other
exception into that shape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Final

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from fabrik_common.specs import FieldError, humanize

log = logging.getLogger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
TYPE_BASE: Final = "https://fabrik.sh/problems/"


class FieldProblem(msgspec.Struct, frozen=True):
    """One invalid field: `field` is a dotted/indexed path (`workload.env.FOO`, `spec.goals[2]`), a
    query parameter, or a header name; `rule` says what the value must be."""

    field: str
    rule: str


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An RFC 9457 problem details object."""

    type: str
    title: str
    status: int
    detail: str
    instance: str = ""
    errors: list[FieldProblem] | None = None


# slug, title per status for problems raised without a more specific type
_STATUS_TYPES: Final[dict[int, tuple[str, str]]] = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-failed", "Validation failed"),
    429: ("too-many-requests", "Too many requests"),
    500: ("internal-error", "Internal server error"),
    503: ("unavailable", "Service unavailable"),
}


class ProblemError(Exception):
    """Raised by API code; answered as a problem document with `status`."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        default_slug, default_title = _STATUS_TYPES.get(status, ("error", "Error"))
        self.status = status
        self.detail = detail
        self.slug = slug or default_slug
        self.title = title or default_title
        self.errors = errors
        self.headers = headers or {}

    def problem(self, instance: str) -> Problem:
        return Problem(
            type=TYPE_BASE + self.slug,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=[FieldProblem(f, r) for f, r in self.errors] if self.errors is not None else None,
        )


def invalid(errors: list[FieldError], *, status: int = 422, detail: str | None = None) -> ProblemError:
    """A validation failure naming every invalid field."""
    fields = list(dict.fromkeys(f for f, _ in errors))
    return ProblemError(
        status,
        detail or f"{len(fields)} invalid field(s): {', '.join(fields)}",
        slug="validation-failed" if status == 422 else "invalid-request",
        title="Validation failed" if status == 422 else "Invalid request",
        errors=errors,
    )


def not_found(what: str) -> ProblemError:
    return ProblemError(404, f"{what} does not exist", slug="not-found")


def problem_response(exc: ProblemError, request: Request[Any, Any, Any]) -> Response[Problem]:
    return Response(
        exc.problem(request.url.path),
        status_code=exc.status,
        media_type=PROBLEM_JSON,
        headers=exc.headers or None,
    )


def make_exception_handlers(
    on_unmatched: Callable[[Request[Any, Any, Any], int], None] | None = None,
) -> dict[type[Exception] | int, Callable[[Request[Any, Any, Any], Any], Response[Problem]]]:
    """Litestar `exception_handlers` answering everything as problem details."""

    def handle_problem(request: Request[Any, Any, Any], exc: ProblemError) -> Response[Problem]:
        return problem_response(exc, request)

    def handle_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
        return problem_response(validation_problem(exc), request)

    def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
        scope: dict[str, Any] = dict(request.scope)  # routing fills some keys only on a match
        matched = bool(scope.get("path_template"))
        if on_unmatched is not None and not matched:
            on_unmatched(request, exc.status_code)
        detail = exc.detail
        if isinstance(exc, NotFoundException) and not matched:
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
        problem = ProblemError(exc.status_code, detail, headers=headers)
        return problem_response(problem, request)

    def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
        log.error(
            "unhandled error",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"path": request.url.path, "method": request.method},
        )
        problem = ProblemError(
            HTTP_500_INTERNAL_SERVER_ERROR, "an unexpected error occurred; it has been logged"
        )
        return problem_response(problem, request)

    return {
        ProblemError: handle_problem,
        ValidationException: handle_validation,
        HTTPException: handle_http,
        Exception: handle_unexpected,
    }


def validation_problem(exc: ValidationException) -> ProblemError:
    """Litestar's validation failures (query, path, header parameters; bodies of routes that do
    not validate them first) with each field named: 400, or 422 for a body."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    errors: list[FieldError] = []
    body_failed = False
    for entry in extra:
        if not isinstance(entry, dict):
            continue
        in_body = entry.get("source") == "body"
        body_failed = body_failed or in_body
        key = str(entry.get("key") or "")
        if in_body:
            key = "" if key == "data" else key.removeprefix("data.")
        message = str(entry.get("message") or exc.detail)
        errors.append(_litestar_error(key, message, "body" if in_body else "$"))
    if not errors:
        errors.append(_litestar_error("", str(exc.detail), "$"))
    return invalid(errors, status=422 if body_failed else 400)


_LITESTAR_MISSING = re.compile(r"^Missing required (?:query|header|path|cookie) parameter '(?P<name>[^']+)'")
_OBJECT_FIELD = re.compile(r"^Object (?P<what>contains unknown|missing required) field `(?P<name>[^`]+)`")


def _litestar_error(key: str, message: str, root: str) -> FieldError:
    if (m := _OBJECT_FIELD.match(message)) is not None:
        field = f"{key}.{m['name']}" if key else m["name"]
        return field, "is not a known field" if m["what"] == "contains unknown" else "is required"
    if _LITESTAR_MISSING.match(message):
        return key or root, "is required"
    return key or root, humanize(message)
