"""Project environments: the rules, the dotenv format, and the encrypted store in NATS KV.

A project environment (`demo`/`dev`, `demo`/`prod`, ...) is a set of variables a run of that
project and environment starts with. Shared by the gateway (the only writer), the executor (it
reads the store when a run is dispatched: the local backend builds the workload's environment
from it, the Kubernetes backend mirrors it into the Secret `fabrik-env-<project>-<env>`) and the
CLI (dotenv files). See docs/environments.md.

Rules
- project and env names are DNS-1123 labels (`fabrik_common.ids`);
- keys are environment variable names (`[A-Za-z_][A-Za-z0-9_]*`, at most 256 characters); keys
  starting with `FABRIK_` or `SMITHERS_` (any case) are reserved: Fabrik sets them;
- values are strings without NUL characters, at most `max_value_bytes` (UTF-8);
- `prod`, `production` and `live` are protected: writing or promoting into them needs the
  maintainer role and an explicit confirmation.

Store: KV bucket `envs`, key `<project>.<env>`, value the JSON document `StoredEnv`:
`{"format": 1, "values": {KEY: <Fernet token>}, "updated_at", "updated_by", "revision", "key_id"}`.
Key names and metadata are in clear (listing an environment's keys does not decrypt anything);
every value is encrypted on its own with Fernet (AES-128-CBC + HMAC-SHA256) under the key
configured as `FABRIK_ENV_ENCRYPTION_KEY` or `FABRIK_ENV_ENCRYPTION_KEY_FILE`. Several keys may be
given (comma- or line-separated): the first encrypts, all decrypt, so a key can be rotated.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from fabrik_common.ids import DNS1123_RULE, is_dns1123_label, utcnow

ENVS_BUCKET: Final = "envs"
PROTECTED_ENVS: Final = frozenset({"prod", "production", "live"})
RESERVED_PREFIXES: Final = ("FABRIK_", "SMITHERS_")
MAX_KEY_LENGTH: Final = 256
DEFAULT_MAX_VALUE_BYTES: Final = 64 * 1024
DEFAULT_MAX_KEYS: Final = 1000
DEFAULT_MAX_TOTAL_BYTES: Final = 512 * 1024
"""Sum of key and value sizes of one environment: well under NATS' 1 MiB message limit (values
grow by about 4/3 plus 57 bytes when encrypted) and Kubernetes' 1 MiB Secret limit."""
STORE_FORMAT: Final = 1

KEY_VARIABLE: Final = "FABRIK_ENV_ENCRYPTION_KEY"
KEY_FILE_VARIABLE: Final = "FABRIK_ENV_ENCRYPTION_KEY_FILE"
KEYGEN_HINT: Final = (
    'generate one with: python -c "from cryptography.fernet import Fernet; '
    'print(Fernet.generate_key().decode())"'
)

KEY_RULE: Final = (
    "must be an environment variable name: letters, digits and '_', not starting with a digit, "
    f"at most {MAX_KEY_LENGTH} characters"
)
RESERVED_RULE: Final = "is reserved: keys starting with FABRIK_ or SMITHERS_ are set by Fabrik"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

FieldError = tuple[str, str]


# --------------------------------------------------------------------------------------------
# Rules


def is_protected(env: str) -> bool:
    """`prod`, `production` and `live` need the maintainer role and a confirmation to write."""
    return env in PROTECTED_ENVS


def is_reserved(key: str) -> bool:
    return key.upper().startswith(RESERVED_PREFIXES)


def is_valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and bool(_KEY.match(key))


def key_problem(key: str) -> str | None:
    """Why `key` cannot be a project env key, or None."""
    if not is_valid_key(key):
        return KEY_RULE
    if is_reserved(key):
        return RESERVED_RULE
    return None


