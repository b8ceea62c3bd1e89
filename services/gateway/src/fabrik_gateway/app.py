"""Wiring and start-up of the gateway service."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Litestar, Request
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, Schema, SecurityScheme

from fabrik_common import specs
from fabrik_common.service import Service, run_service
from fabrik_gateway import envs, models, schedules
from fabrik_gateway.api import EnvsController, RunsController, SystemController, stream
from fabrik_gateway.api.access import AccessController
from fabrik_gateway.api.analytics import AnalyticsController
from fabrik_gateway.api.backups import BackupsController
from fabrik_gateway.api.dashboard import dashboard_router
from fabrik_gateway.api.experiments import ExperimentsController
from fabrik_gateway.api.imports import ImportsController
from fabrik_gateway.api.schedules import SchedulesController
from fabrik_gateway.api.webhooks_github import github_webhook_route
from fabrik_gateway.api.webhooks_slack import slack_webhook
from fabrik_gateway.audit import AuditTrail, audit_middleware
from fabrik_gateway.auth import Principal, current_principal
from fabrik_gateway.edge import cors_config, guarded_responses, security_headers_middleware
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.github.handlers import github_router
from fabrik_gateway.github.integration import GithubIntegration
from fabrik_gateway.handlers import router
from fabrik_gateway.live import LiveHub
from fabrik_gateway.metrics import UNMATCHED, metrics_middleware
from fabrik_gateway.problems import make_exception_handlers
from fabrik_gateway.settings import GatewaySettings
from fabrik_gateway.slack.handlers import router as slack_router
from fabrik_gateway.slack.integration import install as install_slack
from fabrik_gateway.slack.integration import run_slack

log = logging.getLogger(__name__)

NAME = "gateway"
API_VERSION = "1.0.0"
OPENAPI_PATH = "/api/v1/openapi.json"


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Fabrik API",
        version=API_VERSION,
        description=(
            "Submit, watch, cancel and resume runs. Errors are RFC 9457 problem details "
            "(`application/problem+json`); validation failures name every invalid field in `errors`."
        ),
        # The document is the root of the OpenAPI router, so that the router's catch-all for
        # unknown documentation pages (an HTML 404) stays out of /api/v1/*.
        path=OPENAPI_PATH,
        render_plugins=[JsonRenderPlugin(path="/")],
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="An API token (`fbk_...`, from `POST /api/v1/tokens`) or a JWT",
                )
            }
        ),
        security=[{"bearer": []}],
    )


def build(settings: GatewaySettings) -> Service[Gateway]:
    gateway = Gateway(settings)
    if settings.anonymous_role != "none":
        log.warning(
            "ANONYMOUS ACCESS HAS THE %s ROLE (FABRIK_ANONYMOUS_ROLE=%s): anyone who reaches this gateway "
            "may %s without credentials. Fine for a local stack on 127.0.0.1; never expose such a gateway.",
            settings.anonymous_role.upper(),
            settings.anonymous_role,
            {
                "viewer": "read every run, log and environment",
                "developer": "submit and cancel runs and change non-protected environments",
                "maintainer": "change every environment, protected ones included",
                "admin": "do anything, including creating API tokens",
            }[settings.anonymous_role],
        )
    audit = AuditTrail()
    live = LiveHub(gateway)
    github = GithubIntegration(settings, gateway)

    def count_unmatched(request: Request[Any, Any, Any], status: int) -> None:
        if gateway.metrics is not None:
            gateway.metrics.observe(request.method, UNMATCHED, status, 0.0)

    def provide_gateway() -> Gateway:
        return gateway

    service: Service[Gateway] = Service(
        NAME,
        settings,
        routers=[router, github_router(github), slack_router],
        on_start=gateway.on_start,
        on_stop=gateway.on_stop,
        route_handlers=[
            RunsController,
            SystemController,
            EnvsController,
            AccessController,
            AnalyticsController,
            ExperimentsController,
            BackupsController,
            SchedulesController,
            ImportsController,
            *stream.route_handlers,
            dashboard_router(),
            github_webhook_route(github),
            slack_webhook,
        ],
        http_app_kwargs={
            "dependencies": {
                "gateway": Provide(provide_gateway, sync_to_thread=False),
                "principal": Provide(current_principal),
            },
            "exception_handlers": make_exception_handlers(on_unmatched=count_unmatched),
            "state": State({"gateway": gateway, stream.LIVE_STATE_KEY: live, "github": github}),
            "openapi_config": openapi_config(),
            "middleware": [
                security_headers_middleware(settings),
                metrics_middleware(lambda: gateway.metrics),
                audit_middleware(lambda: audit),
            ],
            "cors_config": cors_config(settings),
            "request_max_body_size": settings.max_body_bytes,
            "signature_namespace": {"Gateway": Gateway, "Principal": Principal},
        },
        background=[
            Gateway.watch_runs,
            Gateway.watch_queue,
            Gateway.watch_tokens,
            live.run,
            github.maintain,
            run_slack,
        ],
    )
    gateway.attach(service)
    live.attach(service)
    github.attach(service)
    install_slack(gateway, service.registry)
    audit.publish = service.bus.publish
    close_strict_schemas(service.http_app)
    guarded_responses(service.http_app)
    return service


def close_strict_schemas(app: Litestar) -> None:
    """Litestar does not render msgspec's `forbid_unknown_fields`: mark those bodies
    `additionalProperties: false` in the (cached) OpenAPI document, as the API enforces it."""
    schemas = app.openapi_schema.components.schemas or {}
    for name, schema in schemas.items():
        model = _STRICT_MODELS.get(name)
        if model is not None and isinstance(schema, Schema):
            schema.additional_properties = False


_STRICT_MODELS: dict[str, type[msgspec.Struct]] = {
    cls.__name__: cls
    for module in (models, specs, envs, schedules)
    for cls in vars(module).values()
    if isinstance(cls, type)
    and issubclass(cls, msgspec.Struct)
    and cls.__struct_config__.forbid_unknown_fields
}


def main() -> None:
    run_service(GatewaySettings, build, NAME)
