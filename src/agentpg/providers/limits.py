"""The per-role limits agentpg sets on every tenant login role (issue 18); :mod:`agentpg.access.guard` says
which of them a tenant can and cannot raise, and why."""

from __future__ import annotations

from dataclasses import dataclass

from agentpg.settings import Settings

#: ``client_connection_check_interval`` of tenant roles and of agentpg's tenant connections.
CONNECTION_CHECK_INTERVAL_MS = 1000

Setting = tuple[str, str]


@dataclass(frozen=True)
class TenantLimits:
    """The per-role limits agentpg sets (MB). Raises ValueError unless each is a positive whole number."""

    temp_file_limit_mb: int = 1024
    work_mem_mb: int = 4
    maintenance_work_mem_mb: int = 64

    def __post_init__(self) -> None:
        for name in ("temp_file_limit_mb", "work_mem_mb", "maintenance_work_mem_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive whole number of MB")

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantLimits:
        """``AGENTPG_TENANT_TEMP_FILE_LIMIT_MB``, ``…_WORK_MEM_MB`` and ``…_MAINTENANCE_WORK_MEM_MB``."""
        return cls(temp_file_limit_mb=settings.tenant_temp_file_limit_mb, work_mem_mb=settings.tenant_work_mem_mb,
                   maintenance_work_mem_mb=settings.tenant_maintenance_work_mem_mb)

    def role_settings(self) -> tuple[Setting, ...]:
        """``(name, value)`` pairs every tenant role gets with ``ALTER ROLE … SET`` (values are agentpg's own)."""
        return (("temp_file_limit", f"{self.temp_file_limit_mb}MB"), *self.session_settings())

    def session_settings(self) -> tuple[Setting, ...]:
        """The user-settable limits agentpg's own tenant connections start with (startup packet).

        A startup value overrides the role's defaults, and a tenant can set those for itself (``ALTER ROLE
        CURRENT_USER SET hash_mem_multiplier = 1000``): so every setting that sizes a statement's memory,
        temporary files or workers is named here, at PostgreSQL's own default where agentpg has no other."""
        return (("work_mem", f"{self.work_mem_mb}MB"),
                ("maintenance_work_mem", f"{self.maintenance_work_mem_mb}MB"),
                ("client_connection_check_interval", f"{CONNECTION_CHECK_INTERVAL_MS}ms"),
                *_PINNED_DEFAULTS)


#: PostgreSQL's defaults of the other resource settings a role may set for itself (see session_settings).
_PINNED_DEFAULTS: tuple[Setting, ...] = (
    ("hash_mem_multiplier", "2"), ("temp_buffers", "8MB"), ("max_parallel_workers_per_gather", "2"),
    ("max_parallel_maintenance_workers", "2"), ("logical_decoding_work_mem", "64MB"))
