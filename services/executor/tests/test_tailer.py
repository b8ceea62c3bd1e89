"""Log tailing and progress coalescing, without NATS: a fake clock drives the time."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from fabrik_common.events import LogLine, RunLogChunk, RunProgress, RunResultReported
from fabrik_executor.tailer import Checkpoint, LogTailer, OutputReader, ProgressCoalescer

RUN = "01JABCDEFGHJKMNPQRSTVWXYZ0"
TS = datetime(2025, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def line(text: str, stream: str = "stdout") -> LogLine:
    return LogLine(ts=TS, stream=stream, text=text)  # type: ignore[arg-type]


def progress_line(finished: int, total: int = 100, phase: str = "implement") -> LogLine:
    data = {"phase": phase, "finished": finished, "total": total}
    return line("::fabrik::progress " + json.dumps(data))


def make_tailer(clock: Clock, **kwargs: object) -> LogTailer:
    return LogTailer(run_id=RUN, attempt=1, clock=clock, progress=ProgressCoalescer(0.5), **kwargs)  # type: ignore[arg-type]


def test_coalescer_lets_out_at_most_two_updates_per_second_and_keeps_the_latest() -> None:
    coalescer = ProgressCoalescer(0.5)
    emitted: list[tuple[float, int]] = []
    # 100 updates per second for 3 seconds.
    for i in range(300):
        now = i / 100
        state = coalescer.update({"finished": i, "total": 300}, now) or coalescer.due(now)
        if state is not None:
            emitted.append((now, state["finished"]))
    times = [t for t, _ in emitted]
    for start in times:
        assert sum(1 for t in times if start <= t < start + 1.0) <= 2
    assert len(emitted) >= 5
    final = coalescer.flush()
    assert final == {"finished": 299, "total": 300}
    assert coalescer.flush() is None  # nothing new since


def test_coalescer_sends_a_waiting_update_when_its_interval_ends() -> None:
    coalescer = ProgressCoalescer(0.5)
    assert coalescer.update({"finished": 1}, 0.0) == {"finished": 1}
    assert coalescer.update({"finished": 2}, 0.1) is None
    assert coalescer.due(0.3) is None
    assert coalescer.due(0.5) == {"finished": 2}
    assert coalescer.due(2.0) is None


def test_progress_fields_merge() -> None:
    coalescer = ProgressCoalescer(0.5)
    coalescer.update({"phase": "plan", "finished": 0, "total": 3}, 0.0)
    assert coalescer.update({"message": "thinking"}, 1.0) == {
        "phase": "plan",
        "finished": 0,
        "total": 3,
        "message": "thinking",
    }


def test_tailer_emits_progress_through_the_coalescer_and_flushes_the_latest() -> None:
    clock = Clock()
    tailer = make_tailer(clock)
    events = []
    for i in range(50):  # 50 progress lines within 0.49 s
        clock.now = i / 100
        events += [e.event for e in tailer.feed(progress_line(i), end_offset=i + 1)]
        events += [e.event for e in tailer.poll()]
    progress = [e for e in events if isinstance(e, RunProgress)]
    assert [p.finished for p in progress] == [0]
    clock.now = 0.6
    progress = [e.event for e in tailer.poll() if isinstance(e.event, RunProgress)]
    assert [p.finished for p in progress] == [49]
    clock.now = 0.7
    tailer.feed(progress_line(50, phase="verify"), end_offset=51)
    final = [e.event for e in tailer.flush() if isinstance(e.event, RunProgress)]
    assert [(p.phase, p.finished, p.total) for p in final] == [("verify", 50, 100)]


def test_log_chunks_by_count_and_age_with_consecutive_numbers_and_checkpoints() -> None:
    clock = Clock()
    tailer = make_tailer(clock, next_line=10)
    for i in range(450):
        tailer.feed(line(f"line {i}"), end_offset=(i + 1) * 10)
    emissions = tailer.poll()  # 450 waiting: two full chunks of 200 at once, 50 wait for their age
    chunks = [e for e in emissions if isinstance(e.event, RunLogChunk)]
    assert [(c.event.first_line, len(c.event.lines)) for c in chunks] == [(10, 200), (210, 200)]  # type: ignore[attr-defined]
    assert chunks[-1].checkpoint == Checkpoint(offset=4000, next_line=410)
    clock.now = 0.05
    assert tailer.poll() == []
    clock.now = 0.11
    (last,) = tailer.poll()
    assert isinstance(last.event, RunLogChunk)
    assert (last.event.first_line, len(last.event.lines)) == (410, 50)
    assert last.event.lines[-1].text == "line 449"
    assert last.checkpoint == Checkpoint(offset=4500, next_line=460)


def test_result_lines_are_emitted_at_once_and_stay_in_the_log() -> None:
    tailer = make_tailer(Clock())
    (emission,) = tailer.feed(line('::fabrik::result {"status":"ok","n":1}'), end_offset=5)
    assert isinstance(emission.event, RunResultReported)
    assert emission.event.result == {"status": "ok", "n": 1}
    (chunk,) = tailer.flush()
    assert isinstance(chunk.event, RunLogChunk)
    assert chunk.event.lines[0].text.startswith("::fabrik::result")


def test_malformed_protocol_line_becomes_a_system_note_and_never_raises() -> None:
    tailer = make_tailer(Clock())
    assert tailer.feed(line("::fabrik::progress {not json"), end_offset=7) == []
    assert tailer.feed(line("::fabrik::bogus {}"), end_offset=9) == []
    assert tailer.feed(line('::fabrik::progress {"finished": -1}'), end_offset=11) == []
    # Only stdout speaks the protocol.
    assert tailer.feed(line('::fabrik::result {"a":1}', stream="stderr"), end_offset=12) == []
    (chunk,) = tailer.flush()
    assert isinstance(chunk.event, RunLogChunk)
    streams = [(ln.stream, ln.text.split(":")[0]) for ln in chunk.event.lines]
    assert streams == [
        ("stdout", ""),
        ("system", "malformed "),
        ("stdout", ""),
        ("system", "malformed "),
        ("stdout", ""),
        ("system", "malformed "),
        ("stderr", ""),
    ]
    assert chunk.checkpoint == Checkpoint(offset=12, next_line=7)


def test_a_chunk_never_splits_a_line_from_its_system_note() -> None:
    clock = Clock()
    tailer = make_tailer(clock, max_lines=3)
    tailer.feed(line("a"), end_offset=1)
    tailer.feed(line("b"), end_offset=2)
    tailer.feed(line("::fabrik::progress nope"), end_offset=3)  # line 3 and its note share offset 3
    tailer.feed(line("c"), end_offset=4)
    chunks = [e for e in tailer.flush() if isinstance(e.event, RunLogChunk)]
    assert [len(c.event.lines) for c in chunks] == [4, 1]  # type: ignore[attr-defined]
    assert chunks[0].checkpoint == Checkpoint(offset=3, next_line=4)


def test_output_reader_reads_complete_lines_from_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "output.jsonl"
    reader = OutputReader(path)
    assert reader.read() == []  # no file yet
    record = json.dumps({"ts": TS.isoformat(), "stream": "stdout", "text": "one"}) + "\n"
    path.write_text(record + '{"ts": "2025-01-01T00:00:00+00:00", "stream": "std')
    lines = reader.read()
    assert [(end, ln.text) for end, ln in lines] == [(len(record), "one")]
    assert reader.read() == []  # the partial line waits for its newline
    with path.open("a") as out:
        out.write('err", "text": "two"}\nnot json\n')
    lines = reader.read()
    assert next((ln.stream, ln.text) for _, ln in lines) == ("stderr", "two")
    assert lines[1][1].stream == "system"
    assert "unreadable" in lines[1][1].text
    resumed = OutputReader(path, offset=len(record))
    assert next(ln.text for _, ln in resumed.read()) == "two"
    reader.close()
    resumed.close()
