"""`mnistlab serve` for real: a server process on 127.0.0.1, driven by headless Chromium.

Draws digits with the mouse, uploads an MNIST test digit, reads the answers off the page, checks
that nothing is fetched from outside the server and that the console stays clean.
"""

from __future__ import annotations

import io
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import expect, sync_playwright

from mnistlab.data import load_mnist

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def artifacts_dir() -> Path:
    path = Path(os.environ.get("MNISTLAB_ARTIFACTS") or REPO / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Server:
    """A `mnistlab serve --port 0` process; its URL is read from the line it prints."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mnistlab", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.started = time.perf_counter()
        first = self.next_line(timeout=60)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        assert match, f"no URL in {first!r}; stderr: {self.stderr_now()}"
        self.url = match.group(0)
        self.port = int(match.group(1))
        self.startup_seconds = time.perf_counter() - self.started

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def stderr_now(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read() if self.proc.stderr else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> tuple[int, str, str]:
        """Send `sig`, wait, return (exit code, rest of stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        time.sleep(0.05)  # let the pump thread drain
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return code, "".join(rest), self.proc.stderr.read() if self.proc.stderr else ""


@pytest.fixture(scope="module")
def server():
    srv = Server()  # the bundled model
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Page:
    """A fresh page that records console errors, page errors and any request off the server."""

    def __init__(self, browser, server: Server) -> None:
        self.context = browser.new_context(viewport={"width": 1100, "height": 760})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.predict_requests: list[float] = []  # browser-side start times, seconds
        self.in_flight = 0
        self.max_in_flight = 0
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", self._request)
        self.page.on("requestfinished", self._done)
        self.page.on("requestfailed", self._done)
        origin = server.url.rstrip("/")

        def guard(route) -> None:
            url = route.request.url
            if url.startswith((origin, "data:", "blob:")):
                route.continue_()
            else:
                self.outside.append(url)
                route.abort()

        self.page.route("**/*", guard)
        self.page.goto(server.url)
        # The page's CSP forbids eval, so waits go through locators, not wait_for_function.
        expect(self.page.locator("#model")).to_contain_text("Model: ")

    def _console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _request(self, request) -> None:
        if request.url.endswith("/api/predict"):
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _done(self, request) -> None:
        if request.url.endswith("/api/predict"):
            self.in_flight -= 1
            # The browser's own clock: events reach Python late and in bursts.
            self.predict_requests.append(request.timing["startTime"] / 1000)

    def pad_box(self) -> dict[str, float]:
        box = self.page.locator("#pad").bounding_box()
        assert box and box["width"] > 200 and abs(box["width"] - box["height"]) < 1
        return box

    def draw(self, points: list[tuple[float, float]], pause_ms: float = 0) -> None:
        """Press at the first point, move through the rest, release. Points in [0, 1]²."""
        box = self.pad_box()
        to_px = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]
        mouse = self.page.mouse
        mouse.move(*to_px[0])
        mouse.down()
        for x, y in to_px[1:]:
            mouse.move(x, y, steps=2)
            if pause_ms:
                self.page.wait_for_timeout(pause_ms)
        mouse.up()

    def label(self) -> str:
        return self.page.locator("#label").inner_text()

    def wait_idle(self) -> None:
        idle = self.page.locator("body:not([data-busy])")
        idle.wait_for()
        self.page.wait_for_timeout(250)  # a trailing request after the last stroke, if any
        idle.wait_for()

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.outside == [], f"requests off the server: {self.outside}"

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, server):
    p = Page(browser, server)
    yield p
    p.close()


def vertical_stroke(n: int = 24) -> list[tuple[float, float]]:
    return [(0.5 + 0.01 * (i / n), 0.15 + 0.7 * i / n) for i in range(n + 1)]


def loop(n: int = 48) -> list[tuple[float, float]]:
    # Start at the top, go round once and a little further so the ends overlap.
    return [
        (0.5 + 0.24 * math.sin(t), 0.5 - 0.34 * math.cos(t))
        for t in (2 * math.pi * 1.05 * i / n for i in range(n + 1))
    ]


