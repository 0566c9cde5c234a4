"""`mnistlab`, `mnistlab data ...`, the lab's display_image figure, and every bad input."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from hashlib import sha256
from pathlib import Path

import pytest
import torch

import mnistlab
from mnistlab import data as mdata
from mnistlab.catalog import MNIST
from mnistlab.cli import main
from mnistlab.data import load_mnist, load_split
from mnistlab.errors import DataError, MnistlabError
from mnistlab.idx import encode_idx, write_idx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def run_main(capsys, *args: str | Path) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit status, stdout, stderr). Any other exception escapes."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1 if code else 0), out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mnistlab: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
    return lines[0]


@pytest.fixture
def root_copy(tmp_path: Path, raw_files) -> Path:
    """A private copy of the real data root, safe to damage."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in raw_files.values():
        shutil.copyfile(path, raw / path.name)
    return tmp_path / "root"


@pytest.fixture(autouse=True)
def _fresh_memory_cache(monkeypatch):
    monkeypatch.setattr(mdata, "_memory_cache", {})


# --- --help / --version stay light -------------------------------------------------------------


def test_help_and_version_do_not_import_torch_or_matplotlib():
    code = """
import sys
from mnistlab.cli import main
for argv in (["--help"], ["--version"], ["-V"], ["data", "--help"], ["data", "show", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), (argv, e.code)
heavy = sorted(m for m in ("torch", "matplotlib") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage: mnistlab [OPTIONS] COMMAND" in done.stdout
    assert f"mnistlab, version {mnistlab.__version__}" in done.stdout
    assert "Usage: mnistlab data show [OPTIONS] INDEX" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY:"


def test_help_and_version_as_commands(run_cli):
    done = run_cli("--help")
    assert done.returncode == 0
    assert "data" in done.stdout and "Download, verify and inspect MNIST." in done.stdout
    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"mnistlab, version {mnistlab.__version__}"


# --- data info ---------------------------------------------------------------------------------


def test_info_json(run_cli, data_root):
    done = run_cli("data", "info", "--json", "--root", data_root)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # exactly one JSON object on stdout
    assert report["root"] == str(data_root)
    assert report["verified"] is True
    train, test = report["train"], report["test"]
    assert train["count"] == 60000 and test["count"] == 10000
    assert train["shape"] == [28, 28] and test["shape"] == [28, 28]
    assert train["dtype"] == "uint8"
    assert train["class_counts"] == TRAIN_CLASS_COUNTS
    assert test["class_counts"] == TEST_CLASS_COUNTS
    assert round(train["mean"], 4) == 0.1307 and round(train["std"], 4) == 0.3081
    assert "mean" not in test
    assert all(report["files"].values())


def test_info_text_uses_env_root(capsys, data_root, monkeypatch):
    monkeypatch.setenv("MNISTLAB_DATA", str(data_root))
    code, out, err = run_main(capsys, "data", "info")
    assert code == 0, err
    assert f"root: {data_root}" in out
    assert "train: 60000 images of 28x28 uint8" in out
    assert "test: 10000 images of 28x28 uint8" in out
    assert "class counts: " + " ".join(map(str, TEST_CLASS_COUNTS)) in out
    assert "mean 0.1307, std 0.3081" in out
    assert "verified" in out


# --- data show ---------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_show_raw_sample_0(run_cli, data_root, tmp_path):
    out = tmp_path / "x.png"
    done = run_cli("data", "show", "0", "--out", out, "--root", data_root)
    assert done.returncode == 0, done.stderr
    assert "size: (28, 28)" in done.stdout
    assert "label: 5" in done.stdout
    assert out.stat().st_size > 50_000  # 784 numbers drawn on a large figure
    width, height = _png_size(out)
    assert width > 600 and height > 600
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left


def test_show_normalized(capsys, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output name lands in the working directory
    code, out, err = run_main(capsys, "data", "show", "0", "--normalized", "--root", data_root)
    assert code == 0, err
    assert "shape: (1, 28, 28)" in out and "label: 5" in out
    assert "min -0.4242, max 2.8215" in out
    assert _png_size(tmp_path / "train-0-normalized.png")[0] > 600


def test_show_negative_index_and_test_split(capsys, data_root, tmp_path):
    _, labels = load_mnist(data_root, "test")
    code, out, err = run_main(
        capsys,
        "data",
        "show",
        "--split",
        "test",
        "--normalized",
        "--root",
        data_root,
        "--out",
        tmp_path / "last.png",
        "--",
        "-1",
    )
    assert code == 0, err
    assert f"label: {int(labels[-1])}" in out
    assert (tmp_path / "last.png").read_bytes()[:8] == PNG_MAGIC


# --- bad input: one line, non-zero, no traceback -----------------------------------------------


def test_missing_files(capsys, tmp_path):
    code, out, err = run_main(capsys, "data", "info", "--root", tmp_path)
    assert out == ""
    assert_one_line_error(
        code,
        err,
        "train-images-idx3-ubyte[.gz] not found",
        str(tmp_path / "MNIST" / "raw"),
        "mnistlab data download",
    )
    assert list(tmp_path.iterdir()) == []  # info never creates folders


def test_missing_files_and_no_reachable_mirror(run_cli, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    root = tmp_path / "data"
    done = run_cli("data", "download", "--root", root, env={"MNISTLAB_MIRRORS": dead})
    line = assert_one_line_error(
        done.returncode,
        done.stderr,
        "could not download",
        dead + "train-images-idx3-ubyte.gz",
        "Connection refused",
        "by hand",
    )
    assert done.returncode == 1, line
    assert list((root / "MNIST" / "raw").iterdir()) == []


def test_truncated_gz(capsys, root_copy):
    path = root_copy / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1_000_000])
    code, _, err = run_main(capsys, "data", "info", "--root", root_copy)
    assert code == 1
    assert_one_line_error(code, err, str(path), "truncated gzip file")


def test_corrupt_gz(capsys, root_copy):
    path = root_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    for i in range(2000, 2100):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    code, _, err = run_main(capsys, "data", "show", "0", "--split", "test", "--root", root_copy)
    assert_one_line_error(code, err, str(path), "corrupt gzip file")


def test_wrong_magic(capsys, root_copy):
    path = root_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[3] = 0x02  # 0x0802: two dimensions
    path.write_bytes(gzip.compress(bytes(content)))
    code, _, err = run_main(capsys, "data", "info", "--root", root_copy)
    assert_one_line_error(
        code, err, str(path), "IDX magic 0x0802 has 2 dimensions, expected 0x0801"
    )


def test_uncompressed_file_with_short_payload(capsys, root_copy):
    # A plain file beside the .gz takes precedence; this one is cut short.
    raw = root_copy / "MNIST" / "raw"
    content = gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes())
    (raw / "t10k-images-idx3-ubyte").write_bytes(content[:-784])
    code, _, err = run_main(capsys, "data", "show", "3", "--split", "test", "--root", root_copy)
    assert_one_line_error(
        code,
        err,
        "t10k-images-idx3-ubyte:",
        "payload is 7839216 bytes but the header (10000x28x28) says 7840000",
    )


def test_label_count_mismatch_cli(capsys, root_copy, data_root):
    # 9999 labels for 10000 images: the content digest is checked first and names the file.
    _, labels = load_mnist(data_root, "test")
    path = root_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    write_idx(path, labels[:-1].to(torch.uint8))
    code, _, err = run_main(capsys, "data", "info", "--root", root_copy)
    assert_one_line_error(
        code, err, str(path), "does not hold the expected content", "mnistlab data download"
    )


def test_label_count_mismatch_message(tmp_path, data_root):
    # With a catalog entry that trusts the short file, the count check itself speaks.
    images, labels = load_mnist(data_root, "test")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    short = labels[:-1].to(torch.uint8)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", short)
    spec = replace(
        MNIST,
        sha256={
            **MNIST.sha256,
            "t10k-labels-idx1-ubyte": sha256(encode_idx(short)).hexdigest(),
        },
    )
    with pytest.raises(DataError, match=r"^test: 10000 images but 9999 labels$"):
        load_split(tmp_path, "test", spec)


@pytest.mark.parametrize("index", ["60000", "-60001", "100000000000000000000"])
def test_index_out_of_range(capsys, data_root, tmp_path, index):
    code, _, err = run_main(
        capsys, "data", "show", "--root", data_root, "--out", tmp_path / "x.png", "--", index
    )
    assert_one_line_error(
        code, err, f"index {index} out of range: the train split has 60000 images"
    )
    assert list(tmp_path.iterdir()) == []


def test_unwritable_root(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run_main(capsys, "data", "download", "--root", blocker / "sub")
    assert_one_line_error(code, err, "cannot write to data root", str(blocker / "sub"))
    assert blocker.read_text() == "x"


def test_unwritable_output(capsys, data_root, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run_main(
        capsys, "data", "show", "0", "--root", data_root, "--out", blocker / "x.png"
    )
    assert_one_line_error(code, err, "cannot write", str(blocker / "x.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


# --- the display_image figure ------------------------------------------------------------------


def test_display_image_raw(data_root):
    from mnistlab.plots import display_image

    images, labels = load_mnist(data_root, "train")
    fig = display_image(images[0], int(labels[0]))
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 1
    ax = image_axes[0]
    assert len(ax.images) == 1
    assert len(ax.texts) == 784
    texts = [t.get_text() for t in ax.texts]
    flat = images[0].flatten().tolist()
    assert texts == [str(v) for v in flat]  # row by row, each pixel's value
    assert ax.images[0].get_clim() == (0.0, 255.0)
    colorbars = [a for a in fig.axes if a is not ax]
    assert len(colorbars) == 1
    assert ax.get_title() == "Label: 5"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_display_image_normalized(data_root):
    from mnistlab.data import normalize
    from mnistlab.plots import display_image

    images, _ = load_mnist(data_root, "train")
    x = normalize(images[:1])[0]
    fig = display_image(x, 5)
    ax = next(a for a in fig.axes if a.images)
    assert len(ax.texts) == 784
    low, high = ax.images[0].get_clim()
    assert low == pytest.approx(float(x.min())) and high == pytest.approx(float(x.max()))
    assert low == pytest.approx(-0.4242, abs=1e-4) and high == pytest.approx(2.8215, abs=1e-4)
    assert ax.texts[0].get_text() == "-0.42"
    assert "normalized" in ax.get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_display_image_rejects_wrong_shape():
    from mnistlab.plots import display_image

    with pytest.raises(MnistlabError, match="expected a 28x28 image"):
        display_image(torch.zeros(3, 28, 28, dtype=torch.uint8))
