"""`/api/v1/schedules`: cron schedules (logic in `fabrik_gateway.schedules`)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, Parameter

from fabrik_gateway.api.params import QueryErrors, int_param, project_param
from fabrik_gateway.api.runs import problem_spec
from fabrik_gateway.audit import PROJECT_KEY, TARGET_KEY
from fabrik_gateway.auth import Principal
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.schedules import (
    CreateScheduleRequest,
    PatchScheduleRequest,
    ScheduleDeleted,
    ScheduleHistory,
    ScheduleList,
    Schedules,
    ScheduleView,
    schedules_of,
    validate_create,
    validate_patch,
)

HISTORY_MAX: int = 100
NOT_FOUND = {404: problem_spec("No such schedule (or one of a project the caller does not see)")}
UNAVAILABLE = {503: problem_spec("Not connected to NATS yet")}
ACCESS = {
    401: problem_spec("Anonymous access is off"),
    403: problem_spec("The developer role in the schedule's project is needed"),
}
WRITE = {
    **ACCESS,
    400: problem_spec("Malformed JSON or an empty body"),
    413: problem_spec("Body larger than the configured maximum"),
    422: problem_spec("Invalid fields, each named in `errors` (run template, cron, time zone, policies)"),
    **UNAVAILABLE,
}


async def validate_create_body(request: Request[Any, Any, Any]) -> None:
    """`before_request`: validate the raw body before Litestar decodes it, naming every field."""
    gateway: Gateway = request.app.state.gateway
    request.state.schedule_create = validate_create(await request.body(), gateway.limits)


async def validate_patch_body(request: Request[Any, Any, Any]) -> None:
    gateway: Gateway = request.app.state.gateway
    request.state.schedule_patch = validate_patch(await request.body(), gateway.limits)


async def _schedules(gateway: Gateway) -> Schedules:
    return await schedules_of(gateway.bus.js)


async def _target(
    request: Request[Any, Any, Any], schedules: Schedules, schedule_id: str, who: Principal
) -> None:
    request.state[TARGET_KEY] = f"schedule:{schedule_id}"
    definition, _ = await schedules.find(schedule_id, who)
    request.state[PROJECT_KEY] = definition.project


class SchedulesController(Controller):
    path = "/api/v1/schedules"
    tags = ["schedules"]
    guards = [api_guard]

    @post(
        "/",
        status_code=201,
        summary="Create a schedule",
        opt={"audit_action": "schedule.create"},
        description=(
            "A run template (the fields of `POST /api/v1/runs` but `project`) fired at every slot of a "
            "cron expression in a time zone, with concurrency and catch-up policies and expectations "
            "that make its health. Every invalid field is named in a 422. Developer role in the project."
        ),
        before_request=validate_create_body,
        responses=WRITE,
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CreateScheduleRequest],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
    ) -> Response[ScheduleView]:
        valid: CreateScheduleRequest = request.state.schedule_create
        request.state[PROJECT_KEY] = valid.project
        schedules = await _schedules(gateway)
        view = await schedules.create(valid, principal)
        request.state[TARGET_KEY] = f"schedule:{view.id}"
        return Response(view, status_code=201, headers={"Location": f"{self.path}/{view.id}"})

    @get(
        "/",
        summary="List schedules",
        description="Every schedule the caller sees (viewer role), with its next slot and health.",
        responses={400: problem_spec("Invalid query parameters"), **UNAVAILABLE},
    )
    async def list_schedules(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: Annotated[str | None, Parameter(description="Only this project")] = None,
    ) -> ScheduleList:
        errors = QueryErrors()
        name = project_param(errors, project)
        errors.raise_if_any()
        return await (await _schedules(gateway)).list(principal, name)

    @get("/{schedule_id:str}", summary="Show a schedule", responses={**NOT_FOUND, **UNAVAILABLE})
    async def show(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        schedule_id: FromPath[str],
    ) -> ScheduleView:
        return await (await _schedules(gateway)).show(schedule_id, principal)

    @patch(
        "/{schedule_id:str}",
        summary="Change a schedule",
        opt={"audit_action": "schedule.update"},
        description=(
            "Only the fields given change (`run` and `expectations` as a whole). A new cron expression, "
            "time zone or a resume starts the schedule afresh: earlier slots are not caught up. "
            "`expected_revision` refuses lost updates with 412."
        ),
        before_request=validate_patch_body,
        responses={**WRITE, **NOT_FOUND, 412: problem_spec("`expected_revision` does not match")},
    )
    async def update(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[PatchScheduleRequest],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        schedule_id: FromPath[str],
    ) -> ScheduleView:
        schedules = await _schedules(gateway)
        await _target(request, schedules, schedule_id, principal)
        return await schedules.update(schedule_id, request.state.schedule_patch, principal)

    @delete(
        "/{schedule_id:str}",
        status_code=200,
        summary="Delete a schedule",
        opt={"audit_action": "schedule.delete"},
        description="Runs it started are not touched; its open alerts are resolved by the scheduler.",
        responses={**ACCESS, **NOT_FOUND, **UNAVAILABLE},
    )
    async def remove(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        schedule_id: FromPath[str],
    ) -> ScheduleDeleted:
        schedules = await _schedules(gateway)
        await _target(request, schedules, schedule_id, principal)
        return await schedules.delete(schedule_id, principal)

    @post(
        "/{schedule_id:str}/pause",
        status_code=200,
        summary="Pause a schedule",
        opt={"audit_action": "schedule.pause"},
        description='No slot fires while paused (same as PATCH `{"paused": true}`); idempotent.',
        responses={**ACCESS, **NOT_FOUND, **UNAVAILABLE},
    )
    async def pause(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        schedule_id: FromPath[str],
    ) -> ScheduleView:
        schedules = await _schedules(gateway)
        await _target(request, schedules, schedule_id, principal)
        return await schedules.update(schedule_id, PatchScheduleRequest(paused=True), principal)

    @post(
        "/{schedule_id:str}/resume",
        status_code=200,
        summary="Resume a schedule",
        opt={"audit_action": "schedule.resume"},
        description=(
            "Slots after now fire again; those that passed while paused are not caught up "
            '(same as PATCH `{"paused": false}`); idempotent.'
        ),
        responses={**ACCESS, **NOT_FOUND, **UNAVAILABLE},
    )
    async def resume(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        schedule_id: FromPath[str],
    ) -> ScheduleView:
        schedules = await _schedules(gateway)
        await _target(request, schedules, schedule_id, principal)
        return await schedules.update(schedule_id, PatchScheduleRequest(paused=False), principal)

    @get(
        "/{schedule_id:str}/history",
        summary="A schedule's slots",
        description=(
            "The newest slots first (at most 100 are kept): `fired` with the run id and its outcome, "
            "`skipped` (concurrency `forbid`) and `missed` (downtime, by the catch-up policy)."
        ),
        responses={**NOT_FOUND, **UNAVAILABLE, 400: problem_spec("Invalid query parameters")},
    )
    async def history(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        schedule_id: FromPath[str],
        limit: Annotated[
            str | None,
            Parameter(
                description="At most this many slots (default and maximum 100)",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1},
            ),
        ] = None,
    ) -> ScheduleHistory:
        errors = QueryErrors()
        count = int_param(errors, "limit", limit, default=HISTORY_MAX, minimum=1, maximum=HISTORY_MAX)
        errors.raise_if_any()
        assert count is not None
        return await (await _schedules(gateway)).history(schedule_id, principal, count)
