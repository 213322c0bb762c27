"""Image files -> 8-bit RGB, the same way everywhere: training, synthesis, evaluation, checks.

`load_image` is the only place a file becomes pixels. It handles the files that silently break
other trainers (16-bit PNG, 32-bit TIFF, DICOM, EXIF rotation, alpha, palette, CMYK, truncated
JPEGs) and turns every unreadable file into an `ImageError` of one line. `check_image` reports
what is wrong with one file; `ImageTransform` makes the training tensor.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder

from sdtune.data.records import Problem
from sdtune.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")

# check_image thresholds, on the 8-bit output.
CONSTANT_STD = 2.0  # grey levels; a blank page with JPEG noise stays under it, a radiograph is far above
SATURATED_FRACTION = 0.5  # pure-white pixels; above this the file was almost surely clipped from 16 bits
DARK_MAX = 32  # brightest pixel; 12-bit data saved in a 16-bit PNG without scaling peaks at 16
INVERTED_MARGIN = 60  # grey levels the edges outshine the centre by, in a radiograph saved inverted

# Pillow modes that hold more than 8 bits per pixel; `.convert("RGB")` clips them instead of rescaling.
_HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
# Warning filters are process-wide: the decoding threads change them one at a time (see _open_with_pillow).
_FILTERS_LOCK = threading.Lock()


class ImageError(UserError):
    """An image file that cannot be used. str() is one line: `path: what is wrong: what to do`."""

    def __init__(self, path: str | Path, what: str):
        self.path = str(path)
        self.what = " ".join(what.split())  # one line, whatever a library put in its message
        super().__init__(f"{self.path}: {self.what}")


def load_image(path: str | Path) -> Image.Image:
    """Decode any supported file to an 8-bit RGB image with no metadata (`info` is empty).

    Bit depth. Integer data is rescaled from its declared range, never clipped: 16-bit PNG and
    TIFF by 65535 (TIFF by its BitsPerSample, e.g. 12 -> 4095). A PNG's sBIT chunk is ignored on
    purpose: by the PNG spec, sBIT=12 means the 12-bit values were already scaled up to 16 bits.
    12-bit data written unscaled into a 16-bit PNG therefore comes out dark, and `check_image`
    reports it instead of guessing. 32-bit integer TIFF has no meaningful declared range, so it
    is scaled from its own min..max; float TIFF is taken as [0, 1] when it lies in it, else min..max.
    Any data outside its declared range also falls back to min..max. A TIFF stored WhiteIsZero (0 is
    white, as DICOM's MONOCHROME1) is inverted, at every bit depth.

    DICOM (.dcm, or any file with the DICM prefix), through pydicom: modality LUT (rescale
    slope/intercept), then the first VOI LUT of the VOI LUT Sequence, else the first window
    (WindowCenter/Width, VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID), else the min..max
    of the data; MONOCHROME1 is inverted after that. Compressed transfer syntaxes decode when
    pydicom has a plugin for them; otherwise the error names the package to install. Multi-frame
    files are refused (a training image is one frame). Only the pixel-describing elements are
    read from the file, so patient, study and institution elements never reach memory.

    Colour. EXIF orientation is applied. Alpha (RGBA, LA, PA, palette or grey with a transparent
    colour) is composited over black: the background of a radiograph and the vignette of a
    dermoscope are black, so transparent borders stay background. Grey, 1-bit, palette and CMYK
    become RGB by Pillow's conversions (CMYK without ICC colour management); grey is replicated
    to three equal channels for the SD VAE.
    """
    path = Path(path)
    _require_file(path)
    if _is_dicom(path):
        rgb = _decode_dicom(path)
    else:
        image, bits, white_is_zero = _open_with_pillow(path)
        rgb = _pillow_to_rgb(path, image, bits)
        if white_is_zero:  # as MONOCHROME1 in DICOM: inverted after the rescale
            rgb = 255 - rgb
    return Image.fromarray(rgb)  # a fresh image: no EXIF, ICC or DICOM element travels with it


def check_image(path: str | Path, resolution: int | None = None, min_size: int | None = None) -> list[Problem]:
    """Every problem of one image file, decoded exactly as training will decode it.

    Errors: unreadable; short side under `min_size`; near-constant (a blank white, grey or black page);
    more than half the pixels pure white (the mark of a 16-bit image clipped by an 8-bit
    conversion elsewhere: training on it teaches clipping, so it is an error, not a warning);
    brightest pixel under DARK_MAX (12-bit data in a 16-bit file). Warnings: short side under
    `resolution` (it will be upscaled); edges much brighter than the centre (a radiograph saved
    inverted: air outside the body is dark in a radiograph, and dermoscopy vignettes are dark too).
    """
    where = str(path)
    try:
        image = load_image(path)
    except ImageError as err:
        return [Problem(where, err.what)]

    problems = []
    width, height = image.size
    short = min(width, height)
    if min_size is not None and short < min_size:
        problems.append(Problem(where, f"{width}x{height} is smaller than --min_size {min_size}: "
                                f"use --min_size {short} or remove it"))
    elif resolution is not None and short < resolution:
        problems.append(Problem(where, f"{width}x{height} will be upscaled to {resolution} on its short side "
                                "(blurry): use a larger original, or --min_size to drop such files", "warning"))

    pixels = np.asarray(image)
    if pixels.std() < CONSTANT_STD:
        mean = pixels.mean()
        level = "white" if mean > 200 else "black" if mean < 55 else "grey"
        problems.append(Problem(where, f"blank {level} image (all pixels about {round(pixels.mean())}): "
                                "fix the export or remove it; sdtune never trains on a blank image"))
        return problems
    white = (pixels == 255).all(axis=2).mean()
    if white > SATURATED_FRACTION:
        problems.append(Problem(where, f"{white:.0%} of pixels are pure white, the mark of a 16-bit image "
                                "clipped to 8 bits: give sdtune the original 16-bit PNG/TIFF or DICOM, or remove it"))
    if pixels.max() < DARK_MAX:
        problems.append(Problem(where, f"nearly black (brightest pixel {pixels.max()}/255): if it is 12-bit data "
                                "saved unscaled in a 16-bit PNG, multiply it by 16 and re-save; otherwise remove it"))
    grey = pixels.mean(axis=2)
    h, w = grey.shape
    edge = np.concatenate([grey[: h // 10].ravel(), grey[-(h // 10):].ravel(), grey[:, : w // 10].ravel(), grey[:, -(w // 10):].ravel()])
    centre = grey[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    if edge.size and edge.mean() - centre.mean() > INVERTED_MARGIN:
        problems.append(Problem(where, f"looks inverted (edges {edge.mean():.0f}, centre {centre.mean():.0f}): if it is "
                                "a MONOCHROME1 radiograph exported without inversion, invert it", "warning"))
    return problems


class ImageTransform:
    """PIL RGB image -> float tensor (3, resolution, resolution) in [-1, 1], the SD VAE's input.

    Resize the short side to `resolution` (Pillow bicubic, antialiased when shrinking), then crop
    a square: "center" (deterministic) or "random". Horizontal flip is off by default; turning
    it on for chest X-rays warns, because a mirrored radiograph puts the heart on the right.
    Random crop and flip draw from the generator given to the call (ImageCaptionDataset passes
    one seeded by (seed, epoch, index), so a resume or another worker count draws the same),
    else from the one given here, else from torch's global RNG.
    """

    def __init__(self, resolution: int, crop: str = "center", random_flip: bool = False,
                 modality: str | None = None, generator: torch.Generator | None = None):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if crop not in ("center", "random"):
            raise ValueError(f"unsupported crop {crop!r}: use 'center' or 'random'")
        if modality not in ("chest_xray", "dermoscopy", None):
            raise ValueError(f"unsupported modality {modality!r}: use 'chest_xray', 'dermoscopy' or None")
        if random_flip and modality == "chest_xray":
            warnings.warn("random_flip mirrors chest X-rays: the heart lands on the wrong side and "
                          "laterality markers read backwards; leave it off unless you mean it", stacklevel=2)
        self.resolution, self.crop, self.random_flip, self.generator = resolution, crop, random_flip, generator

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """`generator` (default: the one given at construction) draws the random crop and flip."""
        generator = generator or self.generator
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}: decode files with load_image")
        r = self.resolution
        scale = r / min(image.size)
        size = tuple(max(r, round(side * scale)) for side in image.size)  # short side exactly r
        image = image.resize(size, Image.Resampling.BICUBIC)

        if self.crop == "center":
            left, top = (size[0] - r) // 2, (size[1] - r) // 2
        else:
            left, top = (int(torch.randint(0, side - r + 1, (1,), generator=generator)) for side in size)
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and torch.rand(1, generator=generator).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return pixels.float() / 127.5 - 1.0


def _require_file(path: Path) -> None:
    if not path.exists():
        raise ImageError(path, "file not found: check the path, or remove it from the dataset")
    if not path.is_file():
        raise ImageError(path, "not a file: give the path of an image file")
    if not os.access(path, os.R_OK):
        raise ImageError(path, "permission denied: make it readable, or remove it")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes): re-export or re-download it, or remove it")


# --- Pillow -----------------------------------------------------------------------------------


def _open_with_pillow(path: Path) -> tuple[Image.Image, int | None, bool]:
    """The fully decoded, upright image, its declared bit depth (None where it has none), and whether its
    grey values still need inverting: a high-depth TIFF stored WhiteIsZero (Photometric 0), which
    Pillow inverts at 8 bits (mode L;I) but returns as stored at 16 (I;16)."""
    try:
        with _FILTERS_LOCK, warnings.catch_warnings():
            # Pillow warns, naming no file, of images between its pixel limit and twice it: they are decoded
            # as asked (beyond twice it, its error is one problem of that file). Opening reads the header only.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            frames = getattr(image, "n_frames", 1)
            # An animated GIF/PNG, a multi-page TIFF: which page is the image is not ours to guess. A camera
            # JPEG with a preview (MPO) is not one: its first frame is the photograph.
            if frames > 1 and image.format != "MPO":
                raise ImageError(path, f"holds {frames} frames or pages: save the one to train on alone, or remove it")
            image.load()  # a truncated JPEG opens fine and only fails here
            bits = _declared_bits(image)  # before exif_transpose, whose copy forgets the format
            white_is_zero = image.format == "TIFF" and image.mode in _HIGH_DEPTH_MODES and image.tag_v2.get(262) == 0
            return ImageOps.exif_transpose(image), bits, white_is_zero
    except UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow or pydicom can read: re-export it as PNG, JPEG, TIFF "
                         "or DICOM, or remove it") from None
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"{str(err).split(',')[0]} (Pillow's decompression-bomb guard): downscale it "
                         "(a few thousand pixels a side is plenty at 512 px), or remove it") from None
    except ImageError:
        raise
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageError(path, f"truncated or corrupt image data ({err}): re-download or re-export it, "
                         "or remove it") from None


def _declared_bits(image: Image.Image) -> int | None:
    if image.format == "TIFF":
        bits = image.tag_v2.get(258)  # BitsPerSample; one value per channel
        bits = bits[0] if isinstance(bits, tuple) else bits
        return bits if bits and bits <= 16 else None
    # Pillow opens 16-bit grey PNG as I;16 (older versions as I); PNG has no deeper grey.
    return 16 if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG") else None


def over_black(image: Image.Image) -> Image.Image:
    """A transparent image composited over black (as every reader of the toolkit sees it); others as they are."""
    if not image.has_transparency_data:
        return image
    return Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))


def _pillow_to_rgb(path: Path, image: Image.Image, bits: int | None) -> np.ndarray:
    try:
        return to_rgb(image, bits)
    except ValueError:
        raise ImageError(path, f"unsupported colour mode {image.mode}: convert it to RGB or greyscale") from None


def to_rgb(image: Image.Image, bits: int | None = None) -> np.ndarray:
    """A Pillow image (a file's or one in memory) as uint8 RGB (H, W, 3), as load_image makes it: high-depth
    grey rescaled from its `bits` (16 for I;16 modes when not given; else its min..max), never clipped as
    Pillow's own conversion would; transparency over black. ValueError: a mode Pillow cannot convert."""
    if image.mode in _HIGH_DEPTH_MODES:
        return _grey_to_rgb(_rescale(np.asarray(image), bits or (16 if image.mode.startswith("I;16") else None)))
    return np.asarray(over_black(image).convert("RGB"))


def _rescale(values: np.ndarray, bits: int | None) -> np.ndarray:
    """High-depth grey values -> uint8, by the declared range when the data fits it, else min..max."""
    is_float = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float64))
    lo, hi = values.min(), values.max()
    if bits and lo >= 0 and hi <= 2**bits - 1:
        lo, hi = 0, 2**bits - 1
    elif is_float and lo >= 0 and hi <= 1:
        lo, hi = 0, 1
    return _to_uint8((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values))


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


