"""Fetch dataset files from mirrors: stream to a temporary file, verify, then rename into place.

A file that fails verification is deleted at once and the next mirror is tried, so nothing a later
run would trust is ever left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .catalog import MNIST, DatasetSpec
from .errors import DataError, DownloadError
from .fileio import new_file_mode
from .idx import decompress

MIRRORS_ENV = "MNISTLAB_MIRRORS"
TIMEOUT_S = 30.0
CHUNK = 1 << 16


def default_mirrors(spec: DatasetSpec = MNIST) -> list[str]:
    """Mirrors from `MNISTLAB_MIRRORS` (comma separated) if set, else the catalog's."""
    env = os.environ.get(MIRRORS_ENV, "").strip()
    if env:
        return [m.strip() for m in env.split(",") if m.strip()]
    return list(spec.mirrors)


def content_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's decompressed content (so a recompressed archive still verifies)."""
    with open(path, "rb") as f:
        return hashlib.sha256(decompress(f.read(), str(path))).hexdigest()


def verify_file(path: str | os.PathLike[str], expected_sha256: str) -> bool:
    try:
        return content_sha256(path) == expected_sha256
    except (DataError, OSError):
        return False


def _fetch(url: str, dest: Path, label: str) -> None:
    """Stream `url` into `dest`, with a progress bar when stderr is a terminal."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "mnistlab"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total and total.isdigit() else None,
            unit="B",
            unit_scale=True,
            desc=label,
            disable=not sys.stderr.isatty(),
            leave=False,
        ) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def download_file(
    name: str, raw_dir: Path, expected_sha256: str, mirrors: Sequence[str]
) -> Path:
    """Download `<name>.gz` into `raw_dir` from the first mirror that gives verified content."""
    target = raw_dir / f"{name}.gz"
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        fd, tmp = tempfile.mkstemp(dir=raw_dir, prefix=f".{name}.gz.", suffix=".part")
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            os.chmod(tmp_path, new_file_mode())  # mkstemp makes 0600; the data is not secret
            _fetch(url, tmp_path, name)
            if not verify_file(tmp_path, expected_sha256):
                failures.append(f"{url}: checksum mismatch")
                continue
            os.replace(tmp_path, target)
            return target
        except urllib.error.HTTPError as e:
            failures.append(f"{url}: HTTP {e.code}")
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            failures.append(f"{url}: {' '.join(str(reason).split())}")  # keep it one line
        finally:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
    tried = "; ".join(failures) if failures else "no mirrors configured"
    raise DownloadError(
        f"could not download {name}.gz ({tried}); put the MNIST files in {raw_dir} by hand, "
        f"or pass --mirror URL / set {MIRRORS_ENV}"
    )
