"""MCP over newline-delimited JSON-RPC 2.0 on stdin/stdout (``agentpg mcp``): one small hand-written loop.

**Why it exists.** The stdio goal (issue 20) is at least 1.5 times the throughput of the npm
``server-postgres`` for a 1-row SELECT. The SDK's ``Server.run`` (worker-thread line reads, a dispatcher,
pydantic validation and re-dump of every message) costs about 0.75-1.0 ms of CPU per trivial call on this
2-vCPU VM, a plain asyncio loop about 0.09 ms (measured with mcp 2.3 for issue 20); the SDK's own client needs another
0.4-0.55 ms, so through the SDK server the goal is out of reach by construction. Measured end to end with the
SDK 2.x ``Client`` (bench/mcp_vs_server_postgres.py, 2026-12-07, 3 rounds x 2,000 calls, load average 3-7
from other work): this loop 920 calls/s in the 2025 era and 811/s in the 2026-07-28 era, server-postgres
1,031/s (0.89x and 0.79x; the goal is not met: agentpg's own per-call work, not the protocol loop, is what
is left). It runs the same :class:`~agentpg.mcp.server.ToolCalls` as the SDK server, and uses only public
``mcp.types`` constants and models (versions, ``_meta`` keys, error codes, result models dumped once at
start); nothing of the SDK's runner.

**What it follows** (the MCP base protocol, lifecycle and tools; stdio transport: one JSON object per line,
UTF-8). Both protocol eras, and, as in the SDK, the client's *first request* decides the connection's era:

- **2026-07-28** (a first request whose ``params._meta`` carries ``io.modelcontextprotocol/protocolVersion``):
  every request carries its own envelope: ``_meta`` with the protocol version and the client capabilities
  (else -32602), a version in ``MODERN_PROTOCOL_VERSIONS`` (else -32022 with ``{supported, requested}``).
  ``server/discover`` answers the supported versions, capabilities and instructions; ``tools/list`` and
  ``tools/call`` as below; every result carries ``resultType: "complete"`` and ``_meta`` naming the server
  (cacheable ones ``ttlMs``/``cacheScope``). ``initialize`` and ``ping`` do not exist there: -32601.
- **2025 era** (anything else first): ``initialize`` answers the client's ``protocolVersion`` if it is a
  handshake version, else the latest one; ``ping`` at any time; any other request before ``initialize`` gets
  -32600; an enveloped request later gets -32600 too.
- ``tools/call``: each call in its own task (at most ``max_concurrent_calls`` at once, the rest wait),
  answered as it completes (matched by id). ``notifications/cancelled`` naming a call in flight cancels it
  (and its statement) and, as the spec says, no response is sent for it.
- Errors: -32700 unparseable line (id null), -32600 not one well-formed message (batches, an id that is not
  a string or an integer, ...: :mod:`agentpg.mcp.envelope`), -32601 unknown method, -32602 invalid params,
  -32603 internal error (generic text; details in the log under a reference). A line longer than
  ``max_line`` is skipped with -32600 and reading goes on.
- EOF on stdin: calls in flight finish (at most ``drain_timeout_s``, then they are cancelled), their
  responses are written and flushed, then :func:`serve_pipes` returns.

Only pipes and sockets are attached here (how MCP clients start servers). A terminal or a file on
stdin/stdout keeps the SDK's ``stdio_server`` + ``Server.run`` (:mod:`agentpg.mcp.stdio`), which serves both
eras too: interactive use, where throughput does not matter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import traceback
import uuid
from typing import Any

from mcp import types
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION, MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

from agentpg import __version__
from agentpg.mcp import envelope
from agentpg.mcp.server import INSTRUCTIONS, ToolCalls

log = logging.getLogger(__name__)

RequestId = int | str
_NO_ID: None = None
_CANCEL_GRACE_S = 5.0
"""How long cancelled calls get to finish cancelling (psycopg cancels the statement server-side)."""


_COMPLETE = {"resultType": "complete"}


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


class JsonRpcSession:
    """One client on one pair of streams: reads requests until EOF and answers them.

    Writes are serialized by construction: each message is one synchronous ``writer.write`` of a whole line
    (nothing can interleave within it on the event loop); ``drain`` only applies back-pressure.
    """

    def __init__(self, calls: ToolCalls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 drain_timeout_s: float, max_concurrent_calls: int = 16, max_line: int = 256 * 2**20) -> None:
        self._calls = calls
        self._reader = reader
        self._writer = writer
        self._drain_timeout_s = drain_timeout_s
        self._max_line = max_line
        self._slots = asyncio.Semaphore(max_concurrent_calls)
        # Calls waiting for a slot still hold their request: past this many, stop reading until one ends.
        self._max_backlog = max(64, 16 * max_concurrent_calls)
        self._in_flight: dict[RequestId, asyncio.Task[None]] = {}
        self._initialized = False
        self._modern: bool | None = None  # the era, set by the client's first request
        self._output_lost = False
        capabilities = types.ServerCapabilities(tools=types.ToolsCapability(list_changed=False))
        info = types.Implementation(name="agentpg", version=__version__)
        self._initialize_result = _dump(types.InitializeResult(
            protocol_version=LATEST_HANDSHAKE_VERSION, capabilities=capabilities, server_info=info,
            instructions=INSTRUCTIONS))
        stamp = {"_meta": {types.SERVER_INFO_META_KEY: _dump(info)}}
        self._discover_result = {**_dump(types.DiscoverResult(
            supported_versions=list(MODERN_PROTOCOL_VERSIONS), capabilities=capabilities,
            instructions=INSTRUCTIONS, ttl_ms=0, cache_scope="private")), **stamp}
        self._modern_stamp = {**_COMPLETE, **stamp}
        self._list_stamp = {"ttlMs": 0, "cacheScope": "private", **self._modern_stamp}  # tools/list is cacheable
        # Built once: json.dumps(..., separators=...) builds an encoder per message.
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    async def serve(self) -> None:
        """Serve until EOF on the reader (or the writer's peer is gone), then finish the calls in flight."""
        try:
            while not self._output_lost:
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as eof:
                    self._handle_line(eof.partial)  # a last message without its newline still counts
                    break
                except ConnectionError:  # a socket reset by the client: the same as EOF
                    break
                except asyncio.LimitOverrunError as overrun:
                    await self._skip_rest_of_line(overrun.consumed)
                    self._error(_NO_ID, types.INVALID_REQUEST, f"message longer than {self._max_line} bytes")
                else:
                    self._handle_line(line)
                await self._drain()
                if len(self._in_flight) >= self._max_backlog:
                    await asyncio.wait(list(self._in_flight.values()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._finish_calls()
            await self._drain()

    async def _skip_rest_of_line(self, buffered: int) -> None:
        """Drop an over-long line: ``buffered`` bytes hold no newline; discard up to the next one (or EOF)."""
        while True:
            try:
                await self._reader.readexactly(max(1, buffered))
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as overrun:
                buffered = overrun.consumed
            except asyncio.IncompleteReadError:
                return

    def _handle_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._error(_NO_ID, types.PARSE_ERROR, envelope.NOT_JSON)
            return
        try:
            self._handle_message(message)
        except Exception as exc:
            self._internal_error(_valid_id(message.get("id")) if isinstance(message, dict) else None, exc)

    def _handle_message(self, message: Any) -> None:
        problem = envelope.problem(message)
        if problem is not None:
            self._error(*problem)
            return
        if "method" not in message:
            return  # the client answering a server request: agentpg sends none
        method: str = message["method"]
        params: dict[str, Any] = message.get("params") or {}  # absent or null: the SDK accepts both
        if "id" in message:
            self._request(message["id"], method, params)
        else:
            self._notification(method, params)  # a notification is never answered

    def _request(self, request_id: RequestId, method: str, params: dict[str, Any]) -> None:
        enveloped = _is_enveloped(params)
        if self._modern is None:
            self._modern = enveloped and method != "initialize"
        if self._modern:
            self._modern_request(request_id, method, params)
        elif enveloped:
            self._error(request_id, types.INVALID_REQUEST, "Invalid Request: this connection speaks the 2025 "
                        "protocol (it opened with initialize); a 2026-07-28 client opens with server/discover")
        elif method == "initialize":
            requested = params.get("protocolVersion")
            if not isinstance(requested, str):
                self._error(request_id, types.INVALID_PARAMS, "Invalid params: protocolVersion must be a string")
                return
            version = requested if requested in HANDSHAKE_PROTOCOL_VERSIONS else LATEST_HANDSHAKE_VERSION
            self._result(request_id, {**self._initialize_result, "protocolVersion": version})
            self._initialized = True
        elif method == "ping":
            self._result(request_id, {})
        elif not self._initialized:
            self._error(request_id, types.INVALID_REQUEST, "the session is not initialized: send initialize first")
        else:
            self._tools_request(request_id, method, params, modern=False)

    def _modern_request(self, request_id: RequestId, method: str, params: dict[str, Any]) -> None:
        """A request on a 2026-07-28 connection: its envelope checked first (the spec's order), then the method."""
        meta = params.get("_meta")
        missing = [key for key in (types.PROTOCOL_VERSION_META_KEY, types.CLIENT_CAPABILITIES_META_KEY)
                   if not isinstance(meta, dict) or key not in meta]
        if missing:
            self._error(request_id, types.INVALID_PARAMS,
                        f"Invalid params: params._meta must carry the envelope key(s) {', '.join(missing)}")
            return
        assert isinstance(meta, dict)
        version = meta[types.PROTOCOL_VERSION_META_KEY]
        if not isinstance(version, str):
            self._error(request_id, types.INVALID_PARAMS, "Invalid params: the protocol version must be a string")
            return
        if version not in MODERN_PROTOCOL_VERSIONS:
            self._error(request_id, types.UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version",
                        {"supported": list(MODERN_PROTOCOL_VERSIONS), "requested": version})
        elif method == "server/discover":
            self._result(request_id, self._discover_result)
        else:
            self._tools_request(request_id, method, params, modern=True)

    def _tools_request(self, request_id: RequestId, method: str, params: dict[str, Any], *, modern: bool) -> None:
        if method in ("tools/list", "tools/call") and request_id in self._in_flight:
            self._error(request_id, types.INVALID_REQUEST, "Invalid Request: a call with this id is running")
        elif method == "tools/list":  # the workspace's choice of tools (issue 20): it may be looked up
            self._start_call(request_id, None, None, modern)
        elif method == "tools/call":
            name, arguments = params.get("name"), params.get("arguments")
            if not isinstance(name, str) or not (arguments is None or isinstance(arguments, dict)):
                self._error(request_id, types.INVALID_PARAMS,
                            "Invalid params: tools/call needs a string name and an object of arguments")
            else:
                self._start_call(request_id, name, arguments, modern)
        else:  # on 2026-07-28 this includes initialize and ping, which that version removed
            self._error(request_id, types.METHOD_NOT_FOUND, "Method not found")

    def _notification(self, method: str, params: dict[str, Any]) -> None:
        if method == "notifications/cancelled":
            request_id = _valid_id(params.get("requestId"))
            task = self._in_flight.get(request_id) if request_id is not None else None
            if task is not None:
                task.cancel()

    def _start_call(self, request_id: RequestId, name: str | None, arguments: dict[str, Any] | None,
                    modern: bool) -> None:
        task = asyncio.create_task(self._run_call(request_id, name, arguments, modern))
        self._in_flight[request_id] = task
        task.add_done_callback(lambda done: self._forget(request_id, done))

    def _forget(self, request_id: RequestId, task: asyncio.Task[None]) -> None:
        if self._in_flight.get(request_id) is task:
            del self._in_flight[request_id]

    async def _run_call(self, request_id: RequestId, name: str | None, arguments: dict[str, Any] | None,
                        modern: bool) -> None:
        """Answer one tools/call (``name`` None: a tools/list). A cancellation ends it without an answer (the
        client asked for that)."""
        try:
            if name is None:
                result = await self._calls.tools_result()
            else:
                async with self._slots:
                    result = await self._calls.call(name, arguments)
        except Exception as exc:  # ToolCalls.call maps failures itself: this is a bug, still answered
            self._internal_error(request_id, exc)
        else:
            stamp = self._list_stamp if name is None else self._modern_stamp
            self._result(request_id, {**result, **stamp} if modern else result)
        await self._drain()

    async def _finish_calls(self) -> None:
        """Let the calls in flight finish (bounded); cancel the ones that do not, and wait for that."""
        if not self._in_flight:
            return
        # With stdout gone their answers cannot be delivered: cancel at once.
        timeout = 0 if self._output_lost else self._drain_timeout_s
        _, late = await asyncio.wait(list(self._in_flight.values()), timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            log.warning("MCP client gone: cancelled %d call(s) still running after %g s", len(late), timeout)
            await asyncio.wait(late, timeout=_CANCEL_GRACE_S)

    # -- writing ---------------------------------------------------------------------------------------

    def _result(self, request_id: RequestId, result: dict[str, Any]) -> None:
        self._send({"jsonrpc": "2.0", "id": request_id, "result": result}, request_id)

    def _error(self, request_id: RequestId | None, code: int, message: str, data: Any = None) -> None:
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        self._send({"jsonrpc": "2.0", "id": request_id, "error": error}, request_id)

    def _internal_error(self, request_id: RequestId | None, exc: BaseException) -> None:
        # The traceback, not the exception text: it may hold a secret.
        reference = uuid.uuid4().hex[:12]
        log.error("MCP stdio request failed unexpectedly with %s (reference %s)\n%s", type(exc).__name__,
                  reference, "".join(traceback.format_tb(exc.__traceback__)))
        self._error(request_id, types.INTERNAL_ERROR, f"Internal error (reference {reference})")

    def _send(self, message: dict[str, Any], request_id: RequestId | None) -> None:
        if self._output_lost:
            return
        try:
            text = self._encode(message)
        except (TypeError, ValueError, RecursionError) as exc:  # a result that is not JSON (errors always are)
            self._internal_error(request_id, exc)
            return
        try:
            data = text.encode() + b"\n"
        except UnicodeEncodeError:  # a lone surrogate (from an escaped "\ud800" in JSON input): escape it
            data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:  # the client stopped reading: nobody to answer
            if not self._output_lost:
                log.warning("stdout closed by the MCP client; stopping")
            self._output_lost = True


def _is_enveloped(params: dict[str, Any]) -> bool:
    """Whether a request claims the 2026-07-28 era: its ``_meta`` names a protocol version (the key exists only
    in that era's envelope; a 2025 ``_meta`` carries e.g. a progress token)."""
    meta = params.get("_meta")
    return isinstance(meta, dict) and types.PROTOCOL_VERSION_META_KEY in meta


def _valid_id(value: Any) -> RequestId | None:
    """``value`` if it is a JSON-RPC request id MCP allows (a string or an integer, not a bool), else None."""
    return value if envelope.is_request_id(value) else None


async def serve_pipes(calls: ToolCalls, *, drain_timeout_s: float, max_concurrent_calls: int,
                      max_line: int = 256 * 2**20) -> None:
    """Serve one MCP client on this process's stdin/stdout, which must be pipes or sockets, until EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=max_line)
    read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    write_transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
    try:
        await JsonRpcSession(calls, reader, writer, drain_timeout_s=drain_timeout_s,
                             max_concurrent_calls=max_concurrent_calls, max_line=max_line).serve()
        # drain() returns below the high-water mark; with none, it returns once all is handed to the OS.
        write_transport.set_write_buffer_limits(high=0)
        await asyncio.wait_for(writer.drain(), _CANCEL_GRACE_S)
    except (ConnectionError, TimeoutError):
        pass  # the client stopped reading: what is left cannot be delivered
    finally:
        write_transport.close()
        read_transport.close()
