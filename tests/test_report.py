"""`mnistlab report`, `runs` and `compare` on a really trained run, and the report in Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"curves", "per_class", "confusion_matrix", "predictions", "misclassified",
           "calibration"}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_cli, data_root):
    """One short real run, trained once by `mnistlab train` (which writes its report)."""
    runs_dir = tmp_path_factory.mktemp("runs")
    done = run_cli(
        "train", "--epochs", "2", "--val-split", "0.1", "--train-limit", "15000",
        "--threads", "1", "--runs-dir", runs_dir, "--name", "lab", "--json", "--no-progress",
        env={"MNISTLAB_DATA": str(data_root)}, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    run = runs_dir / "lab"
    return {
        "runs_dir": runs_dir,
        "run": run,
        "stdout": done.stdout,
        "stderr": done.stderr,
        "summary": json.loads((run / "summary.json").read_text()),
        "metrics": [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n")
                    if line],
    }


class Page(HTMLParser):
    """The tags, ids' texts and images of a report page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.by_id: dict[str, str] = {}
        self._open: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        for key in self._open:  # cells and rows read as separate words
            if key:
                self.by_id[key] += " "
        if attrs.get("id"):
            self.by_id[attrs["id"]] = ""
            self._open.append(attrs["id"])
        elif tag not in ("img", "meta", "link", "br"):
            self._open.append("")

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for key in self._open:
            if key:
                self.by_id[key] += data

    def images(self) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == "img"]


def text_of(page: Page, element_id: str) -> str:
    return " ".join(page.by_id[element_id].split())


def pct(value: float) -> str:
    return f"{value:.2f}%"


def copy_run(trained, dest: Path, name: str) -> Path:
    target = dest / name
    shutil.copytree(trained["run"], target, ignore=shutil.ignore_patterns("report*"))
    return target


def assert_one_line_error(done, *fragments: str, code: int = 1) -> None:
    assert done.returncode == code, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mnistlab: error: ")
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# --- the report ------------------------------------------------------------------------------


def test_train_writes_the_report_and_keeps_json_stdout_clean(trained):
    summary = json.loads(trained["stdout"])  # stdout is exactly the summary JSON
    assert summary == trained["summary"]
    report = trained["run"] / "report.html"
    assert f"Report: {report}" in trained["stderr"]
    assert {p.stem for p in (trained["run"] / "report").glob("*.png")} == FIGURES


def test_train_no_report(tmp_path, run_cli, data_root):
    done = run_cli(
        "train", "--epochs", "1", "--train-limit", "600", "--threads", "1", "--runs-dir",
        tmp_path, "--name", "quiet", "--no-report", "--no-progress",
        env={"MNISTLAB_DATA": str(data_root)},
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "quiet" / "summary.json").is_file()
    assert not (tmp_path / "quiet" / "report.html").exists()
    assert "Report:" not in done.stdout + done.stderr


def test_report_is_self_contained_and_shows_the_runs_numbers(trained):
    run, summary = trained["run"], trained["summary"]
    html = (run / "report.html").read_text()
    page = Page(html)
    # Nothing is fetched: no scripts, no external references, every image a PNG data URI.
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html, re.I)
    images = page.images()
    assert len(images) == len(FIGURES)
    for img in images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).size[0] > 300
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in images}
    assert embedded == {p.read_bytes() for p in (run / "report").glob("*.png")}
    # The numbers are the run's own.
    assert summary["test_acc"] == trained["metrics"][-1]["test_acc"]
    assert text_of(page, "test-acc") == pct(summary["test_acc"])
    assert text_of(page, "best-val-acc") == pct(max(r["val_acc"] for r in trained["metrics"]))
    assert text_of(page, "eval-acc") == pct(summary["test_acc"])  # model.pt re-evaluated
    assert text_of(page, "status") == "complete"
    assert "incomplete" not in page.by_id
    assert "SimpleMNISTDNN" in html
    table = html[html.index('id="per-class"'):]
    table = table[: table.index("</table>")]
    rows = re.findall(r'<tr><td class="k">(\d)</td>(.*?)</tr>', table, re.S)
    assert [int(digit) for digit, _ in rows] == list(range(10))
    supports = [int(re.findall(r"<td>([^<]*)</td>", cells)[-1]) for _, cells in rows]
    assert supports == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    epochs = text_of(page, "epochs")
    for record in trained["metrics"]:
        assert pct(record["test_acc"]) in epochs and f"{record['train_loss']:.4f}" in epochs
    config = text_of(page, "config")
    assert "val_split 0.1" in config and "train_limit 15000" in config
    assert "torch" in text_of(page, "environment")


