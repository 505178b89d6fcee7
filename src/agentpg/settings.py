"""Settings from the environment (``AGENTPG_*``), built once per process by the edge that needs them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agentpg.embedded_memory import DEFAULT_BACKEND_MEMORY_MB


def default_home() -> Path:
    """Where agentpg keeps its data when ``AGENTPG_HOME`` is unset.

    As root the embedded server runs as an unprivileged OS user that must be able to traverse to its data
    directory, and root's home is 0700, so root gets the conventional service location ``/var/lib/agentpg``;
    everybody else gets their per-user data directory.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/agentpg")
    return Path(platformdirs.user_data_dir("agentpg"))


class Settings(BaseSettings):
    """Every knob agentpg has. Secrets are ``SecretStr`` so they never print in a repr or a log."""

    model_config = SettingsConfigDict(env_prefix="AGENTPG_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    postgres_url: SecretStr | None = None
    """Admin DSN of an existing server; unset means the embedded server under ``home``."""
    catalog_url: SecretStr | None = None
    """DSN of agentpg's own metadata database; unset means database ``catalog_database`` on the server."""
    catalog_database: str = "agentpg_catalog"
    secret_key: SecretStr | None = None
    """Base64 of a 32-byte master key; unset means a 0600 key file under ``home`` made on first start."""
    admin_token: SecretStr | None = None
    postgres_os_user: str = "nobody"
    """The unprivileged OS user the embedded server runs as when agentpg runs as root."""
    embedded_fsync: bool = True
    embedded_max_connections: int = Field(default=400, ge=20, le=10_000)
    """``max_connections`` of the embedded server (a third of it, at most 40, is kept for superusers)."""
    embedded_backend_memory_mb: int = Field(default=DEFAULT_BACKEND_MEMORY_MB, ge=0, le=1_048_576)
    """Memory (MB of address space) each process of the embedded server may use beyond what it starts with
    (shared memory, code): a statement over it fails with "out of memory" instead of the kernel killing a
    backend, which restarts every session of the server. Set when the embedded server starts; 0 = none."""
    embedded_autovacuum_pace_s: float = Field(default=2.0, ge=0, le=3600)
    """On the embedded server, ``serve`` keeps autovacuum's worker starts at most one per this many seconds
    (``autovacuum_naptime`` = databases x this, between 60 s and 2 h); 0 leaves PostgreSQL's default."""
    cpu_demoted_nice: int = Field(default=10, ge=0, le=19)
    """On the embedded server, ``serve`` lowers the scheduling priority (to this ``nice``) of the backends of a
    user using more than its share of the CPU, so other users' statements run first (lifecycle/cpu_shares.py;
    0: off)."""
    cpu_groups: bool = True
    """Where the host has a writable cgroup v1 ``cpu`` controller (root, as ``serve`` runs by default), each
    user's backends go into a control group of the user's own, so the CPU is shared per user, not per backend
    (lifecycle/cpu_groups.py); off, or where there is none: each backend is reniced."""
    cpu_demoted_idle: bool = False
    """With per-user groups, a demoted user's group is put in the kernel's idle class (``cpu.idle``) instead of
    given the demoted nice's weight: any other user's waking statement then takes a core from it at once."""
    serve_nice: int = Field(default=-10, ge=-20, le=19)
    """With the embedded server (and CPU shares on), ``serve`` runs at this ``nice``, so answering every user
    comes before any tenant's statements on the shared cores; negative needs root (``CAP_SYS_NICE``), without
    it ``serve`` keeps its priority. 0: left as it is."""
    cpu_shares_interval_s: float = Field(default=0.5, gt=0, le=60)
    """How often ``serve`` measures the embedded server's CPU use per user."""
    tenant_connection_limit: int = Field(default=20, ge=1, le=1000)
    """CONNECTION LIMIT of every tenant login role."""
    tenant_temp_file_limit_mb: int = Field(default=1024, ge=1, le=1_048_576)
    """``temp_file_limit`` of every tenant login role (MB of temporary files one session may hold at once; a
    superuser-only setting, so the agent cannot raise it). Applies to roles created from then on."""
    tenant_work_mem_mb: int = Field(default=4, ge=1, le=65_536)
    """``work_mem`` default of tenant roles and agentpg's tenant connections (a default: Postgres lets any role
    SET it; see docs/limits.md)."""
    tenant_maintenance_work_mem_mb: int = Field(default=64, ge=1, le=65_536)
    """``maintenance_work_mem`` default of tenant roles and agentpg's tenant connections (a default, as above)."""
    tenant_extensions: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [
        "vector", "pg_trgm", "citext", "hstore", "ltree", "fuzzystrmatch", "unaccent", "btree_gin", "btree_gist",
        "pgcrypto"])
    """Extensions agentpg installs (as its admin) in every tenant database, comma-separated; one the server
    lacks is skipped and reported. Some can never be listed (dblink, postgres_fdw, …: providers/extensions.py).
    Databases made before the list grew get the new ones with ``agentpg reconcile --upgrade``."""
    warm_pool_size: int = Field(default=8, ge=0, le=1000)
    """Ready-made databases ``agentpg serve`` always keeps so registration only claims one; 0 disables the pool.
    The pool grows above this to absorb the busiest recent burst (issue 22), up to ``warm_pool_max``."""
    warm_pool_max: int = Field(default=64, ge=0, le=10_000)
    """The pool's disk budget, in databases: an empty PostgreSQL 18 database takes about 7.6 MB, so the
    default 64 is about 0.5 GB. The pool never grows past it, whatever the bursts."""
    connect_timeout_s: int = Field(default=5, ge=1, le=120)
    log_level: str = "INFO"

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # -- MCP: limits of agent calls and the HTTP endpoint ---------------------------------------------------

    mcp_max_rows: int = Field(default=500, ge=1, le=100_000)
    """Most rows one ``query``/``execute`` call returns (an agent may ask for fewer); more sets ``truncated``."""
    mcp_max_result_bytes: int = Field(default=1_000_000, ge=1_000, le=100_000_000)
    """Most bytes of row data one call returns, measured on the values' JSON form."""
    mcp_statement_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """``SET LOCAL statement_timeout`` of every agent statement; agentpg also cancels it from outside."""
    mcp_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Host header values /mcp accepts besides loopback ones (``name``, ``name:port`` or ``name:*``);
    comma-separated in the environment. Guards against DNS rebinding."""
    mcp_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Origin header values /mcp accepts besides loopback ones (``https://name`` or ``https://name:*``)."""
    public_url: str | None = None
    """The service's URL as agents reach it (e.g. ``https://db.example.com``), used in the MCP config;
    unset means the URL the request came in on."""
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Addresses (or networks, ``10.0.0.0/8``) of reverse proxies whose ``X-Forwarded-For``/``-Proto`` serve
    believes; empty (the default): none, so a client's address is the connection's own, and a client on this
    machine cannot pick a fresh one per request to escape the per-address limits."""

    @field_validator("mcp_allowed_hosts", "mcp_allowed_origins", "tenant_extensions", "trusted_proxies",
                     mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    # -- providers: where tenant databases live -----------------------------------------------------------

    fleet: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Admin DSNs of several PostgreSQL servers (comma-separated, or a JSON list): new databases go to the
    least-loaded one. Empty means one server (``postgres_url`` or the embedded one)."""

    @field_validator("fleet", mode="before")
    @classmethod
    def _fleet_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    # -- undo: continuous archiving of each server (providers/archive.py) ----------------------------------

    backup_enabled: bool | None = None
    """Archive continuously (base backups + streamed WAL) so databases can be restored to any point of the
    retention window. Unset: the embedded server only; true: also an external server (AGENTPG_POSTGRES_URL,
    AGENTPG_FLEET) whose admin role may replicate (this creates a replication slot there); false: none."""
    backup_dir: Path | None = None
    """Where backups go (0700, owned by the user agentpg runs as); unset means ``home/backup``."""
    backup_retention_days: float = Field(default=7.0, gt=0, le=3650)
    """How far back any instant stays restorable; older base backups and WAL are deleted."""
    backup_interval_h: float = Field(default=24.0, gt=0, le=24 * 365)
    """A base backup at least this often (incremental where the server summarizes its WAL; a full one once
    the newest full one is ``7 x`` this old)."""
    backup_wal_trigger_mb: int = Field(default=256, ge=0, le=1_048_576)
    """Also take an (incremental) base backup once the server has written this much WAL since the newest one
    started: a restore replays at most about this much WAL (0: only every ``backup_interval_h``)."""
    backup_purge_on_user_delete: Literal["rebase", "window"] = "rebase"
    """What a user deletion does to the backups, which hold every tenant of a server: ``rebase`` (the default,
    what a user deleting their account expects): a fresh full base backup replaces every older backup and WAL
    within one archiving round (every tenant of that server loses the history before it); ``window``: the
    deleted user's data ages out with the retention window. docs/undo.md."""
    backup_synchronous: bool = False
    """Commits wait until their WAL is flushed in the backup directory (nothing acknowledged is lost, one more
    fsync per commit); off: at most what pg_receivewal had not flushed yet is lost with the server's disk."""
    restore_wait_s: float = Field(default=20.0, ge=0, le=3600)
    """How long a REST restore answers within: one done by then answers 200 (201 with a copy), a longer one
    202 with its operation to follow (``GET /api/operations/{id}``) while it goes on in the background."""

    def backup_root(self) -> Path:
        return self.backup_dir if self.backup_dir is not None else self.home / "backup"

    # -- usage and budgets ---------------------------------------------------------------------------------

    price_storage_cents_per_gb_month: float = Field(default=35.0, ge=0)
    price_compute_cents_per_hour: float = Field(default=16.0, ge=0)
    price_written_cents_per_gb: float = Field(default=9.6, ge=0)
    price_transfer_cents_per_gb: float = Field(default=9.0, ge=0)
    price_backup_cents_per_gb_month: float = Field(default=20.0, ge=0)
    """Backup storage (base backups + WAL of a server, split across its databases by size; docs/undo.md)."""
    price_bytes_per_written_row: int = Field(default=200, ge=1)
    """Estimated bytes per row written, where the server counts rows rather than bytes."""
    usage_sync_interval_s: float = Field(default=300.0, ge=0)
    """How often ``serve`` syncs usage and enforces budgets; 0 disables the periodic job."""
    default_budget_cents: int | None = Field(default=None, ge=0)
    """The budget a user starts with; unset means none (never made read-only)."""
    budget_warning_percent: int = Field(default=80, ge=1, le=100)
    user_storage_limit_mb: int = Field(default=10_240, ge=0, le=1_073_741_824)
    """Most MB one user's databases (global + every agent database) may hold; over it they turn read-only,
    as over budget, until back under it. 0: no limit. Checked every ``user_storage_check_interval_s``."""
    user_storage_check_interval_s: float = Field(default=5.0, ge=0, le=3600)
    """How often ``serve`` measures every user's storage against the limit (one query per server); 0 disables
    the check. With the Neon provider it is at least ``usage_sync_interval_s`` (each size is an API call)."""

    # -- Neon: one project per database, as the original design ----------------------------------------

    provider: Literal["local", "fleet", "neon"] | None = None
    """Where tenant databases live; unset means the fleet when ``AGENTPG_FLEET`` is set, else one server."""
    neon_api_key: SecretStr | None = None
    neon_api_url: str = "https://console.neon.tech/api/v2"
    neon_region_id: str = "aws-us-east-2"
    neon_pg_version: int = Field(default=17, ge=14, le=18)
    neon_org_id: str | None = None
    neon_requests_per_minute: int = Field(default=700, ge=2, le=100_000)
    """Neon's published API rate limit; lower it when several agentpg processes share one Neon account."""
    neon_operation_timeout_s: float = Field(default=300.0, gt=0, le=3600)

    # -- MCP gateway: user-configured stdio servers reached through agentpg (issue 5) -------------------

    gateway_catalog: str | None = None
    """The operator's catalog of MCP servers users may run (docs/gateway.md): a JSON file path or inline JSON.
    Unset: only the built-in defaults. (``AGENTPG_GATEWAY_ALLOWED_COMMANDS`` is gone: users send no command.)"""
    gateway_sandbox: Literal["auto", "namespaces", "none"] = "auto"
    """``auto``: bubblewrap namespaces where the kernel allows, else uid + rlimits + env only (with a warning);
    ``namespaces``: refuse to start children without them; ``none``: never use bubblewrap."""
    gateway_uid_base: int = Field(default=470_000, ge=1000, le=2**31 - 2)
    """First of the uids gateway children run as when agentpg runs as root (one per child, no passwd entry)."""
    gateway_uid_count: int = Field(default=1024, ge=1, le=1_000_000)
    gateway_limit_cpu_s: int = Field(default=600, ge=1, le=86_400)
    """CPU seconds a child may use in its life (RLIMIT_CPU); then it is killed and started again on the next call."""
    gateway_limit_memory_mb: int = Field(default=512, ge=16, le=1_048_576)
    """RLIMIT_DATA of a child (heap and other private writable memory)."""
    gateway_limit_address_space_mb: int = Field(default=16_384, ge=64, le=1_048_576)
    """RLIMIT_AS of a child: only a backstop, node reserves far more virtual memory than it uses (measured:
    server-postgres fails below 12 GiB once WebAssembly is used, for ~60 MB resident). Memory is bounded by
    ``gateway_limit_memory_mb``."""
    gateway_limit_processes: int = Field(default=64, ge=1, le=100_000)
    """RLIMIT_NPROC: processes and threads of one child (each child has its own uid)."""
    gateway_limit_file_size_mb: int = Field(default=64, ge=1, le=1_048_576)
    gateway_limit_open_files: int = Field(default=256, ge=16, le=1_048_576)
    gateway_limit_tmp_mb: int = Field(default=256, ge=1, le=1_048_576)
    """The size of each sandboxed child's own ``/tmp`` (its ``HOME``), a tmpfs: memory no rlimit counts."""
    gateway_max_processes: int = Field(default=16, ge=1, le=10_000)
    """Most gateway child processes running at once (all users); beyond it an idle one is stopped, else
    the call is refused with a clear error."""
    gateway_idle_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    """A child unused this long is stopped (the next call starts it again)."""
    gateway_start_timeout_s: float = Field(default=60.0, gt=0, le=600)
    """How long a child may take to start and answer ``initialize``."""
    gateway_call_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    """How long one relayed request may take."""

    # -- limits: rate, concurrency and pool limits of the HTTP edge (docs/limits.md) ------------------------

    rate_limit_per_s: float = Field(default=50.0, ge=0, le=1_000_000)
    """Requests per second each bearer token (or, without one, each client address) may make on ``/api``
    and ``/mcp``, refilled continuously (a token bucket); 0 disables. The admin token is exempt."""
    rate_limit_burst: int = Field(default=200, ge=1, le=1_000_000)
    """How many requests a token may make at once before ``rate_limit_per_s`` applies."""
    mcp_max_concurrent_calls: int = Field(default=16, ge=1, le=10_000)
    """Most MCP tool calls one agent token may have running at once; more get a tool error (retry)."""
    auth_failures_per_s: float = Field(default=10.0, ge=0, le=1_000_000)
    """Refill rate of each client address's budget of 401 answers; 0 disables the check."""
    auth_failures_burst: int = Field(default=500, ge=1, le=1_000_000)
    """401s a client address may collect before its requests with unproven tokens get 429."""
    tenant_pool_max_size: int = Field(default=5, ge=1, le=1000)
    """Connections agentpg keeps per (tenant database, role): at most this many statements of one agent
    run at once on one database."""
    tenant_pool_acquire_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """How long a call waits for one of those connections before it fails with "retry shortly"."""
    governor_budget: int | None = Field(default=None, ge=1, le=100_000)
    """Connections this process may hold on each tenant Postgres server, shared by all tenant pools (the
    connection governor, docs/limits.md); unset: ``max_connections`` minus the reserved slots, divided by
    ``serve_instances``."""
    governor_enabled: bool = True
    """Off: tenant pools open connections without the governor's budget (only behind a pooler that has its own,
    or to measure what the governor buys: bench/fair_sharing.py). Calls may then fail to connect."""
    governor_user_cap: int = Field(default=0, ge=-1, le=100_000)
    """Most statements one user may run at once on a server while other users have calls there (a fair share
    of CPU, which a connection budget does not give); alone, a user leaves a few slots free for another user's
    first call (access/governor.py, ``ServerGate.headroom``); 0: twice this machine's CPU cores; -1: no cap."""
    governor_wait_s: float = Field(default=5.0, gt=0, le=600)
    """How long a call waits for a connection of a busy server before it fails with ``server_busy`` (429)."""
    serve_instances: int = Field(default=1, ge=1, le=1000)
    """How many serve (or mcp) processes share the tenant servers: each takes this fraction of the budget."""
    session_max_statement_s: float = Field(default=900.0, ge=0, le=86_400)
    """A tenant's own connection (a gateway child's): its statement is terminated past this; 0: no bound
    (lifecycle/session_bounds.py; a tenant can lift every timeout setting for itself, so serve enforces it)."""
    session_max_transaction_s: float = Field(default=900.0, ge=0, le=86_400)
    """…its transaction is terminated past this (an open one holds back VACUUM for every tenant); 0: none."""
    session_max_idle_s: float = Field(default=3600.0, ge=0, le=604_800)
    """…its session is closed after this long idle; 0: never."""
    user_max_connections: int = Field(default=0, ge=-1, le=100_000)
    """Most backends one user's own connections may hold on a server, all its databases together (agentpg's
    own pooled connections are not counted); the newest beyond it are terminated. 0: an eighth of the
    server's ordinary connection slots (at least 4); -1: no bound."""
    session_check_interval_s: float = Field(default=5.0, ge=0, le=3600)
    """How often serve checks those bounds; 0 turns the check off."""
