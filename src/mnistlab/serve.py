"""The web service behind `mnistlab serve`: a drawing page at `/` and a JSON API over a Predictor.

`POST /api/predict` takes a multipart upload (field `file`), JSON `{"image": "<base64>"}` or JSON
`{"pixels": 28×28 numbers in [0, 1]}`. Every error is JSON `{"detail": "..."}`: 413 body or image
over the size limit, 415 not an image, 422 malformed body or pixels, 400 an image with no ink.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .errors import MnistlabError
from .predict import Prediction, Predictor
from .preprocess import ImageError, NoInkError

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 5_000_000
# Room beyond the image itself for multipart headers, JSON keys and a data: URL prefix.
BODY_OVERHEAD = 64 * 1024
# The page loads nothing from elsewhere; the browser enforces it too.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'"
)
DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w-]+=[\w.+-]+)*;base64,", re.ASCII)

Pixel = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]
PixelRow = Annotated[list[Pixel], Field(min_length=28, max_length=28)]


class PredictJSON(BaseModel):
    """A JSON request: exactly one of `image` and `pixels`."""

    model_config = ConfigDict(extra="forbid")

    image: Annotated[str, Field(strict=True)] | None = Field(
        None,
        description="A PNG/JPEG/... image as base64, optionally a data: URL.",
        examples=["data:image/png;base64,iVBORw0KGgo..."],
    )
    pixels: Annotated[list[PixelRow], Field(min_length=28, max_length=28)] | None = Field(
        None,
        description="28 rows of 28 numbers in [0, 1], white ink on black, already centred "
        "MNIST-style (no further preprocessing is applied).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictJSON:
        if (self.image is None) == (self.pixels is None):
            raise ValueError('give exactly one of "image" and "pixels"')
        return self


class PredictResponse(BaseModel):
    label: int = Field(description="The predicted digit.", examples=[7])
    probability: float = Field(description="The predicted digit's probability.", examples=[0.99])
    probabilities: list[float] = Field(description="Probabilities of the digits 0–9.")
    preprocessed: str = Field(description="The 28×28 image the model saw, as a base64 PNG.")
    model: str = Field(description="Name of the model that answered.")


class ModelInfo(BaseModel):
    name: str
    architecture: str
    parameters: int
    test_accuracy: float | None = Field(
        description="Accuracy on the 10,000 MNIST test digits, in percent (None if unknown)."
    )


class Health(BaseModel):
    status: str
    model: str
    version: str


class ErrorBody(BaseModel):
    detail: str


class ApiError(Exception):
    """An error the client caused, answered as JSON with its status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit from Content-Length, and while reading.

    The body is never buffered beyond the limit, whatever the client claims.
    """

    def __init__(self, app: ASGIApp, multipart_limit: int, other_limit: int) -> None:
        self.app = app
        self.multipart_limit = multipart_limit
        self.other_limit = other_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        limit = self.multipart_limit if ctype == b"multipart/form-data" else self.other_limit
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            response = _too_large(limit)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, _too_large_detail(limit))
            return message

        await self.app(scope, limited_receive, send)


def _too_large_detail(limit: int) -> str:
    return f"request body over the {limit:,}-byte limit; send a smaller image"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _too_large_detail(limit)}, status_code=413)


def create_app(
    predictor: Predictor,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    *,
    runs_dir: str | os.PathLike[str] = "runs",
    train_allowed: bool = False,
    root: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """The FastAPI app: page, API and offline docs, answering with `predictor`.

    `runs_dir` is shown at /runs; `train_allowed` lets the page start runs there
    (`mnistlab.serve_runs`); `root` is the MNIST data root for the views inside the model.
    """
    if max_upload_bytes <= 0:
        raise MnistlabError(f"the upload limit must be positive, not {max_upload_bytes}")
    info = dict(predictor.info)
    model_name = str(info.get("name") or "model")
    # Preprocessing and inference are CPU-bound: they run off the event loop, in a few threads
    # taking jobs first come, first served, so a burst queues fairly instead of thrashing.
    executor = ThreadPoolExecutor(
        max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="mnistlab-predict"
    )

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for hook in app.state.on_shutdown:
            hook()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPIOffline(
        title="mnistlab",
        version=__version__,
        description="Handwritten-digit recognition: draw or upload a digit, get its label and "
        "the probabilities of all ten digits.",
        swagger_ui_parameters={"validatorUrl": None},
        static_url="/static/docs",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimit,
        multipart_limit=max_upload_bytes + BODY_OVERHEAD,
        other_limit=(max_upload_bytes + 2) // 3 * 4 + BODY_OVERHEAD,  # base64 grows by 4/3
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.on_shutdown = []  # called as the server stops (the runs page stops its child)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Reached only through a bug; uvicorn logs the traceback.
        return JSONResponse({"detail": "internal error in mnistlab"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/api/health", response_model=Health)
    async def health() -> Health:
        """Liveness: the server is up and has a model loaded."""
        return Health(status="ok", model=model_name, version=__version__)

    @app.get("/api/model", response_model=ModelInfo)
    async def model() -> ModelInfo:
        """The loaded model: name, architecture, parameter count and MNIST test accuracy."""
        return ModelInfo(
            name=model_name,
            architecture=str(info.get("architecture", "")),
            parameters=int(info.get("parameters", 0)),
            test_accuracy=info.get("test_accuracy"),
        )

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "The image has no ink."},
        413: {"model": ErrorBody, "description": "The body or image is over the size limit."},
        415: {"model": ErrorBody, "description": "Not an image, or an unsupported body type."},
        422: {"model": ErrorBody, "description": "Malformed body, wrong shape or bad values."},
    }
    upload_schema = {
        "type": "object",
        "properties": {"file": {"type": "string", "format": "binary"}},
        "required": ["file"],
    }
    request_body = {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": upload_schema},
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    }

    @app.post(
        "/api/predict",
        response_model=PredictResponse,
        responses=errors,
        openapi_extra={"requestBody": request_body},
    )
    async def predict(request: Request) -> PredictResponse:
        """Read one digit from an uploaded image, a base64 image, or 28×28 pixels.

        Images get the same MNIST-style preprocessing as `mnistlab predict`; pixels are used as
        they are.
        """
        kind, value = await read_input(request, max_upload_bytes)
        if kind == "image":
            result = await run(_predict_image, predictor, value)
        else:
            result = await run(_predict_pixels, predictor, value)
        return _response(result, model_name)

    from .serve_inside import add_inside_routes
    from .serve_runs import add_runs_routes

    add_inside_routes(app, predictor, run, model_name, max_upload_bytes, Path(runs_dir), root)
    add_runs_routes(app, Path(runs_dir), train_allowed, root)
    return app


async def read_input(request: Request, max_upload_bytes: int) -> tuple[str, Any]:
    """A digit request's input: ("image", bytes) from a multipart `file` or JSON `image`, or
    ("pixels", float32 [28, 28]) from JSON `pixels`; ApiError for anything else."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return "image", await _read_upload(request, max_upload_bytes)
    if ctype == "application/json" or ctype.endswith("+json"):
        body = _parse_json(await request.body())
        if body.image is not None:
            return "image", _decode_base64(body.image, max_upload_bytes)
        return "pixels", torch.tensor(body.pixels, dtype=torch.float32)
    raise ApiError(
        415,
        f"unsupported body type {ctype or '(none)'!r}; send multipart/form-data with "
        'the image in field "file", or JSON {"image": ...} or {"pixels": ...}',
    )


