"""A memory bound for every process of the embedded server, set when the server starts and inherited at fork.

PostgreSQL bounds a statement's sorts and hashes by ``work_mem`` but not its memory: a tenant may raise
``work_mem`` itself (a user setting), and a single row of three 500 MB values, a plpgsql array or a string
built in a loop take what they take. Past the machine's memory the kernel's OOM killer ends a backend with
SIGKILL, and PostgreSQL answers any backend killed that way by restarting every session of the server: one
tenant's statement would cut off every other tenant.

The bound turns that into an ordinary error for the one statement. ``RLIMIT_AS`` caps a process's address
space; the server is started under it (``pg_ctl`` through ``/bin/sh``'s ``ulimit -v``, which pg_ctl itself
uses to start the postmaster), so every process the postmaster forks inherits it: client backends, parallel
workers, autovacuum workers, with no window between a connection and its limit. A backend whose allocation
fails raises ``ERROR: out of memory`` (SQLSTATE 53200), rolls back, and lives on. The limit is the server's
shared memory (``postgres -C shared_memory_size``: every backend maps it) plus :data:`CODE_MB` for code and
libraries plus the allowance, so the allowance is what one process may add on top of what it starts with.
Soft and hard limits are both set: nothing a tenant runs can raise it (nor could it call ``setrlimit``).

It bounds one process, not a user: a user's memory is at most its backends (the connection governor's share
and the role's ``CONNECTION LIMIT``) times the allowance. It is set at start only: changing the rlimit of a
running server's processes needs ``CAP_SYS_RESOURCE``, which root does not always have (containers drop it),
so a server already running keeps the limit it started with (:func:`address_space_limit` tells which). The
embedded build has no JIT (LLVM would map address space of its own).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_BACKEND_MEMORY_MB = 1536
"""Memory (MB of address space) each server process may use beyond its shared memory and code, by default
(``AGENTPG_EMBEDDED_BACKEND_MEMORY_MB``). Sending a value costs the server several copies of it (the value,
its row, its text, the message buffer): a 200 MB value needs ~1.2 GB and fits; one row of three 500 MB values
(measured: fits in 2 GB, not in 1.5 GB) does not."""
CODE_MB = 64
"""Address space of the server's code, libraries and locale data beyond its shared memory (measured: ~13 MB)."""


def start_command(argv: list[str], limit_kib: int) -> list[str]:
    """``argv`` run under an address-space limit of ``limit_kib`` (soft and hard), through ``/bin/sh``."""
    return ["/bin/sh", "-c", 'ulimit -v "$0" && exec "$@"', str(limit_kib), *argv]


def limit_kib(shared_memory_mb: int, allowance_mb: int) -> int:
    """The address-space limit for a server whose shared memory is ``shared_memory_mb``."""
    return (shared_memory_mb + CODE_MB + allowance_mb) * 1024


def parse_shared_memory_mb(output: str) -> int | None:
    """``postgres -C shared_memory_size``'s answer ("150", in MB), or ``None`` if it is not a number."""
    text = output.strip().splitlines()[-1].strip() if output.strip() else ""
    text = text.removesuffix("MB")
    return int(text) if text.isdigit() else None


def address_space_limit(pid: int) -> int | None:
    """``pid``'s address-space limit in bytes from ``/proc/<pid>/limits`` (readable by anyone); ``None`` when
    unlimited or unreadable."""
    try:
        lines = Path(f"/proc/{pid}/limits").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("Max address space"):
            soft = line[len("Max address space"):].split()[0]
            return int(soft) if soft.isdigit() else None
    return None
