"""Archive layout and encodings.

An archive is a set of parts under `<backup_id>/` in a target:

- `<backup_id>/streams/<stream>/<index>.chunk.zst`: one chunk, a zstandard frame holding a msgpack
  array `[format, stream, first_seq, last_seq, [record, ...]]`; a record is the array
  `[seq, timestamp_ns, subject, header_block | nil, data]`. A chunk holds at most
  `chunk_max_messages` records and about `chunk_max_bytes` bytes of message data.
- `<backup_id>/progress.json`: the backup's progress record while it runs (what is captured, which
  chunks are complete); a resumed backup continues after its last complete chunk.
- `<backup_id>/manifest.json`: written last, once every chunk is stored; an archive without a
  manifest is incomplete and is neither listed nor restorable. Its optional `volume_snapshots`
  records the CSI VolumeSnapshots of run workspaces taken with the backup; manifests written
  before it existed decode with it unset, and older readers ignore it (unknown fields are skipped),
  so the format version stays 1.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import msgspec
import zstandard

from fabrik_common.backup_rpc import VolumeSnapshots

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"


class ArchiveError(RuntimeError):
    """The archive is incomplete, corrupted or of an unknown format; the message names the part."""


class Record(msgspec.Struct, array_like=True, frozen=True):
    seq: int
    timestamp_ns: int
    subject: str
    headers: bytes | None
    data: bytes


class Chunk(msgspec.Struct, array_like=True, frozen=True):
    format: int
    stream: str
    first_seq: int
    last_seq: int
    records: list[Record]


class PartRef(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    sha256: str
    size: int
    messages: int = 0
    first_seq: int = 0
    last_seq: int = 0
    data_bytes: int = 0


class ConsumerEntry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    config: dict[str, Any]
    delivered_stream_seq: int = 0
    ack_floor_stream_seq: int = 0
    num_ack_pending: int = 0
    num_pending: int = 0


class StreamEntry(msgspec.Struct, kw_only=True):
    """One stream as captured: its configuration and state when the backup started, the sequence
    range the archive holds (`first_seq..last_seq`, the state's last sequence at the start), and
    what was actually read (`messages`, `data_bytes`; messages removed by limits meanwhile are
    absent)."""

    name: str
    config: dict[str, Any]
    state: dict[str, Any]
    first_seq: int
    last_seq: int
    messages: int = 0
    data_bytes: int = 0
    consumers: list[ConsumerEntry] = msgspec.field(default_factory=list)
    parts: list[PartRef] = msgspec.field(default_factory=list)
    next_seq: int = 0
    done: bool = False


class Manifest(msgspec.Struct, kw_only=True):
    format_version: int = FORMAT_VERSION
    backup_id: str
    created_at: datetime
    completed_at: datetime | None = None
    server: dict[str, Any] = msgspec.field(default_factory=dict)
    streams: list[StreamEntry] = msgspec.field(default_factory=list)
    messages: int = 0
    data_bytes: int = 0
    stored_bytes: int = 0
    parts: int = 0
    volume_snapshots: VolumeSnapshots | None = None

    def stream(self, name: str) -> StreamEntry:
        for entry in self.streams:
            if entry.name == name:
                return entry
        raise KeyError(name)


class Progress(Manifest, kw_only=True):
    """A manifest in the making (same shape, `completed_at` unset)."""


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.encode(manifest)


def decode_manifest(data: bytes, part: str = MANIFEST) -> Manifest:
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ArchiveError(f"{part}: not a backup manifest: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ArchiveError(f"{part}: format version {manifest.format_version} is not supported")
    return manifest


def chunk_name(backup_id: str, stream: str, index: int) -> str:
    return f"{backup_id}/streams/{stream}/{index:08d}.chunk.zst"


_chunk_decoder = msgspec.msgpack.Decoder(Chunk)


class ChunkBuilder:
    """Collects records up to a bound, then yields the compressed chunk and its checksum."""

    def __init__(self, stream: str, *, max_messages: int, max_bytes: int, level: int = 3) -> None:
        self.stream = stream
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.records: list[Record] = []
        self.data_bytes = 0
        self.level = level

    def add(self, record: Record) -> bool:
        """Add a record; True when the chunk is full."""
        self.records.append(record)
        self.data_bytes += len(record.data) + len(record.headers or b"") + len(record.subject)
        return len(self.records) >= self.max_messages or self.data_bytes >= self.max_bytes

    def __len__(self) -> int:
        return len(self.records)

    def take(self) -> tuple[list[Record], int]:
        """The collected records and their size; the builder starts over."""
        records, size = self.records, self.data_bytes
        self.records = []
        self.data_bytes = 0
        return records, size

    def seal(self, name: str) -> tuple[bytes, PartRef]:
        records, size = self.take()
        return build_chunk(self.stream, records, size, name, self.level)


def build_chunk(
    stream: str, records: list[Record], data_bytes: int, name: str, level: int
) -> tuple[bytes, PartRef]:
    """The compressed chunk and its manifest entry (thread-safe: runs off the event loop)."""
    body = msgspec.msgpack.encode(Chunk(FORMAT_VERSION, stream, records[0].seq, records[-1].seq, records))
    blob = zstandard.ZstdCompressor(level=level).compress(body)
    ref = PartRef(
        name=name,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        messages=len(records),
        first_seq=records[0].seq,
        last_seq=records[-1].seq,
        data_bytes=data_bytes,
    )
    return blob, ref


def check_part(ref: PartRef, blob: bytes) -> None:
    if len(blob) != ref.size:
        raise ArchiveError(f"{ref.name}: size {len(blob)} does not match the manifest's {ref.size}")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != ref.sha256:
        raise ArchiveError(f"{ref.name}: SHA-256 {digest} does not match the manifest's {ref.sha256}")


def decode_chunk(ref: PartRef, blob: bytes, stream: str) -> list[Record]:
    """Check the part against the manifest and return its records."""
    check_part(ref, blob)
    try:
        body = zstandard.ZstdDecompressor().decompress(blob)
        chunk = _chunk_decoder.decode(body)
    except (zstandard.ZstdError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ArchiveError(f"{ref.name}: cannot be decoded: {exc}") from exc
    records = chunk.records
    if chunk.stream != stream or len(records) != ref.messages:
        raise ArchiveError(
            f"{ref.name}: holds {len(records)} messages of {chunk.stream}, "
            f"expected {ref.messages} of {stream}"
        )
    previous = 0
    for record in records:
        if record.seq <= previous:
            raise ArchiveError(f"{ref.name}: sequence {record.seq} out of order")
        previous = record.seq
    if records and (records[0].seq != ref.first_seq or records[-1].seq != ref.last_seq):
        raise ArchiveError(f"{ref.name}: sequence range does not match the manifest")
    return records
