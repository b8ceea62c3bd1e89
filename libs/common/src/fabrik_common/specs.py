"""The spec and todo documents a run works from, their validation and their JSON Schemas.

A *spec* says what to build (goals, requirements, acceptance criteria); a *todo* breaks it into
tasks with a way to verify each. Both are strict: unknown fields are errors, so a typo such as
`nonGoal` is reported instead of silently ignored. Validation reports *every* invalid field as a
`(field, rule)` pair, `field` in dotted/indexed form (`req.api`, `goals[2]`, `tasks[0].verify`),
`rule` a sentence a person can act on.

`collect_errors` is the generic walker behind it; the gateway uses it for request bodies too.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import msgspec

from fabrik_common.ids import DNS1123_LABEL, DNS1123_RULE

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SPEC_SCHEMA_ID: Final = "https://fabrik.sh/schemas/spec.schema.json"
TODO_SCHEMA_ID: Final = "https://fabrik.sh/schemas/todo.schema.json"

FieldError = tuple[str, str]
"""`(field, rule)`: where the problem is and what the value must be."""

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
Items = list[str]


class SpecValidationError(ValueError):
    """A document that breaks its schema; `errors` names every invalid field with its rule."""

    def __init__(self, what: str, errors: list[FieldError]) -> None:
        self.what = what
        self.errors = errors
        lines = "\n  ".join(f"{field}: {rule}" for field, rule in errors)
        super().__init__(f"invalid {what}:\n  {lines}")


# --------------------------------------------------------------------------------------------
# Spec


class Requirements(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the result must do: its interface, its behaviour and what it makes observable."""

    api: Items
    behavior: Items
    obs: Items


class SpecConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration the result needs, e.g. the environment variables it reads."""

    env: Items


class Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A Fabrik spec (version 1): what a run is asked to build."""

    v: Literal[1]
    id: NonEmpty
    title: NonEmpty
    status: NonEmpty
    version: NonEmpty
    last_updated: NonEmpty = msgspec.field(name="lastUpdated")
    goals: Items
    non_goals: Items = msgspec.field(name="nonGoals")
    req: Requirements
    accept: Items
    assume: Items
    supersedes: Items = msgspec.field(default_factory=list)
    depends_on: Items = msgspec.field(default_factory=list, name="dependsOn")
    cfg: SpecConfig | msgspec.UnsetType = msgspec.UNSET


# --------------------------------------------------------------------------------------------
# Todo


class TodoTask(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One step: what to do and how to check it is done."""

    id: NonEmpty
    do: NonEmpty
    verify: NonEmpty


class Todo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Fabrik todo (version 1): the tasks that implement a spec, and the definition of done."""

    v: Literal[1]
    id: NonEmpty
    tdd: bool
    dod: Items
    tasks: list[TodoTask]


# --------------------------------------------------------------------------------------------
# Validation


def validate_spec(obj: Any) -> Spec:
    """`obj` (decoded JSON) as a Spec, or `SpecValidationError` naming every invalid field."""
    errors = collect_errors(obj, Spec)
    if errors:
        raise SpecValidationError("spec", errors)
    return msgspec.convert(obj, Spec)


def validate_todo(obj: Any) -> Todo:
    """`obj` (decoded JSON) as a Todo, or `SpecValidationError` naming every invalid field."""
    errors = collect_errors(obj, Todo)
    errors.extend(todo_semantic_errors(obj))
    if errors:
        raise SpecValidationError("todo", errors)
    return msgspec.convert(obj, Todo)


def decode_spec(data: bytes | str) -> Spec:
    """A spec from JSON text; malformed JSON is reported as an error of the root (`$`)."""
    return validate_spec(_decode_json(data, "spec"))


def decode_todo(data: bytes | str) -> Todo:
    return validate_todo(_decode_json(data, "todo"))


def todo_semantic_errors(obj: Any) -> list[FieldError]:
    """Rules a schema cannot express: task ids are unique."""
    errors: list[FieldError] = []
    tasks = obj.get("tasks") if isinstance(obj, Mapping) else None
    if not isinstance(tasks, list):
        return errors
    seen: dict[str, int] = {}
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping) or not isinstance(task.get("id"), str):
            continue
        task_id = task["id"]
        if task_id in seen:
            errors.append((f"tasks[{index}].id", f"duplicates the id of tasks[{seen[task_id]}]"))
        else:
            seen[task_id] = index
    return errors


