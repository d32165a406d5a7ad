"""One table from errors to gRPC status codes; every message starts with a stable reason."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import grpc

from embed.errors import InvalidItemError
from index.errors import IndexLayerError
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


def guarded(method: F) -> F:
    """Servicer decorator: any exception becomes a status with a reason; UNKNOWN never leaves."""

    name = method.__name__

    @wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        metrics = getattr(self, "metrics", None)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
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
            if metrics is not None:
                metrics.requests.labels(name, code.name).inc()
                metrics.latency.labels(name).observe(time.perf_counter() - started)

    return wrapper  # type: ignore[return-value]
