"""The backup archive: a manifest plus zstandard-compressed chunks of messages (see docs/backup.md)."""

from fabrik_backup.archive.format import (
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    ArchiveError,
    ChunkBuilder,
    ConsumerEntry,
    Manifest,
    PartRef,
    Progress,
    Record,
    StreamEntry,
    chunk_name,
    decode_chunk,
    decode_manifest,
    encode_manifest,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "PROGRESS",
    "ArchiveError",
    "ChunkBuilder",
    "ConsumerEntry",
    "Manifest",
    "PartRef",
    "Progress",
    "Record",
    "StreamEntry",
    "chunk_name",
    "decode_chunk",
    "decode_manifest",
    "encode_manifest",
]
