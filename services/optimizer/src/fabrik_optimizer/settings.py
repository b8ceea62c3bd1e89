"""Configuration of the optimizer service, from `FABRIK_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from fabrik_common.settings import CommonSettings, Port


class OptimizerSettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 9103
    data_dir: str = ""
    """Fabrik's data directory (`FABRIK_DATA_DIR`); default `~/.local/share/fabrik`."""
    analytics_db: str = ""
    """The analytics SQLite file (`FABRIK_ANALYTICS_DB`); default `<data_dir>/optimizer/analytics.db`."""

    def analytics_db_path(self) -> Path:
        if self.analytics_db:
            return Path(self.analytics_db).expanduser()
        return resolve_data_dir(self.data_dir) / "optimizer" / "analytics.db"


def resolve_data_dir(configured: str) -> Path:
    """The same resolution as the executor's: setting, then FABRIK_HOME, XDG_DATA_HOME, ~/.local/share."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("FABRIK_HOME"):
        return Path(os.environ["FABRIK_HOME"]).expanduser()
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "fabrik"
    return Path.home() / ".local" / "share" / "fabrik"
