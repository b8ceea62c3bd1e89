from __future__ import annotations

import io

import pytest

from fabrik_runtime import parse_line, report_progress, report_result
from fabrik_runtime.protocol import ProtocolError
from fabrik_runtime.run import LlmEndpoints, RunContext


def test_progress_round_trips_through_the_line_format() -> None:
    out = io.StringIO()
    report_progress(phase="implement", task="16:impl", finished=150, total=192, out=out)
    line = out.getvalue()
    assert line == '::fabrik::progress {"phase":"implement","task":"16:impl","finished":150,"total":192}\n'
    parsed = parse_line(line)
    assert parsed is not None
    assert parsed.kind == "progress"
    assert parsed.data == {"phase": "implement", "task": "16:impl", "finished": 150, "total": 192}


def test_result_line_carries_any_object() -> None:
    out = io.StringIO()
    report_result({"status": "ok", "files": ["a.txt"], "note": "ünïcode"}, out=out)
    parsed = parse_line(out.getvalue())
    assert parsed is not None
    assert parsed.data["note"] == "ünïcode"


@pytest.mark.parametrize(
    "line", ["plain output", "  ", "", "prefix ::fabrik::progress {}", ":: fabrik::result {}"]
)
def test_ordinary_output_is_not_a_protocol_line(line: str) -> None:
    assert parse_line(line) is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("::fabrik::progress {not json", "not JSON"),
        ("::fabrik::progress [1,2]", "JSON object"),
        ('::fabrik::progress {"finished":-1}', "progress.finished"),
        ('::fabrik::progress {"finished":true}', "progress.finished"),
        ('::fabrik::progress {"phase":3}', "progress.phase"),
        ("::fabrik::explode {}", "unknown protocol line kind"),
        ("::fabrik:: progress {}", "unknown protocol line kind ''"),
    ],
)
def test_malformed_protocol_lines_are_errors_naming_the_problem(line: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_line(line)


def test_report_progress_refuses_invalid_values() -> None:
    with pytest.raises(ProtocolError):
        report_progress(finished=-3, out=io.StringIO())


def test_run_context_and_llm_endpoints_from_env() -> None:
    env = {
        "FABRIK_RUN_ID": "01JABCDEFGHJKMNPQRSTVWXYZ0",
        "FABRIK_PROJECT": "demo",
        "FABRIK_ENV": "dev",
        "FABRIK_ATTEMPT": "2",
        "OPENAI_BASE_URL": "http://127.0.0.1:8081/v1",
        "FABRIK_LLM_KEY": "fk-run-abc",
    }
    ctx = RunContext.from_env(env)
    assert ctx.attempt == 2
    assert ctx.project == "demo"
    llm = LlmEndpoints.from_env(env)
    assert llm.api_key == "fk-run-abc"
    assert llm.anthropic_base_url is None
    with pytest.raises(RuntimeError, match="FABRIK_RUN_ID"):
        RunContext.from_env({})
