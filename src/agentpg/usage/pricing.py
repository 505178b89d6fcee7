"""Turning a provider's counters into money.

Prices live in settings (cents), never in code. The defaults are modelled on a serverless Postgres
price list and are meant to be replaced by the operator's own. Costs are kept in micro-cents so that
a sync every few minutes does not round small databases down to zero forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentpg.providers.base import UsageSample

_GB = 1024**3
_HOURS_PER_MONTH = 730.0
MICRO = 1_000_000


@dataclass(frozen=True)
class PriceTable:
    storage_cents_per_gb_month: float = 35.0
    compute_cents_per_hour: float = 16.0
    """Per compute-hour where the provider counts compute time (Neon), else per hour with any activity."""
    written_cents_per_gb: float = 9.6
    transfer_cents_per_gb: float = 9.0
    backup_cents_per_gb_month: float = 20.0
    """Backup storage: a database's share of its server's base backups and WAL (:mod:`.backups`)."""
    bytes_per_written_row: int = 200
    """Where a provider counts rows written but not bytes (a plain Postgres server), the estimate per row."""


def _delta(now: float | int | None, before: float | int | None) -> float:
    """Growth of a running counter; a counter that went backwards was reset, so it counts from zero."""
    if now is None:
        return 0.0
    if before is None or now < before:
        return float(now)
    return float(now - before)


def cost_microcents(prices: PriceTable, before: UsageSample | None, now: UsageSample, elapsed_s: float) -> int:
    """The cost of one database between two samples ``elapsed_s`` seconds apart.

    * storage: the size now, for the elapsed fraction of a month (storage is a size, not a counter);
    * compute: compute-seconds consumed (Neon), or, for a plain server, the whole interval if any
      transaction ran in it (a serverless compute stays up a few minutes after its last query anyway);
    * writes: bytes written (Neon), or rows written times an estimated row size;
    * transfer: bytes sent out, where the provider counts them.
    """
    elapsed_s = max(elapsed_s, 0.0)
    cents = now.storage_bytes / _GB * prices.storage_cents_per_gb_month * elapsed_s / (_HOURS_PER_MONTH * 3600)
    if now.compute_seconds is not None:
        cents += _delta(now.compute_seconds, before.compute_seconds if before else None) / 3600 \
            * prices.compute_cents_per_hour
    elif before is not None and _delta(now.transactions, before.transactions) > 0:
        cents += elapsed_s / 3600 * prices.compute_cents_per_hour
    if now.written_bytes is not None:
        written = _delta(now.written_bytes, before.written_bytes if before else None)
    else:
        written = _delta(now.rows_written, before.rows_written if before else None) * prices.bytes_per_written_row
    cents += written / _GB * prices.written_cents_per_gb
    cents += _delta(now.transfer_bytes, before.transfer_bytes if before else None) / _GB \
        * prices.transfer_cents_per_gb
    return round(cents * MICRO)


def backup_cost_microcents(prices: PriceTable, backup_bytes: int, elapsed_s: float) -> int:
    """The cost of keeping ``backup_bytes`` of backups for ``elapsed_s`` seconds (a size, like storage)."""
    cents = max(backup_bytes, 0) / _GB * prices.backup_cents_per_gb_month * max(elapsed_s, 0.0) \
        / (_HOURS_PER_MONTH * 3600)
    return round(cents * MICRO)
