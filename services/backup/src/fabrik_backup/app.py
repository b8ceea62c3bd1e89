"""Wiring and start-up of the backup service."""

from __future__ import annotations

from fabrik_backup.handlers import router
from fabrik_backup.settings import BackupSettings
from fabrik_common.service import Service, run_service

NAME = "backup"


def build(settings: BackupSettings) -> Service[None]:
    return Service(NAME, settings, routers=[router])


def main() -> None:
    run_service(BackupSettings, build, NAME)
