"""The IDX file format of MNIST: read and write, plain or gzip-compressed, strictly validated.

Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then each
dimension as a big-endian uint32. Labels are 0x0801 ([N]), images 0x0803 ([N, rows, cols]).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError
from .fileio import atomic_write_bytes

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08
# Refuse to inflate more than this: the largest real file is 47 MB; a gzip bomb is not a dataset.
MAX_DECOMPRESSED = 512 * 1024 * 1024
# More dimensions than numpy 1.x can hold (its limit is 32) is not a real IDX file either.
MAX_NDIM = 32


def decompress(data: bytes, name: str = "data") -> bytes:
    """Return the content of `data`, gunzipping it if it starts with the gzip magic."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        d = zlib.decompressobj(wbits=31)  # 31: gzip wrapper
        out = bytearray()
        chunk = data
        while chunk:
            out += d.decompress(chunk, MAX_DECOMPRESSED + 1 - len(out))
            if len(out) > MAX_DECOMPRESSED:
                raise DataError(f"{name}: decompresses to more than {MAX_DECOMPRESSED} bytes")
            chunk = d.unconsumed_tail
        if not d.eof:
            raise DataError(f"{name}: truncated gzip file (delete it and download again)")
        if d.unused_data and d.unused_data.startswith(GZIP_MAGIC):
            # A multi-member gzip file is valid; fall back to the stdlib for it.
            return gzip.decompress(data)
        return bytes(out)
    except (zlib.error, gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{name}: corrupt gzip file ({e}); delete it and download again") from None


def parse_idx(content: bytes, name: str = "data", expect_ndim: int | None = None) -> np.ndarray:
    """Parse decompressed IDX bytes into a uint8 array, checking the header against the payload."""
    if len(content) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(content)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", content[:4])
    if zero != 0 or dtype != UBYTE or ndim == 0:
        raise DataError(
            f"{name}: not an IDX file of unsigned bytes (magic 0x{content[:4].hex()}, "
            "expected 0x00000801 for labels or 0x00000803 for images)"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(
            f"{name}: IDX magic 0x{0x800 + ndim:04x} has {ndim} dimensions, "
            f"expected 0x{0x800 + expect_ndim:04x} ({expect_ndim} dimensions)"
        )
    if ndim > MAX_NDIM:
        raise DataError(f"{name}: IDX header claims {ndim} dimensions (at most {MAX_NDIM})")
    header_len = 4 + 4 * ndim
    if len(content) < header_len:
        raise DataError(f"{name}: header cut short ({len(content)} of {header_len} bytes)")
    dims = struct.unpack(f">{ndim}I", content[4:header_len])
    expected = math.prod(dims)  # exact: np.prod in int64 wraps around (65536**4 == 0)
    payload = len(content) - header_len
    if payload != expected:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{name}: payload is {payload} bytes but the header ({shape}) says {expected}; "
            "the file is truncated or corrupt"
        )
    try:
        return np.frombuffer(content, dtype=np.uint8, offset=header_len).reshape(dims)
    except ValueError:  # e.g. dims (0, 2**31, 2**31): empty, yet too big a shape for numpy
        shape = "x".join(map(str, dims))
        raise DataError(f"{name}: IDX header dimensions {shape} are not a usable shape") from None


def read_idx_bytes(
    path: str | os.PathLike[str], expect_ndim: int | None = None
) -> tuple[np.ndarray, str]:
    """Read an IDX file; return the array and the SHA-256 of its decompressed content."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    content = decompress(raw, str(path))
    digest = hashlib.sha256(content).hexdigest()
    return parse_idx(content, str(path), expect_ndim), digest


def read_idx(path: str | os.PathLike[str], expect_ndim: int | None = None):
    """Read an IDX file (plain or .gz) into a uint8 tensor, e.g. [N, 28, 28] or [N]."""
    import torch

    array, _ = read_idx_bytes(path, expect_ndim)
    return torch.from_numpy(array.copy())


def encode_idx(array) -> bytes:
    """Encode a uint8 array or tensor as IDX bytes."""
    a = np.asarray(array.numpy() if hasattr(array, "numpy") else array)
    if a.dtype != np.uint8:
        raise DataError(f"IDX files here hold uint8 data, got {a.dtype}")
    if not 1 <= a.ndim <= MAX_NDIM:
        raise DataError(f"cannot write a {a.ndim}-dimensional array as IDX")
    header = struct.pack(f">HBB{a.ndim}I", 0, UBYTE, a.ndim, *a.shape)
    return header + np.ascontiguousarray(a).tobytes()


def write_idx(path: str | os.PathLike[str], array, compress: bool | None = None) -> None:
    """Write `array` as IDX, atomically; gzip it when `compress` (default: path ends in .gz)."""
    path = Path(path)
    data = encode_idx(array)
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)
