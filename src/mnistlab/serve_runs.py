"""`/runs` in `mnistlab serve`: the runs table, a run's page with live curves, and runs started,
stopped and resumed from the page (as child processes: `mnistlab.runner`).

Live curves come as server-sent events (`GET /api/runs/NAME/events`) fed by the run folder:
`steps.jsonl` (every progress line), `metrics.jsonl` (every epoch) and, at the end,
`summary.json`. Starting, stopping and resuming are allowed only when the server listens on a
loopback address or was started with `--allow-train`; otherwise they answer 403.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from . import runs, serve
from .errors import MnistlabError
from .runner import RunManager, check_train_args, train_args

POLL_SECONDS = 0.2  # how often a live page's stream looks at the run folder
ELSEWHERE_SECONDS = 60  # an unfinished run whose steps.jsonl changed this recently is "running"
LIVE = ("queued", "running", "stopping")
REPORT_CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
              "base-uri 'none'; form-action 'none'")


def train_allowed(host: str, allow_train: bool) -> bool:
    """Starting runs from the page: only on a loopback address, unless allowed outright."""
    if allow_train:
        return True
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_folder(runs_dir: Path, name: str) -> Path:
    """A run under `runs_dir` by its plain folder name (404 otherwise)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise serve.ApiError(404, f"no run {name!r}")
    folder = runs_dir / name
    if not (folder / runs.CONFIG).is_file():
        raise serve.ApiError(404, f"no run {name!r} in {runs_dir}")
    return folder


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def add_runs_routes(app: FastAPI, runs_dir: Path, allowed: bool,
                    root: str | os.PathLike[str] | None = None) -> None:
    """Register the /runs pages and the /api/runs API on `app`."""
    manager = RunManager(runs_dir, root)
    app.state.run_manager = manager
    app.state.on_shutdown.append(manager.close)

    def status(name: str) -> str:
        """queued, running, stopping, complete, stopped, failed or incomplete."""
        job = manager.state_of(name)
        if job is not None and job.state in LIVE:
            return job.state
        folder = runs_dir / name
        if (folder / runs.SUMMARY).is_file():
            return "complete"
        if job is not None:
            return {"finished": "complete"}.get(job.state, job.state)
        steps = folder / runs.STEPS
        if steps.is_file() and time.time() - steps.stat().st_mtime < ELSEWHERE_SECONDS:
            return "running"  # by a `mnistlab train` outside this server
        return "incomplete"

    def refuse_unless_allowed() -> None:
        if not allowed:
            raise serve.ApiError(
                403, "starting, stopping and resuming runs is off: the server is not on a "
                "loopback address; restart it with --allow-train to allow it")

    def page(name: str) -> FileResponse:
        return FileResponse(serve.STATIC / name,
                            headers={"Content-Security-Policy": serve.PAGE_CSP})

    @app.get("/runs", include_in_schema=False)
    async def runs_page() -> FileResponse:
        return page("runs.html")

    def known(name: str) -> Path:
        """The run's folder; a run queued here may not have made it yet."""
        if manager.state_of(name) is not None:
            return runs_dir / name
        return run_folder(runs_dir, name)

    @app.get("/runs/{name}", include_in_schema=False)
    async def run_page(name: str) -> FileResponse:
        known(name)
        return page("run.html")

    @app.get("/runs/{name}/report.html", include_in_schema=False)
    async def run_report(name: str) -> FileResponse:
        report = run_folder(runs_dir, name) / "report.html"
        if not report.is_file():
            raise serve.ApiError(404, f"run {name} has no report yet")
        return FileResponse(report, media_type="text/html",
                            headers={"Content-Security-Policy": REPORT_CSP})

    @app.get("/api/runs")
    async def list_runs() -> JSONResponse:
        """The runs folder's runs, newest first (queued ones on top), and what the page may do."""
        from .report import list_runs as rows_of

        try:
            rows = rows_of(runs_dir) if runs_dir.is_dir() else []
        except MnistlabError as e:
            raise serve.ApiError(500, str(e)) from None
        known = {r["name"] for r in rows}
        for r in rows:
            r["status"] = status(r["name"]) if r["status"] != "unreadable" else r["status"]
        queued = [{"name": j["name"], "status": j["state"], "model": None, "recipe": None,
                   "epochs": 0, "test_acc": None, "date": None}
                  for j in manager.snapshot() if j["state"] in LIVE and j["name"] not in known]
        return JSONResponse({"runs": queued + rows, "train_allowed": allowed,
                             "runs_dir": str(runs_dir)})

    @app.get("/api/runs/{name}")
    async def run_detail(name: str) -> JSONResponse:
        folder = known(name)
        job = manager.state_of(name)
        return JSONResponse({
            "name": name,
            "status": status(name),
            "config": _read_json(folder / runs.CONFIG),
            "history": runs.read_metrics(folder) if folder.is_dir() else [],
            "steps": runs.read_steps(folder) if folder.is_dir() else [],
            "summary": _read_json(folder / runs.SUMMARY),
            "report": (folder / "report.html").is_file(),
            "job": job.to_dict() if job else None,
            "log": list(job.log) if job else [],
            "train_allowed": allowed,
        })

    @app.get("/api/runs/{name}/events")
    async def run_events(name: str, request: Request) -> StreamingResponse:
        """Server-sent events: `step` (a progress line), `epoch` (an epoch's metrics), `status`,
        `done` (summary.json) and `end`. A stream starts with everything so far."""
        folder = known(name)

        async def stream() -> AsyncIterator[str]:
            sent_steps = sent_epochs = 0
            last = None
            while True:
                state = status(name)  # before reading: a final state means the files are final
                steps = runs.read_steps(folder)
                for record in steps[sent_steps:]:
                    yield _event("step", record)
                sent_steps = max(sent_steps, len(steps))
                try:
                    epochs = runs.read_metrics(folder)
                except MnistlabError:
                    epochs = []
                for record in epochs[sent_epochs:]:
                    yield _event("epoch", record)
                sent_epochs = max(sent_epochs, len(epochs))
                if state != last:
                    job = manager.state_of(name)
                    yield _event("status", {"status": state,
                                            "error": job.error if job else None})
                    last = state
                if state not in LIVE:
                    summary = _read_json(folder / runs.SUMMARY)
                    if summary is not None:
                        yield _event("done", summary)
                    yield _event("end", {"status": state})
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/api/runs", status_code=202)
    async def start_run(request: Request) -> JSONResponse:
        """Start (or queue) a run: JSON {recipe, model, epochs, lr, batch_size} (each optional;
        also train_limit, threads, log_every). Bad values get `mnistlab train`'s own error."""
        refuse_unless_allowed()
        try:
            form = json.loads(await request.body() or b"{}")
        except ValueError:
            raise serve.ApiError(422, "the body is not JSON; send the form as a JSON object"
                                 ) from None
        if not isinstance(form, dict):
            raise serve.ApiError(422, "the body must be a JSON object of form fields")
        try:
            args = train_args(form)
            check_train_args(args)
            job = manager.start(args)
        except MnistlabError as e:
            raise serve.ApiError(422, str(e)) from None
        return JSONResponse({"name": job.name, "status": job.state}, status_code=202)

    @app.post("/api/runs/{name}/stop")
    async def stop_run(name: str) -> JSONResponse:
        """Stop a run cleanly (SIGINT: it keeps its last complete epoch, resumable)."""
        refuse_unless_allowed()
        try:
            job = manager.stop(name)
        except MnistlabError as e:
            raise serve.ApiError(409, str(e)) from None
        return JSONResponse({"name": name, "status": job.state})

    @app.post("/api/runs/{name}/resume", status_code=202)
    async def resume_run(name: str) -> JSONResponse:
        """Continue a stopped run from its last complete epoch."""
        refuse_unless_allowed()
        run_folder(runs_dir, name)
        try:
            job = manager.resume(name)
        except MnistlabError as e:
            raise serve.ApiError(409, str(e)) from None
        return JSONResponse({"name": name, "status": job.state}, status_code=202)
