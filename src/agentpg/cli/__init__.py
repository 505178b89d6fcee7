"""The ``agentpg`` command line (Typer)."""
