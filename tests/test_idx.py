"""The IDX reader and writer: round trips, every kind of damage, and a fuzzer."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnistlab.catalog import MNIST
from mnistlab.errors import DataError, MnistlabError
from mnistlab.idx import decompress, encode_idx, parse_idx, read_idx, read_idx_bytes, write_idx

# MNISTLAB_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the suite quick.
FUZZ = settings(
    max_examples=int(os.environ.get("MNISTLAB_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def header(ndim: int, *dims: int, dtype: int = 0x08, zero: int = 0) -> bytes:
    return struct.pack(f">HBB{len(dims)}I", zero, dtype, ndim, *dims)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8, generator=g)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip_images_and_labels(tmp_path, images, suffix):
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 9], dtype=torch.uint8)
    write_idx(tmp_path / f"images{suffix}", images)
    write_idx(tmp_path / f"labels{suffix}", labels)
    raw = (tmp_path / f"images{suffix}").read_bytes()
    assert raw.startswith(b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(tmp_path / f"images{suffix}", expect_ndim=3)
    assert back.dtype == torch.uint8 and back.shape == (7, 28, 28)
    assert torch.equal(back, images)
    back_labels = read_idx(tmp_path / f"labels{suffix}", expect_ndim=1)
    assert back_labels.shape == (7,) and torch.equal(back_labels, labels)
    # the result owns writable memory
    back[0, 0, 0] = 1


def test_encoding_is_the_idx_layout(images):
    data = encode_idx(images)
    assert data[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", data[4:16]) == (7, 28, 28)
    assert data[16:] == images.numpy().tobytes()
    labels = encode_idx(np.arange(3, dtype=np.uint8))
    assert labels == b"\x00\x00\x08\x01" + b"\x00\x00\x00\x03" + b"\x00\x01\x02"


def test_compress_flag_overrides_suffix(tmp_path, images):
    write_idx(tmp_path / "a.gz", images, compress=False)
    write_idx(tmp_path / "b", images, compress=True)
    assert not (tmp_path / "a.gz").read_bytes().startswith(b"\x1f\x8b")
    assert (tmp_path / "b").read_bytes().startswith(b"\x1f\x8b")
    assert torch.equal(read_idx(tmp_path / "a.gz"), images)
    assert torch.equal(read_idx(tmp_path / "b"), images)


def test_write_is_atomic_and_leaves_no_temp(tmp_path, images):
    write_idx(tmp_path / "x.gz", images)
    write_idx(tmp_path / "x.gz", images[:2])  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gz"]
    assert read_idx(tmp_path / "x.gz").shape == (2, 28, 28)


def test_write_rejects_non_uint8(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        write_idx(tmp_path / "f", torch.zeros(3, dtype=torch.float32))
    assert not (tmp_path / "f").exists()


def test_multi_member_gzip_is_read(tmp_path, images):
    data = encode_idx(images)
    (tmp_path / "m.gz").write_bytes(gzip.compress(data[:100]) + gzip.compress(data[100:]))
    assert torch.equal(read_idx(tmp_path / "m.gz"), images)


def test_read_idx_bytes_digest_is_of_decompressed_content(tmp_path, images):
    data = encode_idx(images)
    (tmp_path / "a.gz").write_bytes(gzip.compress(data, compresslevel=1))
    (tmp_path / "b.gz").write_bytes(gzip.compress(data, compresslevel=9, mtime=12345))
    (tmp_path / "c").write_bytes(data)
    digests = {read_idx_bytes(tmp_path / n)[1] for n in ("a.gz", "b.gz", "c")}
    assert digests == {hashlib.sha256(data).hexdigest()}


def test_real_file_digest_matches_catalog(raw_files):
    array, digest = read_idx_bytes(raw_files["t10k-labels-idx1-ubyte"], expect_ndim=1)
    assert digest == MNIST.sha256["t10k-labels-idx1-ubyte"]
    assert array.shape == (10000,)


# --- damage → DataError with a clear message ---------------------------------------------------


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_wrong_magic(tmp_path, images):
    data = bytearray(encode_idx(images))
    data[2] = 0x0C  # int32 data, not unsigned bytes
    path = _write(tmp_path, "bad", bytes(data))
    with pytest.raises(
        DataError, match=r"not an IDX file of unsigned bytes \(magic 0x00000c03"
    ) as e:
        read_idx(path)
    assert str(path) in str(e.value)
    with pytest.raises(DataError, match="not an IDX file"):
        parse_idx(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="not an IDX file"):
        parse_idx(b"\x00\x00\x08\x00")  # zero dimensions


def test_wrong_ndim(tmp_path, images):
    path = _write(tmp_path, "imgs", encode_idx(images))
    with pytest.raises(DataError, match=r"0x0803 has 3 dimensions, expected 0x0801 \(1 dim"):
        read_idx(path, expect_ndim=1)
    labels = _write(tmp_path, "labels.gz", gzip.compress(encode_idx(np.zeros(5, np.uint8))))
    with pytest.raises(DataError, match=r"0x0801 has 1 dimensions, expected 0x0803"):
        read_idx(labels, expect_ndim=3)


def test_payload_shorter(tmp_path, images):
    data = encode_idx(images)[:-10]
    path = _write(tmp_path, "short.gz", gzip.compress(data))
    with pytest.raises(
        DataError, match=r"payload is 5478 bytes but the header \(7x28x28\) says 5488"
    ):
        read_idx(path)


def test_payload_longer(tmp_path, images):
    path = _write(tmp_path, "long", encode_idx(images) + b"\x00")
    with pytest.raises(
        DataError, match=r"payload is 5489 bytes but the header \(7x28x28\) says 5488"
    ):
        read_idx(path)


def test_header_cut_short():
    with pytest.raises(DataError, match=r"header cut short \(10 of 16 bytes\)"):
        parse_idx(header(3, 7, 28)[:10])
    with pytest.raises(DataError, match="too short to be an IDX file"):
        parse_idx(b"\x00\x00")


def test_truncated_gzip(tmp_path, images):
    gz = gzip.compress(encode_idx(images))
    for cut in (len(gz) // 2, len(gz) - 4, 3):
        path = _write(tmp_path, f"t{cut}.gz", gz[:cut])
        with pytest.raises(DataError, match="truncated gzip file") as e:
            read_idx(path)
        assert str(path) in str(e.value)


def test_corrupt_gzip(tmp_path, images):
    gz = bytearray(gzip.compress(encode_idx(images)))
    gz[len(gz) // 2] ^= 0xFF  # a flipped byte in the deflate stream
    path = _write(tmp_path, "c.gz", bytes(gz))
    with pytest.raises(DataError, match="corrupt gzip file"):
        read_idx(path)
    crc = bytearray(gzip.compress(encode_idx(images)))
    crc[-8] ^= 0x01  # CRC-32 of the content no longer matches
    path = _write(tmp_path, "crc.gz", bytes(crc))
    with pytest.raises(DataError, match="corrupt gzip file"):
        read_idx(path)


def test_truncated_real_file(tmp_path, raw_files):
    data = raw_files["t10k-images-idx3-ubyte"].read_bytes()
    path = _write(tmp_path, "t10k-images-idx3-ubyte.gz", data[: len(data) // 3])
    with pytest.raises(DataError, match="truncated gzip file"):
        read_idx(path, expect_ndim=3)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path)


def test_dimension_product_does_not_overflow():
    # 65536**4 == 2**64 wraps to 0 in int64; with an empty payload that must not pass.
    with pytest.raises(DataError, match="payload is 0 bytes"):
        parse_idx(header(4, 65536, 65536, 65536, 65536))


def test_empty_but_impossible_shape():
    # 0 x 28 x 2**31 x 2**31 holds no bytes, but numpy cannot represent the shape.
    with pytest.raises(DataError, match="not a usable shape"):
        parse_idx(header(4, 0, 28, 2**31, 2**31))
    assert parse_idx(header(3, 0, 28, 28)).shape == (0, 28, 28)


def test_absurd_number_of_dimensions():
    # 100 dimensions of size 1 and a 1-byte payload: consistent, but no array library takes it.
    with pytest.raises(DataError):
        parse_idx(header(100, *([1] * 100)) + b"\x07")


def test_gzip_bomb_is_refused(monkeypatch):
    import mnistlab.idx as idx

    monkeypatch.setattr(idx, "MAX_DECOMPRESSED", 1000)
    with pytest.raises(DataError, match="decompresses to more than 1000 bytes"):
        decompress(gzip.compress(bytes(5000)))
    assert decompress(gzip.compress(bytes(1000))) == bytes(1000)


def test_errors_are_mnistlab_errors():
    assert issubclass(DataError, MnistlabError)


# --- fuzzing -----------------------------------------------------------------------------------


def _check_parse(content: bytes, expect_ndim: int | None = None) -> None:
    """parse_idx either returns the array the header describes, or raises DataError."""
    try:
        array = parse_idx(content, "fuzz", expect_ndim)
    except DataError as e:
        assert str(e).startswith("fuzz: ")
        return
    ndim = content[3]
    dims = struct.unpack(f">{ndim}I", content[4 : 4 + 4 * ndim])
    assert content[:3] == b"\x00\x00\x08"
    assert array.dtype == np.uint8
    assert array.shape == dims
    assert array.size == math.prod(dims) == len(content) - 4 - 4 * ndim
    assert array.tobytes() == content[4 + 4 * ndim :]
    if expect_ndim is not None:
        assert ndim == expect_ndim


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_parse_arbitrary_bytes(data):
    _check_parse(data)


@st.composite
def idx_like(draw) -> bytes:
    """A valid-looking header (sometimes slightly off) followed by arbitrary bytes."""
    ndim = draw(st.sampled_from([1, 2, 3, 4, 0, 40, 70, 255]))
    dims = draw(
        st.lists(
            st.one_of(st.integers(0, 8), st.sampled_from([28, 65536, 2**31, 2**32 - 1])),
            min_size=ndim,
            max_size=ndim,
        )
    )
    dtype = draw(st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0D]))
    head = header(ndim, *dims, dtype=dtype)
    if draw(st.booleans()):
        head = head[: draw(st.integers(0, len(head)))]
    if draw(st.booleans()) and math.prod(dims) <= 512:
        payload_len = math.prod(dims) + draw(st.sampled_from([0, 0, 0, -1, 1]))
        payload = draw(st.binary(min_size=max(payload_len, 0), max_size=max(payload_len, 0)))
    else:
        payload = draw(st.binary(max_size=200))
    return head + payload


@FUZZ
@given(idx_like(), st.sampled_from([None, 1, 3]))
def test_fuzz_parse_valid_looking_headers(data, expect_ndim):
    _check_parse(data, expect_ndim)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_decompress_arbitrary_bytes(data):
    for blob in (data, b"\x1f\x8b" + data, b"\x1f\x8b\x08\x00" + data):
        try:
            out = decompress(blob, "fuzz")
        except DataError as e:
            assert str(e).startswith("fuzz: ")
            continue
        if not blob.startswith(b"\x1f\x8b"):
            assert out == blob  # not gzip: passed through untouched
            continue
        # accepted gzip: exactly what zlib (one member) or the stdlib (several) decodes
        d = zlib.decompressobj(wbits=31)
        first = d.decompress(blob)
        assert d.eof
        assert out == (gzip.decompress(blob) if d.unused_data.startswith(b"\x1f\x8b") else first)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_read_idx_arbitrary_file(tmp_path, data):
    path = tmp_path / "f"
    path.write_bytes(data)
    try:
        tensor = read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    ndim = data[3]
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    assert tensor.numpy().tobytes() == data[4 + 4 * ndim :]


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 9))
def test_fuzz_gzip_of_arbitrary_bytes(content, level):
    blob = gzip.compress(content, compresslevel=level)
    assert decompress(blob) == content  # always valid gzip: must round-trip exactly
    _check_parse(decompress(blob))


@FUZZ
@given(idx_like(), st.integers(0, 400), st.integers(0, 255))
def test_fuzz_read_idx_damaged_gzip(tmp_path, content, position, flip):
    """read_idx of gzipped IDX bytes, possibly with one byte damaged or the tail cut off."""
    blob = bytearray(gzip.compress(content))
    if position < len(blob):
        blob[position] ^= flip
    if position % 3 == 0:
        blob = blob[: len(blob) - position % 17]
    path = tmp_path / "f.gz"
    path.write_bytes(bytes(blob))
    try:
        tensor = read_idx(path)
    except DataError:
        return
    assert tensor.dtype == torch.uint8
    # anything accepted came from a gzip stream the stdlib agrees on, or from plain bytes
    raw = bytes(blob)
    plain = gzip.decompress(raw) if raw.startswith(b"\x1f\x8b") else raw
    ndim = plain[3]
    assert tuple(tensor.shape) == struct.unpack(f">{ndim}I", plain[4 : 4 + 4 * ndim])
    assert tensor.numpy().tobytes() == plain[4 + 4 * ndim :]