def test_report_of_an_incomplete_run_uses_its_checkpoint(trained, tmp_path, run_cli, data_root):
    # Killed after its last epoch's checkpoint but before model.pt and summary.json; its config
    # also carries markup, which must come out as text.
    run = copy_run(trained, tmp_path, "crashed")
    (run / "summary.json").unlink()
    (run / "model.pt").unlink()
    config = json.loads((run / "config.json").read_text())
    config["recipe"] = "<script>alert('x')</script>&"
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "elsewhere" / "crashed.html"
    done = run_cli("report", run, "--out", out, env={"MNISTLAB_DATA": str(data_root)})
    assert done.returncode == 0, done.stderr
    assert "INCOMPLETE" in done.stdout
    assert {p.stem for p in (tmp_path / "elsewhere" / "crashed").glob("*.png")} == FIGURES
    assert not (run / "report.html").exists()
    html = out.read_text()
    page = Page(html)
    assert text_of(page, "status") == "incomplete"
    assert "INCOMPLETE" in text_of(page, "incomplete")
    last = trained["metrics"][-1]
    assert text_of(page, "test-acc") == pct(last["test_acc"])
    assert text_of(page, "eval-acc") == pct(last["test_acc"])  # checkpoint.pt re-evaluated
    assert "checkpoint.pt" in html
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;" in html


def test_report_without_weights_shows_what_exists(trained, tmp_path, run_cli):
    run = tmp_path / "early"
    run.mkdir()
    for name in ("config.json", "environment.json"):
        shutil.copy(trained["run"] / name, run / name)
    first = trained["metrics"][0]
    (run / "metrics.jsonl").write_text(json.dumps(first) + "\n")
    done = run_cli("report", run)
    assert done.returncode == 0, done.stderr
    assert "no weights yet" in done.stderr
    page = Page((run / "report.html").read_text())
    assert len(page.images()) == 1
    assert text_of(page, "test-acc") == pct(first["test_acc"])
    assert text_of(page, "status") == "incomplete"
    assert [p.name for p in (run / "report").glob("*.png")] == ["curves.png"]


@pytest.mark.parametrize(
    "case",
    ["missing", "not-a-run", "no-epoch", "bad-json", "not-utf8", "not-records", "out-is-dir"],
)
def test_report_bad_input_is_one_clear_line(case, trained, tmp_path, run_cli):
    run = tmp_path / "run"
    args = ["report", run]
    expect = [str(run)]
    if case != "missing":
        run.mkdir()
    if case not in ("missing", "not-a-run"):
        shutil.copy(trained["run"] / "config.json", run / "config.json")
    if case == "not-a-run":
        expect.append("no config.json")
    elif case == "no-epoch":
        expect.append("no complete epoch yet")
    elif case == "bad-json":
        (run / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 90.0}\n{"epoch": 2, "te\n')
        expect += ["metrics.jsonl", "line 2"]
    elif case == "not-utf8":
        (run / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage")
        expect.append("metrics.jsonl is unreadable")
    elif case == "not-records":
        (run / "metrics.jsonl").write_text("[1, 2]\n")
        expect.append("metrics.jsonl is unreadable at record 1")
    elif case == "out-is-dir":
        shutil.copy(trained["run"] / "metrics.jsonl", run / "metrics.jsonl")
        args += ["--out", tmp_path]
        expect = ["--out", "is a directory"]  # a usage error, found by click: status 2
    done = run_cli(*args)
    assert_one_line_error(done, *expect, code=2 if case == "out-is-dir" else 1)
    assert not (run / "report.html").exists()


# --- runs and compare ------------------------------------------------------------------------


@pytest.fixture
def runs_dir(trained, tmp_path):
    """The trained run, an older unfinished copy and an even older run with no epoch yet."""
    d = tmp_path / "runs"
    d.mkdir()
    copy_run(trained, d, "lab")
    unfinished = copy_run(trained, d, "unfinished")
    (unfinished / "summary.json").unlink()
    (unfinished / "metrics.jsonl").write_text(json.dumps(trained["metrics"][0]) + "\n")
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "lr": 0.01}))
    fresh = d / "fresh"
    fresh.mkdir()
    shutil.copy(trained["run"] / "config.json", fresh / "config.json")
    started = json.loads((trained["run"] / "environment.json").read_text())["started"]
    year = int(started[:4])
    for name, back in (("unfinished", 1), ("fresh", 2)):
        env = json.loads((trained["run"] / "environment.json").read_text())
        env["started"] = f"{year - back}{started[4:]}"
        (d / name / "environment.json").write_text(json.dumps(env))
    (d / "notes.txt").write_text("not a run")
    return d


