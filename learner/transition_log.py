"""The learner's write-ahead log of received transitions.

The learner acknowledges a batch of transitions only after it is appended here and fsync'ed, so
an acknowledged transition survives a crash of the learner: on restart, the last checkpoint's
replay buffers are loaded and the log written since is replayed into them (duplicates are
dropped by their (actor, episode, step) numbers).

Format: a directory of segment files ``segment-<n>.log`` (n increasing). Each record is

    uint32 little-endian  payload length
    uint32 little-endian  CRC-32 of the payload
    payload               a serialised ``steerl.v1.TransitionBatch``

A torn record at the end of a segment (a crash mid-write) fails its length or CRC check and ends
the replay of that segment with a warning. A checkpoint calls :meth:`TransitionLog.rotate` first
and :meth:`TransitionLog.drop_before` once it is safely on disk.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from transport import steerl_pb2 as pb

log = logging.getLogger("steerl.learner")

_HEADER = struct.Struct("<II")


def _segment_index(path: Path) -> int:
    return int(path.stem.split("-")[1])


class TransitionLog:
    """Append-only, fsync'ed, segmented log of TransitionBatch messages."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.segments()
        self._index = _segment_index(existing[-1]) + 1 if existing else 0
        self._file = open(self._path(self._index), "ab")

    def _path(self, index: int) -> Path:
        return self.directory / f"segment-{index:08d}.log"

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("segment-*.log"), key=_segment_index)

    @property
    def current_segment(self) -> int:
        return self._index

    def append(self, batch: pb.TransitionBatch, sync: bool = True) -> None:
        """Write one batch; durable once this returns with ``sync`` (or after :meth:`sync`)."""
        payload = batch.SerializeToString()
        self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        if sync:
            self.sync()

    def sync(self) -> None:
        """Flush and fsync what was appended (one fsync for a group of appends)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def rotate(self) -> int:
        """Start a new segment; returns its index (everything before it is in older segments)."""
        self._file.close()
        self._index += 1
        self._file = open(self._path(self._index), "ab")
        return self._index

    def drop_before(self, index: int) -> None:
        """Delete the segments older than ``index`` (their content is in a checkpoint)."""
        for path in self.segments():
            if _segment_index(path) < index:
                path.unlink()

    def replay(self) -> Iterator[pb.TransitionBatch]:
        """Every intact batch in every segment, oldest first."""
        for path in self.segments():
            with open(path, "rb") as segment:
                data = segment.read()
            offset = 0
            while offset < len(data):
                if offset + _HEADER.size > len(data):
                    log.warning("%s: torn record header at byte %d; rest of segment ignored", path, offset)
                    break
                length, crc = _HEADER.unpack_from(data, offset)
                payload = data[offset + _HEADER.size: offset + _HEADER.size + length]
                if len(payload) != length or zlib.crc32(payload) != crc:
                    log.warning("%s: corrupt record at byte %d; rest of segment ignored", path, offset)
                    break
                yield pb.TransitionBatch.FromString(payload)
                offset += _HEADER.size + length

    def close(self) -> None:
        self._file.close()
