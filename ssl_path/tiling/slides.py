"""One reader for every image the tiler accepts: whole-slide files, large TIFFs and plain images.

``open_slide(path)`` returns a :class:`Slide` with OpenSlide's geometry (level-0 ``dimensions``,
``level_dimensions``, ``level_downsamples``), the level-0 resolution ``mpp`` (µm/px, or None) and
``read_region(x, y, level, size)`` with ``x, y`` in level-0 pixels, like OpenSlide. Three backends:

- OpenSlide for vendor formats (Aperio .svs, Hamamatsu .ndpi, MIRAX .mrxs, Leica .scn, ...);
- tifffile for other TIFFs: pyramids in SubIFDs or OME series, read segment by segment, so a
  region of a 100k-pixel level costs the tiles it touches, not the level;
- PIL for PNG, JPEG, BMP (decoded once, one level).

A file no backend can read raises :class:`SlideError` with each backend's reason. What a library
says on the side while reading (tifffile's log records, PIL's warnings on a damaged file) is
collected by :func:`reader_notes` and joins that reason, instead of reaching the terminal.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from ssl_path.data.images import (
    IMAGE_SUFFIXES,
    OPENSLIDE_SUFFIXES,
    PIL_SUFFIXES,
    TIFF_SUFFIXES,
)

__all__ = [
    "OPENSLIDE_SUFFIXES",
    "TIFF_SUFFIXES",
    "PIL_SUFFIXES",
    "IMAGE_SUFFIXES",
    "RESOLUTION_TOLERANCE",
    "SlideError",
    "Slide",
    "open_slide",
    "best_level",
    "read_thumbnail",
    "reader_notes",
    "error_summary",
]


# A resolution tag outside this range is a writer's default (72 dpi = 353 µm/px), not a microscope's.
_MPP_RANGE = (0.01, 50.0)
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}  # TIFF ResolutionUnit -> µm
# A level within this relative error of a target downsample is "at" it: 0.499 µm/px serves 0.5 µm/px
# as is, rather than through a 257 -> 256 px resize that blurs every tile for a 0.2 % size change.
RESOLUTION_TOLERANCE = 0.01


class SlideError(Exception):
    """A file that no backend can read; the message names the file and each backend's reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class Slide:
    """A multi-resolution image with OpenSlide's coordinate conventions.

    Subclasses set ``path``, ``level_dimensions`` ((w, h) per level, level 0 first), ``mpp`` and
    implement ``_read(level, x, y, w, h)``, which reads a region already clipped to the level.
    """

    backend = "?"

    def __init__(self, path: Path, level_dimensions: list[tuple[int, int]], mpp: float | None) -> None:
        if not level_dimensions or min(level_dimensions[0]) < 1:
            raise SlideError(path, "empty image")
        self.path = path
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        w0, h0 = self.level_dimensions[0]
        # Mean of the two axes, as OpenSlide does: levels may round differently in x and y.
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions)
        self.mpp = mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 RGB ``[h, w, 3]`` of ``size=(w, h)`` level pixels whose top-left is level-0 ``(x, y)``.

        Parts outside the image are white, as slide background is.
        """
        w, h = size
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, levels={self.level_dimensions}, mpp={self.mpp})"


# ----------------------------------------------------------------------------- OpenSlide


class OpenSlideSlide(Slide):
    """Vendor whole-slide formats through OpenSlide."""

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        try:
            props = self._osr.properties
            mpps = [_float(props.get(k)) for k in ("openslide.mpp-x", "openslide.mpp-y")]
            mpps = [m for m in mpps if m is not None and _MPP_RANGE[0] <= m <= _MPP_RANGE[1]]
            mpp = sum(mpps) / len(mpps) if mpps else None
            background = props.get("openslide.background-color") or "FFFFFF"
            self._background = np.array([int(background[i : i + 2], 16) for i in (0, 2, 4)], np.float32)
            super().__init__(path, list(self._osr.level_dimensions), mpp)
        except BaseException:
            self._osr.close()
            raise
        # OpenSlide's own downsamples account for its per-format rounding; keep them.
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        rgba = np.asarray(self._osr.read_region((int(x), int(y)), level, (int(size[0]), int(size[1]))))
        return _composite(rgba, self._background)

    def close(self) -> None:
        self._osr.close()


def _composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """RGBA (not premultiplied) over an opaque background colour -> uint8 RGB."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + background * (1.0 - a)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- tifffile


