"""The gateway's children: one MCP client session per (workspace, server), started on first use.

A stdio child is an entry of the operator's catalog, spawned directly (``argv``, never a shell) inside the
sandbox of :mod:`.sandbox`: its own unprivileged uid, rlimits, bubblewrap namespaces where the host allows
them, and an environment built from an allow-list plus the entry's resolved ``env`` — nothing of agentpg's
own (``AGENTPG_SECRET_KEY`` …). It gets its own process group (and bubblewrap's PID namespace dies with it),
and once it stopped every process left running as its uid is killed. Its stderr is read line by line,
scrubbed, and logged.

The built-in defaults (``postgres-global``, ``postgres-agent``) are agentpg's own MCP server, run in-process
over memory streams: no process, not counted by the bound.

:class:`Children` keeps them: reuse while the resolved config is unchanged (else replace), stop after
``gateway_idle_timeout_s`` without use, drop a child whose process died (the next call starts a new one),
and at most ``gateway_max_processes`` processes at once: at the bound, the least recently used idle one is
stopped; if every one is busy the call is refused with :class:`GatewayBusy`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.text import TextReceiveStream
from mcp import ClientSession, types
from mcp.server.lowlevel import Server
from mcp.shared.memory import create_client_server_memory_streams
from mcp.shared.message import SessionMessage
from mcp.types.jsonrpc import jsonrpc_message_adapter

from agentpg.errors import AgentpgError
from agentpg.gateway.sandbox import Limits, Sandbox, SandboxMode, SandboxUnavailable
from agentpg.gateway.scrub import Scrubber
from agentpg.service import GatewayTarget
from agentpg.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A builtin server factory: the agentpg MCP server for one workspace.
BuiltinFactory = Callable[[GatewayTarget], Server[Any]]


class GatewayBusy(AgentpgError):
    status = 503
    code = "gateway_busy"


class UpstreamSession(ClientSession):
    """The gateway's own client session to a child. Its results are the child's raw output (the resolved
    secrets included, e.g. server-postgres' resource URIs): they are scrubbed (:mod:`.scrub`) before anything
    reaches an agent or a log, and are never an output themselves (the test suite's leak scanner, which
    records every result an SDK client receives, skips this class and scans what the agent gets)."""

    agentpg_upstream = True


class ChildStopped(Exception):
    """The child stopped (exited, was killed, or was stopped) while a request waited on it."""


class GatewayFailed(AgentpgError):
    status = 502
    code = "gateway_failed"


def make_sandbox(settings: Settings) -> Sandbox:
    return Sandbox(home=settings.home, requested=settings.gateway_sandbox, uid_base=settings.gateway_uid_base,
                   uid_count=settings.gateway_uid_count, postgres_os_user=settings.postgres_os_user)


def limits_for(settings: Settings, target: GatewayTarget) -> Limits:
    own = target.limits
    return Limits(cpu_s=own.cpu_s or settings.gateway_limit_cpu_s,
                  memory_mb=own.memory_mb or settings.gateway_limit_memory_mb,
                  address_space_mb=own.address_space_mb or settings.gateway_limit_address_space_mb,
                  processes=own.processes or settings.gateway_limit_processes,
                  file_size_mb=own.file_size_mb or settings.gateway_limit_file_size_mb,
                  open_files=own.open_files or settings.gateway_limit_open_files,
                  tmp_mb=settings.gateway_limit_tmp_mb)


class Child:
    """One running MCP server behind the gateway, and the client session to it."""

    def __init__(self, target: GatewayTarget, settings: Settings, builtin: BuiltinFactory | None,
                 sandbox: Sandbox | None = None) -> None:
        self.target = target
        self._sandbox = sandbox
        self.fingerprint = target.fingerprint
        self.scrubber = Scrubber(target.secrets)
        self.is_process = not target.builtin
        self._settings = settings
        self._builtin = builtin
        self.session: ClientSession | None = None
        self.capabilities: types.ServerCapabilities | None = None
        self.pid: int | None = None
        self.inflight = 0
        self.last_used = time.monotonic()
        self.dead = False
        self._stop = anyio.Event()
        self._done = anyio.Event()
        self._stderr_tail: list[str] = []
        self._calls: set[anyio.CancelScope] = set()
        self._started = False

    @property
    def label(self) -> str:
        return f"{self.target.name} (workspace {self.target.workspace_id})"

    @property
    def stopping(self) -> bool:
        return self.dead or self._stop.is_set() or self._exited()

    def _exited(self) -> bool:
        """Whether the child's process has exited, even if its end of stdout has not been read yet: a child
        killed between two calls is then replaced before the next call is sent to it, instead of that call
        failing as "stopped during the call". ``WNOWAIT`` leaves the exit status for the event loop to reap."""
        if self.pid is None or not self.is_process:
            return False
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # already reaped
            return True

    def stderr_tail(self) -> str:
        return " | ".join(self._stderr_tail[-3:])

    def _signal_stop(self) -> None:
        """Stop the child; requests waiting on it end at once (the session would wait for its timeout)."""
        self._stop.set()
        for scope in list(self._calls):
            scope.cancel()

    async def request(self, call: Callable[[ClientSession], Awaitable[T]]) -> T:
        """``call`` on the child's session; :class:`ChildStopped` if the child stops (dies) meanwhile."""
        session = self.session
        if session is None or self.stopping:
            raise ChildStopped(f"MCP server {self.target.name} is not running")
        scope = anyio.CancelScope()
        self._calls.add(scope)
        try:
            with scope:
                return await call(session)
        finally:
            self._calls.discard(scope)
        raise ChildStopped(f"MCP server {self.target.name} stopped during the call")

    async def stop(self) -> None:
        self._signal_stop()
        with anyio.move_on_after(10):
            await self._done.wait()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            if self.is_process:
                await self._run_process(task_status)
            else:
                await self._run_builtin(task_status)
        except Exception as exc:
            if self._started:  # after start: log (scrubbed), never raise into the children's task group
                log.warning("gateway server %s stopped: %s", self.label,
                            self.scrubber.text(f"{type(exc).__name__}: {exc}"))
            else:
                raise
        finally:
            self.dead = True
            self.session = None
            self._signal_stop()
            self._done.set()

    async def _initialize(self, session: ClientSession) -> None:
        with anyio.fail_after(self._settings.gateway_start_timeout_s):
            result = await session.initialize()
        self.capabilities = result.capabilities
        self.session = session
        self._started = True

    async def _run_builtin(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        assert self._builtin is not None
        server = self._builtin(self.target)
        async with create_client_server_memory_streams() as (client, srv), anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.run(srv[0], srv[1], server.create_initialization_options()))
            async with UpstreamSession(client[0], client[1]) as session:
                await self._initialize(session)
                task_status.started()
                await self._stop.wait()
            tg.cancel_scope.cancel()

    async def _run_process(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        sandbox = self._sandbox
        if sandbox is None:
            raise GatewayFailed("the gateway has no sandbox; it does not start processes")
        command = self.target.command
        if not (os.path.isabs(command) and os.access(command, os.X_OK)):
            raise GatewayFailed(f"MCP server {self.target.name}: the catalog's command for {self.target.server} "
                                "is not installed on this server; ask the operator")
        launch = await anyio.to_thread.run_sync(
            lambda: sandbox.plan(command, list(self.target.args), dict(self.target.env),
                                 list(self.target.read_only_paths), limits_for(self._settings, self.target)))
        try:
            process = await anyio.open_process(launch.argv, env=launch.env, cwd=launch.cwd, start_new_session=True)
        except BaseException:
            with anyio.CancelScope(shield=True):  # a cancelled start must still free the uid and remove the dir
                await anyio.to_thread.run_sync(launch.release, sandbox)
            raise
        self.pid = process.pid
        log.info("gateway started %s (pid %d, uid %s, %s)", self.label, process.pid,
                 launch.uid if launch.uid is not None else "agentpg's", sandbox.mode.kind)
        read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

        async def stdout_reader() -> None:
            assert process.stdout is not None
            buffer = ""
            async with read_writer:
                async for chunk in TextReceiveStream(process.stdout, errors="replace"):
                    lines = (buffer + chunk).split("\n")
                    buffer = lines.pop()
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            message = jsonrpc_message_adapter.validate_json(line)
                        except Exception:
                            log.warning("gateway server %s wrote a non-JSON-RPC line on stdout", self.label)
                            continue
                        await read_writer.send(SessionMessage(message))
            self._signal_stop()  # stdout closed: the child is gone (or going)

        async def stdin_writer() -> None:
            assert process.stdin is not None
            async with write_reader:
                async for message in write_reader:
                    data = message.message.model_dump_json(by_alias=True, exclude_none=True) + "\n"
                    try:
                        await process.stdin.send(data.encode())
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        self._signal_stop()
                        return

        async def stderr_reader() -> None:
            assert process.stderr is not None
            buffer = ""
            async for chunk in TextReceiveStream(process.stderr, errors="replace"):
                lines = (buffer + chunk).split("\n")
                buffer = lines.pop()
                for line in lines:
                    if line.strip():
                        clean = self.scrubber.text(line)[:500]
                        self._stderr_tail = [*self._stderr_tail[-9:], clean]
                        log.info("gateway server %s stderr: %s", self.label, clean)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stdout_reader)
                tg.start_soon(stdin_writer)
                tg.start_soon(stderr_reader)
                try:
                    async with UpstreamSession(read_stream, write_stream,
                                             read_timeout_seconds=self._settings.gateway_call_timeout_s) as session:
                        try:
                            await self._initialize(session)
                        except Exception as exc:
                            await anyio.sleep(0.2)  # let stderr arrive for the message
                            tail = self.stderr_tail()
                            raise GatewayFailed(
                                f"MCP server {self.target.name} did not start"
                                + (f" ({type(exc).__name__})" if not isinstance(exc, AgentpgError) else "")
                                + (f"; its last stderr lines: {tail}" if tail else "")) from None
                        task_status.started()
                        await self._stop.wait()
                finally:
                    await self._terminate(process)
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(launch.release, sandbox)
            log.info("gateway stopped %s (exit %s)", self.label, process.returncode)

    @staticmethod
    async def _terminate(process: anyio.abc.Process) -> None:
        if process.stdin is not None:
            with contextlib.suppress(Exception):  # already closed
                await process.stdin.aclose()
        with anyio.move_on_after(2):
            await process.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.returncode is not None:
                break
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            with anyio.move_on_after(3), anyio.CancelScope(shield=True):
                await process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # whatever the child left in its group
            os.killpg(process.pid, signal.SIGKILL)


class Children:
    """The running children, keyed by (workspace, server name)."""

    def __init__(self, settings: Settings, builtin: BuiltinFactory | None = None) -> None:
        self._settings = settings
        self._builtin = builtin
        self._children: dict[tuple[str, str], Child] = {}
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self.sandbox = make_sandbox(settings)
        self.sandbox_mode: SandboxMode | None = None
        self.sandbox_error: str | None = None

    async def _detect(self) -> None:
        try:
            started = time.monotonic()
            mode = await anyio.to_thread.run_sync(lambda: self.sandbox.mode)
        except SandboxUnavailable as exc:
            self.sandbox_error = exc.message
            log.warning("gateway: MCP server processes will NOT be started: %s", exc.message)
            return
        self.sandbox_mode = mode
        if mode.degraded:
            log.warning("gateway sandbox is DEGRADED: %s", mode.describe())
        else:
            log.info("gateway sandbox: %s (checked in %d ms)", mode.describe(), (time.monotonic() - started) * 1000)

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        if "AGENTPG_GATEWAY_ALLOWED_COMMANDS" in os.environ:
            log.warning("AGENTPG_GATEWAY_ALLOWED_COMMANDS is ignored: users no longer send commands; the operator "
                        "lists the servers users may run in AGENTPG_GATEWAY_CATALOG")
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._reaper)
            tg.start_soon(self._detect)  # at start-up: the warning (if any) is in the log before any call
            try:
                yield
            finally:
                self._tg = None
                with anyio.CancelScope(shield=True):
                    for child in list(self._children.values()):
                        await child.stop()
                self._children.clear()
                tg.cancel_scope.cancel()

    def running(self) -> dict[tuple[str, str], Child]:
        return {k: c for k, c in self._children.items() if not c.dead}

    async def _reaper(self) -> None:
        idle = self._settings.gateway_idle_timeout_s
        while True:
            await anyio.sleep(min(max(idle / 4, 0.1), 5.0))
            now = time.monotonic()
            stopping: list[Child] = []
            for key, child in list(self._children.items()):
                if child.dead:
                    self._children.pop(key, None)
                elif child.inflight == 0 and now - child.last_used > idle:
                    log.info("gateway stopping idle %s", child.label)
                    self._children.pop(key, None)
                    stopping.append(child)
            async with anyio.create_task_group() as tg:  # at once: a slow one does not hold the others up
                for child in stopping:
                    tg.start_soon(child.stop)

    async def _acquire(self, target: GatewayTarget) -> Child:
        key = (target.workspace_id, target.name)
        child = self._children.get(key)
        if child is not None and not child.stopping and child.fingerprint == target.fingerprint:
            return child
        async with self._lock:
            child = self._children.get(key)
            if child is not None and not child.stopping and child.fingerprint == target.fingerprint:
                return child
            if child is not None:
                self._children.pop(key, None)
                await child.stop()
            if not target.builtin:
                if self.sandbox_mode is None and self.sandbox_error is None:
                    await self._detect()
                if self.sandbox_error is not None:
                    raise GatewayFailed(f"the gateway does not start MCP server processes here: {self.sandbox_error}")
                await self._make_room()
            if self._tg is None:
                raise GatewayFailed("the gateway is not running")
            child = Child(target, self._settings, self._builtin, self.sandbox)
            try:
                await self._tg.start(child.run)
            except Exception as exc:
                raise _start_error(child, exc) from None
            self._children[key] = child
            return child

    async def _make_room(self) -> None:
        processes = [(k, c) for k, c in self._children.items() if c.is_process and not c.dead]
        if len(processes) < self._settings.gateway_max_processes:
            return
        idle = sorted((c.last_used, k) for k, c in processes if c.inflight == 0)
        if not idle:
            raise GatewayBusy(f"the gateway already runs its maximum of {self._settings.gateway_max_processes} MCP "
                              "server processes, all busy; retry shortly (AGENTPG_GATEWAY_MAX_PROCESSES)")
        _, key = idle[0]
        victim = self._children.pop(key)
        log.info("gateway stopping %s to make room", victim.label)
        await victim.stop()

    @asynccontextmanager
    async def use(self, target: GatewayTarget) -> AsyncIterator[Child]:
        """The child for ``target``, started if need be, counted as busy for the block."""
        child = await self._acquire(target)
        child.inflight += 1
        try:
            yield child
        finally:
            child.inflight -= 1
            child.last_used = time.monotonic()


