"""The server's views inside the model: `POST /api/explain`, the embedding map, the confusion
matrix with its digits, and the `/inside` page that shows them.

`/api/explain` takes the same three input forms as `/api/predict` and answers with the same
error statuses; its answer is `{"label", "probabilities", "saliency": 28×28}` (integrated
gradients of the predicted digit's score, from a black image; `mnistlab.inside`).
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from . import serve
from .errors import MnistlabError
from .predict import Predictor
from .preprocess import ImageError, NoInkError

EMBEDDING_DIGITS = 2000
CELL_DIGITS = 60  # digits listed per confusion-matrix cell

Run = Callable[..., Awaitable[Any]]


class ExplainResponse(BaseModel):
    label: int = Field(description="The predicted digit.", examples=[7])
    probability: float = Field(description="The predicted digit's probability.")
    probabilities: list[float] = Field(description="Probabilities of the digits 0–9.")
    saliency: list[list[float]] = Field(
        description="28×28 integrated gradients of the predicted digit's score, from a black "
        "image: positive pixels raised it, negative ones lowered it; they add up to the score's "
        "change from the black image."
    )
    preprocessed: str = Field(description="The 28×28 image the model saw, as a base64 PNG.")
    model: str


def explain_pixels(predictor: Predictor, pixels: torch.Tensor) -> dict[str, Any]:
    """Integrated gradients of one 28×28 image in [0, 1] (already preprocessed)."""
    from .inside import integrated_gradients

    e = integrated_gradients(predictor.model, pixels.unsqueeze(0))
    label = int(e.labels[0])
    probs = [float(p) for p in e.probabilities[0]]
    return {
        "label": label,
        "probability": probs[label],
        "probabilities": probs,
        "saliency": [[round(float(v), 6) for v in row] for row in e.attributions[0]],
        "preprocessed": serve._png_base64(pixels),
    }


def _pixels_of_image(predictor: Predictor, data: bytes) -> torch.Tensor:
    """The preprocessed image, with /api/predict's statuses for bad input."""
    try:
        return predictor.preprocess(data)
    except NoInkError as e:
        raise serve.ApiError(400, str(e)) from None
    except ImageError as e:
        raise serve.ApiError(415, str(e)) from None
    except MnistlabError as e:
        raise serve.ApiError(422, str(e)) from None


def _checked_pixels(pixels: torch.Tensor) -> torch.Tensor:
    if not bool((pixels > 0).any()):
        raise serve.ApiError(400, "the pixels are all 0: there is no digit to read; draw one")
    return pixels


class TestSet:
    """MNIST's test digits, loaded on first use (the server starts without them)."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = root
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            from .data import load_mnist

            try:
                self._data = load_mnist(self.root, "test")
            except MnistlabError as e:
                raise serve.ApiError(503, f"the MNIST test set is not available here: {e}"
                                     ) from None
        return self._data


def add_inside_routes(
    app: FastAPI, predictor: Predictor, run: Run, model_name: str, max_upload_bytes: int,
    runs_dir: Path, root: str | os.PathLike[str] | None = None,
) -> None:
    """Register /api/explain, /api/inside/*, /api/mnist/test/N.png and the /inside page."""
    test_set = TestSet(root)
    cache: dict[str, Any] = {}
    locks: dict[str, asyncio.Lock] = {}

    @app.post(
        "/api/explain",
        response_model=ExplainResponse,
        responses={400: {"model": serve.ErrorBody}, 413: {"model": serve.ErrorBody},
                   415: {"model": serve.ErrorBody}, 422: {"model": serve.ErrorBody}},
    )
    async def explain(request: Request) -> ExplainResponse:
        """Why the model reads what it reads: integrated gradients of the predicted digit.

        The same inputs as `/api/predict`: a multipart `file`, JSON `{"image": base64}` or JSON
        `{"pixels": 28×28}`.
        """
        kind, value = await serve.read_input(request, max_upload_bytes)
        if kind == "image":
            pixels = await run(_pixels_of_image, predictor, value)
        else:
            pixels = _checked_pixels(value)
        answer = await run(explain_pixels, predictor, pixels)
        return ExplainResponse(**answer, model=model_name)

    def _predictor_for(name: str | None) -> tuple[str, Predictor]:
        if not name:
            return "model", predictor
        from .serve_runs import run_folder

        folder = run_folder(runs_dir, name)
        if not (folder / "model.pt").is_file():
            raise serve.ApiError(409, f"run {name} has no final weights yet; wait for it to end")
        try:
            return f"run:{name}", Predictor.from_run(folder)
        except MnistlabError as e:
            raise serve.ApiError(422, str(e)) from None

    async def _cached(key: str, compute: Callable[[], Any]) -> Any:
        lock = locks.setdefault(key, asyncio.Lock())
        async with lock:  # one computation per key, however many ask at once
            if key not in cache:
                cache[key] = await run(compute)
            return cache[key]

    def _test_predictions(p: Predictor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = test_set.get()
        with torch.inference_mode():
            probs = p.predict_pixels(images.float() / 255).probabilities
        return images, labels, probs

    @app.get("/api/inside/embedding")
    async def embedding(request: Request) -> JSONResponse:
        """t-SNE map of 2,000 test digits' penultimate features (the served model, or `?run=`).

        Computed on first request (several seconds), then kept.
        """
        key, p = _predictor_for(request.query_params.get("run"))

        def compute() -> dict[str, Any]:
            from .inside import embedding_map

            images, labels = test_set.get()
            emap = embedding_map(p.model, images, labels, n=EMBEDDING_DIGITS, seed=0)
            return {"source": key, **emap.to_dict()}

        return JSONResponse(await _cached("embedding:" + key, compute))

    @app.get("/api/inside/confusion")
    async def confusion(request: Request) -> JSONResponse:
        """The test set's confusion matrix and, per cell, the first test digits in it."""
        key, p = _predictor_for(request.query_params.get("run"))

        def compute() -> dict[str, Any]:
            _, labels, probs = _test_predictions(p)
            pred = probs.argmax(1)
            matrix = torch.zeros(10, 10, dtype=torch.long)
            matrix.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
            cells: dict[str, list[int]] = {}
            order = torch.argsort(labels * 10 + pred, stable=True)
            keys = (labels * 10 + pred)[order]
            for k in torch.unique(keys).tolist():
                idx = order[keys == k][:CELL_DIGITS]
                cells[f"{k // 10},{k % 10}"] = idx.tolist()
            return {"source": key, "matrix": matrix.tolist(), "cells": cells,
                    "accuracy": 100.0 * float((pred == labels).float().mean()),
                    "count": len(labels)}

        return JSONResponse(await _cached("confusion:" + key, compute))

    @app.get("/api/mnist/test/{index}.png", include_in_schema=False)
    async def digit(index: int) -> Response:
        images, _ = test_set.get()
        if not 0 <= index < len(images):
            raise serve.ApiError(404, f"no test digit {index}; there are {len(images)}")
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(images[index].numpy()).save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png",
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/inside", include_in_schema=False)
    async def inside_page() -> FileResponse:
        return FileResponse(serve.STATIC / "inside.html",
                            headers={"Content-Security-Policy": serve.PAGE_CSP})
