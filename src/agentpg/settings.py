"""Settings from the environment (``AGENTPG_*``), built once per process by the edge that needs them."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    tenant_connection_limit: int = Field(default=20, ge=1, le=1000)
    """CONNECTION LIMIT of every tenant login role."""
    warm_pool_size: int = Field(default=8, ge=0, le=1000)
    """Ready-made databases kept per server by ``agentpg serve`` so registration only claims one; 0 disables."""
    connect_timeout_s: int = Field(default=5, ge=1, le=120)
    log_level: str = "INFO"

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()
