"""The database explorer: server-rendered pages where a user sees what their agents stored.

``agentpg serve`` includes :data:`router` (see :mod:`agentpg.web.routes`); templates and static assets ship in
this package (``templates/``, ``static/``), so there is no front-end build step. Design notes: docs/explorer.md.
"""

from __future__ import annotations

from agentpg.web.routes import router

__all__ = ["router"]
