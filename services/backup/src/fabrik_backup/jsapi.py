"""JetStream as the backup needs it: raw JSON API requests, raw header blocks, pipelined publishing.

The backup keeps stream and consumer configurations as the server reports them (JSON objects), so
that fields of newer servers survive a round trip, and keeps each message's header block as the
bytes the server stored, so that header order, case and repeated keys are restored exactly (the
client's own header parser would turn them into a dict).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

API = "$JS.API"
Json = dict[str, Any]


class JetStreamApiError(RuntimeError):
    def __init__(self, subject: str, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{subject}: {description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


class _FastParser(Parser):
    """The client's protocol parser with `MSG`/`HMSG` lines split without regular expressions
    (the bulk of a backup's traffic), also when a payload is split across socket reads; any other
    line goes through the standard parser."""

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        headers: bytes | None
        while buf:
            if self.state == AWAITING_MSG_PAYLOAD:
                needed = self.needed
                if len(buf) < needed + 2:
                    return
                header_needed = self.header_needed
                payload = bytes(buf[header_needed:needed])
                headers = bytes(buf[:header_needed]) if header_needed else None
                del buf[: needed + 2]
                self.header_needed = 0
                self.state = AWAITING_CONTROL_LINE
                arg = self.msg_arg
                await self.nc._process_msg(arg["sid"], arg["subject"], arg["reply"], payload, headers)
                continue
            if buf.startswith(b"HMSG "):
                skip = 5
            elif buf.startswith(b"MSG "):
                skip = 4
            else:
                await super().parse()
                return
            end = buf.find(b"\r\n")
            if end < 0:
                return  # the line is not complete yet
            fields = bytes(buf[skip:end]).split()
            if skip == 5 and len(fields) in (4, 5):
                header_needed = int(fields[-2])
            elif skip == 4 and len(fields) in (3, 4):
                header_needed = 0
            else:
                await super().parse()
                return
            subject, sid = fields[0], int(fields[1])
            reply = fields[2] if len(fields) == (5 if skip == 5 else 4) else b""
            needed = int(fields[-1])
            start = end + 2
            if len(buf) < start + needed + 2:
                # The payload is still on its way: the standard state machine completes it.
                self.msg_arg["subject"] = subject
                self.msg_arg["sid"] = sid
                self.msg_arg["reply"] = reply
                self.needed = needed
                self.header_needed = header_needed
                del buf[:start]
                self.state = AWAITING_MSG_PAYLOAD
                return
            if header_needed:
                headers = bytes(buf[start : start + header_needed])
                payload = bytes(buf[start + header_needed : start + needed])
            else:
                headers = None
                payload = bytes(buf[start : start + needed])
            del buf[: start + needed + 2]
            await self.nc._process_msg(sid, subject, reply, payload, headers)


Sink = Callable[[bytes, bytes, bytes, bytes], None]
"""Receives (subject, reply, payload, header block) of each message of a fast subscription."""


class RawClient(Client):
    """A NATS client that can publish a header block unchanged and hand a subscription's messages
    straight to a function — subject, reply, payload and the header block as the server sent it,
    with no `Msg`, no queue and no task switch per message — for bulk reading and acks."""

    def __init__(self) -> None:
        super().__init__()
        self._sinks: dict[int, Sink] = {}
        self._ps = _FastParser(self)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        sink = self._sinks.get(sid)
        if sink is not None:
            self.stats["in_msgs"] += 1
            self.stats["in_bytes"] += len(data)
            sink(subject, reply, data, headers)
            return
        await super()._process_msg(sid, subject, reply, data, headers)

    async def fast_subscribe(self, subject: str, sink: Sink) -> Subscription:
        sub = await self.subscribe(subject)
        self._sinks[sub._id] = sink
        return sub

    async def fast_unsubscribe(self, sub: Subscription) -> None:
        self._sinks.pop(sub._id, None)
        await sub.unsubscribe()

    async def publish_raw(self, subject: str, payload: bytes, headers: bytes | None, reply: str) -> None:
        """Publish with the header block `headers` (as stored by the server) byte for byte."""
        await self.send_raw(subject, payload, headers, reply)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def send_raw(self, subject: str, payload: bytes, headers: bytes | None, reply: str) -> None:
        """Queue a publish without flushing (the client flushes when its buffer fills, or on flush())."""
        if headers:
            cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                subject.encode(),
                reply.encode(),
                len(headers),
                len(headers) + len(payload),
                headers,
                payload,
            )
        else:
            cmd = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += len(payload)
        await self._send_command(cmd)

    async def flush_pending(self) -> None:
        await self._flush_pending()


async def connect_raw(url: str, name: str = "fabrik-backup", *, reconnect_forever: bool = False) -> RawClient:
    nc = RawClient()
    await nc.connect(
        servers=url.split(","),
        name=name,
        connect_timeout=2,
        max_reconnect_attempts=-1 if reconnect_forever else 5,
    )
    return nc


async def request(
    nc: Client, subject: str, body: Mapping[str, Any] | None = None, wait: float = 10.0
) -> Json:
    """One JetStream API request; an error response raises `JetStreamApiError`."""
    payload = json.dumps(body).encode() if body is not None else b""
    try:
        msg = await nc.request(subject, payload, timeout=wait)
    except nats.errors.NoRespondersError as exc:
        raise JetStreamApiError(subject, 503, 0, "JetStream not available") from exc
    data: Json = json.loads(msg.data)
    error = data.get("error")
    if error:
        raise JetStreamApiError(
            subject,
            int(error.get("code", 0)),
            int(error.get("err_code", 0)),
            str(error.get("description", "")),
        )
    return data


async def stream_names(nc: Client) -> list[str]:
    names: list[str] = []
    offset = 0
    while True:
        data = await request(nc, f"{API}.STREAM.NAMES", {"offset": offset})
        page = data.get("streams") or []
        names.extend(page)
        offset += len(page)
        if not page or offset >= int(data.get("total", 0)):
            return sorted(names)


async def stream_info(nc: Client, name: str) -> Json | None:
    """The stream's `{config, state, ...}`, or None when it does not exist."""
    try:
        return await request(nc, f"{API}.STREAM.INFO.{name}")
    except JetStreamApiError as exc:
        if exc.code == 404:
            return None
        raise


async def consumers(nc: Client, stream: str) -> list[Json]:
    found: list[Json] = []
    offset = 0
    while True:
        data = await request(nc, f"{API}.CONSUMER.LIST.{stream}", {"offset": offset})
        page = data.get("consumers") or []
        found.extend(page)
        offset += len(page)
        if not page or offset >= int(data.get("total", 0)):
            return found


async def create_stream(nc: Client, config: Json) -> Json:
    return await request(nc, f"{API}.STREAM.CREATE.{config['name']}", config)


async def update_stream(nc: Client, config: Json) -> Json:
    return await request(nc, f"{API}.STREAM.UPDATE.{config['name']}", config)


async def delete_stream(nc: Client, name: str) -> None:
    await request(nc, f"{API}.STREAM.DELETE.{name}")


async def purge_stream(nc: Client, name: str, **params: Any) -> Json:
    return await request(nc, f"{API}.STREAM.PURGE.{name}", params, wait=60.0)


async def create_consumer(nc: Client, stream: str, config: Json) -> Json:
    name = config.get("durable_name") or config.get("name")
    subject = f"{API}.CONSUMER.CREATE.{stream}.{name}" if name else f"{API}.CONSUMER.CREATE.{stream}"
    return await request(nc, subject, {"stream_name": stream, "config": config})


async def delete_consumer(nc: Client, stream: str, name: str) -> None:
    await request(nc, f"{API}.CONSUMER.DELETE.{stream}.{name}")


def ack_metadata(reply: str | bytes) -> tuple[int, int, int]:
    """(stream sequence, timestamp in ns, pending) from a JetStream delivery's reply subject."""
    tokens = reply.split(b"." if isinstance(reply, bytes) else ".")  # type: ignore[arg-type]
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[7]), int(tokens[8])
    if (
        len(tokens) >= 12
    ):  # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<token>
        return int(tokens[7]), int(tokens[9]), int(tokens[10])
    raise ValueError(f"not a JetStream delivery: {reply!r}")


