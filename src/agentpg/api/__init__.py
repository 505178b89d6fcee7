"""The HTTP edge: FastAPI app with REST routes, health, metrics (and MCP mounted beside them)."""