def value_problem(value: Any, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> str | None:
    """Why `value` cannot be a project env value, or None."""
    if not isinstance(value, str):
        return f"must be a string, not {_json_type(value)}"
    if "\x00" in value:
        return "must not contain NUL characters (environment variables cannot hold them)"
    size = len(value.encode())
    if size > max_value_bytes:
        return f"must be at most {max_value_bytes} bytes (UTF-8), not {size}"
    return None


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a project or environment name, or None."""
    return None if is_dns1123_label(name) else DNS1123_RULE


def values_errors(
    values: Mapping[str, Any], *, field: str = "values", max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
) -> list[FieldError]:
    """Every invalid key or value of `values`, named `<field>.<KEY>`."""
    errors: list[FieldError] = []
    for key, value in values.items():
        name = f"{field}.{key}"
        if (rule := key_problem(key)) is not None:
            errors.append((name, rule))
        if (rule := value_problem(value, max_value_bytes)) is not None:
            errors.append((name, rule))
    return errors


def env_size(values: Mapping[str, str]) -> int:
    """Bytes of keys and values together (the size limit of an environment)."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in values.items())


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Diff


@dataclass(frozen=True)
class EnvDiff:
    """What the target environment undergoes when the source is copied onto it: `added` keys are
    in the source only, `removed` in the target only, `changed` in both with different values.
    Key names only, sorted."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff_envs(source: Mapping[str, str], target: Mapping[str, str]) -> EnvDiff:
    return EnvDiff(
        added=sorted(k for k in source if k not in target),
        removed=sorted(k for k in target if k not in source),
        changed=sorted(k for k in source if k in target and source[k] != target[k]),
        unchanged=sorted(k for k in source if k in target and source[k] == target[k]),
    )


# --------------------------------------------------------------------------------------------
# Dotenv


@dataclass(frozen=True)
class DotenvEntry:
    key: str
    value: str
    line: int
    """Line number (1-based) where the entry starts."""


class DotenvError(ValueError):
    """A dotenv text that cannot be read; `problems` lists `(line number, message)`, all of them."""

    def __init__(self, source: str, problems: Sequence[tuple[int, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.source}:{line}: {message}" for line, message in self.problems]


_DOUBLE_QUOTED_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$", "'": "'"}
_EXPORT = re.compile(r"^export[ \t]+")


def parse_dotenv_entries(text: str, source: str = ".env") -> list[DotenvEntry]:
    """The `KEY=VALUE` entries of a dotenv text, in order, or a `DotenvError` naming every bad line.

    - blank lines and lines starting with `#` are skipped; an `export ` prefix is allowed;
    - spaces around `=` are allowed; a key must be a valid variable name;
    - `'single quoted'` values are literal; `"double quoted"` values know the escapes `\\n`, `\\t`,
      `\\r`, `\\"`, `\\\\`, `\\$` and `\\'` (any other backslash stays as it is); quoted values may
      span lines; after the closing quote only spaces and a `# comment` may follow;
    - unquoted values are trimmed and end at ` #` (a comment);
    - no variable expansion: `$OTHER` is taken literally;
    - a line without `=` and a key given twice are errors, with their line numbers.
    """
    lines = text.split("\n")
    entries: list[DotenvEntry] = []
    seen: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    index = 0
    while index < len(lines):
        number = index + 1
        line = lines[index].removesuffix("\r").strip()
        index += 1
        if not line or line.startswith("#"):
            continue
        line = _EXPORT.sub("", line, count=1)
        key, sep, rest = line.partition("=")
        key = key.strip()
        if not sep:
            problems.append((number, f"expected KEY=VALUE, found no '=' in {_excerpt(line)}"))
            continue
        if not is_valid_key(key):
            problems.append((number, f"{_excerpt(key)} is not a valid variable name: {KEY_RULE}"))
            # still consume a quoted value spanning lines, so that its lines are not misread
        rest = rest.lstrip(" \t")
        value: str | None
        if rest[:1] in ("'", '"'):
            value, index, problem = _quoted(rest, lines, index, number)
            if problem is not None:
                problems.append((number, problem))
                continue
        else:
            value = _unquoted(rest)
        if not is_valid_key(key):
            continue
        if key in seen:
            problems.append((number, f"{key} is set twice: already on line {seen[key]}"))
            continue
        seen[key] = number
        entries.append(DotenvEntry(key, value, number))
    if problems:
        raise DotenvError(source, problems)
    return entries


def parse_dotenv(text: str, source: str = ".env") -> dict[str, str]:
    """The values of a dotenv text (see `parse_dotenv_entries`)."""
    return {entry.key: entry.value for entry in parse_dotenv_entries(text, source)}


def _excerpt(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _unquoted(rest: str) -> str:
    match = re.search(r"[ \t]#", rest)
    if match is not None:
        rest = rest[: match.start()]
    return rest.strip()


def _quoted(rest: str, lines: list[str], index: int, number: int) -> tuple[str, int, str | None]:
    """A quoted value starting at `rest` (the rest of line `number`); more lines are read from
    `lines[index:]` while the quote is open. Returns the value, the next line index and a problem."""
    quote = rest[0]
    out: list[str] = []
    text = rest[1:]
    while True:
        pos = 0
        while pos < len(text):
            char = text[pos]
            if quote == '"' and char == "\\" and pos + 1 < len(text):
                nxt = text[pos + 1]
                out.append(_DOUBLE_QUOTED_ESCAPES.get(nxt, "\\" + nxt))
                pos += 2
                continue
            if char == quote:
                trailing = text[pos + 1 :].strip()
                if trailing and not trailing.startswith("#"):
                    return "", index, f"unexpected text after the closing quote: {_excerpt(trailing)}"
                return "".join(out), index, None
            out.append(char)
            pos += 1
        if index >= len(lines):
            kind = "double" if quote == '"' else "single"
            return "", index, f"unterminated {kind} quote (the value starts on this line)"
        out.append("\n")
        text = lines[index].removesuffix("\r")
        index += 1


_PLAIN = re.compile(r"^[A-Za-z0-9_./:@%+,=~^-]+$")


def format_dotenv_value(value: str) -> str:
    """`value` as it must be written in a dotenv file to be read back unchanged."""
    if _PLAIN.match(value):
        return value
    if "'" not in value and "\n" not in value and "\r" not in value:
        return f"'{value}'"
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("$", "\\$")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def format_dotenv(values: Mapping[str, str], header: Iterable[str] = ()) -> str:
    """A dotenv text of `values` (in their order) that `parse_dotenv` reads back as `values`."""
    lines = [f"# {line}".rstrip() for line in header]
    lines.extend(f"{key}={format_dotenv_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n" if lines else ""


# --------------------------------------------------------------------------------------------
# Encryption


class EnvKeyError(ValueError):
    """The configured encryption key is unusable (the message names the variable, never the key)."""


class EnvCipher:
    """Fernet over one or more keys: the first encrypts, every one decrypts (key rotation)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise EnvKeyError("no encryption key given")
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self.key_ids = [key_fingerprint(k) for k in keys]

    @property
    def key_id(self) -> str:
        """Fingerprint of the key that encrypts (stored with each environment)."""
        return self.key_ids[0]

    @classmethod
    def from_text(cls, text: str, *, source: str = KEY_VARIABLE) -> EnvCipher:
        """Keys separated by commas, spaces or lines; each must be a Fernet key."""
        keys = [part.encode() for part in re.split(r"[\s,]+", text.strip()) if part]
        if not keys:
            raise EnvKeyError(f"{source} is empty; {KEYGEN_HINT}")
        for number, key in enumerate(keys, start=1):
            if not _is_fernet_key(key):
                which = f"key {number} of {source}" if len(keys) > 1 else source
                raise EnvKeyError(
                    f"{which} is not a Fernet key (32 bytes, url-safe base64: 44 characters); {KEYGEN_HINT}"
                )
        return cls(keys)

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, UnicodeError) as exc:
            raise EnvDecryptError(
                "a value cannot be decrypted with the configured key(s) "
                f"({', '.join(self.key_ids)}): was it written with another {KEY_VARIABLE}?"
            ) from exc


