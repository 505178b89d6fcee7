"""The MCP gateway (issues 5, 17): a user picks an MCP server from the operator's catalog (``{server,
params}``); agentpg resolves its ``${GLOBAL_DB_URL}``-style placeholders server-side, runs it sandboxed, and
relays it to the agent with every resolved secret scrubbed.

- :mod:`.catalog`: the operator's catalog (``AGENTPG_GATEWAY_CATALOG``), checked when loaded;
- :mod:`.sandbox`: own uid, rlimits, bubblewrap namespaces, allow-listed env (setpriv, prlimit, bwrap);
- :mod:`.configs`: the users' configs (sealed), validation, the built-in defaults, placeholder resolution;
- :mod:`.scrub`: what the child writes back loses the resolved secrets; database URIs become ``agentpg://``;
- :mod:`.children`: the child processes (one per workspace and server), idle stop, restart, the bound;
- :mod:`.proxy`: the low-level MCP ``Server`` facing the agent, forwarding to the child's ``ClientSession``;
- :mod:`.http` (``/mcp/servers/{name}``) and :mod:`.stdio` (``agentpg mcp --server NAME``): the transports.
"""