# --- DICOM ------------------------------------------------------------------------------------

# The only elements read from a DICOM file: the Image Pixel, Modality LUT and VOI LUT modules.
# Patient, study and institution elements are skipped unparsed, so no identifier can reach an
# image, a warning or an error message.
_DICOM_TAGS = [
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "PixelData",
]

# What to pip install so pydicom can decode a compressed transfer syntax, by the start of its name
# (most specific first). RLE and deflate need nothing; Pillow covers JPEG baseline and JPEG 2000.
_DICOM_DECODERS = {
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "High-Throughput JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg pylibjpeg-libjpeg",
}


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"  # Part 10 files: 128-byte preamble, then "DICM"


def _decode_dicom(path: Path) -> np.ndarray:
    try:  # force: old .dcm files lack the preamble
        ds = pydicom.dcmread(path, force=True, specific_tags=_DICOM_TAGS)
    except Exception as err:
        raise ImageError(path, f"not a readable DICOM file ({err}): re-export it, or remove it") from None
    if "PixelData" not in ds:
        raise ImageError(path, "DICOM file without pixel data (a report, or not DICOM at all): remove it")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(path, f"multi-frame DICOM ({frames} frames): export the one frame to train on, or remove it")
    pixels = _dicom_pixels(path, ds)

    photometric = ds.get("PhotometricInterpretation", "")
    if ds.get("SamplesPerPixel", 1) == 3:  # colour (ISIC dermoscopy): pydicom already converts YBR to RGB
        return pixels if pixels.dtype == np.uint8 else _to_uint8(pixels / (2 ** int(ds.BitsStored) - 1))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(path, f"unsupported DICOM Photometric Interpretation {photometric!r}: "
                         "convert it to MONOCHROME2 or RGB, or remove it")

    try:  # header values written by hand or by broken exporters: "abc" as a window centre
        unit = _displayed(pixels, ds)
    except Exception as err:
        raise ImageError(path, f"its DICOM rescale or window values cannot be applied ({err}): re-export it, "
                         "or remove it") from None
    grey = _to_uint8(unit)
    if photometric == "MONOCHROME1":  # low values are white; inverted after the VOI (PS3.3 C.7.6.3.1.2)
        grey = 255 - grey
    return _grey_to_rgb(grey)


