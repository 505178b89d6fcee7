"""The floor for ``catalog_reads.py``: the least any Python HTTP service on agentpg's stack can do for a page.

    BARE_ROWS_DSN=... python bench/_bare_rows_app.py PORT

One uvicorn process (as ``agentpg serve`` runs it), a bare ASGI callable (no framework, no auth, no read-only
transaction, no pinned settings, no reset), an async psycopg pool of 8, and for every request the raw loop's
own ``SELECT`` of 100 rows, answered as JSON. What it costs above the raw psycopg loop is HTTP, the event
loop and JSON in Python on this machine: a bound on what agentpg's REST page could reach. Never a server for
anything else: it reads whatever ``BARE_ROWS_DSN`` names, which the benchmark sets and never prints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from psycopg_pool import AsyncConnectionPool

SELECT = "SELECT * FROM items ORDER BY id LIMIT 100 OFFSET 0"
Scope = dict[str, Any]
Message = dict[str, Any]


def make_app(dsn: str) -> Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                                   Awaitable[None]]:
    pool = AsyncConnectionPool(dsn, min_size=8, max_size=8, open=False, kwargs={"autocommit": True})

    async def app(scope: Scope, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await pool.open(wait=True)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await pool.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        while (await receive()).get("more_body"):  # the request's body is not needed
            pass
        async with pool.connection() as conn:
            cur = await conn.execute(SELECT)
            names = [d.name for d in cur.description or []]
            rows = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
        body = json.dumps({"rows": rows}, default=str).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


if __name__ == "__main__":
    uvicorn.run(make_app(os.environ["BARE_ROWS_DSN"]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
