"""gRPC server metrics by the grpc-ecosystem convention (go-grpc-prometheus, py-grpc-prometheus), for
grpc.aio: unary and streaming calls, on the App's registry.

    grpc_server_started_total{grpc_type,grpc_service,grpc_method}
    grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
    grpc_server_msg_received_total{grpc_type,grpc_service,grpc_method}
    grpc_server_msg_sent_total{grpc_type,grpc_service,grpc_method}
    grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}  (histogram, every call type)

The maintained libraries are for the sync server (py-grpc-prometheus); the aio fork we looked at
(py-async-grpc-prometheus) awaits streaming handlers (async generators cannot be) and counts no
stream's end, so this is a small interceptor of our own, on server/tally.py's lock-free children. It
must come first in the server's interceptors: what the interceptors after it refuse (AuthInterceptor:
UNAUTHENTICATED, PERMISSION_DENIED) is counted with its code. Each method's children are bound once;
without authentication the wrapped handler is reused too. The streams of the methods named in
`counted_by_handler` (NodeSession's) are counted by their handler, in its own read and write loops
(`stream()`), with no layer of ours around every message; other streams (reflection's, health's Watch)
through an async generator over the requests and a wrapper of the context.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry

from .tally import Counter, Histogram

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

LABELS = ("grpc_type", "grpc_service", "grpc_method")
# go-grpc-prometheus' default buckets, with the sub-5 ms ones a real-time fleet's unary calls live in.
HANDLING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def status_of(context: Any, err: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: what the handler set or aborted with; CANCELLED when the call was
    cancelled (GeneratorExit too: grpc.aio leaves a response generator unfinished when the client goes
    away while a response is being written, and it is closed later, with context.cancelled() still
    False); UNKNOWN for an exception that set none (grpc answers it so)."""
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code if isinstance(code, grpc.StatusCode) else _by_value(code)
    if isinstance(err, asyncio.CancelledError | GeneratorExit) or context.cancelled():
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if err is not None else grpc.StatusCode.OK


def _by_value(code: Any) -> grpc.StatusCode:
    """grpc.aio may keep the code as its integer value."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


class _Counted:
    """A ServicerContext whose writes are counted as messages sent (streams answered with write())."""

    __slots__ = ("_context", "_sent")

    def __init__(self, context: Any, sent: Any) -> None:
        self._context = context
        self._sent = sent

    def write(self, message: Any) -> Any:
        self._sent.inc()  # counted as handed to grpc (no coroutine of our own around every write)
        return self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Uncounted:
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass


class Stream:
    """A streaming call's message counters, for a handler that counts itself what it reads from the
    request stream and writes with context.write(), in its own loops. Outside a call of a method in
    `counted_by_handler` (metrics off, say), both count nothing."""

    __slots__ = ("received", "sent")

    def __init__(self, received: Any, sent: Any) -> None:
        self.received, self.sent = received, sent


_UNCOUNTED = Stream(_Uncounted(), _Uncounted())  # never changed
_STREAM: ContextVar[Stream] = ContextVar("grpc_stream", default=_UNCOUNTED)


def stream() -> Stream:
    """The current call's stream counters (set by the interceptor in the call's own task: grpc.aio runs
    each RPC in a task of its own, and the tasks the handler starts copy them)."""
    return _STREAM.get()


class _Method:
    """One method's children, bound once, and its last handler with the wrapped one."""

    __slots__ = ("by_handler", "handled", "handler", "labels", "parent", "received", "seconds", "sent", "started",
                 "stream", "wrapped")

    def __init__(self, parent: GrpcMetrics, labels: tuple[str, str, str], by_handler: bool) -> None:
        self.parent, self.labels, self.by_handler = parent, labels, by_handler
        self.started = parent.started.labels(*labels)
        self.received = parent.received.labels(*labels)
        self.sent = parent.sent.labels(*labels)
        self.seconds = parent.seconds.labels(*labels)
        self.stream = Stream(self.received, self.sent)
        self.handled: dict[grpc.StatusCode, Any] = {}
        self.handler: Handler | None = None
        self.wrapped: Handler | None = None

    def done(self, context: Any, err: BaseException | None, start: float) -> None:
        code = status_of(context, err)
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = self.parent.handled.labels(*self.labels, code.name)
        child.inc()
        self.seconds.observe(time.perf_counter() - start)


