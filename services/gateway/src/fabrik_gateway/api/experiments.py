"""`/api/v1/experiments`, `/api/v1/optimizer/*`: the optimizer's experiments on run configuration,
its global pause and the history of its changes, answered by the optimizer over NATS
request/reply (docs/optimizer.md#api-and-cli).

Roles: reading needs a viewer (experiments of projects the caller does not see are left out;
experiments without a target project need a caller who sees every project); creating, pausing,
resuming and stopping an experiment needs a maintainer in its target project (an admin for an
experiment on every project); approving and rolling back need a maintainer of its project (of
every project for an experiment without one); the global pause needs an admin. Candidates (the
experiments the optimizer proposes from its insights) are read by viewers of their project and
started under the rules of creating an experiment, as the caller.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, Parameter, QueryParameter

from fabrik_common import experiments as ex
from fabrik_common import optimizer_rpc as rpc
from fabrik_common.ids import DNS1123_LABEL, DNS1123_RULE
from fabrik_gateway.api.analytics import OPTIMIZER
from fabrik_gateway.api.params import QueryErrors, int_param
from fabrik_gateway.api.runs import BAD_QUERY, problem_spec
from fabrik_gateway.audit import DETAILS_KEY, PROJECT_KEY, TARGET_KEY
from fabrik_gateway.auth import Principal, require_role
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.optimizer import ask
from fabrik_gateway.problems import ProblemError, invalid

R = TypeVar("R")
STATES = ("draft", "pending_approval", "active", "paused", "shipped", "rolled_back", "stopped", "invalid")
NOT_FOUND = {404: problem_spec("No such experiment (or not visible to the caller)")}
CANDIDATE_NOT_FOUND = {404: problem_spec("No such candidate (unknown, already tried, or not visible)")}
CANDIDATE_ID = re.compile(r"^[0-9a-f]{20}$")
CONFLICT = {409: problem_spec("The experiment is not in a state that allows this, or too many are active")}


class CreateExperiment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A new experiment. `treatment_share` (at most 0.2) is split evenly among the treatments."""

    name: str
    target: ex.Target = msgspec.field(default_factory=ex.Target)
    parameter: str
    control: ex.Arm
    treatments: list[ex.Arm]
    treatment_share: float = ex.DEFAULT_TREATMENT_SHARE
    primary_metric: ex.PrimaryMetric = "success_rate"
    guardrails: list[ex.Guardrail] = msgspec.field(default_factory=lambda: list(ex.ALL_GUARDRAILS))
    risk: ex.Risk = "low"
    min_runs_per_arm: int = 30
    max_duration_seconds: int = 14 * 86400
    protected_env: bool = False
    approved_cost_ceiling: float = 3.0
    start: bool = True


class ActionBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: str = ""


class PauseBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: str


def _timeout(gateway: Gateway) -> float:
    return gateway.settings.optimizer_timeout_seconds


def _sees(principal: Principal, experiment: ex.Experiment) -> bool:
    return _sees_target(principal, experiment.target)


def _sees_target(principal: Principal, target: ex.Target) -> bool:
    project = target.project
    if principal.visible_projects is None:
        return True
    return project is not None and project in principal.visible_projects


def _require_viewer(principal: Principal, action: str) -> None:
    """401/403 unless the caller may read some project."""
    if principal.all_projects or not principal.visible_projects:
        require_role(principal, "viewer", action)


def _manage(principal: Principal, project: str | None, action: str) -> None:
    if project is None:
        require_role(principal, "admin", f"{action} an experiment on every project")
    else:
        require_role(principal, "maintainer", f"{action} an experiment", project)


