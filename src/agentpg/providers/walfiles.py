"""What a server's backup directory holds: base backups (with agentpg's metadata) and streamed WAL segments.

Layout of ``<backup_dir>/<server>/`` (0700, owned by the user agentpg runs as):

* ``wal/`` — segments written by ``pg_receivewal`` (the newest one ``.partial`` while it is being filled);
* ``base/<label>/`` — one ``pg_basebackup`` each, complete once ``agentpg-backup.json`` is in it (written
  last); in-progress ones live in ``base/.tmp-<label>`` and are deleted by the next run;
* ``home/`` — copies of what disaster recovery needs besides the data (admin password, key, admin token).

Pure file logic, no server: shared by the archiver (:mod:`.archive`) and the restore (:mod:`.pitr`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

META = "agentpg-backup.json"
_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class Segment:
    path: Path
    timeline: int
    segno: int
    partial: bool

    @property
    def name(self) -> str:
        """The segment's name without ``.partial`` (what the server looks for in pg_wal)."""
        return self.path.name.removesuffix(".partial")


def segments(wal_dir: Path, seg_size: int) -> list[Segment]:
    """The WAL segments in ``wal_dir``, oldest first."""
    per_id = 0x100000000 // seg_size
    found: list[Segment] = []
    try:
        names = os.listdir(wal_dir)
    except FileNotFoundError:
        return []
    for name in names:
        match = _SEGMENT.match(name)
        if match:
            segno = int(match.group(2), 16) * per_id + int(match.group(3), 16)
            found.append(Segment(wal_dir / name, int(match.group(1), 16), segno, bool(match.group(4))))
    return sorted(found, key=lambda s: (s.segno, s.timeline, s.partial))


def contiguous_from(found: Sequence[Segment], first: int) -> list[Segment]:
    """The unbroken run of segments starting at segment number ``first`` (empty when it is missing)."""
    run: list[Segment] = []
    expected = first
    for seg in found:
        if seg.segno < expected:
            continue
        if seg.segno != expected:
            break
        run.append(seg)
        expected += 1
    return run


@dataclass(frozen=True)
class BaseBackup:
    """One complete base backup and what agentpg recorded about it."""

    path: Path
    label: str
    incremental_of: str | None
    start_lsn: int
    end_lsn: int
    timeline: int
    started: datetime
    finished: datetime
    databases: dict[str, int]
    """Database name → oid on the server when the backup started (which ``base/<oid>`` is which)."""
    seg_size: int

    @property
    def start_segno(self) -> int:
        return self.start_lsn // self.seg_size

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "incremental_of": self.incremental_of,
                "start_lsn": format_lsn(self.start_lsn), "end_lsn": format_lsn(self.end_lsn),
                "timeline": self.timeline, "started": self.started.isoformat(),
                "finished": self.finished.isoformat(), "databases": self.databases, "seg_size": self.seg_size}

    @classmethod
    def load(cls, path: Path) -> BaseBackup | None:
        try:
            data = json.loads((path / META).read_text())
            return cls(path=path, label=str(data["label"]), incremental_of=data.get("incremental_of"),
                       start_lsn=parse_lsn(data["start_lsn"]), end_lsn=parse_lsn(data["end_lsn"]),
                       timeline=int(data["timeline"]), started=datetime.fromisoformat(data["started"]),
                       finished=datetime.fromisoformat(data["finished"]),
                       databases={str(k): int(v) for k, v in data["databases"].items()},
                       seg_size=int(data["seg_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def wal_range(manifest: Path) -> tuple[int, int, int]:
    """(timeline, start LSN, end LSN) of the WAL a base backup needs, from its ``backup_manifest``."""
    ranges = json.loads(manifest.read_text())["WAL-Ranges"]
    first, last = ranges[0], ranges[-1]
    return int(last["Timeline"]), parse_lsn(first["Start-LSN"]), parse_lsn(last["End-LSN"])


def base_backups(base_dir: Path) -> list[BaseBackup]:
    """Complete base backups, oldest first."""
    try:
        entries = sorted(p for p in base_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    loaded = [BaseBackup.load(p) for p in entries]
    return sorted((b for b in loaded if b is not None), key=lambda b: b.start_lsn)


def chain(backup: BaseBackup, by_label: dict[str, BaseBackup]) -> list[BaseBackup] | None:
    """The full backup ``backup`` builds on, then each incremental up to it; None if a link is missing."""
    links = [backup]
    while links[0].incremental_of is not None:
        parent = by_label.get(links[0].incremental_of)
        if parent is None:
            return None
        links.insert(0, parent)
    return links


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def utcnow() -> datetime:
    return datetime.now(UTC)


def write_private(path: Path, data: bytes) -> None:
    """Atomically write a 0600 file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
