"""Back up and restore N events (~1 KB each): throughput each way and peak memory.

    uv run python bench/backup.py                  # 1,000,000 events
    uv run python bench/backup.py --events 200000

Starts two nats-servers (temporary stores, free ports): fills the source with N events shaped like
Fabrik's (JSON payload of about 1 KB with an id, a timestamp and run-dependent content, headers
`Nats-Msg-Id` and `Fabrik-Event-Type`, as `Bus.publish` sets them), backs the stream up into a
directory target, restores it into the empty second server and checks that the restored stream has
every message at its sequence (count, last sequence, and a digest of every message). Prints MB/s
(message bytes: payload + headers + subject) and wall time of each direction, the archive size, and
the resident memory before and at the peak of each phase (sampled every 20 ms), so flat memory
shows as a peak that does not grow with N, and the CPU seconds of this process and of the
nats-server in each phase (on a busy machine, wall time above their sum divided by the cores is
time spent waiting for a CPU). Baselines from the same run: the fill's MB/s (pipelined publishes
of the same messages) and a bulk read of the source with a digest. Exits non-zero when the restore
does not match.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from fabrik_backup import jsapi
from fabrik_backup.compare import read_stream
from fabrik_backup.engine import BackupOptions, run_backup
from fabrik_backup.restore import restore
from fabrik_backup.targets import DirectoryTarget
from fabrik_common.natsserver import NatsServer

STREAM = "BENCH"


class RssSampler:
    """Peak resident set size of this process, sampled on a thread (independent of the loop)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def server_cpu(server: NatsServer) -> float:
    """CPU seconds (user + system) the nats-server process has used."""
    with open(f"/proc/{server.pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


async def fill(url: str, events: int) -> int:
    """Publish the events (a request every 1,000 messages paces the server); returns message bytes."""
    rng = random.Random(7)
    nc = await jsapi.connect_raw(url)
    total = 0
    try:
        await jsapi.create_stream(nc, {"name": STREAM, "subjects": ["bench.>"], "storage": "file"})
        words = [rng.randbytes(6).hex() for _ in range(5000)]
        for i in range(events):
            run = f"01JBENCH{i % 5000:08d}"
            text = " ".join(rng.choices(words, k=60))
            payload = (
                f'{{"type":"run.progress","event_id":"01JEVT{i:020d}","run_id":"{run}",'
                f'"occurred_at":"2026-11-29T12:{i % 60:02d}:{i % 59:02d}.{i % 999:03d}Z",'
                f'"finished":{i % 192},'
                f'"total":192,"phase":"implement","message":"{text}"}}'
            ).encode()
            headers = (
                f"NATS/1.0\r\nNats-Msg-Id: 01JEVT{i:020d}\r\nFabrik-Event-Type: run.progress\r\n\r\n".encode()
            )
            subject = f"bench.progress.{run}"
            total += len(payload) + len(headers) + len(subject)
            if i % 1000 == 999 or i == events - 1:
                await nc.request(subject, payload, timeout=60, headers=None)
            else:
                await nc.send_raw(subject, payload, headers, "")
    finally:
        await nc.close()
    return total


async def digest(url: str) -> tuple[int, str]:
    nc = await jsapi.connect_raw(url)
    h = hashlib.sha256()
    count = 0
    try:
        async for record in read_stream(nc, STREAM):
            count += 1
            h.update(record.seq.to_bytes(8, "big"))
            h.update(record.subject.encode())
            h.update(record.headers or b"")
            h.update(record.data)
    finally:
        await nc.close()
    return count, h.hexdigest()


async def main(events: int) -> int:
    root = Path(tempfile.mkdtemp(prefix="fabrik-bench-backup-"))
    source = NatsServer(root / "source")
    dest = NatsServer(root / "dest")
    source.start()
    dest.start()
    begun = time.monotonic()
    try:
        started = time.monotonic()
        data_bytes = await fill(source.url, events)
        fill_s = time.monotonic() - started
        print(
            f"filled {events:,} events, {mib(data_bytes)} in {fill_s:.1f} s "
            f"(baseline, pipelined publish: {data_bytes / fill_s / 1e6:.1f} MB/s)"
        )
        target = DirectoryTarget(root / "archive")

        nc = await jsapi.connect_raw(source.url)
        with RssSampler() as mem:
            before = mem.rss()
            cpu, server_before = time.process_time(), server_cpu(source)
            started = time.monotonic()
            manifest = await run_backup(nc, target, "bench", BackupOptions(streams=[STREAM]))
            backup_s = time.monotonic() - started
            cpu, server_used = time.process_time() - cpu, server_cpu(source) - server_before
        await nc.close()
        print(
            f"backup : {backup_s:6.1f} s  {data_bytes / backup_s / 1e6:6.1f} MB/s  "
            f"{events / backup_s:9,.0f} msg/s  archive {mib(manifest.stored_bytes)} in {manifest.parts} parts"
            f"  RSS {mib(before)} -> peak {mib(mem.peak)}"
            f"  CPU: backup {cpu:.1f} s, nats-server {server_used:.1f} s"
        )

        nc = await jsapi.connect_raw(dest.url)
        with RssSampler() as mem:
            before = mem.rss()
            cpu, server_before = time.process_time(), server_cpu(dest)
            started = time.monotonic()
            await restore(nc, target, manifest)
            restore_s = time.monotonic() - started
            cpu, server_used = time.process_time() - cpu, server_cpu(dest) - server_before
        await nc.close()
        print(
            f"restore: {restore_s:6.1f} s  {data_bytes / restore_s / 1e6:6.1f} MB/s  "
            f"{events / restore_s:9,.0f} msg/s  RSS {mib(before)} -> peak {mib(mem.peak)}  "
            f"CPU: restore {cpu:.1f} s, nats-server {server_used:.1f} s"
        )
        print(f"load average: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
        print(f"ru_maxrss (whole run, incl. fill and check): {mib(_maxrss())}")

        started = time.monotonic()
        original = await digest(source.url)
        read_s = time.monotonic() - started
        print(
            f"baseline, bulk read of the source with a digest: {read_s:.1f} s  "
            f"{data_bytes / read_s / 1e6:.1f} MB/s"
        )
        restored = await digest(dest.url)
        if original != restored or original[0] != events:
            print(f"MISMATCH: source {original}, restored {restored}", file=sys.stderr)
            return 1
        print(f"restored stream identical: {restored[0]:,} messages, sha256 {restored[1][:16]}…")
        print(f"total: {time.monotonic() - begun:.1f} s (backup + restore {backup_s + restore_s:.1f} s)")
        return 0
    finally:
        source.stop()
        dest.stop()
        shutil.rmtree(root, ignore_errors=True)


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.events)))
