"""MCP over newline-delimited JSON-RPC 2.0 on stdin/stdout (``agentpg mcp``), without the SDK's session layer.

The SDK's ``Server.run`` validates every message into pydantic models, routes it through a ``ServerSession``,
memory streams and a request context, and dumps every result back through models: on stdio that cost more
than the database call. This loop speaks the same wire protocol with :mod:`json` and plain dicts, and runs
the tools through the same :class:`~agentpg.mcp.server.ToolCalls` the SDK server (HTTP) uses.

Served (the server side of the MCP base protocol, lifecycle and tools; one JSON object per line, UTF-8):

- ``initialize``: the client's ``protocolVersion`` if the SDK supports it, else the SDK's latest; server
  info, ``tools`` capability and instructions as the SDK would send them (built from ``mcp.types`` once).
  ``ping`` is answered at any time; any other request before ``initialize`` gets -32600.
- ``tools/list``; ``tools/call``: each call in its own task (at most ``max_concurrent_calls`` run at once,
  the rest wait), answered as it completes, so answers may come in any order (matched by id).
- ``notifications/cancelled`` naming a call in flight cancels it (the statement is cancelled server-side)
  and, as the spec says, no response is sent for it. Other notifications and client responses are ignored.
- Errors: -32700 unparseable line (id null), -32600 not one well-formed message (batches, an id that is
  not a string or an integer, ...: :mod:`agentpg.mcp.envelope`), -32601 unknown method, -32602 invalid
  params, -32603 internal error (generic text; details in the log under a reference). A line longer than
  ``max_line`` is skipped with -32600 and reading goes on.
- EOF on stdin: calls in flight finish (at most ``drain_timeout_s``, then they are cancelled), their
  responses are written and flushed, then :func:`serve_pipes` returns.

Only pipes and sockets are attached here (asyncio reads and writes them directly; that is how MCP clients
start servers). A terminal or a file on stdin/stdout keeps the SDK's ``stdio_server`` + ``Server.run``
(see :mod:`agentpg.mcp.stdio`): interactive use, where throughput does not matter.
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
from mcp.shared.version import SUPPORTED_PROTOCOL_VERSIONS

from agentpg import __version__
from agentpg.mcp import envelope
from agentpg.mcp.server import INSTRUCTIONS, ToolCalls

log = logging.getLogger(__name__)

RequestId = int | str
_NO_ID: None = None
_CANCEL_GRACE_S = 5.0
"""How long cancelled calls get to finish cancelling (psycopg cancels the statement server-side)."""


def _dump(model: types.Result) -> dict[str, Any]:
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
        self._output_lost = False
        self._initialize_result = _dump(types.InitializeResult(
            protocolVersion=types.LATEST_PROTOCOL_VERSION,
            capabilities=types.ServerCapabilities(tools=types.ToolsCapability(listChanged=False)),
            serverInfo=types.Implementation(name="agentpg", version=__version__), instructions=INSTRUCTIONS))
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
        if method == "initialize":
            requested = params.get("protocolVersion")
            if not isinstance(requested, str):
                self._error(request_id, types.INVALID_PARAMS, "Invalid params: protocolVersion must be a string")
                return
            version = requested if requested in SUPPORTED_PROTOCOL_VERSIONS else types.LATEST_PROTOCOL_VERSION
            self._result(request_id, {**self._initialize_result, "protocolVersion": version})
            self._initialized = True
        elif method == "ping":
            self._result(request_id, {})
        elif not self._initialized:
            self._error(request_id, types.INVALID_REQUEST, "the session is not initialized: send initialize first")
        elif method in ("tools/list", "tools/call") and request_id in self._in_flight:
            self._error(request_id, types.INVALID_REQUEST, "Invalid Request: a call with this id is running")
        elif method == "tools/list":  # the workspace's choice of tools (issue 20): it may be looked up
            self._start_call(request_id, None, None)
        elif method == "tools/call":
            name, arguments = params.get("name"), params.get("arguments")
            if not isinstance(name, str) or not (arguments is None or isinstance(arguments, dict)):
                self._error(request_id, types.INVALID_PARAMS,
                            "Invalid params: tools/call needs a string name and an object of arguments")
            else:
                self._start_call(request_id, name, arguments)
        else:
            self._error(request_id, types.METHOD_NOT_FOUND, "Method not found")

    def _notification(self, method: str, params: dict[str, Any]) -> None:
        if method == "notifications/cancelled":
            request_id = _valid_id(params.get("requestId"))
            task = self._in_flight.get(request_id) if request_id is not None else None
            if task is not None:
                task.cancel()

    def _start_call(self, request_id: RequestId, name: str | None, arguments: dict[str, Any] | None) -> None:
        task = asyncio.create_task(self._run_call(request_id, name, arguments))
        self._in_flight[request_id] = task
        task.add_done_callback(lambda done: self._forget(request_id, done))

    def _forget(self, request_id: RequestId, task: asyncio.Task[None]) -> None:
        if self._in_flight.get(request_id) is task:
            del self._in_flight[request_id]

    async def _run_call(self, request_id: RequestId, name: str | None, arguments: dict[str, Any] | None) -> None:
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
            self._result(request_id, result)
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

    def _error(self, request_id: RequestId | None, code: int, message: str) -> None:
        self._send({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}, request_id)

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