def test_server_starts_quickly_and_answers_health(server):
    assert server.startup_seconds < 30  # a couple of seconds on a quiet machine
    response = httpx.get(server.url + "api/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_heavy_predictions_do_not_block_the_server(server):
    # 6000×6000 pixels (36 MP, under the decoder's limit) compress to ~50 kB but take about half a
    # second each to decode and preprocess; the event loop must keep answering meanwhile.
    image = Image.new("L", (6000, 6000), 255)
    ImageDraw.Draw(image).line([(3000, 1000), (3000, 5000)], fill=0, width=300)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    files = {"file": ("big.png", buffer.getvalue(), "image/png")}
    results: list[httpx.Response] = []

    def heavy() -> None:
        results.append(httpx.post(server.url + "api/predict", files=files, timeout=60))

    threads = [threading.Thread(target=heavy) for _ in range(6)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(0.2)
    health = []
    while any(t.is_alive() for t in threads) and len(health) < 10:
        t0 = time.perf_counter()
        assert httpx.get(server.url + "api/health", timeout=30).status_code == 200
        health.append(time.perf_counter() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    heavy_seconds = time.perf_counter() - started
    assert [r.status_code for r in results] == [200] * 6
    assert all(r.json()["label"] == 1 for r in results)
    assert len(health) >= 2, f"the heavy requests ended too soon ({heavy_seconds:.2f} s)"
    assert max(health) < max(0.5, heavy_seconds / 4), (health, heavy_seconds)


def test_oversized_content_length_is_refused_before_the_body(server):
    # Only the headers are sent: the answer must come from Content-Length alone.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert b"application/json" in head
    assert b"limit" in body


def test_page_shows_the_model(page, server):
    model = httpx.get(server.url + "api/model", timeout=10).json()
    footer = page.page.locator("#model").inner_text()
    assert model["name"] in footer and model["architecture"] in footer
    assert f"{model['parameters']:,} parameters" in footer
    accuracy = model["test_accuracy"]
    shown = "test accuracy unknown." if accuracy is None else f"test accuracy {accuracy:.2f}%"
    assert shown in footer, footer
    assert page.label() == "–"
    page.assert_clean()


def test_vertical_stroke_reads_1(page):
    page.draw(vertical_stroke())
    expect(page.page.locator("#label")).to_have_text("1")
    page.wait_idle()
    assert page.label() == "1"
    assert page.page.locator(".bar.winner").get_attribute("data-digit") == "1"
    seen = page.page.locator("#preprocessed").get_attribute("src")
    assert seen.startswith("data:image/png;base64,")
    page.assert_clean()


def test_loop_reads_0_and_screenshot(page):
    page.draw(loop())
    expect(page.page.locator("#label")).to_have_text("0")
    page.wait_idle()
    assert page.label() == "0"
    assert "sure" in page.page.locator("#confidence").inner_text()
    page.page.screenshot(path=str(artifacts_dir() / "serve-page-drawn-0.png"), full_page=True)
    page.page.click("#clear")
    assert page.label() == "–"
    page.page.wait_for_timeout(200)
    assert page.label() == "–"  # no late answer repaints a cleared page
    page.assert_clean()


def test_live_prediction_while_drawing_without_a_request_storm(page):
    box = page.pad_box()
    mouse = page.page.mouse
    points = vertical_stroke(60)
    mouse.move(box["x"] + points[0][0] * box["width"], box["y"] + points[0][1] * box["height"])
    started = time.perf_counter()
    mouse.down()
    for x, y in points[1:]:
        mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.page.wait_for_timeout(15)
    # Answers arrive while the button is still down.
    expect(page.page.locator("#label")).not_to_have_text("–")
    stroke = time.perf_counter() - started
    mouse.up()
    page.wait_idle()
    sent = sorted(page.predict_requests)
    gaps = np.diff(sent)
    # The page throttles to one request per 150 ms, one at a time, plus one when the pen lifts.
    assert 1 <= len(sent) <= stroke / 0.15 + 2, f"{len(sent)} requests in a {stroke:.2f} s stroke"
    # Spacing is measured where requests start, after the PNG encoding, so it wobbles a little.
    # The last gap may end at the pen-lift request, which is sent at once (by design), so it can
    # be short: the throttle is checked on the gaps inside the stroke.
    stroke_gaps = gaps[:-1] if len(gaps) > 1 else gaps
    assert np.median(gaps) >= 0.14 and stroke_gaps.min() > 0.05, gaps
    assert page.max_in_flight == 1
    assert page.label() == "1"
    page.assert_clean()


def test_upload_reads_an_mnist_test_digit(page, data_root, tmp_path):
    images, labels = load_mnist(data_root, "test")
    index = 0  # a 7
    path = tmp_path / "mnist-test-0.png"
    Image.fromarray(images[index].numpy()).resize((112, 112), Image.NEAREST).save(path)
    page.page.set_input_files("#file", str(path))
    expected = str(int(labels[index]))
    expect(page.page.locator("#label")).to_have_text(expected, timeout=15_000)
    assert page.page.locator("#status").inner_text() == f"Read as {expected}."
    page.wait_idle()
    assert page.page.locator(".bar.winner").get_attribute("data-digit") == expected
    page.page.screenshot(path=str(artifacts_dir() / "serve-page-upload.png"), full_page=True)
    page.assert_clean()


def test_upload_of_a_non_image_shows_the_error(page, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    page.page.set_input_files("#file", str(path))
    status = page.page.locator("#status.error")
    status.wait_for(timeout=15_000)
    assert "not an image" in status.inner_text()
    assert page.label() == "–"
    # The 415 itself is logged by Chromium as a failed resource; nothing else may be.
    assert all("415" in e for e in page.errors), page.errors
    assert page.outside == []


def test_docs_work_offline(browser, server):
    p = Page(browser, server)
    try:
        p.page.goto(server.url + "docs")
        p.page.locator(".opblock-summary-path", has_text="/api/predict").wait_for(timeout=15_000)
        p.assert_clean()
    finally:
        p.close()


def test_port_in_use_is_one_clear_line(server, run_cli):
    done = run_cli("serve", "--port", str(server.port), timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnistlab: error: "), done.stderr
    assert "already in use" in lines[0] and "--port" in lines[0]


def test_sigint_stops_a_server_cleanly():
    srv = Server()
    code, out, err = srv.stop(signal.SIGINT)
    assert code == 0, err
    assert "stopped" in out
    assert "Traceback" not in err


def test_sigterm_stops_the_server_cleanly(server):
    # Last in the module: stops the shared server.
    code, out, err = server.stop(signal.SIGTERM)
    assert code == 0, err
    assert "stopped" in out
    assert "Traceback" not in err
