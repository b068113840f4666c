"""The FastAPI app: ``create_app(settings)``. Routes, auth, limits and error shapes; the work is ``Service``'s.

    POST /v1/search                    images (multipart) or {"ids", "texts", "urls", "k", "filter", "min_score"}
    POST /v1/images                    upload one image (+ labels, source); searchable when the answer comes
    GET  /v1/points/{id}               the stored payload
    GET  /v1/points/{id}/thumbnail     a JPEG of the stored image (?size=256)
    GET  /v1/collections               model, dimension, points, what the page may offer
    GET  /healthz  /readyz  /metrics   process up; model, store and broker ready; Prometheus text
    GET  /                             the web page (static files shipped in the package)

Answers have the shape of ``lookalike search --json``. Every refusal is a 4xx with ``{"error": "…"}`` (a
request body over the cap is refused from its Content-Length or as it streams in, before it is read whole).
With ``LOOKALIKE_API_KEY`` set, writes need ``Authorization: Bearer <key>`` (reads too with
``LOOKALIKE_PROTECT_READS=1``); the key is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from search.errors import ConfigError, LookalikeError, StoreUnavailable
from search.schema import Filter
from workers.serve.service import Query, RequestError, Service, valid_id
from workers.serve.settings import ServeSettings
from workers.serve.thumbs import MAX_SIZE, MIN_SIZE

log = logging.getLogger("workers.serve")
STATIC = Path(__file__).with_name("static")


# ---------------------------------------------------------------------------------------------- shapes
class ErrorOut(BaseModel):
    error: str


class Tag(BaseModel):
    model_config = ConfigDict(extra="allow")
    label: str
    score: float


class HitOut(BaseModel):
    id: str
    score: float
    uris: list[str]
    labels: list[str]
    tags: list[Tag]
    sha256: str | None = None


class Answer(BaseModel):
    query: str
    kind: str = Field(description="image, url, text or id")
    results: list[HitOut]
    error: str | None = Field(None, description="why this query could not be served (its results are empty)")


class SearchBody(BaseModel):
    """A JSON search: any mix of stored ids, texts (CLIP models) and image URLs (when URL fetching is on)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(default_factory=list, max_length=1000)
    texts: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(default_factory=list, max_length=1000)
    urls: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(default_factory=list, max_length=1000)
    k: int = Field(10, ge=1, le=1000)
    filter: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=64)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class UploadOut(BaseModel):
    id: str
    status: str = Field(description="indexed, present, updated (in-process); accepted or queued (202)")
    uri: str
    tags: list[Tag] = Field(default_factory=list)
    neighbours: list[HitOut] = Field(default_factory=list)
    seconds: float | None = None


class PointOut(BaseModel):
    id: str
    payload: dict[str, Any]


class ForgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uris: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(min_length=1, max_length=1000)


class RemovalOut(BaseModel):
    target: str
    status: str = Field(description="removed (uri dropped, point kept), deleted (point gone) or absent")
    ids: list[str]


class CollectionOut(BaseModel):
    collection: str
    model: str
    dim: int
    preprocessing: str
    points: int
    supports_text: bool
    fetch_urls: bool
    store: str
    uploads: str


PointId = Annotated[str, PathParam(description="point id (UUID)", max_length=64)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 404, 413, 415, 422, 503)}


# ---------------------------------------------------------------------------------------------- plumbing
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # One printable line: a client's filename, JSON key or filter may carry newlines or terminal escapes.
    message = _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


def _authorise(request: Request, write: bool) -> None:
    settings: ServeSettings = request.app.state.settings
    if not settings.api_key or not (write or settings.protect_reads):
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <LOOKALIKE_API_KEY>'")


def read_access(request: Request) -> None:
    _authorise(request, write=False)


def write_access(request: Request) -> None:
    _authorise(request, write=True)


def _filter(exprs: list[str]) -> Filter | None:
    try:
        flt = Filter.parse(exprs)
    except ConfigError as err:
        raise RequestError(422, str(err).replace("--filter ", "filter ")) from None
    for match in flt.must if flt is not None else ():
        if any(isinstance(v, int) and not -(2**63) <= v < 2**63 for v in match.values):  # the store's int64
            raise RequestError(422, f"filter {match.field}: a whole number between -2^63 and 2^63-1")
    return flt


