"""Run-scoped LLM keys: each run gets a key signed for it alone, never a provider key.

The key carries the run, its project, its budget and an expiry; the llm-proxy verifies it with the
same secret (`FABRIK_RUN_KEY_SECRET` or `FABRIK_RUN_KEY_SECRET_FILE`) without a lookup.
"""

from __future__ import annotations

from datetime import timedelta

from fabrik_common.events import RunDispatched
from fabrik_common.runkeys import issue_run_key

# A key outlives its attempt's deadline a little, so a call started just before it still ends.
KEY_VALIDITY_AFTER_DEADLINE = timedelta(hours=1)


class SignedRunKeys:
    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def llm_key_env(self, dispatch: RunDispatched) -> dict[str, str]:
        key = issue_run_key(
            self.secret,
            run_id=dispatch.run_id,
            project=dispatch.project,
            budget_usd=dispatch.params.budget_usd,
            expires_at=dispatch.deadline + KEY_VALIDITY_AFTER_DEADLINE,
        )
        # The variables agent harnesses read, next to the base URLs of the llm-proxy.
        return {"FABRIK_LLM_KEY": key, "OPENAI_API_KEY": key, "ANTHROPIC_API_KEY": key}
