"""The credentials `fabrik login` stores: one bearer credential (an API token or a JWT) per API.

Which credential a command sends (first match wins):

1. `$FABRIK_TOKEN`,
2. the credential `fabrik login` stored for the API's URL,
3. the token in the `token_file` of `fabrik init`'s config.yaml (`fabrik_cli.userconfig`),
4. none (the gateway treats the caller as anonymous, with its `FABRIK_ANONYMOUS_ROLE`).

The file is `$FABRIK_HOME/credentials.json` when `$FABRIK_HOME` is set (one variable isolates a
whole Fabrik setup, as for the local stack's data), else `$XDG_CONFIG_HOME/fabrik/credentials.json`,
else `~/.config/fabrik/credentials.json`. It is written atomically with mode 0600, its directory
is created with mode 0700, and it maps normalized API URLs (scheme and host lowercased, the
default port and a trailing `/api/v1` dropped) to the credential and who it was when it was
verified:

    {"version": 1, "apis": {"http://127.0.0.1:8080": {"token": "fbk_...", "subject": "token:01...",
     "kind": "token", "name": "ci", "saved_at": "2026-11-29T14:02:11Z"}}}

No click here: the commands in `fabrik_cli.commands.access` print; this module reads and writes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from fabrik_cli.errors import CliError

ENV_TOKEN: Final = "FABRIK_TOKEN"  # noqa: S105 - the variable name, not a secret
FILE_NAME: Final = "credentials.json"
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
FORMAT_VERSION: Final = 1
API_PREFIX: Final = "/api/v1"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class CredentialsError(CliError):
    """The credentials file cannot be read or written."""


def credentials_file(environ: Mapping[str, str] | None = None) -> Path:
    """$FABRIK_HOME/credentials.json, else $XDG_CONFIG_HOME/fabrik/..., else ~/.config/fabrik/..."""
    env = os.environ if environ is None else environ
    if env.get("FABRIK_HOME"):
        return Path(env["FABRIK_HOME"]).expanduser() / FILE_NAME
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]).expanduser() / "fabrik" / FILE_NAME
    home = Path(env["HOME"]).expanduser() if env.get("HOME") else Path.home()
    return home / ".config" / "fabrik" / FILE_NAME


def api_key(url: str) -> str:
    """The key of an API in the file: `HTTP://Host:80/api/v1/` and `http://host` are one API."""
    text = url.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    path = parts.path.rstrip("/").removesuffix(API_PREFIX).rstrip("/")
    return f"{scheme}://{netloc}{path}"


@dataclass(frozen=True)
class StoredCredential:
    token: str
    subject: str = ""
    kind: str = ""
    name: str = ""
    saved_at: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "token": self.token,
            "subject": self.subject,
            "kind": self.kind,
            "name": self.name,
            "saved_at": self.saved_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> StoredCredential | None:
        if not isinstance(data, Mapping) or not isinstance(data.get("token"), str) or not data["token"]:
            return None
        return cls(**{k: str(data.get(k) or "") for k in ("token", "subject", "kind", "name", "saved_at")})


@dataclass(frozen=True)
class Credential:
    """The credential a command sends, and where it came from (for hints when it is refused)."""

    token: str
    source: str
    """`env` ($FABRIK_TOKEN), `file` (stored by `fabrik login`), `config` (the `token_file` of
    `fabrik init`'s config.yaml) or `option`."""
    path: Path | None = None

    @property
    def from_env(self) -> bool:
        return self.source == "env"

    def describe(self) -> str:
        if self.from_env:
            return f"${ENV_TOKEN}"
        if self.source == "config":
            return f"the token file {self.path} (token_file in config.yaml)"
        return f"stored by `fabrik login` in {self.path}"


class CredentialStore:
    """The credentials file. Every change reads the file again and replaces it atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def default(cls, environ: Mapping[str, str] | None = None) -> CredentialStore:
        return cls(credentials_file(environ))

    def _read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialsError(f"cannot read the credentials file {self.path}: {exc.strerror}") from exc
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise CredentialsError(
                f"the credentials file {self.path} is not valid JSON ({exc})",
                ["fix it, or remove it and log in again with `fabrik login`"],
            ) from exc
        if not isinstance(data, dict):
            raise CredentialsError(
                f"the credentials file {self.path} is not a JSON object",
                ["remove it and log in again with `fabrik login`"],
            )
        return data

    def _apis(self, data: Mapping[str, Any]) -> dict[str, Any]:
        apis = data.get("apis")
        return dict(apis) if isinstance(apis, Mapping) else {}

    def all(self) -> dict[str, StoredCredential]:
        found = {}
        for key, value in self._apis(self._read()).items():
            credential = StoredCredential.from_json(value)
            if credential is not None:
                found[key] = credential
        return found

    def get(self, url: str) -> StoredCredential | None:
        return StoredCredential.from_json(self._apis(self._read()).get(api_key(url)))

    def save(self, url: str, credential: StoredCredential) -> None:
        data = self._read()
        apis = self._apis(data)
        apis[api_key(url)] = credential.to_json()
        self._write({**data, "version": FORMAT_VERSION, "apis": apis})

    def remove(self, url: str) -> bool:
        """Forget the API's credential; False when there was none."""
        data = self._read()
        apis = self._apis(data)
        if apis.pop(api_key(url), None) is None:
            return False
        self._write({**data, "version": FORMAT_VERSION, "apis": apis})
        return True

    def clear(self) -> list[str]:
        """Forget every credential (the file is removed); the URLs that had one."""
        urls = list(self.all())
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise CredentialsError(f"cannot remove the credentials file {self.path}: {exc.strerror}") from exc
        return urls

    def loose_permissions(self) -> str | None:
        """A warning when others may read the file (it should be 0600), else None."""
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
        except OSError:
            return None
        if mode & 0o077:
            return (
                f"the credentials file {self.path} can be read by others (mode {mode:04o}); "
                f"fix it with: chmod 600 {self.path}"
            )
        return None

    def _write(self, data: Mapping[str, Any]) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise CredentialsError(
                f"cannot write the credentials file {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp creates it 0600 already; be explicit
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise CredentialsError(
                f"cannot write the credentials file {self.path}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def resolve_credential(url: str, environ: Mapping[str, str] | None = None) -> Credential | None:
    """$FABRIK_TOKEN, else the stored credential for `url`, else None.

    An unreadable credentials file is an error only when it matters (no $FABRIK_TOKEN).
    """
    env = os.environ if environ is None else environ
    token = (env.get(ENV_TOKEN) or "").strip()
    if token:
        return Credential(token, "env")
    store = CredentialStore.default(env)
    stored = store.get(url)
    if stored is None:
        return None
    return Credential(stored.token, "file", store.path)


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def jwt_expiry(token: str) -> datetime | None:
    """The `exp` of a JWT, read without verifying it (to tell the user when to log in again);
    None for an API token or anything that is not a JWT with an `exp`."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, UnicodeEncodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, Mapping) else None
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    try:
        return datetime.fromtimestamp(exp, UTC)
    except (OverflowError, OSError, ValueError):
        return None