def test_runs_table_newest_first(trained, runs_dir, run_cli):
    done = run_cli("runs", "--runs-dir", runs_dir, "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows] == ["lab", "unfinished", "fresh"]
    lab, unfinished, fresh = rows
    summary = trained["summary"]
    assert lab["status"] == "complete"
    assert (lab["model"], lab["recipe"], lab["epochs"]) == ("mlp", "lab", 2)
    assert lab["test_acc"] == summary["test_acc"]
    assert lab["best_val_acc"] == summary["best_val_acc"]
    assert lab["train_seconds"] == summary["train_seconds"]
    assert unfinished["status"] == "incomplete"
    assert (unfinished["epochs"], unfinished["planned_epochs"]) == (1, 2)
    assert unfinished["test_acc"] == trained["metrics"][0]["test_acc"]
    assert fresh["status"] == "incomplete" and fresh["epochs"] == 0
    assert "no complete epoch" in fresh["error"]

    text = run_cli("runs", "--runs-dir", runs_dir)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "status", "model"]
    assert lines[1].split()[:2] == ["lab", "complete"]
    assert pct(summary["test_acc"]) in lines[1]
    assert lines[2].split()[:2] == ["unfinished", "incomplete"] and " 1/2 " in lines[2]


def test_runs_errors_and_empty(tmp_path, run_cli):
    assert_one_line_error(run_cli("runs", "--runs-dir", tmp_path / "none"), "no runs folder")
    empty = run_cli("runs", "--runs-dir", tmp_path)
    assert empty.returncode == 0 and "no runs" in empty.stdout


def test_compare_overlays_runs_in_one_page(trained, runs_dir, tmp_path, run_cli):
    out = tmp_path / "cmp" / "lab-vs-unfinished.html"
    done = run_cli("compare", "lab", "unfinished", "--runs-dir", runs_dir, "--out", out)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cmp" / "lab-vs-unfinished" / "curves.png").is_file()
    html = out.read_text()
    page = Page(html)
    assert "<script" not in html.lower()
    (img,) = page.images()
    assert img["src"].startswith("data:image/png;base64,")
    table = text_of(page, "runs")
    assert table.index("lab") < table.index("unfinished")
    assert pct(trained["summary"]["test_acc"]) in table
    assert pct(trained["metrics"][0]["test_acc"]) in table
    assert "incomplete" in table
    differences = text_of(page, "differences").split()
    assert differences[differences.index("lr"):][:3] == ["lr", "0.001", "0.01"]

    assert_one_line_error(run_cli("compare", "lab", "--runs-dir", runs_dir), "at least two")
    assert_one_line_error(
        run_cli("compare", "lab", "ghost", "--runs-dir", runs_dir), "ghost"
    )
    assert_one_line_error(
        run_cli("compare", "lab", "fresh", "--runs-dir", runs_dir), "no complete epoch"
    )


# --- in a real browser -----------------------------------------------------------------------


@pytest.mark.browser
def test_report_in_headless_chromium(trained, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
    from playwright.sync_api import sync_playwright

    from mnistlab.report import build_comparison

    artifacts = Path(os.environ.get("MNISTLAB_ARTIFACTS") or REPO / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    compare = build_comparison([trained["run"], trained["run"]], tmp_path / "compare.html").path
    expected = pct(trained["summary"]["test_acc"])
    assert expected == pct(trained["metrics"][-1]["test_acc"])

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("requestfailed", lambda r: problems.append(f"failed {r.url}"))
            for url, count in (((trained["run"] / "report.html").as_uri(), len(FIGURES)),
                               (compare.as_uri(), 1)):
                page.goto(url, wait_until="load")
                widths = page.eval_on_selector_all(
                    "img", "els => els.map(e => e.complete ? e.naturalWidth : 0)"
                )
                assert len(widths) == count and all(w > 0 for w in widths), (url, widths)
                if url.endswith("report.html"):
                    assert page.inner_text("#test-acc").strip() == expected
                    assert page.inner_text("#status").strip().lower() == "complete"
                    page.screenshot(path=str(artifacts / "report.png"), full_page=True)
                else:
                    page.screenshot(path=str(artifacts / "compare.png"), full_page=True)
            assert problems == []
        finally:
            browser.close()
    assert (artifacts / "report.png").stat().st_size > 10_000