def _is_fernet_key(key: bytes) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key)) == 32 and len(key) == 44
    except (binascii.Error, ValueError):
        return False


def key_fingerprint(key: bytes) -> str:
    """A short, non-secret name of a key: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.strip()).hexdigest()[:12]


def generate_env_key() -> str:
    return Fernet.generate_key().decode("ascii")


def load_env_cipher(value: str = "", file: str = "") -> EnvCipher | None:
    """The cipher from `FABRIK_ENV_ENCRYPTION_KEY` (`value`) or `..._FILE` (`file`), or None when
    neither is set. Raises `EnvKeyError` when both are set, the file cannot be read or a key is bad."""
    if value.strip() and file:
        raise EnvKeyError(f"set one of {KEY_VARIABLE} or {KEY_FILE_VARIABLE}, not both")
    if file:
        try:
            text = Path(file).expanduser().read_text()
        except OSError as exc:
            raise EnvKeyError(f"{KEY_FILE_VARIABLE}={file!r} cannot be read: {exc.strerror or exc}") from None
        return EnvCipher.from_text(text, source=f"{KEY_FILE_VARIABLE} ({file})")
    if value.strip():
        return EnvCipher.from_text(value)
    return None


def ensure_key_file(path: Path) -> bool:
    """Create `path` with a new key (mode 0600, directory 0700) unless it exists. True if created."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(generate_env_key() + "\n")
    return True