class ExperimentsController(Controller):
    path = "/api/v1"
    tags = ["optimizer"]
    guards = [api_guard]

    @post(
        "/experiments",
        status_code=201,
        summary="Create an experiment",
        description=(
            "A control and one or more treatment arms, each a set of overrides of `parameter`. It starts at "
            "once (`start`, default true) unless it needs a maintainer's approval (risk `medium`/`high`, or "
            "`protected_env`): then it is `pending_approval`. 409 when the most active experiments already "
            "run."
        ),
        opt={"audit_action": "experiment.create"},
        responses={**CONFLICT, **OPTIMIZER},
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        data: JSONBody[CreateExperiment],
    ) -> rpc.ExperimentResponse:
        fields = msgspec.structs.asdict(data)
        probe = ex.Experiment(
            id="0" * 26,
            created_at=datetime.now(UTC),
            created_by=principal.subject,
            **{k: v for k, v in fields.items() if k != "start"},
        )
        errors = ex.validate(probe)
        if errors:
            raise invalid(errors, status=422)
        request.state[TARGET_KEY] = "experiment:new"
        request.state[PROJECT_KEY] = data.target.project
        request.state[DETAILS_KEY] = {"name": data.name, "parameter": data.parameter, "risk": data.risk}
        _manage(principal, data.target.project, "create")
        answer = await gateway_ask(
            gateway,
            rpc.EXPERIMENTS_CREATE,
            rpc.ExperimentCreateRequest(**fields, actor=principal.subject),
            rpc.ExperimentResponse,
            invalid_status=422,
        )
        request.state[TARGET_KEY] = f"experiment:{answer.experiment.id}"
        return answer

    @get(
        "/experiments",
        summary="Experiments",
        description=(
            "Every experiment the caller sees, oldest first, with the global pause and the current defaults."
        ),
        responses={**BAD_QUERY, **OPTIMIZER},
    )
    async def list_experiments(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        wanted: Annotated[
            str | None,
            QueryParameter(
                name="state",
                description="Only experiments in this state",
                schema_extra={"enum": list(STATES)},
            ),
        ] = None,
    ) -> rpc.ExperimentsListResponse:
        errors = QueryErrors()
        if wanted is not None and wanted not in STATES:
            errors.add("state", "must be one of " + ", ".join(STATES))
        errors.raise_if_any()
        _require_viewer(principal, "read experiments")
        answer = await gateway_ask(
            gateway,
            rpc.EXPERIMENTS_LIST,
            rpc.ExperimentsListRequest(state=wanted),  # type: ignore[arg-type]
            rpc.ExperimentsListResponse,
        )
        visible = [e for e in answer.experiments if _sees(principal, e)]
        return msgspec.structs.replace(answer, experiments=visible)

    async def _visible(
        self, gateway: Gateway, principal: Principal, experiment_id: str
    ) -> rpc.ExperimentResponse:
        if not experiment_id.isalnum() or len(experiment_id) != 26:
            raise ProblemError(404, f"no experiment {experiment_id}", slug="not-found", title="Not found")
        answer = await gateway_ask(
            gateway,
            rpc.EXPERIMENTS_GET,
            rpc.ExperimentGetRequest(id=experiment_id.upper()),
            rpc.ExperimentResponse,
        )
        if not _sees(principal, answer.experiment):
            raise ProblemError(404, f"no experiment {experiment_id}", slug="not-found", title="Not found")
        project = answer.experiment.target.project
        require_role(principal, "viewer", "read experiments", project)
        return answer

    @get(
        "/experiments/candidates",
        summary="Candidate experiments",
        description=(
            "Experiments the optimizer proposes from its insights (more memory where runs are OOM-killed, "
            "a model whose success rate is clearly higher), each with the numbers behind it, its sample "
            "size and its risk. Candidates with an unfinished experiment on the same target and parameter, "
            "or whose value was already tried, are left out. `auto`: low-risk candidates are started by the "
            "optimizer itself."
        ),
        responses={**BAD_QUERY, **OPTIMIZER},
    )
    async def list_candidates(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: Annotated[
            str | None, Parameter(description="Only candidates targeting this project")
        ] = None,
    ) -> rpc.CandidatesListResponse:
        errors = QueryErrors()
        if project is not None and not DNS1123_LABEL.match(project):
            errors.add("project", DNS1123_RULE)
        errors.raise_if_any()
        _require_viewer(principal, "read candidate experiments")
        answer = await gateway_ask(
            gateway,
            rpc.CANDIDATES_LIST,
            rpc.CandidatesListRequest(project=project),
            rpc.CandidatesListResponse,
        )
        return msgspec.structs.replace(
            answer, candidates=[c for c in answer.candidates if _sees_target(principal, c.target)]
        )

    @post(
        "/experiments/candidates/{candidate_id:str}/start",
        status_code=201,
        summary="Start a candidate experiment",
        description=(
            "Creates the candidate's experiment as the caller, under the rules of `POST /experiments` (a "
            "maintainer in its target project): it starts at once when its risk is low, else it waits for "
            "a maintainer's approval. 404 when the candidate is unknown or no longer proposed."
        ),
        opt={"audit_action": "experiment.create"},
        responses={**CANDIDATE_NOT_FOUND, **CONFLICT, **OPTIMIZER},
    )
    async def start_candidate(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        candidate_id: FromPath[str],
    ) -> rpc.ExperimentResponse:
        request.state[TARGET_KEY] = f"candidate:{candidate_id}"
        missing = ProblemError(
            404,
            f"no candidate {candidate_id}",
            slug="not-found",
            title="Not found",
            errors=[("id", "unknown")],
        )
        if not CANDIDATE_ID.match(candidate_id):
            raise missing
        listed = await gateway_ask(
            gateway, rpc.CANDIDATES_LIST, rpc.CandidatesListRequest(), rpc.CandidatesListResponse
        )
        candidate = next((c for c in listed.candidates if c.id == candidate_id), None)
        if candidate is None or not _sees_target(principal, candidate.target):
            raise missing
        request.state[PROJECT_KEY] = candidate.target.project
        request.state[DETAILS_KEY] = {
            "name": candidate.name,
            "parameter": candidate.parameter,
            "risk": candidate.risk,
            "candidate": candidate.id,
        }
        _manage(principal, candidate.target.project, "create")
        answer = await gateway_ask(
            gateway,
            rpc.CANDIDATES_START,
            rpc.CandidateStartRequest(id=candidate.id, actor=principal.subject),
            rpc.ExperimentResponse,
        )
        request.state[TARGET_KEY] = f"experiment:{answer.experiment.id}"
        return answer

    @get(
        "/experiments/{experiment_id:str}",
        summary="An experiment",
        description=(
            "Its definition and state, each arm's sample (runs, successes, failures, OOM kills, success "
            "rate, "
            "cost per run, duration p95), and the latest decision with the numbers behind it."
        ),
        responses={**NOT_FOUND, **OPTIMIZER},
    )
    async def get_experiment(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        experiment_id: FromPath[str],
    ) -> rpc.ExperimentResponse:
        return await self._visible(gateway, principal, experiment_id)

    async def _act(
        self,
        request: Request[Any, Any, Any],
        gateway: Gateway,
        principal: Principal,
        experiment_id: str,
        action: rpc.ExperimentAction,
        reason: str,
    ) -> rpc.ExperimentResponse:
        request.state[TARGET_KEY] = f"experiment:{experiment_id}"
        current = await self._visible(gateway, principal, experiment_id)
        project = current.experiment.target.project
        request.state[PROJECT_KEY] = project
        request.state[DETAILS_KEY] = {"action": action, "reason": reason}
        if action in ("approve", "rollback"):
            # maintainers approve optimizer changes (docs/auth.md), in the experiment's project
            require_role(principal, "maintainer", f"{action} an experiment", project=project)
        else:
            _manage(principal, project, action)
        return await gateway_ask(
            gateway,
            rpc.EXPERIMENTS_ACTION,
            rpc.ExperimentActionRequest(
                id=current.experiment.id, action=action, actor=principal.subject, reason=reason
            ),
            rpc.ExperimentResponse,
        )

    @post(
        "/experiments/{experiment_id:str}/approve",
        status_code=200,
        summary="Approve an experiment",
        description=(
            "A maintainer of its project. Approves what the experiment waits for: its start "
            "(medium/high risk, protected env; it starts within the business-hours window) or the "
            "rollout of a winning arm. The approver is recorded."
        ),
        opt={"audit_action": "experiment.approve"},
        responses={**NOT_FOUND, **CONFLICT, **OPTIMIZER},
    )
    async def approve(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        experiment_id: FromPath[str],
    ) -> rpc.ExperimentResponse:
        return await self._act(request, gateway, principal, experiment_id, "approve", "")

    @post(
        "/experiments/{experiment_id:str}/pause",
        status_code=200,
        summary="Pause an experiment",
        description="No more runs are assigned to it until it is resumed; its sample is kept.",
        opt={"audit_action": "experiment.pause"},
        responses={**NOT_FOUND, **CONFLICT, **OPTIMIZER},
    )
    async def pause(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        experiment_id: FromPath[str],
        data: JSONBody[ActionBody | None] = None,
    ) -> rpc.ExperimentResponse:
        reason = data.reason if data is not None else ""
        return await self._act(request, gateway, principal, experiment_id, "pause", reason)

    @post(
        "/experiments/{experiment_id:str}/resume",
        status_code=200,
        summary="Resume (or start) an experiment",
        description="A paused experiment, or a draft, becomes active (within the guardrails).",
        opt={"audit_action": "experiment.resume"},
        responses={**NOT_FOUND, **CONFLICT, **OPTIMIZER},
    )
    async def resume(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        experiment_id: FromPath[str],
        data: JSONBody[ActionBody | None] = None,
    ) -> rpc.ExperimentResponse:
        reason = data.reason if data is not None else ""
        return await self._act(request, gateway, principal, experiment_id, "resume", reason)

    @post(
        "/experiments/{experiment_id:str}/stop",
        status_code=200,
        summary="Stop an experiment",
        description="Ends it without a rollout; the defaults stay as they are.",
        opt={"audit_action": "experiment.stop"},
        responses={**NOT_FOUND, **CONFLICT, **OPTIMIZER},
    )
    async def stop(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        experiment_id: FromPath[str],
        data: JSONBody[ActionBody | None] = None,
    ) -> rpc.ExperimentResponse:
        reason = data.reason if data is not None else ""
        return await self._act(request, gateway, principal, experiment_id, "stop", reason)

    @post(
        "/experiments/{experiment_id:str}/rollback",
        status_code=200,
        summary="Roll back a shipped experiment",
        description="A maintainer of its project. Puts back the defaults its rollout replaced.",
        opt={"audit_action": "experiment.rollback"},
        responses={**NOT_FOUND, **CONFLICT, **OPTIMIZER},
    )
    async def rollback(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        experiment_id: FromPath[str],
        data: JSONBody[ActionBody | None] = None,
    ) -> rpc.ExperimentResponse:
        reason = data.reason if data is not None else ""
        return await self._act(request, gateway, principal, experiment_id, "rollback", reason)

    @post(
        "/optimizer/pause",
        status_code=200,
        summary="Pause the optimizer",
        description=(
            "Admins. No run is assigned to any experiment until it is resumed (defaults still apply)."
        ),
        opt={"audit_action": "optimizer.pause"},
        responses=OPTIMIZER,
    )
    async def pause_optimizer(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        data: JSONBody[PauseBody],
    ) -> rpc.OptimizerStatusResponse:
        if not data.reason.strip():
            raise invalid([("reason", "must not be empty")], status=422)
        request.state[TARGET_KEY] = "optimizer"
        request.state[DETAILS_KEY] = {"reason": data.reason}
        require_role(principal, "admin", "pause the optimizer")
        return await gateway_ask(
            gateway,
            rpc.OPTIMIZER_PAUSE,
            rpc.OptimizerPauseRequest(paused=True, reason=data.reason, actor=principal.subject),
            rpc.OptimizerStatusResponse,
        )

    @post(
        "/optimizer/resume",
        status_code=200,
        summary="Resume the optimizer",
        description="Admins. Assignment to active experiments starts again.",
        opt={"audit_action": "optimizer.resume"},
        responses=OPTIMIZER,
    )
    async def resume_optimizer(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
    ) -> rpc.OptimizerStatusResponse:
        request.state[TARGET_KEY] = "optimizer"
        require_role(principal, "admin", "resume the optimizer")
        return await gateway_ask(
            gateway,
            rpc.OPTIMIZER_PAUSE,
            rpc.OptimizerPauseRequest(paused=False, actor=principal.subject),
            rpc.OptimizerStatusResponse,
        )

    @get(
        "/optimizer/history",
        summary="The optimizer's history",
        description=(
            "Every change, oldest first: experiments created, approved, started, paused, decided, rolled out "
            "and rolled back (with the decision, the numbers behind it and who approved), changes of the "
            "defaults and of the global pause. Callers who see only some projects get only their "
            "experiments' "
            "entries."
        ),
        responses={**BAD_QUERY, **OPTIMIZER},
    )
    async def history(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        experiment_id: Annotated[str | None, Parameter(description="Only this experiment's entries")] = None,
        limit: Annotated[
            str | None,
            Parameter(
                description="The last this many entries (default 200, at most 10000)",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1, "maximum": 10_000},
            ),
        ] = None,
    ) -> rpc.HistoryResponse:
        errors = QueryErrors()
        size = int_param(errors, "limit", limit, default=200, minimum=1, maximum=10_000)
        errors.raise_if_any()
        assert size is not None
        _require_viewer(principal, "read the optimizer's history")
        answer = await gateway_ask(
            gateway,
            rpc.OPTIMIZER_HISTORY,
            rpc.HistoryRequest(experiment_id=experiment_id.upper() if experiment_id else None, limit=size),
            rpc.HistoryResponse,
        )
        if principal.visible_projects is None:
            return answer
        listed = await gateway_ask(
            gateway, rpc.EXPERIMENTS_LIST, rpc.ExperimentsListRequest(), rpc.ExperimentsListResponse
        )
        seen = {e.id for e in listed.experiments if _sees(principal, e)}
        return rpc.HistoryResponse(entries=[e for e in answer.entries if e.experiment_id in seen])


async def gateway_ask(
    gateway: Gateway,
    subject: str,
    request: msgspec.Struct,
    response_type: type[R],
    *,
    invalid_status: int = 400,
) -> R:
    return await ask(
        gateway.bus.nc,
        subject,
        request,
        response_type,
        seconds=_timeout(gateway),
        invalid_status=invalid_status,
    )