def _start_error(child: Child, exc: BaseException) -> AgentpgError:
    """The first agentpg error inside (task groups wrap what they raise), else a generic start failure."""
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if isinstance(current, AgentpgError):
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
    log.warning("gateway could not start %s: %s", child.label, type(exc).__name__)
    tail = child.stderr_tail()
    return GatewayFailed(f"MCP server {child.target.name} did not start ({type(exc).__name__})"
                         + (f"; its last stderr lines: {tail}" if tail else ""))


def gateway_status(settings: Settings) -> dict[str, str]:
    """For ``agentpg status``: the catalog and the sandbox this host gives gateway children (runs the probe)."""
    from agentpg.service.gateway_catalog import CatalogError, load_catalog

    try:
        catalog = load_catalog(settings.gateway_catalog, settings.home)
        entries = f"{len(catalog.entries)} entries ({catalog.source})" + (
            f": {', '.join(catalog.names())}" if catalog.entries else "")
    except CatalogError as exc:
        entries = f"INVALID: {exc.message}"
    try:
        mode = make_sandbox(settings).detect()
        sandbox = ("DEGRADED: " if mode.degraded else "") + mode.describe()
    except SandboxUnavailable as exc:
        sandbox = f"UNAVAILABLE (no server processes are started): {exc.message}"
    return {"gateway_catalog": entries, "gateway_sandbox": sandbox}
