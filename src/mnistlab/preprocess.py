"""Any picture of a digit → the 28×28 image an MNIST model expects.

MNIST digits were size-normalized to fit a 20×20 box (aspect kept, anti-aliased) and centred in
28×28 by their centre of mass, white ink on black. `to_mnist` does the same to any image: it
decides the polarity, removes the (possibly uneven) background, crops to the ink, scales the ink's
longest side to 20 px and pastes it by centre of mass. `open_image` turns files, bytes, arrays and
tensors into a grayscale PIL image, refusing anything that is not a safely decodable image.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import MnistlabError

MAX_PIXELS = 40_000_000  # refused from the header, before decoding: 40 MP is a big phone photo
MAX_BYTES = 100 * 1024 * 1024  # for bytes, streams and stdin, which must be read whole
WORK_SIZE = 640  # larger images are box-reduced to about this before the analysis
BOX = 20  # MNIST's ink box inside the 28×28 field
SIZE = 28
CENTRE = 14.0  # where MNIST's centres of mass sit (measured: 14.00 ± 0.29 in pixel indices)
# MNIST stroke widths in the 20-px box: median 2.7 px, 1st percentile 2.0 (measured, ink > 127).
TYPICAL_STROKE = 2.7
MIN_STROKE = 1.8
LEVEL_PERCENTILE = 90.0  # of the ink pixels: maps to full white (MNIST's cores are ~255)

# PIL has its own decompression-bomb guard, Image.MAX_IMAGE_PIXELS (89 MP): it warns above it and
# raises DecompressionBombError above twice it, both inside Image.open. MAX_PIXELS is lower, so we
# refuse every such image ourselves; the error is caught below and the warning is only noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Magic numbers of the formats we accept; anything else is "not an image", whatever its name says.
SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),  # after "RIFF" and a length
)
FORMATS_TEXT = "PNG, JPEG, BMP, GIF, WebP or TIFF"

ImageSource = Any  # str | Path | bytes | BinaryIO | PIL.Image.Image | np.ndarray | torch.Tensor


class ImageError(MnistlabError):
    """Not an image, a corrupt or truncated one, one too large to decode safely, or unreadable."""


class NoInkError(MnistlabError):
    """The image holds no digit: it is blank, or nothing stands out from the background."""


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or None."""
    for magic, offset, name in SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            if name == "WEBP" and head[:4] != b"RIFF":
                continue
            return name
    return None


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "image" if isinstance(source, Image.Image) else type(source).__name__


