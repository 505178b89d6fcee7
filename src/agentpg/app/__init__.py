"""The assembly: the one place that knows every edge.

It builds settings → runtime (catalog, key ring, provider, :class:`agentpg.service.Service`) → the
service's tenant access, and mounts every edge: :func:`agentpg.app.asgi.create_app` for ``agentpg serve``,
:mod:`agentpg.app.stdio` for the stdio transports, :mod:`agentpg.app.commands` for the CLI commands that
start them. Edges never import this package.
"""
