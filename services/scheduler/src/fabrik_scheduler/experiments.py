"""Experiment assignment at dispatch (docs/optimizer.md#assignment).

The scheduler keeps the active experiments, the run-configuration defaults and the optimizer's
global pause in memory, from a watch of the `config` KV bucket (written only by the optimizer).
At a run's first dispatch it applies the defaults, then the overrides of the arm each matching
experiment assigns the run to (a stable hash of experiment and run id), and stamps the arms on
the record. A later attempt (resume, heal) keeps the configuration and the arms of the first one.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.kv import KeyValue

from fabrik_common import experiments as ex
from fabrik_common import kvwatch
from fabrik_common.runs import RunRecord

log = logging.getLogger(__name__)


class ExperimentView:
    """What the `config` bucket says about experiments, as the scheduler last saw it."""

    def __init__(self, kv: KeyValue | None = None) -> None:
        self.kv = kv
        self.experiments: dict[str, ex.Experiment] = {}
        self.defaults = ex.Defaults()
        self.pause = ex.OptimizerPause(paused=False)
        self.assigned = 0

    def observe(self, key: str, value: bytes | None) -> None:
        """Take one entry of the bucket (None: deleted). Entries that do not decode are logged and
        leave the previous value in place."""
        try:
            if key == ex.DEFAULTS_KEY:
                self.defaults = ex.decode_defaults(value)
            elif key == ex.PAUSE_KEY:
                self.pause = ex.decode_pause(value)
            elif key.startswith(ex.EXPERIMENT_PREFIX):
                experiment_id = key.removeprefix(ex.EXPERIMENT_PREFIX)
                if value:
                    self.experiments[experiment_id] = ex.decode_experiment(value)
                else:
                    self.experiments.pop(experiment_id, None)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.error(  # noqa: TRY400 - the entry is named, a traceback adds nothing
                "config entry does not decode; ignored", extra={"key": key, "error": str(exc)}
            )

    def active(self) -> list[ex.Experiment]:
        return [e for e in self.experiments.values() if e.state in ex.ACTIVE_STATES]

    def configure(self, record: RunRecord) -> None:
        """Apply defaults and arm overrides to a record being dispatched for the first time."""
        if record.attempt > 1 or record.experiments:
            return  # the first attempt's configuration and arms stay (sticky across resumes)
        assignments: list[tuple[ex.Experiment, ex.Arm]] = []
        if not self.pause.paused:
            facts = ex.RunFacts(
                run_id=record.run_id,
                project=record.project,
                env=record.env,
                spec_id=record.spec_id,
                labels=record.params.labels,
                pinned=ex.pinned_parameters(record.params),
            )
            assignments = ex.assign(self.active(), facts)
        params, stamps = ex.configure(record.params, self.defaults, assignments)
        record.params = params
        if stamps:
            record.experiments = stamps
            record.experiment_arm = ex.stamp_text(stamps)
            self.assigned += 1


async def load(kv: KeyValue, view: ExperimentView, wait: float = 5.0, settle: float = 0.25) -> None:
    """Read the bucket's current entries into `view` (the initial values of a watch)."""
    await kvwatch.load(kv, ">", lambda key, value, _revision: view.observe(key, value), wait, settle)


async def follow(kv: KeyValue, view: ExperimentView) -> None:
    """Keep `view` current: every change the optimizer writes is seen within milliseconds."""
    await kvwatch.follow(kv, ">", lambda key, value, _revision: view.observe(key, value))