def open_image(source: ImageSource) -> Image.Image:
    """A fully loaded grayscale ("L") image from a path, bytes, stream, PIL image, array or tensor.

    Files are recognized by content; EXIF orientation is applied; transparency is flattened.
    Raises ImageError for anything that is not a safely decodable image.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, "image")
        try:  # an image from Image.open is decoded only now, and may turn out corrupt
            return _to_gray(ImageOps.exif_transpose(source) or source)
        except Exception as e:
            raise ImageError(f"image: corrupt or truncated ({_reason(e)})") from None
    if isinstance(source, torch.Tensor):
        return _from_array(source.detach().cpu().numpy(), "tensor")
    if isinstance(source, np.ndarray):
        return _from_array(source, "array")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            with open(path, "rb") as f:
                return _decode(f, str(path))
        except ImageError:
            raise
        except IsADirectoryError:
            raise ImageError(f"{path}: is a directory, not an image") from None
        except OSError as e:
            raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > MAX_BYTES:
            raise ImageError(f"image data of {len(data):,} bytes is over the {MAX_BYTES:,} limit")
        return _decode(io.BytesIO(data), "image data")
    if hasattr(source, "read"):
        return open_image(_read_stream(source))
    raise ImageError(
        f"cannot read an image from a {type(source).__name__}; give a path, bytes, a file object, "
        "a PIL image, a numpy array or a torch tensor"
    )


def _read_stream(stream: BinaryIO) -> bytes:
    try:
        data = stream.read(MAX_BYTES + 1)
    except OSError as e:
        raise ImageError(f"cannot read the image stream ({e.strerror or e})") from None
    if isinstance(data, str):
        raise ImageError("the image stream is opened in text mode; open it in binary mode ('rb')")
    if len(data) > MAX_BYTES:
        raise ImageError(f"image data is over the {MAX_BYTES:,} byte limit")
    return data


def _check_pixels(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageError(
            f"{name}: {w}×{h} pixels is over the {MAX_PIXELS:,}-pixel limit (a decompression "
            "bomb, or simply too big); scale it down first"
        )
    if w == 0 or h == 0:
        raise ImageError(f"{name}: the image is empty ({w}×{h} pixels)")


def _decode(f: BinaryIO, name: str) -> Image.Image:
    head = f.read(16)
    fmt = sniff_format(head)
    if fmt is None:
        what = "empty file" if not head else "not an image"
        raise ImageError(f"{name}: {what} (mnistlab reads {FORMATS_TEXT})")
    f.seek(0)
    try:
        im = Image.open(f, formats=[fmt])  # lazy: reads the header only
    except Image.DecompressionBombError as e:  # over twice Image.MAX_IMAGE_PIXELS
        raise ImageError(
            f"{name}: refused before decoding, too large to decode safely ({_reason(e)})"
        ) from None
    except Exception as e:  # PIL's decoders raise many types for malformed headers
        raise ImageError(f"{name}: corrupt {fmt} image ({_reason(e)})") from None
    _check_pixels(im.size, name)  # from the header, before any pixel is decoded
    try:
        im.load()
        im = ImageOps.exif_transpose(im) or im
        return _to_gray(im)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused: {e}") from None
    except Exception as e:  # truncated data, bad chunks, broken EXIF: all mean a corrupt file
        raise ImageError(f"{name}: corrupt or truncated {fmt} image ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _to_gray(im: Image.Image) -> Image.Image:
    """Grayscale "L"; transparency is composited onto white (onto black for light content)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _from_array(np.asarray(im), "image")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(rgba.convert("L"), dtype=np.float32)
        # A drawing in light ink on a transparent canvas would vanish on white: use black there.
        ink = alpha > 0.5
        light = bool(ink.any()) and not ink.all() and float(gray[ink].mean()) > 127.5
        background = 0.0 if light else 255.0
        out = gray * alpha + background * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")
    if im.mode != "L":
        im = im.convert("RGB").convert("L") if im.mode not in ("RGB", "1") else im.convert("L")
    return im


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    """An "L" image from an array: [H, W], [H, W, C] or [C, H, W] with C in 1, 3, 4."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.moveaxis(a, 0, 2)  # channels first (torch's layout) → last
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(
            f"{name} of shape {tuple(a.shape)} is not an image; expected [H, W], [H, W, C] or "
            "[C, H, W] with 1, 3 or 4 channels"
        )
    _check_pixels((a.shape[1], a.shape[0]), name)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
            raise ImageError(f"{name} of dtype {a.dtype} is not an image")
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ImageError(f"{name} holds NaN or infinite values")
        lo, hi = float(f.min()), float(f.max())
        if lo < 0:
            raise ImageError(
                f"{name} has negative values ({lo:.3g}); give pixels in [0, 1] or [0, 255], "
                "not normalized ones"
            )
        if np.issubdtype(a.dtype, np.floating) and hi <= 1.0:
            f = f * 255.0
        elif hi > 255:
            f = f / 257.0 if hi <= 65535 else f * (255.0 / hi)  # 16-bit, else whatever range
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L")
    mode = "RGB" if a.shape[2] == 3 else "RGBA"
    return _to_gray(Image.fromarray(np.ascontiguousarray(a), mode))


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 255]: it maximizes the between-class variance."""
    hist = np.bincount(np.clip(values, 0, 255).astype(np.uint8).ravel(), minlength=256)
    hist = hist.astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(np.argmax(between)) + 0.5  # class 0 is <= the level, class 1 above it


