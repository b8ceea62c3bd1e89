"""Project environments behind `/api/v1/projects/{project}/envs`: the gateway is the only writer of
the `envs` KV bucket (compare-and-set on the entry's revision), encrypts values with the
configured key, checks roles and confirmations, and records every change as an `AuditRecorded`
event (who, when, which keys, merge or replace; never values). docs/environments.md.

Roles: listing environments, their key names and diffs needs `viewer`; revealing values, writing,
deleting and promoting need `developer`, and `maintainer` when a protected environment (`prod`,
`production`, `live`) is written, deleted, revealed or promoted from or into. A write into a
protected environment also needs an explicit confirmation (`confirm: true`, `?confirm=true` for
DELETE, or the header `Fabrik-Confirm: <env>`), else 428.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from fabrik_common.envs import (
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    KEY_FILE_VARIABLE,
    KEY_VARIABLE,
    EnvCipher,
    EnvDiff,
    EnvStoreError,
    ProjectEnv,
    diff_envs,
    encode_stored,
    env_size,
    envs_kv,
    is_protected,
    key_problem,
    kv_key,
    list_envs,
    load_env,
    load_env_cipher,
    name_problem,
    values_errors,
)
from fabrik_common.events import AuditRecorded, Event
from fabrik_common.ids import utcnow
from fabrik_common.specs import FieldError, collect_errors
from fabrik_gateway.auth import Principal, Role, require_role
from fabrik_gateway.problems import ProblemError, invalid, not_found

log = logging.getLogger(__name__)

CONFIRM_HEADER: Final = "Fabrik-Confirm"
RESERVED_ENV_NAMES: Final = frozenset({"diff", "promote"})
"""Path segments of `/envs/diff` and `/envs/promote`: not usable as environment names."""
_WRITE_ATTEMPTS: Final = 20

Revision = Annotated[int, msgspec.Meta(ge=0, description="An environment's revision; 0: it must not exist")]


# --------------------------------------------------------------------------------------------
# Bodies


class EnvPutRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Set variables: merged into the environment, or replacing it with `replace: true`."""

    values: dict[str, str] = msgspec.field(default_factory=dict)
    """KEY -> value. Keys are variable names; `FABRIK_*` and `SMITHERS_*` are reserved."""
    unset: list[str] = msgspec.field(default_factory=list)
    """Keys to remove (merge only; unknown keys are ignored)."""
    replace: bool = False
    """The environment becomes exactly `values`."""
    confirm: bool = False
    """Required (or the `Fabrik-Confirm` header) to write a protected environment."""
    expected_revision: Revision | None = None
    """Refuse (412) unless the environment is at this revision (0: does not exist yet)."""


class PromoteRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Copy environment `from` onto `to` of the same project. Without `confirm`, a preview."""

    from_env: str = msgspec.field(name="from")
    to_env: str = msgspec.field(name="to")
    confirm: bool = False
    """False: only show what would change (the diff). True: apply."""
    merge: bool = False
    """False: `to` becomes a copy of `from`. True: `from`'s keys are set in `to`, the others kept."""
    from_revision: Revision | None = None
    to_revision: Revision | None = None
    """Refuse (412) unless the environments are at these revisions (as shown by the preview)."""


# --------------------------------------------------------------------------------------------
# Answers


