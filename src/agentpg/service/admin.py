"""The operator's maintenance commands (``agentpg pool …``, ``agentpg keys …``): the service's ``admin`` part."""

from __future__ import annotations

from agentpg.lifecycle import keys, warm
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.settings import Settings


class Admin:
    def __init__(self, deps: LifecycleDeps, settings: Settings) -> None:
        self._deps = deps
        self._settings = settings

    def fill_warm_pool(self, size: int | None = None) -> int:
        """Create warm databases up to ``size`` (default ``AGENTPG_WARM_POOL_SIZE``); how many were made."""
        return warm.fill(self._deps, self._settings.warm_pool_size if size is None else size)

    def drain_warm_pool(self) -> int:
        """Drop every warm database; how many were dropped."""
        return warm.drain(self._deps)

    def rotate_keys(self, *, batch_size: int = 500) -> keys.RotationReport:
        """Add a master key (or resume a rotation) and re-seal every stored secret under it; resumable."""
        return keys.rotate_keys(self._deps, batch_size=batch_size)

    def key_status(self) -> keys.KeyStatus:
        """Key ids and how many values each seals; never key material."""
        return keys.key_status(self._deps)