class BodyLimit:
    """Refuse a request body over ``limit`` bytes (413), from its Content-Length or while it streams."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await _error(400, "Content-Length is not a number")(scope, receive, send)
        if declared is not None and int(declared) > self.limit:
            return await _error(413, self._message())(scope, receive, send)
        seen, over = 0, False

        async def counted() -> Any:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except Exception:  # _TooLarge, bare or in the ExceptionGroup of a middleware's task group
            if not over:
                raise
            await _error(413, self._message())(scope, receive, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit / 1e6:g} MB (LOOKALIKE_MAX_BYTES)"


class _TooLarge(Exception):
    pass


def _install_middleware(app: FastAPI, settings: ServeSettings) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        try:
            response = await asyncio.wait_for(call_next(request), settings.request_timeout)
        except TimeoutError:
            response = _error(503, f"request took longer than {settings.request_timeout:g} s "
                                   "(LOOKALIKE_REQUEST_TIMEOUT)")
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics = request.app.state.service.metrics
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        metrics.latency.labels(route, request.method).observe(time.perf_counter() - t0)
        return response

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_bytes + (1 << 20))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _error(err.status, str(err), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(ClientDisconnect)
    async def gone(_: Request, _err: ClientDisconnect) -> JSONResponse:  # a body cut short, or a timed-out one
        return _error(400, "the client went away before sending the whole request body")

    @app.exception_handler(StoreUnavailable)
    async def store_down(_: Request, err: StoreUnavailable) -> JSONResponse:
        return _error(503, str(err))

    @app.exception_handler(LookalikeError)
    async def domain(_: Request, err: LookalikeError) -> JSONResponse:
        return _error(422, str(err))


# ---------------------------------------------------------------------------------------------- routes
def _search_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(read_access)], responses=ERRORS)
    multipart = {"multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}}}}}
    json_body = {"application/json": {"schema": SearchBody.model_json_schema()}}  # inline: not in components

    @router.post("/search", response_model=list[Answer], response_model_exclude_none=True,
                 openapi_extra={"requestBody": {"required": True, "content": {**json_body, **multipart}}})
    async def search(request: Request,
                     k: Annotated[int | None, QueryParam(ge=1, le=1000)] = None,
                     filter: Annotated[list[str] | None, QueryParam(max_length=64)] = None,
                     min_score: Annotated[float | None, QueryParam(ge=-1.0, le=1.0)] = None) -> Any:
        """Search by uploaded images (multipart ``image``, repeatable; ``k``, ``filter``, ``min_score`` as query
        parameters) or by a JSON body. One answer per query, in order: images, urls, texts, ids."""
        settings: ServeSettings = request.app.state.settings
        queries, body = await _read_queries(request, settings)
        k = body.k if body is not None and k is None else (k or 10)
        exprs = (body.filter if body is not None else []) + list(filter or [])
        min_score = body.min_score if body is not None and min_score is None else min_score
        if k > settings.max_k:
            raise RequestError(422, f"k: at most {settings.max_k} results per query (LOOKALIKE_MAX_K)")
        flt = _filter(exprs)
        answers = await run_in_threadpool(_service(request).search, queries, k=k, filter=flt, min_score=min_score)
        # Built by Service in the documented shape (the response model is the OpenAPI document's, and the
        # fuzz tests check answers against it): returned as is, not validated again on the hot path.
        return JSONResponse(answers)

    return router


async def _read_queries(request: Request, settings: ServeSettings) -> tuple[list[Query], SearchBody | None]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=settings.max_queries, max_fields=16)
        files = [f for key, f in form.multi_items() if key == "image" and hasattr(f, "read")]
        if not files:
            raise RequestError(422, "no 'image' file in the form (send multipart field 'image')")
        queries = [Query("image", f.filename or f"image {i + 1}", await f.read()) for i, f in enumerate(files)]
        return queries, None
    if content_type != "application/json":
        raise RequestError(415, "send application/json or multipart/form-data with 'image' files")
    try:
        body = SearchBody.model_validate_json(await request.body())
    except ValueError as err:
        first = getattr(err, "errors", lambda: [{}])()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise RequestError(422, f"{where}: {first.get('msg', 'not valid JSON')}") from None
    if body.urls and not settings.fetch_urls:
        raise RequestError(422, "URL queries need URL fetching: set LOOKALIKE_FETCH_URLS=1 on the server")
    queries = ([Query("url", u) for u in body.urls] + [Query("text", t) for t in body.texts]
               + [Query("id", _checked_id(i)) for i in body.ids])
    if not queries:
        raise RequestError(422, "give at least one of ids, texts, urls (or upload images as multipart)")
    if len(queries) > settings.max_queries:
        raise RequestError(422, f"at most {settings.max_queries} queries per request (LOOKALIKE_MAX_QUERIES)")
    return queries, body


def _checked_id(value: str) -> str:
    return valid_id(value)


def _images_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["images"], responses=ERRORS)
    form = {"multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"},
        "labels": {"type": "array", "items": {"type": "string"}, "description": "repeatable, or comma-separated"},
        "source": {"type": "string"}}}}}

    @router.post("/images", response_model=UploadOut, response_model_exclude_none=True, status_code=200,
                 dependencies=[Depends(write_access)], responses={202: {"model": UploadOut}},
                 openapi_extra={"requestBody": {"required": True, "content": form}})
    async def upload(request: Request, wait: bool = True, k: Annotated[int, QueryParam(ge=1, le=1000)] = 10) -> Any:
        """Store one image under the uploads folder and ingest it. In-process (embedded store) with
        ``wait=true``: answers once the point is durable and searchable, with its tags and neighbours.
        With a broker and a Qdrant server: publishes a live event and answers 202 with the point id."""
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise RequestError(415, "send multipart/form-data with an 'image' file")
        data = await request.form(max_files=1, max_fields=80)
        image = data.get("image")
        if image is None or not hasattr(image, "read"):
            raise RequestError(422, "no 'image' file in the form (send multipart field 'image')")
        labels = [part for value in data.getlist("labels") if isinstance(value, str)
                  for part in value.split(",") if part.strip()]
        source = data.get("source")
        status, body = await run_in_threadpool(
            _service(request).upload, await image.read(), image.filename or "upload", labels=labels,
            source=source if isinstance(source, str) and source.strip() else None, wait=wait,
            k=min(k, request.app.state.settings.max_k))
        return JSONResponse(body, status_code=status)

    return router


def _points_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["points"], dependencies=[Depends(read_access)], responses=ERRORS)

    @router.delete("/points/{point_id}", response_model=RemovalOut, dependencies=[Depends(write_access)])
    async def delete_point(request: Request, point_id: PointId) -> Any:
        """Delete one point from the index (its files are not touched)."""
        (done,) = await run_in_threadpool(_service(request).delete, [point_id])
        if done["status"] == "absent":
            raise RequestError(404, f"no point with id {done['target']}")
        return done

    @router.post("/forget", response_model=list[RemovalOut], dependencies=[Depends(write_access)])
    async def forget(request: Request, body: ForgetBody) -> Any:
        """Forget locations (the files are gone or moved): each uri leaves every point that lists it; a point
        left without a uri is deleted. One answer per uri."""
        return await run_in_threadpool(_service(request).forget, body.uris)

    @router.get("/points/{point_id}", response_model=PointOut)
    async def point(request: Request, point_id: PointId) -> Any:
        found = await run_in_threadpool(_service(request).point, point_id)
        if found is None:
            raise RequestError(404, f"no point with id {valid_id(point_id)}")
        return found

    @router.get("/points/{point_id}/thumbnail", response_class=Response,
                responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(request: Request, point_id: PointId,
                        size: Annotated[int, QueryParam(ge=MIN_SIZE, le=MAX_SIZE)] = 256) -> Response:
        service = _service(request)
        if await run_in_threadpool(service.point, point_id) is None:
            raise RequestError(404, f"no point with id {valid_id(point_id)}")
        data = await run_in_threadpool(service.thumbnail, point_id, size)
        if data is None:
            raise RequestError(404, "none of this point's files can be read (moved, changed, or outside "
                                    "LOOKALIKE_ALLOWED_ROOTS)")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=31536000, "
                                                                                  "immutable"})

    @router.get("/collections", response_model=CollectionOut)
    async def collections(request: Request) -> Any:
        return await run_in_threadpool(_service(request).collection)

    return router


def _ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up (the model may still be loading)."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "not ready: the checks say why"}})
    async def readyz(request: Request) -> JSONResponse:
        """Ready to serve: the model is loaded, the store (and the broker, when configured) answer."""
        checks = await run_in_threadpool(_service(request).readiness)
        return JSONResponse(checks, status_code=200 if checks["ready"] else 503)

    @router.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        body, content_type = await run_in_threadpool(_service(request).metrics.render)
        return Response(body, media_type=content_type)

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    return router


def create_app(settings: ServeSettings, *, service: Service | None = None, start: bool = True) -> FastAPI:
    """The app. ``service`` may be handed in (tests inject a tiny model); otherwise one is built from
    ``settings``. The model loads in the background when the app starts (``start``)."""
    settings.check_uploads()
    service = service or Service(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        if start:
            service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    from search import __version__

    app = FastAPI(title="lookalike", version=__version__, lifespan=lifespan,
                  description="Reverse image search: query by image, text (CLIP) or id; upload images.")
    app.state.settings, app.state.service = settings, service
    for router in (_search_router(), _images_router(), _points_router(), _ops_router()):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _install_middleware(app, settings)
    _install_error_handlers(app)
    return app


__all__ = ["create_app"]
