"""The MCP edge: the agent tools (:mod:`.tools`), the server factory (:mod:`.server`) and its two
transports, streamable HTTP on the ``serve`` app (:mod:`.http`) and stdio (:mod:`.stdio`)."""
