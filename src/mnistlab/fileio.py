"""Atomic file writes: a temporary file beside the target, fsync, then rename.

A kill at any instant leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask (read without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed over `target`."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, new_file_mode())  # mkstemp makes 0600; give what open() would
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write(target: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a binary file object, then move the result into place."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(target, lambda f: f.write(data))


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2) + "\n")
