"""The backup service's subscribers: one typed async function per subject."""

from __future__ import annotations

from fabrik_common.bus import Router

router = Router()
