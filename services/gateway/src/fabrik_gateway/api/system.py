"""`/api/v1/projects` and `/api/v1/queue`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import Parameter

from fabrik_gateway.api.params import QueryErrors, int_param, project_param
from fabrik_gateway.api.runs import BAD_QUERY, UNAVAILABLE
from fabrik_gateway.auth import Principal
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.models import ProjectList, QueueView


class SystemController(Controller):
    path = "/api/v1"
    tags = ["projects and queue"]
    guards = [api_guard]

    @get(
        "/projects", summary="Projects", description="Every project with runs, and its run counts per state."
    )
    async def projects(
        self, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
    ) -> ProjectList:
        gateway.require_ready()
        return ProjectList(items=gateway.readmodel.projects(principal.visible_projects))

    @get(
        "/queue",
        summary="The queue",
        description=(
            "Queued runs in dispatch order with their positions and estimated start, and per-project "
            "usage and limits, from the scheduler's latest snapshot (empty until it has written one)."
        ),
        responses={**BAD_QUERY, **UNAVAILABLE},
    )
    async def queue(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: Annotated[
            str | None, Parameter(description="Only this project's runs (positions stay global)")
        ] = None,
        limit: Annotated[
            str | None,
            Parameter(
                description="At most this many items",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1},
            ),
        ] = None,
    ) -> QueueView:
        settings = gateway.settings
        errors = QueryErrors()
        project_name = project_param(errors, project)
        size = int_param(
            errors,
            "limit",
            limit,
            default=settings.queue_max_limit,
            minimum=1,
            maximum=settings.queue_max_limit,
        )
        errors.raise_if_any()
        return gateway.readmodel.queue_view(
            project=project_name, limit=size, visible=principal.visible_projects
        )