def _decode_json(data: bytes | str, what: str) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise SpecValidationError(what, [("$", f"is not valid JSON: {exc}")]) from None


# --------------------------------------------------------------------------------------------
# JSON Schemas


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema 2020-12 of a spec (additional properties forbidden), generated from `Spec`."""
    return _document_schema(Spec, SPEC_SCHEMA_ID, "Fabrik spec")


def todo_json_schema() -> dict[str, Any]:
    """JSON Schema 2020-12 of a todo (additional properties forbidden), generated from `Todo`."""
    return _document_schema(Todo, TODO_SCHEMA_ID, "Fabrik todo")


def _document_schema(cls: type[msgspec.Struct], schema_id: str, title: str) -> dict[str, Any]:
    (_,), components = msgspec.json.schema_components([cls], ref_template="#/$defs/{name}")
    root = dict(components.pop(cls.__name__))
    root["title"] = title
    document: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id, **root}
    if components:
        document["$defs"] = dict(sorted(components.items()))
    result: dict[str, Any] = _single_enums_as_const(document)
    return result


def _single_enums_as_const(node: Any) -> Any:
    """`{"enum": [1]}` as the clearer `{"const": 1}`."""
    if isinstance(node, dict):
        enum = node.get("enum")
        if isinstance(enum, list) and len(enum) == 1:
            node = {("const" if k == "enum" else k): (enum[0] if k == "enum" else v) for k, v in node.items()}
        return {k: _single_enums_as_const(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_single_enums_as_const(v) for v in node]
    return node


# --------------------------------------------------------------------------------------------
# The generic walker: every invalid field of a value against a (Struct) type


def collect_errors(value: Any, tp: Any, path: str = "") -> list[FieldError]:
    """Every `(field, rule)` by which `value` (decoded JSON) fails to convert to `tp`.

    msgspec stops at the first error; this walks Structs, lists and dicts itself so that each
    invalid field is reported, and humanises msgspec's messages for the leaves. A `rule` can be
    given per field with `Annotated[..., msgspec.Meta(extra={"rule": "..."})]`.
    """
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        first = str(exc)
    else:
        return []
    base, metas = _unwrap(tp)
    children: list[FieldError] | None = None
    if _is_struct(base) and isinstance(value, dict):
        children = _struct_errors(value, base, path)
    elif (member := _optional_member(base)) is not None and value is not None:
        return collect_errors(value, member, path)
    elif get_origin(base) in (list, tuple, set, frozenset) and isinstance(value, list):
        item_type = _item_type(base)
        if item_type is not None:
            children = [
                error
                for i, item in enumerate(value)
                for error in collect_errors(item, item_type, f"{path}[{i}]")
            ]
    elif get_origin(base) is dict and isinstance(value, dict):
        key_type, value_type = get_args(base)
        children = []
        for key, item in value.items():
            field = join_path(path, str(key))
            key_errors = collect_errors(key, key_type, field)
            children.extend((f, f"key {rule}") for f, rule in key_errors)
            children.extend(collect_errors(item, value_type, field))
    if children:
        return children
    message, suffix = _split_message(first)
    return [(_display(path + suffix), humanize(message, tp, metas))]


def join_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _display(path: str) -> str:
    return path.removeprefix(".") or "$"


def _struct_errors(value: dict[str, Any], cls: type[msgspec.Struct], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    if cls.__struct_config__.forbid_unknown_fields:
        for key in value:
            if key not in fields:
                errors.append((join_path(path, str(key)), "is not a known field"))
    for name, field in fields.items():
        where = join_path(path, name)
        if name not in value:
            if field.required:
                errors.append((where, "is required"))
            continue
        errors.extend(collect_errors(value[name], field.type, where))
    return errors


def _unwrap(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    metas: list[msgspec.Meta] = []
    while get_origin(tp) is Annotated:
        args = get_args(tp)
        tp = args[0]
        metas.extend(m for m in args[1:] if isinstance(m, msgspec.Meta))
    return tp, metas


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _optional_member(tp: Any) -> Any | None:
    """`X` of `X | None` (or `X | UnsetType`), if `tp` is such a union with one other member."""
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    members = [a for a in get_args(tp) if a not in (type(None), msgspec.UnsetType)]
    return members[0] if len(members) == 1 else None


def _item_type(tp: Any) -> Any | None:
    args = get_args(tp)
    if get_origin(tp) is tuple:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else None
    return args[0] if args else None


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _split_message(message: str) -> tuple[str, str]:
    match = _AT.search(message)
    if match is None:
        return message, ""
    suffix = match.group("path")
    # msgspec writes `[...]` for a dict value; we name dict entries ourselves.
    return message[: match.start()], "" if suffix == "[...]" else suffix


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "array": "an array",
    "object": "an object",
    "null": "null",
    "datetime": "an RFC 3339 date-time",
    "date": "a date (YYYY-MM-DD)",
}
_PATTERN_RULES = {DNS1123_LABEL.pattern: DNS1123_RULE}
_EXPECTED_GOT = re.compile(r"^Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`$")
_LENGTH = re.compile(r"^Expected `(?P<kind>\w+)` of length (?P<op>[<>]=?) (?P<n>\d+)$")
_BOUND = re.compile(r"^Expected `(?P<kind>int|float)` (?P<op>[<>]=?) (?P<n>-?[\d.e+-]+)$")
_REGEX = re.compile(r"^Expected `str` matching regex '(?P<re>.*)'$")


def _words(type_expr: str) -> str:
    parts = [p.strip() for p in type_expr.split("|")]
    return " or ".join(_TYPE_WORDS.get(p, f"`{p}`") for p in parts)


def _number(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() else text


def humanize(message: str, tp: Any = None, metas: list[msgspec.Meta] | None = None) -> str:
    """A msgspec validation message as a rule sentence (`must be ...`)."""
    for meta in metas or ():
        if meta.extra and isinstance(meta.extra.get("rule"), str):
            return str(meta.extra["rule"])
    if message.startswith("Invalid enum value"):
        base, _ = _unwrap(tp)
        choices = _literal_choices(base)
        if len(choices) == 1:
            return f"must be {choices[0]!r}"
        if choices:
            return "must be one of " + ", ".join(repr(c) if isinstance(c, str) else str(c) for c in choices)
        return "is not one of the allowed values"
    if (m := _EXPECTED_GOT.match(message)) is not None:
        return f"must be {_words(m['expected'])}, not {_words(m['got'])}"
    if (m := _LENGTH.match(message)) is not None:
        n = int(m["n"])
        unit = {"str": "character", "array": "item", "object": "entry"}.get(m["kind"], "element")
        plural = unit if n == 1 else ("entries" if unit == "entry" else f"{unit}s")
        if m["op"] == ">=" and n == 1 and m["kind"] == "str":
            return "must not be empty"
        bound = {">=": "at least", "<=": "at most", ">": "more than", "<": "fewer than"}[m["op"]]
        return f"must have {bound} {n} {plural}"
    if (m := _BOUND.match(message)) is not None:
        bound = {">=": "at least", "<=": "at most", ">": "greater than", "<": "less than"}[m["op"]]
        return f"must be {bound} {_number(m['n'])}"
    if (m := _REGEX.match(message)) is not None:
        return _PATTERN_RULES.get(m["re"], f"must match the pattern {m['re']}")
    if message.startswith("Expected ") or message.startswith("Invalid "):
        return "is invalid: " + message
    return message


def _literal_choices(tp: Any) -> tuple[Any, ...]:
    if get_origin(tp) is Literal:
        return get_args(tp)
    if (member := _optional_member(tp)) is not None:
        return _literal_choices(_unwrap(member)[0])
    return ()