def to_mnist(image: Image.Image) -> torch.Tensor:
    """The MNIST-style 28×28 float32 image in [0, 1] (white ink on black) of a digit picture.

    Raises NoInkError when nothing in the image stands out as ink.
    """
    from scipy import ndimage

    if image.mode != "L":
        image = _to_gray(image)
    long_side = max(image.size)
    if long_side > WORK_SIZE:  # the ink ends up 20 px tall: analysing megapixels buys nothing
        image = image.reduce(math.ceil(long_side / WORK_SIZE))
    gray = np.asarray(image, dtype=np.float32)
    if float(gray.max() - gray.min()) < 8:
        raise NoInkError("no ink found: the image is blank (one flat colour)")

    # Polarity: the background is the class most of the border belongs to.
    t0 = otsu_threshold(gray)
    band = max(1, round(0.03 * min(gray.shape)))
    border = np.concatenate(
        [gray[:band].ravel(), gray[-band:].ravel(), gray[:, :band].ravel(), gray[:, -band:].ravel()]
    )
    light_border = float((border > t0).mean())
    if abs(light_border - 0.5) < 0.1:  # ambiguous border: the majority of all pixels decides
        light_border = float((gray > t0).mean())
    inverted = light_border > 0.5
    ink = 255.0 - gray if inverted else gray

    residual = ink - _background(ink, gray <= t0 if inverted else gray > t0)
    t = otsu_threshold(residual)
    mask = residual > t
    bg_values = residual[~mask]
    bg = float(np.median(bg_values)) if bg_values.size else 0.0
    noise = 1.4826 * float(np.median(np.abs(bg_values - bg))) if bg_values.size else 0.0
    if not mask.any():
        raise NoInkError("no ink found: nothing stands out from the background")
    strong, level = np.percentile(residual[mask], [90.0, LEVEL_PERCENTILE])
    if strong - bg < max(16.0, 6.0 * noise):
        raise NoInkError("no ink found: nothing stands out from the background (only noise)")

    # Keep the ink's connected pieces; specks far smaller than the largest piece are noise.
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes >= max(1.0, 0.02 * sizes.max())
    mask = keep[labels]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    extent = max(bottom - top, right - left)
    if extent < max(2, 0.03 * max(gray.shape)):
        raise NoInkError("no ink found: the image holds only specks, no digit")

    # Work on the ink box with room around it: cheaper than the whole image at every step below.
    pad = math.ceil(0.25 * extent) + 2
    y0, x0 = max(0, top - pad), max(0, left - pad)
    region = (slice(y0, bottom + pad), slice(x0, right + pad))
    mask = mask[region]
    # Soft ink in [0, 1]: the background level → 0, the typical stroke level → 1. The anti-aliased
    # edges below the Otsu threshold survive near the strokes; everything far from them is zeroed.
    lo = bg + 3.0 * noise
    soft = np.clip((residual[region] - lo) / max(level - lo, 1e-6), 0.0, 1.0)

    # A fine pen on a big page would shrink to a faint hairline at 20 px: thicken thin strokes to
    # MNIST's typical width. (A strip w px wide has a mean inner distance of about (w + 2) / 4.)
    width = (4.0 * float(ndimage.distance_transform_edt(mask)[mask].mean()) - 2.0) * BOX / extent
    if width < MIN_STROKE:
        reach = (TYPICAL_STROKE - width) / 2.0 * extent / BOX
        outside = ndimage.distance_transform_edt(~mask)
        soft = np.maximum(soft, np.clip(reach + 1.0 - outside, 0.0, 1.0))
        mask = outside <= reach
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    extent = max(bottom - top, right - left)

    scale = BOX / extent
    margin = max(1, math.ceil(1.5 / scale))
    near = ndimage.maximum_filter(mask.astype(np.uint8), size=2 * margin + 1).astype(bool)
    soft[~near] = 0.0

    # Crop the ink box plus the margin, scale its longest side to 20 px (anti-aliased).
    crop = soft[max(0, top - margin) : bottom + margin, max(0, left - margin) : right + margin]
    out_h = max(1, round(crop.shape[0] * scale))
    out_w = max(1, round(crop.shape[1] * scale))
    if (out_h, out_w) != crop.shape:
        resized = Image.fromarray(crop.astype(np.float32), "F").resize(
            (out_w, out_h), Image.Resampling.LANCZOS
        )
        crop = np.asarray(resized, dtype=np.float32)
        if scale > 1.0:  # enlarging widens the soft edges: steepen them, partly
            crop = (crop - 0.5) * min(math.sqrt(scale), 2.0) + 0.5
        crop = np.clip(crop, 0.0, 1.0)
    rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
    if rows.size == 0:
        raise NoInkError("no ink found: the ink vanished when scaled to 20 pixels")
    # Trim the empty margin; what remains is the ink box plus its anti-aliased edge (≤ 28 px).
    crop = crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1][:SIZE, :SIZE]

    # Paste so that the centre of mass lands where MNIST's do.
    cy, cx = ndimage.center_of_mass(crop)
    ch, cw = crop.shape
    oy = min(max(round(CENTRE - cy), 0), SIZE - ch)
    ox = min(max(round(CENTRE - cx), 0), SIZE - cw)
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[oy : oy + ch, ox : ox + cw] = crop
    return torch.from_numpy(out)


def _background(ink: np.ndarray, ink_mask: np.ndarray) -> np.ndarray | float:
    """The background level under the ink: a quadratic surface fitted away from the strokes.

    A plane is not enough for a photo lit from one side; a quadratic follows gentle vignetting.
    """
    from scipy import ndimage

    h, w = ink.shape
    reach = max(1, round(0.02 * max(h, w)))
    far = ~ndimage.maximum_filter(ink_mask.astype(np.uint8), size=2 * reach + 1).astype(bool)
    ys, xs = np.nonzero(far)
    if ys.size < 64 or min(h, w) < 16:
        values = ink[~ink_mask]
        return float(np.median(values)) if values.size else 0.0
    if ys.size > 4096:  # six coefficients need a sample, not every pixel
        pick = np.random.default_rng(0).integers(0, ys.size, 4096)
        ys, xs = ys[pick], xs[pick]
    v = ink[ys, xs].astype(np.float64)
    if float(v.max() - v.min()) < 1.0:
        return float(v.mean())  # flat (a clean scan or a synthetic image): no fit needed
    y, x = 2.0 * ys / max(h - 1, 1) - 1.0, 2.0 * xs / max(w - 1, 1) - 1.0
    design = np.stack([np.ones_like(y), y, x, y * y, x * y, x * x], axis=1)
    # Normal equations: well conditioned on [-1, 1] coordinates, and far cheaper than an SVD.
    c = np.linalg.solve(design.T @ design + 1e-9 * np.eye(6), design.T @ v)
    gy = np.linspace(-1.0, 1.0, h)[:, None]
    gx = np.linspace(-1.0, 1.0, w)[None, :]
    return (c[0] + c[1] * gy + c[2] * gx + c[3] * gy * gy + c[4] * gy * gx + c[5] * gx * gx).astype(
        np.float32
    )


def preprocess(source: ImageSource) -> torch.Tensor:
    """`to_mnist(open_image(source))`: any supported input → float32 [28, 28] in [0, 1]."""
    return to_mnist(open_image(source))