def _kind(handler: Handler) -> str:
    return ("stream_" if handler.request_streaming else "unary_") + ("stream" if handler.response_streaming else "unary")


_TYPES = {"unary_unary": "unary", "unary_stream": "server_stream", "stream_unary": "client_stream",
          "stream_stream": "bidi_stream"}


class GrpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The grpc_server_* metrics of every call this server handles."""

    def __init__(self, registry: CollectorRegistry, counted_by_handler: Collection[str] = ()) -> None:
        """`counted_by_handler`: the methods (full names, "/package.Service/Method") whose handlers count
        their stream's messages themselves, from stream()."""
        self.counted_by_handler = frozenset(counted_by_handler)
        self.started = Counter("grpc_server_started_total", "Total number of RPCs started on the server.",
                               LABELS, registry=registry)
        self.handled = Counter("grpc_server_handled_total", "Total number of RPCs completed on the server, "
                               "regardless of success or failure.", (*LABELS, "grpc_code"), registry=registry)
        self.received = Counter("grpc_server_msg_received_total", "Total number of RPC stream messages "
                                "received on the server.", LABELS, registry=registry)
        self.sent = Counter("grpc_server_msg_sent_total", "Total number of gRPC stream messages sent by the "
                            "server.", LABELS, registry=registry)
        self.seconds = Histogram("grpc_server_handling_seconds", "Histogram of response latency (seconds) of "
                                 "gRPC that had been application-level handled by the server.", LABELS,
                                 buckets=HANDLING_BUCKETS, registry=registry)
        self._methods: dict[str, _Method] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
                                details: grpc.HandlerCallDetails) -> Handler:
        handler = await continuation(details)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED
            return handler
        method = self._methods.get(details.method)
        if method is None:
            service, _, name = details.method.lstrip("/").rpartition("/")
            method = self._methods[details.method] = _Method(self, (_TYPES[_kind(handler)], service, name),
                                                              details.method in self.counted_by_handler)
        wrapped = method.wrapped
        if handler is not method.handler or wrapped is None:  # new (per call when an interceptor after this wraps it)
            wrapped = _wrap(method, handler)
            method.handler, method.wrapped = handler, wrapped
        return wrapped


def _wrap(m: _Method, handler: Handler) -> Handler:
    kind = _kind(handler)
    behaviour = getattr(handler, kind)
    by_handler = m.by_handler and (handler.request_streaming or handler.response_streaming)

    async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            m.received.inc()
            yield request

    if inspect.isasyncgenfunction(behaviour):  # responses yielded: counted as they pass
        async def stream_out(request: Any, context: Any) -> AsyncIterator[Any]:
            m.started.inc()
            start, err = time.perf_counter(), None
            if by_handler:
                _STREAM.set(m.stream)  # this call's task (and the tasks it starts)
            elif handler.request_streaming:
                request = counted(request)
            if not handler.request_streaming:
                m.received.inc()
            try:
                async for response in behaviour(request, context):
                    m.sent.inc()
                    yield response
            except BaseException as e:
                err = e
                raise
            finally:
                m.done(context, err, start)
        return handler._replace(**{kind: stream_out})  # type: ignore[attr-defined, no-any-return]

    async def call(request: Any, context: Any) -> Any:
        m.started.inc()
        start, err = time.perf_counter(), None
        if by_handler:
            _STREAM.set(m.stream)
        elif handler.request_streaming:
            request = counted(request)
        if not handler.request_streaming:
            m.received.inc()
        try:
            if handler.response_streaming:  # a stream answered with context.write()
                return await behaviour(request, context if by_handler else _Counted(context, m.sent))
            response = await behaviour(request, context)
            m.sent.inc()
            return response
        except BaseException as e:
            err = e
            raise
        finally:
            m.done(context, err, start)
    return handler._replace(**{kind: call})  # type: ignore[attr-defined, no-any-return]