# --------------------------------------------------------------------------------------------
# The store


class EnvStoreError(Exception):
    """The project environment cannot be read (the message says why and what to do)."""


class EnvKeyMissingError(EnvStoreError):
    """An environment is stored but no encryption key is configured here."""


class EnvDecryptError(EnvStoreError):
    """A stored value does not decrypt with the configured key(s)."""


class EnvCorruptError(EnvStoreError):
    """A stored document is not a project environment."""


class StoredEnv(msgspec.Struct, frozen=True, kw_only=True):
    """The value of the `envs` bucket under `<project>.<env>`."""

    format: int = STORE_FORMAT
    values: dict[str, str]
    """KEY -> Fernet token of the value."""
    updated_at: datetime
    updated_by: str
    revision: int
    """1 for the first write, +1 for each change."""
    key_id: str = ""
    """Fingerprint of the key the values are encrypted with."""


_stored = msgspec.json.Decoder(StoredEnv)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class ProjectEnv:
    """A project environment as read from the store (values decrypted, or empty if not asked)."""

    project: str
    env: str
    keys: list[str]
    updated_at: datetime
    updated_by: str
    revision: int
    kv_revision: int
    """Revision of the KV entry: what a compare-and-set write must name."""
    key_id: str = ""
    values: dict[str, str] = field(default_factory=dict)
    decrypted: bool = False


def kv_key(project: str, env: str) -> str:
    """The `envs` key of a project environment; both names must be DNS-1123 labels."""
    if not is_dns1123_label(project) or not is_dns1123_label(env):
        raise ValueError(f"not a project/env pair of DNS-1123 labels: {project!r}/{env!r}")
    return f"{project}.{env}"


def split_kv_key(key: str) -> tuple[str, str] | None:
    project, sep, env = key.partition(".")
    if not sep or not is_dns1123_label(project) or not is_dns1123_label(env):
        return None
    return project, env


def encode_stored(
    values: Mapping[str, str],
    cipher: EnvCipher,
    *,
    updated_by: str,
    revision: int,
    at: datetime | None = None,
) -> bytes:
    stored = StoredEnv(
        values={key: cipher.encrypt(value) for key, value in sorted(values.items())},
        updated_at=at or utcnow(),
        updated_by=updated_by,
        revision=revision,
        key_id=cipher.key_id,
    )
    return _encoder.encode(stored)


def decode_stored(data: bytes, where: str) -> StoredEnv:
    try:
        stored = _stored.decode(data)
    except msgspec.DecodeError as exc:
        raise EnvCorruptError(f"{where} is not a stored project environment: {exc}") from None
    if stored.format != STORE_FORMAT:
        raise EnvCorruptError(f"{where} has store format {stored.format}; this version reads {STORE_FORMAT}")
    return stored


def to_project_env(
    project: str, env: str, stored: StoredEnv, kv_revision: int, cipher: EnvCipher | None, *, decrypt: bool
) -> ProjectEnv:
    values: dict[str, str] = {}
    if decrypt and stored.values:
        if cipher is None:
            raise EnvKeyMissingError(
                f"the environment {project}/{env} is stored encrypted, but no encryption key is "
                f"configured here: set {KEY_VARIABLE} or {KEY_FILE_VARIABLE}"
                + (f" (the values were encrypted with key {stored.key_id})" if stored.key_id else "")
            )
        try:
            values = {key: cipher.decrypt(token) for key, token in stored.values.items()}
        except EnvDecryptError as exc:
            raise EnvDecryptError(
                f"the environment {project}/{env} cannot be decrypted: {exc}"
                + (f" (it was written with key {stored.key_id})" if stored.key_id else "")
            ) from None
    return ProjectEnv(
        project=project,
        env=env,
        keys=sorted(stored.values),
        updated_at=stored.updated_at,
        updated_by=stored.updated_by,
        revision=stored.revision,
        kv_revision=kv_revision,
        key_id=stored.key_id,
        values=dict(sorted(values.items())),
        decrypted=decrypt,
    )


