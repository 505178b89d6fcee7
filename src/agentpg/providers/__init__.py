"""Where tenant databases live: one interface (:class:`~agentpg.providers.base.Provider`), several homes."""
