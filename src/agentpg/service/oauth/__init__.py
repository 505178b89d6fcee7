"""OAuth for remote MCP clients (issue 20): agentpg is its own authorization server for ``/mcp``.

A user connects a desktop MCP client to one of their workspaces: the client discovers this server from the
``/mcp`` 401 (RFC 9728 protected-resource metadata, RFC 8414 server metadata), registers itself (RFC 7591),
sends the user's browser to the consent page (signed in through the explorer's session), and gets JWT
access tokens (RFC 9068) whose audience is ``<public URL>/mcp`` and which act as that workspace's agent, the
same principal as the workspace's agent token.

- :mod:`agentpg.service.oauth.service`: what the edges call (as ``Service.oauth``);
- :mod:`agentpg.service.oauth.server`: the Authlib server;
- :mod:`agentpg.service.oauth.models`: the objects it works with;
- :mod:`agentpg.service.oauth.store`: its catalog records; :mod:`agentpg.service.oauth.keys`: its signing keys.

The HTTP routes are in :mod:`agentpg.mcp.oauth` (metadata, token, registration, revocation, the bearer
check on /mcp) and :mod:`agentpg.web.oauth` (the consent page). docs/mcp.md describes it.
"""
