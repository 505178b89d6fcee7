"""libpq's protocol trace (``PQtrace``) read back as round trips: what the client sent, one run of messages
per round trip (the messages it sends before it reads the server's answers). Shared by the tests that count
round trips on the wire (catalog reads, the REST rows page)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from psycopg import pq


class WireLog:
    """libpq's trace of every connection handed to :meth:`attach`, in one file, read back per operation."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="agentpg-wire-")
        os.close(fd)
        self.path = Path(name)
        self._files: list[Any] = []

    def attach(self, pgconn: Any) -> None:
        f = self.path.open("ab", buffering=0)
        self._files.append(f)  # libpq writes through its own FILE*; keep ours open alongside
        pgconn.trace(os.dup(f.fileno()))
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def mark(self) -> int:
        return self.path.stat().st_size

    def sent_since(self, mark: int) -> list[list[str]]:
        """What the client sent since ``mark``, one list of messages per round trip. libpq flushes its trace
        whenever it sends, so every message sent is in the file already (answers may lag: not needed)."""
        trips: list[list[str]] = []
        run: list[str] | None = None
        for line in self.path.read_bytes()[mark:].decode("utf-8", "replace").splitlines():
            direction, _, rest = line.partition("\t")
            if direction not in ("F", "B"):  # a statement's text goes on over several lines
                if run is not None:
                    run[-1] += "\n" + line
                continue
            if direction == "F":
                if run is None:
                    run = []
                    trips.append(run)
                run.append(rest.partition("\t")[2])  # drop the length: "Query\t \"BEGIN\""
            elif direction == "B":
                run = None
        return trips

    def close(self) -> None:
        for f in self._files:
            f.close()
        self.path.unlink(missing_ok=True)

    def trips_text(self, mark: int) -> list[str]:
        """:meth:`sent_since`, each round trip's messages as one text (for ``in`` checks and messages)."""
        return ["\n".join(trip) for trip in self.sent_since(mark)]