class TiffSlide(Slide):
    """TIFF (plain, tiled, pyramidal in SubIFDs, OME, SVS) read page by page with tifffile."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(str(path))
        try:
            series = self._tif.series
            if not series:
                raise SlideError(path, "TIFF has no image")
            self._pages = [_first_page(level) for level in series[0].levels]
            self._whole: dict[int, np.ndarray] = {}
            dims = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
            super().__init__(path, dims, _tiff_mpp(self._tif, self._pages[0]))
        except BaseException:
            self._tif.close()
            raise

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        if _segment_readable(page):
            raw = _read_segments(page, x, y, w, h)
        else:
            # Planar or volumetric layouts: decode the page once and crop; rare for slides.
            if level not in self._whole:
                self._whole[level] = _as_yxs(page.asarray(), page)
            raw = self._whole[level][y : y + h, x : x + w]
        return _to_rgb8(raw, page)

    def close(self) -> None:
        self._whole.clear()
        self._tif.close()


def _first_page(level: Any) -> Any:
    """The first page of a series level (a level can hold a stack of pages)."""
    pages = getattr(level, "pages", None)
    page = pages[0] if pages else level
    return getattr(page, "keyframe", page)


def _segment_readable(page: Any) -> bool:
    return (page.planarconfig == 1 or page.samplesperpixel == 1) and page.imagedepth == 1


def _read_segments(page: Any, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Decode only the tiles or strips of ``page`` that overlap the region; return ``[h, w, S]``."""
    if page.is_tiled:
        seg_h, seg_w = page.tilelength, page.tilewidth
    else:
        seg_h, seg_w = min(page.rowsperstrip, page.imagelength), page.imagewidth
    n_cols = math.ceil(page.imagewidth / seg_w)
    rows = range(y // seg_h, (y + h - 1) // seg_h + 1)
    cols = range(x // seg_w, (x + w - 1) // seg_w + 1)
    indices = [r * n_cols + c for r in rows for c in cols]
    out = np.zeros((h, w, page.samplesperpixel), page.dtype)

    decode = page.decode
    kwargs: dict[str, Any] = {"_fullsize": page.is_tiled}
    if page.compression in (6, 7, 33007, 34892):  # JPEG flavours carry shared tables in the IFD
        kwargs.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)
    fh = page.parent.filehandle
    offsets = [page.dataoffsets[i] for i in indices]
    counts = [page.databytecounts[i] for i in indices]
    for data, index in fh.read_segments(offsets, counts, indices=indices, sort=True, lock=fh.lock):
        segment, (_, _, sy, sx, _), _ = decode(data, index, **kwargs)
        if segment is None:  # a sparse TIFF leaves empty tiles unwritten
            continue
        segment = segment.reshape(segment.shape[-3:])  # [len, width, samples]
        # Intersect the segment with the region, both in page coordinates.
        ya, yb = max(sy, y), min(sy + segment.shape[0], y + h, page.imagelength)
        xa, xb = max(sx, x), min(sx + segment.shape[1], x + w, page.imagewidth)
        if yb > ya and xb > xa:
            out[ya - y : yb - y, xa - x : xb - x] = segment[ya - sy : yb - sy, xa - sx : xb - sx]
    return out


def _as_yxs(array: np.ndarray, page: Any) -> np.ndarray:
    """A whole decoded page to ``[H, W, S]`` whatever its axes order."""
    axes = page.axes
    if "S" in axes and axes.index("S") < axes.index("Y"):
        array = np.moveaxis(array, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    # Drop any leading axes (depth, planes) by taking the first entry.
    while array.ndim > (3 if axes.endswith("S") else 2):
        array = array[0]
    return array if array.ndim == 3 else array[..., None]


def _to_rgb8(raw: np.ndarray, page: Any) -> np.ndarray:
    """TIFF samples ``[h, w, S]`` of any integer/float type to uint8 RGB."""
    if raw.ndim == 2:
        raw = raw[..., None]
    if raw.dtype != np.uint8:
        if raw.dtype == bool:
            raw = raw.astype(np.uint8) * 255
        elif np.issubdtype(raw.dtype, np.integer):
            # Scale by the declared bit depth, not the data: every tile gets the same mapping.
            top = float(2 ** min(int(page.bitspersample), 8 * raw.dtype.itemsize) - 1)
            raw = np.clip(np.rint(raw.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
        else:
            raw = np.clip(np.rint(raw.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if page.photometric == 0:  # MINISWHITE
        raw = 255 - raw
    channels = raw.shape[-1]
    rgb = raw[..., :3] if channels >= 3 else np.repeat(raw[..., :1], 3, axis=-1)
    return np.ascontiguousarray(rgb)


def _tiff_mpp(tif: Any, page: Any) -> float | None:
    """µm/px from Aperio's ImageDescription, OME-XML, or the resolution tags; None if unknown."""
    description = page.description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
    candidates = [_float(match.group(1))] if match else []
    ome = tif.ome_metadata if tif.is_ome else None
    if ome:
        size = re.search(r'PhysicalSizeX="([^"]+)"', ome)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
        if size and scale is not None:
            value = _float(size.group(1))
            candidates.append(value * scale if value is not None else None)
    if 282 in page.tags:
        unit = page.tags.valueof(296, default=2)
        num, den = page.tags.valueof(282)
        if unit in _UM_PER_UNIT and num > 0 and den > 0:
            candidates.append(_UM_PER_UNIT[unit] * den / num)
    for mpp in candidates:
        if mpp is not None and _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
            return mpp
    return None


# ----------------------------------------------------------------------------- PIL


class PilSlide(Slide):
    """PNG, JPEG, BMP (and TIFFs tifffile cannot read), decoded whole into memory."""

    backend = "pil"

    def __init__(self, path: Path) -> None:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file must fail here, not at the first tile
            self._rgb = _pil_rgb(image)
        h, w = self._rgb.shape[:2]
        super().__init__(path, [(w, h)], None)

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._rgb[y : y + h, x : x + w]

    def close(self) -> None:
        self._rgb = np.zeros((0, 0, 3), np.uint8)


def _pil_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode to uint8 RGB ``[H, W, 3]``; transparency over white, 16-bit scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image).astype(np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"))
        return _composite(rgba, np.full(3, 255.0, np.float32))
    return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------- opening


def open_slide(path: str | Path) -> Slide:
    """Open ``path`` with the first backend that reads it; raise :class:`SlideError` if none does."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(path, "not a file")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file")
    errors = []
    for name, backend in _backends(path):
        with reader_notes() as notes:
            try:
                return backend(path)
            except Exception as err:  # any decoder's failure on a user file means "try the next backend"
                errors.append(f"{name}: {error_summary(err, notes)}")
    raise SlideError(path, f"unreadable ({'; '.join(errors)})")


def _backends(path: Path) -> Iterator[tuple[str, Callable[[Path], Slide]]]:
    """Backends to try for ``path``, most specific first."""
    suffix = path.suffix.lower()
    if suffix in PIL_SUFFIXES:
        yield "pil", PilSlide
        return
    vendor = _openslide_vendor(path)
    # OpenSlide's generic-tiff sees neither SubIFD pyramids nor OME series; tifffile does.
    if vendor is not None and vendor != "generic-tiff":
        yield "openslide", OpenSlideSlide
    if suffix not in OPENSLIDE_SUFFIXES or suffix in (".svs", ".ndpi", ".scn", ".bif"):
        yield "tifffile", TiffSlide
    if vendor == "generic-tiff":
        yield "openslide", OpenSlideSlide
    yield "pil", PilSlide


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # OpenSlide missing or unable to probe: the other backends still apply
        return None


# ----------------------------------------------------------------------------- levels, thumbnails


def best_level(slide: Slide, downsample: float, tolerance: float = RESOLUTION_TOLERANCE) -> int:
    """The coarsest level whose downsample is at or below ``downsample`` (finer or equal), else 0."""
    level = 0
    for i, ds in enumerate(slide.level_downsamples):
        if ds <= downsample * (1.0 + tolerance) and ds >= slide.level_downsamples[level]:
            level = i
    return level


def read_thumbnail(slide: Slide, downsample: float, block: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
    """A low-resolution RGB image of the whole slide, and its (x, y) downsample from level 0.

    Reads the level at or below ``downsample`` in blocks and averages ``k x k`` pixel cells, with
    ``k`` the integer factor left to reach it, so memory stays at one block whatever the level size.
    """
    level = best_level(slide, downsample)
    ds = slide.level_downsamples[level]
    k = max(1, int(downsample / ds))
    lw, lh = slide.level_dimensions[level]
    tw, th = max(1, lw // k), max(1, lh // k)  # a last partial cell is dropped (or padded white)
    step = max(k, block // k * k)
    out = np.empty((th, tw, 3), np.uint8)
    for by in range(0, th * k, step):
        for bx in range(0, tw * k, step):
            bw, bh = min(step, tw * k - bx), min(step, th * k - by)
            region = slide.read_region(int(round(bx * ds)), int(round(by * ds)), level, (bw, bh))
            cells = np.asarray(Image.fromarray(region).reduce(k)) if k > 1 else region  # box mean of k x k
            out[by // k : (by + bh) // k, bx // k : (bx + bw) // k] = cells
    w0, h0 = slide.dimensions
    return out, (w0 / lw * k, h0 / lh * k)


# ----------------------------------------------------------------------------- helpers


def _float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


class _NoteHandler(logging.Handler):
    def __init__(self, notes: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def reader_notes() -> Iterator[list[str]]:
    """Within the block, warnings and log records of WARNING and above go into the yielded list, not to stderr.

    A reader's complaints explain why a file failed (tifffile logs "invalid offset to first page" on
    a truncated slide before failing); on a file that reads they are dropped. Meant for a reading
    process (a tiling worker, or the stage with ``--workers 1``): warning filters are process-wide.
    """
    notes: list[str] = []
    handler = _NoteHandler(notes)
    root = logging.getLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def note_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            notes.append(f"{category.__name__}: {message}")

        warnings.showwarning = note_warning  # restored by catch_warnings
        # A handler on the root logger also keeps logging's last-resort stderr handler out.
        root.addHandler(handler)
        try:
            yield notes
        finally:
            root.removeHandler(handler)


def error_summary(err: BaseException, notes: Sequence[str] = (), limit: int = 160) -> str:
    """One short line for an exception: its type and the first line of its message, then what the
    reader said on the side (``notes`` from :func:`reader_notes`), in brackets."""
    if isinstance(err, SlideError):
        text = err.reason
    else:
        text = f"{type(err).__name__}: {_clip(str(err), limit) or type(err).__name__}"
    said = list(dict.fromkeys(_clip(n, limit) for n in notes))
    if said:
        more = f"; {len(said) - 3} more" if len(said) > 3 else ""
        text += f" [{'; '.join(said[:3])}{more}]"
    return text


def _clip(text: str, limit: int) -> str:
    """The first line of ``text``, squeezed and cut to ``limit`` characters."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
