"""One table from errors to gRPC status codes; every message starts with a stable reason."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from embed.errors import InvalidItemError
from index.errors import IndexLayerError
from protos.onetower.v1 import onetower_pb2 as pb
from service.batching import DeadlineExpiredError, QueueFullError

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error meant for the caller: a status code and a message `"<reason>: <what to change>"`."""

    def __init__(self, code: grpc.StatusCode, reason: str, detail: str) -> None:
        self.code = code
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def invalid(reason: str, detail: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, detail)


def not_found(detail: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, "item_not_found", detail)


def exhausted(reason: str, detail: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, detail)


def unavailable(detail: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "not_ready", detail)


def to_service_error(exc: BaseException, prefix: str = "items") -> ServiceError:
    """Map a library exception to a ServiceError (the one table)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, InvalidItemError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.reason == "image_too_large" else \
            grpc.StatusCode.INVALID_ARGUMENT
        return ServiceError(code, exc.reason, f"{exc.path(prefix)} {exc.detail}")
    if isinstance(exc, QueueFullError):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full", f"{exc}; retry with backoff")
    if isinstance(exc, DeadlineExpiredError):
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded", str(exc))
    if isinstance(exc, OSError):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, "storage_error",
                            f"the live-write log could not be written ({exc}); nothing was acknowledged, retry")
    if isinstance(exc, IndexLayerError):
        return ServiceError(grpc.StatusCode.INTERNAL, "index_error", str(exc))
    request_id = uuid.uuid4().hex[:12]
    logger.exception("internal error (request %s)", request_id)
    return ServiceError(grpc.StatusCode.INTERNAL, "internal", f"unexpected server error, request id {request_id}")


F = TypeVar("F", bound=Callable[..., Any])
SERVICE = pb.DESCRIPTOR.services_by_name["Recommendations"]
MALFORMED_LOG_EVERY_S = 1.0


class _Malformed:
    """Parses raw request bytes; a request that does not parse is INVALID_ARGUMENT, logged at most once a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -MALFORMED_LOG_EVERY_S
        self._quiet = 0

    def parse(self, method: str, data: bytes, metrics: Any) -> Any:
        cls = getattr(pb, SERVICE.methods_by_name[method].input_type.name)
        try:
            return cls.FromString(data)
        except DecodeError as e:
            if metrics is not None:
                metrics.malformed.labels(method).inc()
            self._log(method, len(data), e)
            raise invalid("malformed_request", f"the {cls.__name__} ({len(data)} bytes) does not parse as "
                                               f"onetower.v1.{cls.__name__}: {e}") from None

    def _log(self, method: str, size: int, error: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < MALFORMED_LOG_EVERY_S:
                self._quiet += 1
                return
            quiet, self._quiet, self._last = self._quiet, 0, now
        logger.warning("%s: a %d-byte request did not parse (%s)%s", method, size, error,
                       f"; {quiet} more since the last such line" if quiet else "")


_malformed = _Malformed()


def guarded(method: F) -> F:
    """Servicer decorator: parses the raw request (see `add_to_server`); any exception becomes a status
    with a reason; UNKNOWN never leaves."""

    name = method.__name__

    @wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        metrics = getattr(self, "metrics", None)
        admission = getattr(self, "admission", None)
        if admission is not None and not admission.enter():
            admission.refuse(name, context)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, bytes):
                request = _malformed.parse(name, request, metrics)
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the one place every error is mapped
            err = to_service_error(exc)
            code = err.code
            if err.code == grpc.StatusCode.INTERNAL:
                logger.error("%s failed: %s", name, err)
            else:
                logger.debug("%s refused: %s %s", name, err.code.name, err)
            context.abort(err.code, str(err))
        finally:
            if admission is not None:
                admission.leave()
                admission.log_call(name, context, code, started)
            if metrics is not None:
                metrics.count(name, code.name, time.perf_counter() - started)

    return wrapper  # type: ignore[return-value]


def add_to_server(servicer: Any, server: grpc.Server) -> None:
    """Register the servicer's methods with raw bytes in: `guarded` parses them, so a request that does not
    parse is answered INVALID_ARGUMENT with a reason and counted, not gRPC's bare INTERNAL."""
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=None,
                                                          response_serializer=_serialize)
                for name in SERVICE.methods_by_name}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())
