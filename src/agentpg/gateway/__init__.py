"""The MCP gateway (issue 5): a user's stdio MCP server configs (``{command, args, env}`` with ``${NAME}``
placeholders), resolved and spawned server-side, relayed to the agent with every resolved secret scrubbed.

- :mod:`.configs`: the configs (catalog, sealed), validation, the built-in defaults, placeholder resolution;
- :mod:`.scrub`: what the child writes back loses the resolved secrets; database URIs become ``agentpg://``;
- :mod:`.children`: the child processes (one per workspace and server), idle stop, restart, the bound;
- :mod:`.proxy`: the low-level MCP ``Server`` facing the agent, forwarding to the child's ``ClientSession``;
- :mod:`.http` (``/mcp/servers/{name}``) and :mod:`.stdio` (``agentpg mcp --server NAME``): the transports.
"""
