"""`/api/v1/projects/{project}/envs`: project environments (logic in `fabrik_gateway.envs`)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, Parameter, QueryParameter

from fabrik_gateway.api.params import QueryErrors, bool_param, int_param
from fabrik_gateway.api.runs import problem_spec
from fabrik_gateway.auth import Principal
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.envs import (
    CONFIRM_HEADER,
    EnvDeleteResult,
    EnvDiffView,
    EnvList,
    EnvPutRequest,
    EnvView,
    EnvWriteResult,
    PromoteRequest,
    PromoteResult,
    check_path,
    env_name_errors,
    path_errors,
    validate_promote,
    validate_put,
)
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.problems import invalid

BAD_PATH = {400: problem_spec("`project` or `env` is not a DNS-1123 label (or a bad query parameter)")}
ACCESS = {
    401: problem_spec("Anonymous access is off"),
    403: problem_spec("The caller's role is not enough (maintainer for protected environments)"),
}
NOT_FOUND = {404: problem_spec("No such environment")}
UNAVAILABLE = {503: problem_spec("Not connected to NATS, or no encryption key configured")}
WRITE = {
    **BAD_PATH,
    **ACCESS,
    412: problem_spec("`expected_revision` does not match: the environment changed"),
    413: problem_spec("Body larger than the configured maximum"),
    422: problem_spec("Invalid fields, each named in `errors` (reserved keys, bad names, sizes)"),
    428: problem_spec("Writing a protected environment needs `confirm: true` or the Fabrik-Confirm header"),
    **UNAVAILABLE,
}

ConfirmHeader = Annotated[
    str | None,
    HeaderParameter(
        name=CONFIRM_HEADER,
        required=False,
        description="The name of the protected environment being written: confirms the write",
    ),
]


def _header_confirms(value: str | None, env: str) -> bool:
    return value is not None and value.strip() == env


async def validate_put_body(request: Request[Any, Any, Any]) -> None:
    """`before_request` of PUT: the path, then the raw body, every invalid field named."""
    params = request.path_params
    check_path(str(params.get("project", "")), str(params.get("env", "")))
    gateway: Gateway = request.app.state.gateway
    request.state.env_put = validate_put(await request.body(), gateway.envs.max_value_bytes)


async def validate_promote_body(request: Request[Any, Any, Any]) -> None:
    check_path(str(request.path_params.get("project", "")))
    request.state.promote = validate_promote(await request.body())


class EnvsController(Controller):
    path = "/api/v1/projects/{project:str}/envs"
    tags = ["environments"]
    guards = [api_guard]
    # EnvService audits each write and refusal itself, with the env's details.
    opt = {"self_audited": True}

    @get(
        "/",
        summary="List a project's environments",
        description="Names, key counts, revisions and last changes; no values.",
        responses={**BAD_PATH, **ACCESS, **UNAVAILABLE},
    )
    async def list_envs(
        self, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal], project: FromPath[str]
    ) -> EnvList:
        check_path(project)
        return await gateway.envs.list(project, principal)

    @get(
        "/diff",
        summary="Compare two environments (key names only)",
        description=(
            "What `to` undergoes when `from` is copied onto it: `added` (only in `from`), `removed` (only "
            "in `to`), `changed` (different values). A `to` that does not exist counts as empty; a "
            "missing `from` is a 404. Also answered to POST."
        ),
        responses={**BAD_PATH, **ACCESS, **NOT_FOUND, **UNAVAILABLE},
    )
    async def diff(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: FromPath[str],
        from_env: Annotated[
            str | None, QueryParameter(name="from", description="The source environment")
        ] = None,
        to_env: Annotated[str | None, QueryParameter(name="to", description="The target environment")] = None,
    ) -> EnvDiffView:
        source, target = _diff_params(project, from_env, to_env)
        return await gateway.envs.diff(project, source, target, principal)

    @post(
        "/diff",
        status_code=200,
        summary="Compare two environments (key names only)",
        description="As GET /diff.",
        responses={**BAD_PATH, **ACCESS, **NOT_FOUND, **UNAVAILABLE},
    )
    async def diff_post(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: FromPath[str],
        from_env: Annotated[
            str | None, QueryParameter(name="from", description="The source environment")
        ] = None,
        to_env: Annotated[str | None, QueryParameter(name="to", description="The target environment")] = None,
    ) -> EnvDiffView:
        source, target = _diff_params(project, from_env, to_env)
        return await gateway.envs.diff(project, source, target, principal)

    @post(
        "/promote",
        status_code=200,
        summary="Promote one environment onto another",
        description=(
            "Copies `from`'s values onto `to` (`to` becomes a copy; with `merge: true` `from`'s keys are set "
            "and `to`'s others kept). Without `confirm: true` nothing is written: the answer is a preview, "
            "the diff (`applied: false`). Applying needs the developer role, maintainer when either "
            "environment is protected; `from_revision`/`to_revision` (from the preview) make it refuse "
            "(412) if either changed since."
        ),
        before_request=validate_promote_body,
        responses={**WRITE, **NOT_FOUND},
    )
    async def promote(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[PromoteRequest],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: FromPath[str],
        confirm_header: ConfirmHeader = None,
    ) -> PromoteResult:
        body: PromoteRequest = request.state.promote
        return await gateway.envs.promote(
            project, body, principal, header_confirmed=_header_confirms(confirm_header, body.to_env)
        )

    @get(
        "/{env:str}",
        summary="Show an environment",
        description=(
            "Key names, revision, last change. Values only with `reveal=true` (developer role; maintainer "
            "for a protected environment; audited)."
        ),
        responses={**BAD_PATH, **ACCESS, **NOT_FOUND, **UNAVAILABLE},
    )
    async def show(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: FromPath[str],
        env: FromPath[str],
        reveal: Annotated[
            str | None,
            Parameter(description="Include the values", schema_extra={"oneOf": None, "type": "boolean"}),
        ] = None,
    ) -> EnvView:
        errors = QueryErrors()
        errors.errors.extend(path_errors(project, env))
        show_values = bool_param(errors, "reveal", reveal, default=False)
        errors.raise_if_any()
        return await gateway.envs.get(project, env, principal, reveal=show_values)

    @put(
        "/{env:str}",
        summary="Set variables",
        description=(
            "Merges `values` into the environment (creating it), removes the keys in `unset`; with "
            "`replace: true` the environment becomes exactly `values`. Answers 201 when it created the "
            "environment. Writing a protected environment (`prod`, `production`, `live`) needs the "
            "maintainer role and `confirm: true` (or the `Fabrik-Confirm: <env>` header), else 403/428. "
            "Every change is audited (key names, never values)."
        ),
        before_request=validate_put_body,
        responses={201: ResponseSpec(data_container=EnvWriteResult, description="Created"), **WRITE},
    )
    async def set_values(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[EnvPutRequest],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: FromPath[str],
        env: FromPath[str],
        confirm_header: ConfirmHeader = None,
    ) -> Response[EnvWriteResult]:
        body: EnvPutRequest = request.state.env_put
        result = await gateway.envs.put(
            project, env, body, principal, header_confirmed=_header_confirms(confirm_header, env)
        )
        return Response(result, status_code=201 if result.created else 200)

    @delete(
        "/{env:str}",
        status_code=200,
        summary="Delete an environment",
        description=(
            "A protected environment needs the maintainer role and `?confirm=true` (or the "
            "`Fabrik-Confirm: <env>` header)."
        ),
        responses={**WRITE, **NOT_FOUND},
    )
    async def delete_env(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: FromPath[str],
        env: FromPath[str],
        confirm: Annotated[
            str | None,
            Parameter(
                description="Confirms deleting a protected environment",
                schema_extra={"oneOf": None, "type": "boolean"},
            ),
        ] = None,
        expected_revision: Annotated[
            str | None,
            Parameter(
                description="Refuse (412) unless the environment is at this revision",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1},
            ),
        ] = None,
        confirm_header: ConfirmHeader = None,
    ) -> EnvDeleteResult:
        errors = QueryErrors()
        errors.errors.extend(path_errors(project, env))
        confirmed = bool_param(errors, "confirm", confirm, default=False)
        revision = int_param(
            errors, "expected_revision", expected_revision, default=None, minimum=1, maximum=None
        )
        errors.raise_if_any()
        return await gateway.envs.delete(
            project,
            env,
            principal,
            confirmed=confirmed or _header_confirms(confirm_header, env),
            expected_revision=revision,
        )


def _diff_params(project: str, source: str | None, target: str | None) -> tuple[str, str]:
    errors = QueryErrors()
    errors.errors.extend(path_errors(project))
    for name, value in (("from", source), ("to", target)):
        if not value:
            errors.add(name, "is required: an environment name")
        else:
            errors.errors.extend(env_name_errors(name, value))
    errors.raise_if_any()
    assert source is not None and target is not None
    if source == target:
        raise invalid([("to", "must differ from 'from'")], status=400)
    return source, target