def _dicom_pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        raise ImageError(path, "DICOM file without a Transfer Syntax UID: re-export it, or remove it")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageError(path, f"pydicom cannot decode the transfer syntax {tsyntax.name!r}: convert it "
                         "(e.g. gdcmconv --raw) or remove it") from None
    if not decoder.is_available:
        install = next((pkgs for family, pkgs in _DICOM_DECODERS.items() if tsyntax.name.startswith(family)),
                       "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        raise ImageError(path, f"its transfer syntax {tsyntax.name!r} needs a decoder that is not installed: "
                         f"pip install {install} (or python-gdcm)")
    try:
        return ds.pixel_array
    except Exception as err:
        raise ImageError(path, f"cannot decode its DICOM pixel data ({err}): re-export it, or remove it") from None


def _displayed(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values to [0, 1] as a viewer shows them: modality LUT (rescale), then the VOI LUT or window."""
    values = apply_modality_lut(pixels, ds)
    voi_lut = ds.get("VOILUTSequence")
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if voi_lut and "LUTDescriptor" in voi_lut[0] and "LUTData" in voi_lut[0]:
        return _voi_lut(values, ds)
    if center is not None and width is not None and width > 0:
        return _window(values, center, width, ds.get("VOILUTFunction", "LINEAR"))
    lo, hi = values.min(), values.max()  # no window stored: the whole range of the data, as viewers do
    return (values - lo) / (hi - lo) if hi > lo else np.zeros(values.shape)


def _first(value) -> float | None:
    """The first of a multi-valued element (alternative windows: the first is the default view)."""
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    return None if value is None or value == "" else float(value)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing of DICOM PS3.3 C.11.2.1.2-3, scaled to [0, 1]."""
    if function.upper() == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function.upper() == "LINEAR_EXACT":
        lo, hi = center - width / 2, center + width / 2
    else:  # LINEAR, the default: the standard's half-pixel offsets
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    if hi <= lo:  # a width of 1 is a threshold
        return (x > lo).astype(np.float64)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _voi_lut(x: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The first VOI LUT of the sequence, scaled to [0, 1] by the range of the table's own entries
    (writers often declare 16 bits per entry for a table that only reaches 4095)."""
    entries, first_mapped, _ = ds.VOILUTSequence[0].LUTDescriptor
    table = apply_voi(np.arange(first_mapped, first_mapped + (entries or 2**16)), ds)  # the table, whatever its VR
    lo, hi = float(table.min()), float(table.max())
    y = apply_voi(np.rint(x).astype(np.int64), ds).astype(np.float64)
    return (y - lo) / (hi - lo) if hi > lo else np.zeros(y.shape)
