"""The explorer's ASGI app (Starlette): the page, its assets, a JSON API over `Explorer`, and the image routes."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from mlflow.exceptions import MlflowException
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from protos.onetower.v1 import onetower_pb2 as pb
from service.explorer.backend import Explorer, Search, rpc_error
from service.explorer.catalog import ImageRefusedError

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_BODY_BYTES = 256 * 1024 * 1024  # the page's own bound; the service's image limits refuse far earlier
HTTP_STATUS = {  # gRPC status -> HTTP status of the JSON error the page shows
    "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413, "FAILED_PRECONDITION": 409,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
IMAGE_TYPES = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
               (b"RIFF", "image/webp"))
CACHED = {"cache-control": "private, max-age=3600"}


class BadRequestError(ValueError):
    """A request the page should not have sent (bad number, bad base64): HTTP 400 with the reason."""


def create_app(explorer: Explorer) -> Starlette:
    """The app; `explorer` answers every API route (the caller closes it)."""

    def api(handler: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if request.method == "POST":
                    # JSON only: another site's page cannot send it to this port without a CORS preflight,
                    # which nothing here answers, so no cross-site form can write through the explorer
                    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                        raise BadRequestError("send the body as application/json")
                    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                        raise BadRequestError(f"the upload is over the explorer's {MAX_BODY_BYTES >> 20} MiB")
                    request.scope["explorer.raw"] = await request.body()
                return JSONResponse(await run_in_threadpool(handler, request))  # gRPC calls block
            except grpc.RpcError as e:
                error = rpc_error(e)
                return JSONResponse({"error": error}, status_code=HTTP_STATUS.get(error["code"], 502))
            except BadRequestError as e:
                return JSONResponse({"error": {"code": "BAD_REQUEST", "details": str(e)}}, status_code=400)
            except MlflowException as e:
                return JSONResponse({"error": {"code": "REGISTRY", "details": str(e).splitlines()[0][:500]}},
                                    status_code=502)
        return endpoint

    routes = [
        Route("/", lambda request: FileResponse(STATIC / "index.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/api/info", api(lambda r: explorer.info(_int(r, "seed", 0)))),
        Route("/api/similar", api(lambda r: explorer.similar(_search(r)))),
        Route("/api/versions", api(lambda r: explorer.versions())),
        Route("/api/compare", api(lambda r: explorer.compare(_text(r, "a"), _text(r, "b"), _search(r)))),
        Route("/api/embed", api(lambda r: explorer.embed(_item(_body(r), need_id=False), _body_search(r))),
              methods=["POST"]),
        Route("/api/upsert", api(lambda r: explorer.upsert(_item(_body(r), need_id=True), _body_search(r).k)),
              methods=["POST"]),
        Route("/api/recommend", api(_recommend(explorer)), methods=["POST"]),
        Route("/img/file/{path:path}", _file_image(explorer)),
        Route("/img/blob", _blob_image(explorer)),
        Route("/img/live", _live_image(explorer)),
    ]
    return Starlette(routes=routes)


# ---- images -----------------------------------------------------------------------------------------
def _refused(status: int, reason: str, detail: str) -> Response:
    return JSONResponse({"error": {"code": reason, "details": detail}}, status_code=status)


def _file_image(explorer: Explorer) -> Callable[[Request], Response]:
    def endpoint(request: Request) -> Response:
        try:
            path = explorer.catalog.image_file(request.path_params["path"])
        except ImageRefusedError as e:
            logger.warning("image refused: %s", e)
            return _refused(e.status, e.reason, str(e))
        return FileResponse(path, headers=CACHED)
    return endpoint


def _blob_image(explorer: Explorer) -> Callable[[Request], Response]:
    def endpoint(request: Request) -> Response:
        blobs = explorer.catalog.blobs.get(request.query_params.get("id", ""), [])
        n = _int(request, "n", 0)
        if not 0 <= n < len(blobs):
            return _refused(404, "image_missing", "the catalog holds no such image")
        return Response(blobs[n], media_type=_image_type(blobs[n]), headers=CACHED)
    return endpoint


def _live_image(explorer: Explorer) -> Callable[[Request], Response]:
    def endpoint(request: Request) -> Response:
        try:
            data = explorer.live_image(request.query_params.get("id", ""), _int(request, "n", 0))
        except grpc.RpcError as e:
            error = rpc_error(e)
            return _refused(HTTP_STATUS.get(error["code"], 502), error["code"], error["details"])
        if data is None:
            return _refused(404, "image_missing", "the service holds no such live item image")
        return Response(data, media_type=_image_type(data), headers=CACHED)
    return endpoint


def _image_type(data: bytes) -> str:
    return next((kind for magic, kind in IMAGE_TYPES if data.startswith(magic)), "application/octet-stream")


# ---- request parsing ----------------------------------------------------------------------------------
def _text(request: Request, name: str) -> str:
    value = request.query_params.get(name, "").strip()
    if not value:
        raise BadRequestError(f"{name} is empty")
    return value


def _int(request: Request, name: str, default: int) -> int:
    try:
        return int(request.query_params.get(name, default))
    except ValueError:
        raise BadRequestError(f"{name}={request.query_params[name]!r} is not a whole number") from None


def _search(request: Request) -> Search:
    return _parse_search(dict(request.query_params), require_text=True)


def _body_search(request: Request) -> Search:
    return _parse_search(_body(request), require_text=False)


def _parse_search(params: dict[str, Any], require_text: bool) -> Search:
    text = str(params.get("q", "")).strip()
    if require_text and not text:
        raise BadRequestError("q is empty: give an item id or some words")
    try:
        k = int(params.get("k") or 12)
        min_score = float(params["min_score"]) if str(params.get("min_score", "")).strip() else None
    except ValueError as e:
        raise BadRequestError(f"k or min_score is not a number: {e}") from None
    exclude = [s.strip() for s in str(params.get("exclude", "")).split(",") if s.strip()]
    return Search(text=text, mode=str(params.get("mode", "auto")), k=k,
                  attributes_equal=_filter(str(params.get("filter", ""))), min_score=min_score, exclude=exclude)


def _filter(text: str) -> dict[str, str]:
    """`key=value, key2=value2` -> attributes_equal."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise BadRequestError(f"filter {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _body(request: Request) -> dict[str, Any]:
    """The JSON body (read by `api` before the handler runs in a worker thread), parsed once."""
    cached = request.scope.get("explorer.body")
    if cached is None:
        try:
            cached = json.loads(request.scope["explorer.raw"])
        except (KeyError, ValueError) as e:
            raise BadRequestError(f"the body is not JSON: {e}") from None
        if not isinstance(cached, dict):
            raise BadRequestError("the body must be a JSON object")
        request.scope["explorer.body"] = cached
    return dict(cached)


def _item(body: dict[str, Any], need_id: bool) -> pb.Item:
    item_id = str(body.get("item_id", "")).strip()
    if need_id and not item_id:
        raise BadRequestError("item_id is empty: name the new item")
    try:
        images = [base64.b64decode(str(b).split(",", 1)[-1], validate=True) for b in body.get("images") or ()]
    except (binascii.Error, ValueError) as e:
        raise BadRequestError(f"an image is not base64: {e}") from None
    attributes = _filter(str(body.get("attributes", "")))
    return pb.Item(item_id=item_id if need_id else "", title=str(body.get("title", "")),
                   description=str(body.get("description", "")), attributes=attributes, images=images)


def _recommend(explorer: Explorer) -> Callable[[Request], Any]:
    def handler(request: Request) -> Any:
        body = _body(request)
        history: list[tuple[str, float | None]] = []
        for line in str(body.get("history", "")).replace(",", "\n").splitlines():
            item_id, _, weight = line.strip().partition(" ")
            if not item_id:
                continue
            try:
                history.append((item_id, float(weight) if weight.strip() else None))
            except ValueError:
                raise BadRequestError(f"history line {line.strip()!r}: the weight is not a number") from None
        if not history:
            raise BadRequestError("history is empty: one item id per line, optionally followed by a weight")
        search = _parse_search(body, require_text=False)
        return explorer.recommend(history, search.k, search.attributes_equal)
    return handler
