"""Latency and throughput the llm-proxy adds, against the same fake upstream called directly.

    uv run python bench/llm_proxy.py [--seconds S] [--rounds R] [--delay-ms D] [--stream] [--limits]

Starts its own nats-server (temporary store, free port), a fake OpenAI upstream in its own
process (`FakeUpstream`, answering after D ms, default 20: an upstream that answers in zero
time measures nothing but which side has more CPU), and the llm-proxy as its own process
(uvloop, httptools) routing model `bench` to that upstream with a run key, prices and usage
events on (every call publishes its `LlmUsage` to JetStream and adds to the project's spend
in the `limits` KV). The load generator (this process, aiohttp) keeps C requests in flight for
S seconds per measurement, at C = 1, 16 and 64, against the upstream directly and through the
proxy, alternating which goes first, R rounds; medians over rounds are reported:

* requests/s, p50 and p99 latency of both, the added p50/p99 (proxy - direct) and the ratio
  of requests/s (aim: added p50 <= 1 ms and p99 <= 5 ms at C=16, >= 80% of direct requests/s);
* the proxy's own `X-Fabrik-Overhead-Ms` header (p50/p99), time spent in the proxy itself.

`--limits` adds per-project and per-run requests/tokens-per-minute limits high enough never to
refuse, so every call also makes the exact (compare-and-set) KV reservation. `--stream` measures
streamed chat completions (latency to the last byte). The machine is shared by all four
processes; figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from fabrik_common.ids import new_ulid
from fabrik_common.natsserver import NatsServer, free_port
from fabrik_common.runkeys import issue_run_key
from fabrik_common.testing import ServiceProcess

SECRET = "bench-secret-0123456789abcdefghij"
CONCURRENCY = (1, 16, 64)
AIM_P50_MS, AIM_P99_MS, AIM_RATIO = 1.0, 5.0, 0.80


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    overheads: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0  # CPU seconds of the server process (proxy or upstream) during the run

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu / len(self.latencies) * 1e6 if self.latencies else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def overhead_pct(self, q: float) -> float:
        if not self.overheads:
            return float("nan")
        ordered = sorted(self.overheads)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(
    url: str,
    headers: dict[str, str],
    body: bytes,
    concurrency: int,
    seconds: float,
    stream: bool,
    pid: int = 0,
) -> Sample:
    sample = Sample()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = 0.0

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        if stream:
                            async for _ in resp.content.iter_any():
                                pass
                        else:
                            await resp.read()
                        if resp.status != 200:
                            sample.errors += 1
                            continue
                        overhead = resp.headers.get("x-fabrik-overhead-ms")
                except aiohttp.ClientError:
                    sample.errors += 1
                    continue
                sample.latencies.append(time.perf_counter() - started)
                if overhead is not None:
                    sample.overheads.append(float(overhead))

        # Warm the connection pool, then measure.
        stop_at = time.perf_counter() + min(0.5, seconds / 4)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        sample = Sample()
        cpu_before = cpu_seconds(pid) if pid else 0.0
        begin = time.perf_counter()
        stop_at = begin + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        sample.seconds = time.perf_counter() - begin
        sample.server_cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
    return sample


def serve_upstream(port: int, delay_ms: float) -> None:
    """Child-process mode: the fake upstream, until killed."""
    from fabrik_llm_proxy.testing.fakes import FakeUpstream

    async def run() -> None:
        fake = FakeUpstream(name="bench", delay=delay_ms / 1000)
        fake.record = False
        fake.port = port
        await fake.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


async def wait_port(port: int, patience: float = 20.0) -> None:
    deadline = time.monotonic() + patience
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--limits", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="*", default=list(CONCURRENCY))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fabrik-bench-llm-"))
    nats = NatsServer(tmp / "nats")
    nats.start()
    upstream_port = free_port()
    upstream = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-upstream", str(upstream_port), str(args.delay_ms)
    )
    proxy: ServiceProcess | None = None
    try:
        await wait_port(upstream_port)
        config: dict[str, object] = {
            "models": {
                "bench": [
                    {
                        "provider": "openai",
                        "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                        "model": "gpt-4o-mini",
                        "keys": "bench",
                    }
                ]
            }
        }
        if args.limits:
            config["limits"] = {"project": {"rpm": 10_000_000, "tpm": 10**12}, "run": {"rpm": 10_000_000}}
        (tmp / "llm.json").write_text(json.dumps(config))
        (tmp / "keys").mkdir()
        (tmp / "keys" / "bench").write_text("sk-bench-upstream-key\n")
        proxy = ServiceProcess(
            "fabrik_llm_proxy",
            {
                "FABRIK_NATS_URL": nats.url,
                "FABRIK_LLM_CONFIG_FILE": str(tmp / "llm.json"),
                "FABRIK_LLM_KEYS_DIR": str(tmp / "keys"),
                "FABRIK_RUN_KEY_SECRET": SECRET,
                "FABRIK_LOG_LEVEL": "WARNING",
            },
            log_path=tmp / "proxy.log",
        )
        await asyncio.to_thread(proxy.start, 60)
        assert proxy.proc is not None
        proxy_pid = proxy.proc.pid
        key = issue_run_key(
            SECRET.encode(),
            run_id=new_ulid(),
            project="bench",
            budget_usd=1e9,
            expires_at=datetime.now(UTC) + timedelta(hours=2),
        )
        payload: dict[str, object] = {
            "model": "bench",
            "messages": [
                {"role": "system", "content": "You are a helpful coding agent."},
                {"role": "user", "content": "Write a function that adds two numbers. " * 8},
            ],
        }
        if args.stream:
            payload["stream"] = True
        body = json.dumps(payload).encode()
        direct_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
        proxy_url = f"{proxy.base_url}/v1/chat/completions"
        direct_headers = {"Authorization": "Bearer sk-bench-upstream-key", "Content-Type": "application/json"}
        proxy_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

        mode = "streamed" if args.stream else "buffered"
        print(
            f"llm-proxy benchmark: upstream delay {args.delay_ms:g} ms, {mode} chat completions, "
            f"{args.seconds:g} s per measurement, {args.rounds} rounds, "
            f"limits {'on' if args.limits else 'off'}, cpus {os.cpu_count()}"
        )
        header = (
            f"{'c':>3} {'direct rps':>10} {'proxy rps':>10} {'ratio':>6} {'direct p50':>10} {'proxy p50':>9} "
            f"{'direct p99':>10} {'proxy p99':>9} {'added p50':>9} {'added p99':>9} "
            f"{'ovh p50':>7} {'ovh p99':>7} {'cpu/req':>8} {'err':>4}"
        )
        print(header)
        verdicts: list[str] = []
        upstream_cpu: list[str] = []
        for concurrency in args.concurrency:
            rows: dict[str, list[Sample]] = {"direct": [], "proxy": []}
            for round_no in range(args.rounds):
                order = ("direct", "proxy") if round_no % 2 == 0 else ("proxy", "direct")
                for target in order:
                    if target == "direct":
                        url, headers, pid = direct_url, direct_headers, upstream.pid
                    else:
                        url, headers, pid = proxy_url, proxy_headers, proxy_pid
                    rows[target].append(
                        await load(url, headers, body, concurrency, args.seconds, args.stream, pid)
                    )
            d_rps = median([s.rps for s in rows["direct"]])
            p_rps = median([s.rps for s in rows["proxy"]])
            d50 = median([s.pct(0.50) for s in rows["direct"]])
            p50 = median([s.pct(0.50) for s in rows["proxy"]])
            d99 = median([s.pct(0.99) for s in rows["direct"]])
            p99 = median([s.pct(0.99) for s in rows["proxy"]])
            o50 = median([s.overhead_pct(0.50) for s in rows["proxy"]])
            o99 = median([s.overhead_pct(0.99) for s in rows["proxy"]])
            errors = sum(s.errors for s in rows["direct"] + rows["proxy"])
            cpu_proxy = median([s.cpu_us_per_request for s in rows["proxy"]])
            cpu_upstream = median([s.cpu_us_per_request for s in rows["direct"]])
            ratio = p_rps / d_rps if d_rps else float("nan")
            print(
                f"{concurrency:>3} {d_rps:>10.0f} {p_rps:>10.0f} {ratio:>6.0%} {d50:>9.2f}m {p50:>8.2f}m "
                f"{d99:>9.2f}m {p99:>8.2f}m {p50 - d50:>8.2f}m {p99 - d99:>8.2f}m {o50:>7.3f} {o99:>7.3f} "
                f"{cpu_proxy:>6.0f}us {errors:>4}"
            )
            upstream_cpu.append(f"c={concurrency}: {cpu_upstream:.0f} us")
            if concurrency == 16:
                ok = p50 - d50 <= AIM_P50_MS and p99 - d99 <= AIM_P99_MS and ratio >= AIM_RATIO
                aim = f"added p50 <= {AIM_P50_MS:g} ms, p99 <= {AIM_P99_MS:g} ms, >= {AIM_RATIO:.0%} rps"
                verdicts.append(f"aim at c=16 ({aim}): " + ("met" if ok else "NOT met"))
        print(
            "(ms; 'ovh' = the proxy's X-Fabrik-Overhead-Ms header, time spent in the proxy itself; "
            "'cpu/req' = CPU time of the proxy process per request, insensitive to other load)"
        )
        print("for scale, CPU per request of the fake upstream (aiohttp.web): " + ", ".join(upstream_cpu))
        for verdict in verdicts:
            print(verdict)
    finally:
        if proxy is not None:
            proxy.kill()
        upstream.kill()
        await upstream.wait()
        nats.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-upstream":
        serve_upstream(int(sys.argv[2]), float(sys.argv[3]))
    else:
        raise SystemExit(asyncio.run(main()))