async def envs_kv(js: JetStreamContext) -> KeyValue:
    return await js.key_value(ENVS_BUCKET)


async def load_env(
    kv: KeyValue, project: str, env: str, cipher: EnvCipher | None, *, decrypt: bool = True
) -> ProjectEnv | None:
    """The stored environment, or None when it was never set (or was deleted)."""
    key = kv_key(project, env)
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    if entry.operation in ("DEL", "PURGE") or entry.value is None:
        return None
    stored = decode_stored(entry.value, f"envs/{key}")
    return to_project_env(project, env, stored, int(entry.revision or 0), cipher, decrypt=decrypt)


async def list_envs(kv: KeyValue, project: str | None = None) -> list[ProjectEnv]:
    """Every stored environment (of `project`), metadata only, sorted by project and env."""
    watcher = await kv.watch(f"{project}.*" if project else ">", ignore_deletes=True)
    found: list[ProjectEnv] = []
    try:
        async for entry in watcher:
            if entry is None:
                break
            names = split_kv_key(entry.key)
            if names is None or entry.value is None or entry.operation in ("DEL", "PURGE"):
                continue
            try:
                stored = decode_stored(entry.value, f"envs/{entry.key}")
            except EnvCorruptError:
                continue
            found.append(to_project_env(*names, stored, int(entry.revision or 0), None, decrypt=False))
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return sorted(found, key=lambda e: (e.project, e.env))


async def envs_in_use(js: JetStreamContext) -> bool:
    """Whether any project environment is stored."""
    try:
        info = await js.stream_info(f"KV_{ENVS_BUCKET}")
    except nats.js.errors.NotFoundError:
        return False
    return int(info.state.messages or 0) > 0 and bool(await list_envs(await envs_kv(js)))


async def require_key_if_used(js: JetStreamContext, cipher: EnvCipher | None, service: str) -> None:
    """At start: refuse to run without a key when environments are stored (runs would start
    without their variables, or the gateway could not show them)."""
    if cipher is None and await envs_in_use(js):
        raise EnvKeyMissingError(
            f"project environments are stored in the KV bucket '{ENVS_BUCKET}', but the {service} has no "
            f"encryption key: set {KEY_VARIABLE} or {KEY_FILE_VARIABLE} (the key they were written with)"
        )


def as_cipher(key: EnvCipher | str | bytes | None) -> EnvCipher | None:
    if key is None or isinstance(key, EnvCipher):
        return key
    text = key.decode() if isinstance(key, bytes) else key
    return EnvCipher.from_text(text) if text.strip() else None


async def read_env(
    js: JetStreamContext, project: str, env: str, key: EnvCipher | str | bytes | None
) -> dict[str, str]:
    """The decrypted variables of a project environment; {} when none is stored.

    For the executor's backends at dispatch. `key` is the cipher (or the key text). Raises
    `EnvKeyMissingError` (stored but no key), `EnvDecryptError` (wrong key), `EnvCorruptError`;
    NATS errors (not reachable, timeout) propagate: they are worth a retry, the others are not.
    """
    stored = await load_env(await envs_kv(js), project, env, as_cipher(key), decrypt=True)
    return dict(stored.values) if stored is not None else {}


TRANSIENT_ERRORS: Final = (nats.errors.Error, TimeoutError, OSError)
"""What reading the store may raise that is worth a retry (NATS down, timeouts)."""


def local_key_file(data_dir: Path) -> Path:
    """Where `fabrik up` keeps the key of a local stack that has none configured."""
    return data_dir / "secrets" / "env.key"


def key_configured(environ: Mapping[str, str]) -> bool:
    """Whether `environ` configures an encryption key (value or file)."""
    return bool(environ.get(KEY_VARIABLE, "").strip() or environ.get(KEY_FILE_VARIABLE, "").strip())