class Puller:
    """Reads a consumer's deliveries in bulk with pipelined pull requests (at most `depth` batches
    outstanding), through a fast subscription: deliveries accumulate as raw tuples and are taken
    a whole socket read at a time."""

    def __init__(
        self, nc: RawClient, stream: str, consumer: str, *, batch: int = 2000, depth: int = 4
    ) -> None:
        self.nc = nc
        self.depth = depth
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        self._inbox = nc.new_inbox()
        self._buffer: list[tuple[bytes, bytes, bytes, bytes]] = []
        self._ready = asyncio.Event()
        self._sub: Subscription | None = None
        self._outstanding = 0
        self._ended = False

    def _sink(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if reply:
            self._buffer.append((subject, reply, data, headers))
            self._outstanding -= 1
        elif not headers.startswith(b"NATS/1.0 100"):
            # 404 no messages, 408 request expired, 409 limits: that pull is over.
            self._outstanding = 0
            self._ended = True
        self._ready.set()

    async def start(self) -> None:
        self._sub = await self.nc.fast_subscribe(self._inbox, self._sink)

    async def _pull(self) -> None:
        body = {"batch": self.batch, "expires": 2_000_000_000}
        await self.nc.publish(
            f"{API}.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
            json.dumps(body).encode(),
            reply=self._inbox,
        )
        self._outstanding += self.batch

    async def next_batch(self, wait: float = 10.0) -> list[tuple[bytes, bytes, bytes, bytes]]:
        """The deliveries received so far (waiting for at least one); empty when a pull ended
        without any (nothing more to read right now)."""
        while True:
            while self._outstanding <= self.batch * (self.depth - 1):
                await self._pull()
            if not self._buffer:
                self._ready.clear()
                if self._ended:
                    self._ended = False
                    return []
                await asyncio.wait_for(self._ready.wait(), wait)
            if self._buffer:
                out, self._buffer = self._buffer, []
                self._ended = False
                return out

    async def stop(self) -> None:
        if self._sub is not None:
            await self.nc.fast_unsubscribe(self._sub)
            self._sub = None
