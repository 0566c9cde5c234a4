"""The live runs page, Stop and Resume, the Why? overlay and the embedding map, for real: a
`mnistlab serve` process on 127.0.0.1 training child `mnistlab train` runs, driven by headless
Chromium. Screenshots go to $MNISTLAB_ARTIFACTS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from mnistlab.data import load_mnist
from test_serve_browser import CHROMIUM, CHROMIUM_ARGS, Server, artifacts_dir

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("page-runs")


@pytest.fixture(scope="module")
def server(runs_dir):
    srv = Server("--runs-dir", str(runs_dir))
    yield srv
    code, _, err = srv.stop()
    assert code == 0, err


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    origin = server.url.rstrip("/")

    def guard(route) -> None:
        if route.request.url.startswith((origin, "data:", "blob:")):
            route.continue_()
        else:
            problems.append(f"outside: {route.request.url}")
            route.abort()

    pg.route("**/*", guard)
    pg.problems = problems
    yield pg
    context.close()


def start_from_form(page, server, **fields: str) -> str:
    page.goto(server.url + "runs")
    page.locator("body[data-loaded]").wait_for()
    page.click("form.start summary")
    for key, value in fields.items():
        page.fill(f"#f-{key.replace('_', '-')}", value)
    page.click("#start-button")
    page.wait_for_url("**/runs/2*")
    return page.url.rstrip("/").rsplit("/", 1)[1]


def body(page, attr: str) -> str | None:
    return page.locator("body").get_attribute(f"data-{attr}")


def test_a_two_epoch_run_updates_live_and_ends_with_summary_json(page, server, runs_dir):
    name = start_from_form(page, server, epochs="2", threads="1")
    samples = []  # (status, updates) as the page showed them while the run went on
    shot = False
    deadline = time.monotonic() + 180
    while body(page, "ended") is None and time.monotonic() < deadline:
        status, updates = body(page, "status"), int(body(page, "updates") or 0)
        samples.append((status, updates))
        if not shot and status == "running" and updates >= 6:
            page.screenshot(path=str(artifacts_dir() / "runs-live-during.png"), full_page=True)
            shot = True
        page.wait_for_timeout(100)
    assert body(page, "ended") == "1", samples[-5:]
    summary = json.loads((runs_dir / name / "summary.json").read_text())
    total = int(body(page, "updates"))
    assert total == 2 * 7 + 2  # 7 progress lines and one epoch line per epoch
    assert int(body(page, "live-updates")) >= 10
    # Live, not replayed: the page showed part of the curves while the run was still running.
    assert any(s == "running" and 0 < u < total for s, u in samples), samples
    expect(page.locator("#final-acc")).to_have_text(f"{summary['test_acc']:.2f}%")
    assert body(page, "status") == "complete"
    assert int(page.locator("#loss-chart").get_attribute("data-points")) == 14 + 2 + 2
    page.locator("#report[src]").wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir() / "runs-live-finished.png"), full_page=True)
    page.goto(server.url + "runs")
    expect(page.locator(f"#runs tr[data-name='{name}'] .badge")).to_have_text("complete")
    assert page.problems == []


def test_stop_leaves_a_resumable_run_and_resume_finishes_it(page, server, runs_dir):
    name = start_from_form(page, server, epochs="4", threads="1")
    run = runs_dir / name
    # Stop once the first epoch is in (7 progress lines + its epoch line).
    deadline = time.monotonic() + 120
    while int(body(page, "updates") or 0) < 8 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped", timeout=60_000)
    page.screenshot(path=str(artifacts_dir() / "runs-stopped.png"), full_page=True)
    assert not (run / "summary.json").exists()
    assert (run / "checkpoint.pt").is_file()
    done = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(done) < 4
    assert "Resume" in page.locator("#message").inner_text()
    expect(page.locator("#resume")).to_be_enabled()
    page.click("#resume")
    expect(page.locator("#status")).to_have_text("complete", timeout=180_000)
    page.locator("body[data-ended]").wait_for(timeout=30_000)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 4
    expect(page.locator("#final-acc")).to_have_text(f"{summary['test_acc']:.2f}%")
    log = page.locator("#log").inner_text()
    assert f"after epoch {len(done)}/4" in log  # it continued, it did not start over
    assert page.problems == []


def test_why_overlay_and_embedding_map(page, server, data_root, tmp_path):
    images, labels = load_mnist(data_root, "test")
    path = tmp_path / "seven.png"
    Image.fromarray(images[0].numpy()).resize((112, 112), Image.NEAREST).save(path)
    page.goto(server.url)
    expect(page.locator("#model")).to_contain_text("Model: ")
    page.check("#why")
    page.set_input_files("#file", str(path))
    overlay = page.locator("#why-overlay:not([hidden])")
    overlay.wait_for(timeout=20_000)
    assert overlay.get_attribute("data-label") == str(int(labels[0]))
    page.screenshot(path=str(artifacts_dir() / "why-overlay.png"))
    page.uncheck("#why")
    expect(page.locator("#why-overlay")).to_be_hidden()

    page.goto(server.url + "inside")
    page.locator("#map[data-points='2000']").wait_for(timeout=120_000)
    box = page.locator("#map").bounding_box()
    hover = page.locator("#hover")
    for step in range(400):  # sweep until the pointer is over a digit
        x = box["x"] + 40 + (step % 20) * (box["width"] - 80) / 20
        y = box["y"] + 40 + (step // 20) * (box["height"] - 80) / 20
        page.mouse.move(x, y)
        if hover.is_visible():
            break
    expect(hover).to_be_visible()
    index = int(hover.get_attribute("data-index"))
    text = page.locator("#hover-text").inner_text()
    assert f"test digit {index}: a {int(labels[index])}, read as " in text
    page.screenshot(path=str(artifacts_dir() / "embedding-map.png"))
    page.click("#confusion td[data-cell='4,9']")
    cell = page.locator("#cell-digits img")
    expected = int(page.locator("#confusion td[data-cell='4,9']").inner_text())
    expect(cell).to_have_count(min(expected, 60))
    for img in cell.all():
        assert int(labels[int(img.get_attribute("data-index"))]) == 4
    page.screenshot(path=str(artifacts_dir() / "confusion-cell.png"), full_page=True)
    assert page.problems == []


def test_runs_queue_one_at_a_time(server, runs_dir):
    import httpx

    form = {"epochs": "1", "train_limit": "2000", "threads": "1"}
    first = httpx.post(server.url + "api/runs", json=form, timeout=30)
    second = httpx.post(server.url + "api/runs", json=form, timeout=30)
    assert first.status_code == second.status_code == 202
    assert first.json()["status"] == "running" and second.json()["status"] == "queued"
    a, b = first.json()["name"], second.json()["name"]
    listed = {r["name"]: r["status"] for r in httpx.get(server.url + "api/runs").json()["runs"]}
    assert listed[b] == "queued" and listed[a] == "running"
    stopped = httpx.post(server.url + f"api/runs/{b}/stop", timeout=30)
    assert stopped.json()["status"] == "stopped"  # a queued run is dropped, never started
    assert httpx.post(server.url + f"api/runs/{a}/stop", timeout=30).status_code == 200
    deadline = time.monotonic() + 120
    while httpx.get(server.url + f"api/runs/{a}").json()["status"] in ("running", "stopping"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert not (runs_dir / b).exists()  # never started
    listed = {r["name"] for r in httpx.get(server.url + "api/runs").json()["runs"]}
    assert b not in listed
