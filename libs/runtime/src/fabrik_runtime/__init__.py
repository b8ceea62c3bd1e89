"""What a workload uses inside a Fabrik run: the progress protocol, LLM endpoint settings, credentials.

Dependency-free on purpose: it is installed into run images next to arbitrary agent harnesses.
"""

from fabrik_runtime.protocol import (
    PREFIX,
    ProtocolLine,
    format_line,
    parse_line,
    report_progress,
    report_result,
)
from fabrik_runtime.run import LlmEndpoints, RunContext, harness_settings

__all__ = [
    "PREFIX",
    "LlmEndpoints",
    "ProtocolLine",
    "RunContext",
    "format_line",
    "harness_settings",
    "parse_line",
    "report_progress",
    "report_result",
]