class EnvView(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    env: str
    protected: bool
    keys: list[str]
    values: dict[str, str] | None
    """Only with `reveal=true`; null otherwise."""
    revision: int
    updated_at: datetime
    updated_by: str


class EnvSummary(msgspec.Struct, frozen=True, kw_only=True):
    env: str
    protected: bool
    keys: int
    revision: int
    updated_at: datetime
    updated_by: str


class EnvList(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    items: list[EnvSummary]


class EnvChanges(msgspec.Struct, frozen=True, kw_only=True):
    added: list[str]
    changed: list[str]
    removed: list[str]


class EnvWriteResult(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    env: str
    protected: bool
    mode: Literal["merge", "replace"]
    created: bool
    changes: EnvChanges
    """Key names only; all empty when the request changed nothing (nothing was written)."""
    keys: list[str]
    revision: int
    updated_at: datetime
    updated_by: str


class EnvDeleteResult(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    env: str
    deleted: bool
    removed: list[str]
    revision: int
    """The revision that was deleted."""


class EnvDiffView(msgspec.Struct, frozen=True, kw_only=True):
    """What `to` undergoes when `from` is copied onto it: `added` keys are only in `from`,
    `removed` only in `to`, `changed` in both with different values. Key names only."""

    project: str
    from_env: str = msgspec.field(name="from")
    to_env: str = msgspec.field(name="to")
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: int
    from_revision: int
    to_revision: int
    """0 when `to` does not exist yet."""


class PromoteResult(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    from_env: str = msgspec.field(name="from")
    to_env: str = msgspec.field(name="to")
    mode: Literal["merge", "replace"]
    applied: bool
    """False: a preview (nothing written)."""
    protected: bool
    """Whether `to` is protected (applying needs the maintainer role)."""
    diff: EnvDiffView
    revision: int | None
    """`to`'s revision after applying; null for a preview."""


# --------------------------------------------------------------------------------------------
# Validation


def path_errors(project: str, env: str | None = None) -> list[FieldError]:
    errors: list[FieldError] = []
    if (rule := name_problem(project)) is not None:
        errors.append(("project", rule))
    if env is not None:
        errors.extend(env_name_errors("env", env))
    return errors


def env_name_errors(field: str, env: str) -> list[FieldError]:
    if (rule := name_problem(env)) is not None:
        return [(field, rule)]
    if env in RESERVED_ENV_NAMES:
        return [(field, f"cannot be {env!r}: the name is taken by the /envs/{env} endpoint")]
    return []


def check_path(project: str, env: str | None = None) -> None:
    """400 naming `project` / `env` when they are not DNS-1123 labels."""
    errors = path_errors(project, env)
    if errors:
        raise invalid(errors, status=400)


def decode_json_body(raw: bytes, *, required: bool = True) -> Any:
    if not raw.strip():
        if not required:
            return {}
        raise invalid([("body", "is required: a JSON object")], status=400)
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid(
            [("body", f"is not valid JSON: {exc}")], status=400, detail="malformed JSON body"
        ) from None


def validate_put(raw: bytes, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> EnvPutRequest:
    """The request, or 422 naming every invalid field (400 for malformed JSON)."""
    obj = decode_json_body(raw)
    errors = collect_errors(obj, EnvPutRequest)
    if isinstance(obj, dict):
        errors.extend(_put_semantic_errors(obj, max_value_bytes))
    if errors:
        raise invalid(list(dict.fromkeys(errors)))
    return msgspec.convert(obj, EnvPutRequest)


def _put_semantic_errors(obj: Mapping[str, Any], max_value_bytes: int) -> list[FieldError]:
    errors: list[FieldError] = []
    values = obj.get("values")
    values = values if isinstance(values, Mapping) else {}
    # Type errors of values were named by the schema walk; here keys, reserved names, sizes.
    errors.extend(
        (f, r)
        for f, r in values_errors(values, max_value_bytes=max_value_bytes)
        if not r.startswith("must be a string")
    )
    unset = obj.get("unset")
    unset = unset if isinstance(unset, list) else []
    replace = obj.get("replace") is True
    for i, key in enumerate(unset):
        if not isinstance(key, str):
            continue
        if (rule := key_problem(key)) is not None:
            errors.append((f"unset[{i}]", rule))
        elif key in values:
            errors.append((f"unset[{i}]", f"{key} is also in values: set it or unset it, not both"))
    if replace and unset:
        errors.append(("unset", "cannot be combined with replace: a replace drops every key not in values"))
    if not replace and not values and not unset:
        errors.append(
            ("values", "give values to set or keys to unset (or replace: true to empty the environment)")
        )
    return errors


def validate_promote(raw: bytes) -> PromoteRequest:
    obj = decode_json_body(raw)
    errors = collect_errors(obj, PromoteRequest)
    if isinstance(obj, dict):
        for field in ("from", "to"):
            name = obj.get(field)
            if isinstance(name, str):
                errors.extend(env_name_errors(field, name))
        if isinstance(obj.get("from"), str) and obj.get("from") == obj.get("to"):
            errors.append(("to", "must differ from 'from'"))
    if errors:
        raise invalid(list(dict.fromkeys(errors)))
    return msgspec.convert(obj, PromoteRequest)


# --------------------------------------------------------------------------------------------
# The service


def _changes(before: Mapping[str, str], after: Mapping[str, str]) -> EnvChanges:
    diff = diff_envs(after, before)
    return EnvChanges(added=diff.added, changed=diff.changed, removed=diff.removed)


class EnvService:
    """Reads and writes project environments for the API; raises `ProblemError`s."""

    def __init__(
        self,
        *,
        encryption_key: str = "",
        encryption_key_file: str = "",
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    ) -> None:
        self.cipher: EnvCipher | None = load_env_cipher(encryption_key, encryption_key_file)
        self.max_value_bytes = max_value_bytes
        self.max_keys = max_keys
        self.max_total_bytes = max_total_bytes
        self._kv: KeyValue | None = None
        # Writes of one environment are serialised in this replica; across replicas the KV's
        # compare-and-set decides (a loser reads again and re-applies its change).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._publish: Callable[[Event], Awaitable[object]] | None = None

    async def start(self, js: JetStreamContext, publish: Callable[[Event], Awaitable[object]]) -> None:
        self._kv = await envs_kv(js)
        self._publish = publish
        if self.cipher is None:
            log.warning(
                "no encryption key for project environments: the env endpoints answer 503",
                extra={"fix": f"set {KEY_VARIABLE} or {KEY_FILE_VARIABLE}"},
            )

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise ProblemError(
                503, "the gateway is not connected to NATS yet; retry shortly", headers={"Retry-After": "1"}
            )
        return self._kv

    def require_cipher(self) -> EnvCipher:
        if self.cipher is None:
            raise ProblemError(
                503,
                "project environments are not available: the gateway has no encryption key "
                f"(set {KEY_VARIABLE} or {KEY_FILE_VARIABLE}; `fabrik up` makes one for the local stack)",
                slug="env-store-not-configured",
                title="Environments not configured",
            )
        return self.cipher

    async def _load(self, project: str, env: str, *, decrypt: bool) -> ProjectEnv | None:
        cipher = self.require_cipher() if decrypt else self.cipher
        try:
            return await load_env(self.kv, project, env, cipher, decrypt=decrypt)
        except EnvStoreError as exc:
            log.error(  # noqa: TRY400 - the message says it all; no traceback
                "stored environment unreadable", extra={"project": project, "env": env, "error": str(exc)}
            )
            raise ProblemError(
                500, str(exc), slug="env-unreadable", title="Environment cannot be read"
            ) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise _unavailable(exc) from exc

    async def _audit(
        self,
        principal: Principal,
        action: str,
        project: str,
        env: str,
        result: Literal["ok", "denied", "failed"],
        **details: Any,
    ) -> None:
        event = AuditRecorded(
            actor=principal.subject,
            role=principal.role_name,
            action=action,
            target=f"env:{project}/{env}",
            project=project,
            result=result,
            details={"env": env, "protected": is_protected(env), **details},
        )
        try:
            await self._publisher()(event)
        except Exception as exc:  # noqa: BLE001 - the change is stored; keep its trail in the log
            log.error(  # noqa: TRY400
                "audit event could not be published",
                extra={
                    "event_id": event.event_id,
                    "actor": event.actor,
                    "action": action,
                    "target": event.target,
                    "result": result,
                    "details": event.details,
                    "error": str(exc),
                },
            )

    def _publisher(self) -> Callable[[Event], Awaitable[object]]:
        if self._publish is None:
            raise RuntimeError("the environment service has not started")
        return self._publish

    async def _require(
        self,
        principal: Principal,
        minimum: Role,
        action: str,
        why: str,
        project: str,
        env: str,
        **details: Any,
    ) -> None:
        """The role check of a write or reveal; a refusal is audited (result `denied`)."""
        try:
            require_role(principal, minimum, why, project)
        except ProblemError:
            await self._audit(principal, action, project, env, "denied", needed=minimum, **details)
            raise

    # -- reads ----------------------------------------------------------------------------------

    async def list(self, project: str, principal: Principal) -> EnvList:
        require_role(principal, "viewer", "list environments", project)
        try:
            found = await list_envs(self.kv, project)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _unavailable(exc) from exc
        return EnvList(
            project=project,
            items=[
                EnvSummary(
                    env=e.env,
                    protected=is_protected(e.env),
                    keys=len(e.keys),
                    revision=e.revision,
                    updated_at=e.updated_at,
                    updated_by=e.updated_by,
                )
                for e in found
            ],
        )

    async def get(self, project: str, env: str, principal: Principal, *, reveal: bool) -> EnvView:
        require_role(principal, "viewer", "read environments", project)
        if reveal:
            needed: Role = "maintainer" if is_protected(env) else "developer"
            await self._require(
                principal, needed, "env.reveal", f"reveal the values of {project}/{env}", project, env
            )
        current = await self._load(project, env, decrypt=reveal)
        if current is None:
            raise not_found(f"environment {env} of project {project}")
        if reveal:
            await self._audit(
                principal, "env.reveal", project, env, "ok", keys=current.keys, revision=current.revision
            )
        return self._view(current, reveal=reveal)

    def _view(self, current: ProjectEnv, *, reveal: bool) -> EnvView:
        return EnvView(
            project=current.project,
            env=current.env,
            protected=is_protected(current.env),
            keys=current.keys,
            values=dict(current.values) if reveal else None,
            revision=current.revision,
            updated_at=current.updated_at,
            updated_by=current.updated_by,
        )

    async def diff(self, project: str, source: str, target: str, principal: Principal) -> EnvDiffView:
        require_role(principal, "viewer", "compare environments", project)
        self.require_cipher()
        diff, source_env, target_env = await self._diff(project, source, target)
        return self._diff_view(project, source, target, diff, source_env, target_env)

    async def _diff(
        self, project: str, source: str, target: str
    ) -> tuple[EnvDiff, ProjectEnv, ProjectEnv | None]:
        source_env = await self._load(project, source, decrypt=True)
        if source_env is None:
            raise not_found(f"environment {source} of project {project}")
        target_env = await self._load(project, target, decrypt=True)
        diff = diff_envs(source_env.values, target_env.values if target_env is not None else {})
        return diff, source_env, target_env

    @staticmethod
    def _diff_view(
        project: str,
        source: str,
        target: str,
        diff: EnvDiff,
        source_env: ProjectEnv,
        target_env: ProjectEnv | None,
    ) -> EnvDiffView:
        return EnvDiffView(
            project=project,
            from_env=source,
            to_env=target,
            added=diff.added,
            removed=diff.removed,
            changed=diff.changed,
            unchanged=len(diff.unchanged),
            from_revision=source_env.revision,
            to_revision=target_env.revision if target_env is not None else 0,
        )

    # -- writes ---------------------------------------------------------------------------------

    def _require_confirmation(self, project: str, env: str, confirmed: bool, how: str) -> None:
        if is_protected(env) and not confirmed:
            raise ProblemError(
                428,
                f"{env} is a protected environment of project {project}: writing it needs an explicit "
                f"confirmation ({how}, or the header `{CONFIRM_HEADER}: {env}`)",
                slug="confirmation-required",
                title="Confirmation required",
            )

    def _check_limits(self, values: Mapping[str, str]) -> None:
        errors: list[FieldError] = []
        if len(values) > self.max_keys:
            errors.append(
                ("values", f"the environment would have {len(values)} keys; at most {self.max_keys}")
            )
        size = env_size(values)
        if size > self.max_total_bytes:
            errors.append(
                (
                    "values",
                    f"the environment would hold {size} bytes of keys and values; "
                    f"at most {self.max_total_bytes}",
                )
            )
        if errors:
            raise invalid(errors)

    async def put(
        self, project: str, env: str, request: EnvPutRequest, principal: Principal, *, header_confirmed: bool
    ) -> EnvWriteResult:
        mode: Literal["merge", "replace"] = "replace" if request.replace else "merge"
        protected = is_protected(env)
        named = sorted({*request.values, *request.unset})
        await self._require(
            principal,
            "maintainer" if protected else "developer",
            "env.set",
            f"write the {'protected ' if protected else ''}environment {project}/{env}",
            project,
            env,
            mode=mode,
            keys=named,
        )
        self._require_confirmation(
            project, env, request.confirm or header_confirmed, "`confirm: true` in the body"
        )
        cipher = self.require_cipher()

        def change(current: Mapping[str, str]) -> dict[str, str]:
            if request.replace:
                return dict(request.values)
            values = {k: v for k, v in current.items() if k not in request.unset}
            values.update(request.values)
            return values

        return await self._write(
            project,
            env,
            cipher,
            principal,
            change,
            mode=mode,
            expected=request.expected_revision,
            action="env.set",
            details={"keys": named, "unset": sorted(request.unset)},
        )

    async def _write(
        self,
        project: str,
        env: str,
        cipher: EnvCipher,
        principal: Principal,
        change: Callable[[Mapping[str, str]], dict[str, str]],
        *,
        mode: Literal["merge", "replace"],
        expected: int | None,
        action: str,
        details: Mapping[str, Any],
    ) -> EnvWriteResult:
        """Read, change, compare-and-set; a concurrent write makes it start over (merges compose)."""
        key = kv_key(project, env)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            return await self._write_locked(
                project,
                env,
                cipher,
                principal,
                change,
                mode=mode,
                expected=expected,
                action=action,
                details=details,
            )

    async def _write_locked(
        self,
        project: str,
        env: str,
        cipher: EnvCipher,
        principal: Principal,
        change: Callable[[Mapping[str, str]], dict[str, str]],
        *,
        mode: Literal["merge", "replace"],
        expected: int | None,
        action: str,
        details: Mapping[str, Any],
    ) -> EnvWriteResult:
        key = kv_key(project, env)
        for attempt in range(_WRITE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))  # noqa: S311 - jitter, not crypto
            current = await self._load(project, env, decrypt=True)
            before = current.values if current is not None else {}
            revision = current.revision if current is not None else 0
            if expected is not None and expected != revision:
                raise ProblemError(
                    412,
                    f"the environment {project}/{env} is at revision {revision}, not {expected}: "
                    "it changed since it was read; read it again and retry",
                    slug="revision-mismatch",
                    title="Revision mismatch",
                )
            after = change(before)
            changes = _changes(before, after)
            if current is not None and not (changes.added or changes.changed or changes.removed):
                return self._result(current, mode, created=False, changes=changes)
            self._check_limits(after)
            now = utcnow()
            data = encode_stored(after, cipher, updated_by=principal.subject, revision=revision + 1, at=now)
            try:
                if current is None:
                    kv_revision = await self.kv.create(key, data)
                else:
                    kv_revision = await self.kv.update(key, data, last=current.kv_revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # written meanwhile: read again
            except (nats.errors.Error, TimeoutError) as exc:
                raise _unavailable(exc) from exc
            written = ProjectEnv(
                project=project,
                env=env,
                keys=sorted(after),
                updated_at=now,
                updated_by=principal.subject,
                revision=revision + 1,
                kv_revision=kv_revision,
                key_id=cipher.key_id,
            )
            log.info(
                "environment written",
                extra={
                    "project": project,
                    "env": env,
                    "mode": mode,
                    "revision": revision + 1,
                    "by": principal.subject,
                    "added": changes.added,
                    "changed": changes.changed,
                    "removed": changes.removed,
                },
            )
            await self._audit(
                principal,
                action,
                project,
                env,
                "ok",
                mode=mode,
                created=current is None,
                added=changes.added,
                changed=changes.changed,
                removed=changes.removed,
                revision=revision + 1,
                **details,
            )
            return self._result(written, mode, created=current is None, changes=changes)
        raise ProblemError(
            409,
            f"the environment {project}/{env} kept changing while it was written; retry",
            slug="conflict",
            title="Concurrent changes",
        )

    @staticmethod
    def _result(
        current: ProjectEnv, mode: Literal["merge", "replace"], *, created: bool, changes: EnvChanges
    ) -> EnvWriteResult:
        return EnvWriteResult(
            project=current.project,
            env=current.env,
            protected=is_protected(current.env),
            mode=mode,
            created=created,
            changes=changes,
            keys=current.keys,
            revision=current.revision,
            updated_at=current.updated_at,
            updated_by=current.updated_by,
        )

    async def delete(
        self,
        project: str,
        env: str,
        principal: Principal,
        *,
        confirmed: bool,
        expected_revision: int | None,
    ) -> EnvDeleteResult:
        protected = is_protected(env)
        await self._require(
            principal,
            "maintainer" if protected else "developer",
            "env.delete",
            f"delete the {'protected ' if protected else ''}environment {project}/{env}",
            project,
            env,
        )
        self._require_confirmation(project, env, confirmed, "`?confirm=true`")
        for _ in range(_WRITE_ATTEMPTS):
            current = await self._load(project, env, decrypt=False)
            if current is None:
                raise not_found(f"environment {env} of project {project}")
            if expected_revision is not None and expected_revision != current.revision:
                raise ProblemError(
                    412,
                    f"the environment {project}/{env} is at revision {current.revision}, "
                    f"not {expected_revision}",
                    slug="revision-mismatch",
                    title="Revision mismatch",
                )
            try:
                await self.kv.delete(kv_key(project, env), last=current.kv_revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except (nats.errors.Error, TimeoutError) as exc:
                raise _unavailable(exc) from exc
            log.info("environment deleted", extra={"project": project, "env": env, "by": principal.subject})
            await self._audit(
                principal, "env.delete", project, env, "ok", removed=current.keys, revision=current.revision
            )
            return EnvDeleteResult(
                project=project, env=env, deleted=True, removed=current.keys, revision=current.revision
            )
        raise ProblemError(409, f"the environment {project}/{env} kept changing; retry", slug="conflict")

    async def promote(
        self, project: str, request: PromoteRequest, principal: Principal, *, header_confirmed: bool
    ) -> PromoteResult:
        source, target = request.from_env, request.to_env
        mode: Literal["merge", "replace"] = "merge" if request.merge else "replace"
        require_role(principal, "viewer", "compare environments", project)
        cipher = self.require_cipher()
        diff, source_env, target_env = await self._diff(project, source, target)
        if request.merge:
            diff = EnvDiff(added=diff.added, removed=[], changed=diff.changed, unchanged=diff.unchanged)
        view = self._diff_view(project, source, target, diff, source_env, target_env)
        preview = PromoteResult(
            project=project,
            from_env=source,
            to_env=target,
            mode=mode,
            applied=False,
            protected=is_protected(target),
            diff=view,
            revision=None,
        )
        if not (request.confirm or header_confirmed):
            return preview
        protected = is_protected(target) or is_protected(source)
        await self._require(
            principal,
            "maintainer" if protected else "developer",
            "env.promote",
            f"promote {project}/{source} to {target}"
            + (" (a protected environment is involved)" if protected else ""),
            project,
            target,
            source=source,
            mode=mode,
        )
        if request.from_revision is not None and request.from_revision != source_env.revision:
            raise ProblemError(
                412,
                f"the environment {project}/{source} is at revision {source_env.revision}, not "
                f"{request.from_revision}: it changed since the preview; preview again",
                slug="revision-mismatch",
                title="Revision mismatch",
            )
        source_values = dict(source_env.values)

        def change(current: Mapping[str, str]) -> dict[str, str]:
            return {**current, **source_values} if request.merge else dict(source_values)

        result = await self._write(
            project,
            target,
            cipher,
            principal,
            change,
            mode=mode,
            expected=request.to_revision,
            action="env.promote",
            details={"source": source, "source_revision": source_env.revision},
        )
        return PromoteResult(
            project=project,
            from_env=source,
            to_env=target,
            mode=mode,
            applied=True,
            protected=is_protected(target),
            diff=view,
            revision=result.revision,
        )


def _unavailable(exc: BaseException) -> ProblemError:
    log.warning("environment store unavailable", extra={"error": str(exc) or type(exc).__name__})
    return ProblemError(
        503, "the environment store (NATS) did not answer; retry shortly", headers={"Retry-After": "1"}
    )