async def _read_upload(request: Request, limit: int) -> bytes:
    try:
        form = await request.form(max_files=1, max_fields=16)
    except StarletteHTTPException as e:  # Starlette's answer to a malformed multipart body
        raise ApiError(422, f"malformed multipart body: {e.detail}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, 'no file in form field "file"; upload the image as "file"')
        data = await upload.read(limit + 1)
    finally:
        await form.close()
    if len(data) > limit:
        raise ApiError(413, f"image over the {limit:,}-byte upload limit; send a smaller image")
    return data


def _parse_json(body: bytes) -> PredictJSON:
    try:
        return PredictJSON.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        where = where.lstrip(".")
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ApiError(422, f"{where + ': ' if where else ''}{message}{more}") from None


def _decode_base64(text: str, limit: int) -> bytes:
    match = DATA_URL.match(text)
    payload = text[match.end() :] if match else text
    if len(payload) > (limit + 2) // 3 * 4 + 4:
        raise ApiError(413, f"image over the {limit:,}-byte upload limit; send a smaller image")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            422, '"image" is not valid base64; send the image file base64-encoded'
        ) from None
    if not data:
        raise ApiError(422, '"image" is empty; send the image file base64-encoded')
    if len(data) > limit:
        raise ApiError(413, f"image over the {limit:,}-byte upload limit; send a smaller image")
    return data


def _predict_image(predictor: Predictor, data: bytes) -> tuple[Prediction, str]:
    try:
        (prediction,) = predictor.predict([data])
    except NoInkError as e:
        raise ApiError(400, str(e)) from None
    except ImageError as e:
        raise ApiError(415, str(e)) from None
    except MnistlabError as e:
        raise ApiError(422, str(e)) from None
    return prediction, _png_base64(prediction.image)


def _predict_pixels(predictor: Predictor, pixels: torch.Tensor) -> tuple[Prediction, str]:
    if not bool((pixels > 0).any()):
        raise ApiError(400, "the pixels are all 0: there is no digit to read; draw one")
    try:
        (prediction,) = predictor.predict_pixels(pixels)
    except MnistlabError as e:
        raise ApiError(422, str(e)) from None
    return prediction, _png_base64(prediction.image)


def _png_base64(image: torch.Tensor) -> str:
    """A [28, 28] tensor in [0, 1] as a base64 grayscale PNG."""
    array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _response(result: tuple[Prediction, str], model_name: str) -> PredictResponse:
    prediction, png = result
    return PredictResponse(
        label=int(prediction.label),
        probability=float(prediction.probability),
        probabilities=[float(p) for p in prediction.probabilities],
        preprocessed=png,
        model=model_name,
    )
