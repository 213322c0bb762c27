"""load_image, check_image and ImageTransform on files written here, at test time.

Expected pixels are computed independently with numpy (or by the formula of the standard),
never by calling the code under test twice.
"""

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from sdtune.data.images import IMAGE_SUFFIXES, ImageError, ImageTransform, check_image, load_image
from sdtune.errors import UserError

PATIENT_NAME, PATIENT_ID = "DOE^JANE", "MRN12345"


def rgb_array(path):
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def assert_grey(rgb):
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


def gradient(shape, lo, hi, dtype):
    return np.linspace(lo, hi, shape[0] * shape[1]).reshape(shape).astype(dtype)


# --- 8-bit and high bit depth -------------------------------------------------------------------


def test_suffixes_cover_the_formats_of_the_field():
    assert set(IMAGE_SUFFIXES) == {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"}


def test_8bit_grey_png_is_kept_exactly_in_three_equal_channels(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.png")
    rgb = rgb_array(tmp_path / "a.png")
    assert rgb.shape == (30, 40, 3)
    assert (assert_grey(rgb) == grey).all()
    assert load_image(tmp_path / "a.png").info == {}


def test_8bit_grey_jpeg_matches_pillows_own_decode(tmp_path):
    grey = gradient((32, 48), 0, 255, np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.jpg", quality=95)
    expected = np.asarray(Image.open(tmp_path / "a.jpg"))
    assert (assert_grey(rgb_array(tmp_path / "a.jpg")) == expected).all()


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_is_rescaled_by_65535_not_clipped(tmp_path, suffix):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / f"a{suffix}")
    with Image.open(tmp_path / f"a{suffix}") as raw:
        assert raw.mode == "I;16"
        assert (np.asarray(raw.convert("RGB")) == 255).mean() > 0.99  # the trap load_image avoids

    grey = assert_grey(rgb_array(tmp_path / f"a{suffix}"))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert (grey == expected).all()
    assert (grey == 255).mean() < 0.01
    assert grey[128, 128] == round(32896 * 255 / 65535) == 128


def test_a_16bit_white_is_zero_tiff_is_inverted(tmp_path):
    # Photometric 0 (WhiteIsZero), TIFF's MONOCHROME1: 0 is white. Pillow inverts it at 8 bits (mode L;I)
    # but returns 16-bit data as stored.
    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    Image.fromarray(values).save(tmp_path / "a.tif", tiffinfo={262: 0})
    with Image.open(tmp_path / "a.tif") as raw:
        assert raw.mode == "I;16" and raw.tag_v2[262] == 0 and np.asarray(raw)[0, 0] == 0
    grey = assert_grey(rgb_array(tmp_path / "a.tif"))
    assert (grey == 255 - np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)).all()
    assert grey[0, 0] == 255 and grey[-1, -1] == 0


def test_12bit_data_in_16bit_png_is_scaled_by_the_container_and_reported_dark(tmp_path):
    values = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # 12-bit values, not scaled up
    Image.fromarray(values).save(tmp_path / "a.png")
    grey = assert_grey(rgb_array(tmp_path / "a.png"))
    assert grey.max() == round(4095 * 255 / 65535) == 16
    (problem,) = check_image(tmp_path / "a.png")
    assert problem.severity == "error" and "nearly black" in problem.what and "multiply it by 16" in problem.what


def test_32bit_integer_tiff_is_scaled_from_its_own_range(tmp_path):
    values = gradient((64, 64), 1000, 300_000, np.int32)
    Image.fromarray(values).save(tmp_path / "a.tif")
    with Image.open(tmp_path / "a.tif") as raw:
        assert raw.mode == "I"
    expected = np.round((values - 1000) / (300_000 - 1000) * 255).astype(np.uint8)
    assert (assert_grey(rgb_array(tmp_path / "a.tif")) == expected).all()


@pytest.mark.parametrize(("lo", "hi", "scale_lo", "scale_hi"), [(0.2, 0.6, 0.0, 1.0), (-3.0, 5.0, -3.0, 5.0)])
def test_float_tiff_is_taken_as_0_1_when_inside_it_else_min_max(tmp_path, lo, hi, scale_lo, scale_hi):
    values = gradient((64, 64), lo, hi, np.float32)
    Image.fromarray(values).save(tmp_path / "a.tif")
    with Image.open(tmp_path / "a.tif") as raw:
        assert raw.mode == "F"
    expected = np.round((values.astype(np.float64) - scale_lo) / (scale_hi - scale_lo) * 255).astype(np.uint8)
    assert np.abs(assert_grey(rgb_array(tmp_path / "a.tif")).astype(int) - expected).max() <= 1


# --- colour modes and orientation --------------------------------------------------------------


def test_exif_orientation_6_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # red mark at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "a.jpg", exif=exif, quality=95)

    rgb = rgb_array(tmp_path / "a.jpg")
    assert rgb.shape == (80, 40, 3)  # width and height swapped
    top_right, top_left = rgb[4:12, 28:36].mean(axis=(0, 1)), rgb[4:12, 4:12].mean(axis=(0, 1))
    assert top_right[0] > 200 and top_right[2] < 50  # the mark turned with the image
    assert top_left[0] < 50 and top_left[2] > 200


@pytest.mark.parametrize(
    ("mode", "pixel", "expected"),
    [
        ("CMYK", (255, 0, 0, 0), (0, 255, 255)),  # pure cyan
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),  # no ink
        ("RGBA", (200, 100, 50, 255), (200, 100, 50)),  # opaque: unchanged
        ("RGBA", (200, 100, 50, 0), (0, 0, 0)),  # transparent: the black background
        ("LA", (180, 255), (180, 180, 180)),
        ("LA", (180, 0), (0, 0, 0)),
        ("1", 1, (255, 255, 255)),
        ("1", 0, (0, 0, 0)),
    ],
)
def test_modes_become_rgb_with_the_right_colour(tmp_path, mode, pixel, expected):
    suffix = ".tif" if mode == "CMYK" else ".png"
    Image.new(mode, (8, 6), pixel).save(tmp_path / f"a{suffix}")
    rgb = rgb_array(tmp_path / f"a{suffix}")
    assert rgb.shape == (6, 8, 3)
    assert tuple(rgb[3, 4]) == expected


def test_half_transparent_rgba_is_composited_over_black(tmp_path):
    Image.new("RGBA", (4, 4), (200, 100, 50, 128)).save(tmp_path / "a.png")
    expected = np.array([200, 100, 50]) * 128 / 255
    assert np.abs(rgb_array(tmp_path / "a.png")[0, 0] - expected).max() <= 1


def test_palette_images_use_their_palette_and_transparency(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 5] + [0] * 759)
    image.putpixel((0, 0), 1)
    image.putpixel((1, 0), 2)
    image.save(tmp_path / "p.png")
    image.save(tmp_path / "t.png", transparency=2)  # palette entry 2 transparent
    p, t = rgb_array(tmp_path / "p.png"), rgb_array(tmp_path / "t.png")
    assert tuple(p[0, 0]) == (10, 200, 30) and tuple(p[0, 1]) == (250, 5, 5)
    assert tuple(t[0, 0]) == (10, 200, 30) and tuple(t[0, 1]) == (0, 0, 0)



def test_palette_with_alpha_is_composited_over_black():
    from sdtune.data.images import _pillow_to_rgb  # no file format writes PA; it only arises in memory

    image = Image.new("PA", (4, 2), (1, 255))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 0), (1, 0))
    rgb = _pillow_to_rgb(Path("pa"), image, None)
    assert tuple(rgb[0, 0]) == (10, 200, 30) and tuple(rgb[0, 1]) == (0, 0, 0)


# --- files that must fail with one clear line ----------------------------------------------------


def broken_files(tmp_path):
    Image.fromarray(gradient((256, 256), 0, 255, np.uint8)).convert("RGB").save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "report.dcm").write_text("not dicom either\n")
    return {
        "truncated.jpg": "truncated",
        "notes.png": "not an image",
        "empty.png": "empty file",
        "empty.dcm": "empty file",
        "report.dcm": "without pixel data",
        "missing.png": "not found",
    }


def test_broken_files_raise_one_line_image_errors(tmp_path):
    for name, what in broken_files(tmp_path).items():
        with pytest.raises(ImageError) as caught:
            load_image(tmp_path / name)
        message = str(caught.value)
        assert isinstance(caught.value, UserError)
        assert message.startswith(f"{tmp_path / name}: ") and what in message, message
        assert "\n" not in message and "Traceback" not in message
        error = caught.value  # no chained traceback under the one line
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_truncated_jpeg_is_refused_without_touching_pillows_global_switch(tmp_path):
    from PIL import ImageFile

    broken_files(tmp_path)
    with pytest.raises(ImageError, match="re-download or re-export"):
        load_image(tmp_path / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_becomes_an_image_error(tmp_path, monkeypatch):
    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x limit: Pillow refuses
    with pytest.raises(ImageError, match="decompression-bomb guard\\): downscale it"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # between the limit and twice it: decoded, unwarned
    with warnings.catch_warnings(record=True) as caught:
        assert load_image(tmp_path / "big.png").size == (40, 40)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_camera_jpeg_with_a_preview_is_read_as_its_photograph(tmp_path):
    """Phones and cameras (dermoscopy too) store a preview as a second frame (MPO): not an animation."""
    photo = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1)), "L").convert("RGB")
    photo.save(tmp_path / "photo.jpg", format="MPO", save_all=True, append_images=[photo.resize((16, 12))])
    with Image.open(tmp_path / "photo.jpg") as opened:
        assert opened.format == "MPO" and opened.n_frames == 2  # really a two-frame file
    assert load_image(tmp_path / "photo.jpg").size == (64, 48)


@pytest.mark.parametrize("name", ["animated.gif", "pages.tiff", "animated.png"])
def test_images_of_several_frames_are_refused_not_cut_to_their_first(tmp_path, name):
    frames = [Image.new("L", (32, 32), v) for v in (60, 180)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="holds 2 frames or pages: save the one to train on alone"):
        load_image(tmp_path / name)


# --- DICOM ------------------------------------------------------------------------------------


def write_dicom(path, stored, photometric="MONOCHROME2", bits_stored=12, compress=None, part10=True, **elements):
    """A DX image with planted identifiers; `elements` adds e.g. RescaleSlope, WindowCenter."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.StudyDate, ds.InstitutionName = "20240131", "Example General Hospital"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 1 if stored.ndim == 2 else 3
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if stored.ndim == 3:
        ds.PlanarConfiguration = 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.tobytes()
    if compress:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=part10)  # part10=False: no preamble, as in old exports
    assert PATIENT_NAME.encode() in path.read_bytes()  # the identifiers really are in the file
    return path


STORED_12BIT = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit value once


def test_dicom_rescale_then_window_follows_the_standard(tmp_path):
    slope, intercept, center, width = 2.0, -1024.0, 3000.0, 4000.0
    path = write_dicom(tmp_path / "a.dcm", STORED_12BIT, RescaleSlope=slope, RescaleIntercept=intercept,
                       WindowCenter=center, WindowWidth=width)
    # PS3.3 C.11.2.1.2.1, LINEAR, output range 0..255
    x = STORED_12BIT * slope + intercept
    c, w = center - 0.5, width - 1
    expected = np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, ((x - c) / w + 0.5) * 255))
    grey = assert_grey(rgb_array(path))
    assert np.abs(grey.astype(float) - expected).max() <= 0.5 + 1e-9
    assert (x <= c - w / 2).any() and (x > c + w / 2).any()  # the data reaches past both window ends


def test_dicom_sigmoid_window_follows_the_standard(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", STORED_12BIT, WindowCenter=2000.0, WindowWidth=1500.0,
                       VOILUTFunction="SIGMOID")
    expected = 255 / (1 + np.exp(-4 * (STORED_12BIT - 2000.0) / 1500.0))  # PS3.3 C.11.2.1.3.1
    assert np.abs(assert_grey(rgb_array(path)) - expected).max() <= 0.5 + 1e-9


def test_dicom_without_window_uses_the_data_range(tmp_path):
    stored = gradient((32, 32), 300, 3000, np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, RescaleSlope=1.0, RescaleIntercept=-1000.0)
    expected = np.round((stored - 300.0) / 2700 * 255).astype(np.uint8)
    assert (assert_grey(rgb_array(path)) == expected).all()


def test_dicom_voi_lut_sequence_is_applied_and_scaled_by_its_entries(tmp_path):
    table = np.round(np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)  # 12-bit entries
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # declared 16 bits, as writers often do
    item.add_new("LUTData", "US", table.tolist())
    path = write_dicom(tmp_path / "a.dcm", STORED_12BIT, VOILUTSequence=[item])
    expected = np.round(table[STORED_12BIT] / 4095 * 255).astype(np.uint8)
    assert (assert_grey(rgb_array(path)) == expected).all()


def test_monochrome1_is_the_inverse_of_monochrome2_after_windowing(tmp_path):
    window = {"WindowCenter": 1500.0, "WindowWidth": 2000.0}
    m2 = rgb_array(write_dicom(tmp_path / "m2.dcm", STORED_12BIT, "MONOCHROME2", **window))
    m1 = rgb_array(write_dicom(tmp_path / "m1.dcm", STORED_12BIT, "MONOCHROME1", **window))
    assert (m1 == 255 - m2).all()
    assert m1[0, 0, 0] == 255  # the lowest stored value is white in MONOCHROME1


def test_dicom_identifiers_never_leave_load_image(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", STORED_12BIT, WindowCenter=2048.0, WindowWidth=4096.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(path)
    said = repr(image) + repr(image.info) + repr(image.getexif()) + "".join(str(w.message) for w in caught)
    assert image.info == {}
    for secret in (PATIENT_NAME, "DOE", PATIENT_ID, "20240131", "Example General"):
        assert secret not in said

    broken = tmp_path / "broken.dcm"
    broken.write_bytes(path.read_bytes()[:-3000])  # pixel data cut short
    with pytest.raises(ImageError) as caught_error:
        load_image(broken)
    for secret in (PATIENT_NAME, "DOE", PATIENT_ID, "20240131", "Example General"):
        assert secret not in str(caught_error.value)


def test_dicom_patient_elements_are_never_even_parsed(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "a.dcm", STORED_12BIT)
    read, real_dcmread = [], pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **kw: read.append(real_dcmread(*a, **kw)) or read[-1])
    load_image(path)
    (ds,) = read
    assert "PixelData" in ds
    assert not {"PatientName", "PatientID", "StudyDate", "InstitutionName"} & set(ds.dir())


def test_dicom_is_recognised_by_its_prefix_whatever_the_suffix(tmp_path):
    plain = write_dicom(tmp_path / "a.dcm", STORED_12BIT)
    (tmp_path / "scan.img").write_bytes(plain.read_bytes())
    assert (rgb_array(tmp_path / "scan.img") == rgb_array(plain)).all()

    bare = write_dicom(tmp_path / "bare.dcm", STORED_12BIT, part10=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    assert (rgb_array(bare) == rgb_array(plain)).all()  # .dcm without the preamble still reads


def test_rle_compressed_dicom_decodes_to_the_same_pixels(tmp_path):
    window = {"WindowCenter": 2000.0, "WindowWidth": 3000.0}
    plain = write_dicom(tmp_path / "plain.dcm", STORED_12BIT, **window)
    rle = write_dicom(tmp_path / "rle.dcm", STORED_12BIT, compress=RLELossless, **window)
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLELossless
    assert (rgb_array(rle) == rgb_array(plain)).all()


def test_rgb_dicom_keeps_its_colours(tmp_path):
    stored = np.zeros((8, 8, 3), dtype=np.uint8)
    stored[..., 0], stored[..., 1], stored[..., 2] = 200, 120, 40
    path = write_dicom(tmp_path / "a.dcm", stored, "RGB", bits_stored=8)
    assert tuple(rgb_array(path)[4, 4]) == (200, 120, 40)


def test_multiframe_dicom_is_refused_clearly(tmp_path):
    frames = np.stack([STORED_12BIT, STORED_12BIT])
    path = write_dicom(tmp_path / "a.dcm", frames.reshape(128, 64), NumberOfFrames=2)
    ds = pydicom.dcmread(path)
    ds.Rows = 64
    ds.save_as(path)
    with pytest.raises(ImageError, match="multi-frame DICOM \\(2 frames\\)"):
        load_image(path)


def test_missing_dicom_decoder_names_the_package_to_install(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = write_dicom(tmp_path / "a.dcm", STORED_12BIT)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not really jpeg-ls \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    with pytest.raises(ImageError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
        load_image(path)


# --- check_image ------------------------------------------------------------------------------


def noise(size, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize(("colour", "word"), [(255, "white"), (128, "grey"), (0, "black")])
def test_blank_images_are_errors(tmp_path, colour, word):
    Image.new("L", (64, 64), colour).save(tmp_path / "blank.png")
    (problem,) = check_image(tmp_path / "blank.png", resolution=64)
    assert problem.severity == "error" and f"blank {word} image" in problem.what
    assert problem.where == str(tmp_path / "blank.png")


def test_small_image_warns_at_resolution_and_fails_under_min_size(tmp_path):
    noise((48, 32)).save(tmp_path / "small.png")
    (warning,) = check_image(tmp_path / "small.png", resolution=64)
    assert warning.severity == "warning" and "48x32" in warning.what and "upscaled" in warning.what
    (error,) = check_image(tmp_path / "small.png", resolution=64, min_size=40)
    assert error.severity == "error" and "--min_size 40" in error.what and "remove it" in error.what
    assert check_image(tmp_path / "small.png", resolution=32) == []


def test_good_image_has_no_problems(tmp_path):
    noise((64, 80)).save(tmp_path / "good.png")
    assert check_image(tmp_path / "good.png", resolution=64, min_size=64) == []


def test_image_clipped_from_16_bits_elsewhere_is_an_error(tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).convert("RGB").save(tmp_path / "clipped.png")  # the conversion trainers get wrong
    (problem,) = check_image(tmp_path / "clipped.png")
    assert problem.severity == "error" and "100% of pixels are pure white" in problem.what


def test_unreadable_file_is_one_error_with_the_path_as_given(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    where = str(tmp_path / "notes.png")
    (problem,) = check_image(where, resolution=64)
    assert problem.where == where and problem.severity == "error" and "not an image" in problem.what
    assert str(problem) == f"{where}: {problem.what}"


# --- ImageTransform ---------------------------------------------------------------------------


def test_transform_output_shape_dtype_and_range():
    out = ImageTransform(32)(noise((50, 40)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    black_white = Image.new("RGB", (40, 40))
    black_white.paste((255, 255, 255), (20, 0, 40, 40))
    out = ImageTransform(40)(black_white)
    assert out.min() == -1 and out.max() == 1


def test_small_images_are_upscaled_to_the_resolution():
    assert ImageTransform(64)(noise((20, 30))).shape == (3, 64, 64)


def test_center_crop_keeps_the_centre_of_a_wide_image():
    # thirds: red | white | blue; resizing 300x100 to 192x64 makes the centre crop the white third
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    out = ImageTransform(64)(image)
    assert torch.allclose(out[:, :, 4:60], torch.ones(3, 64, 56), atol=0.02)
    assert torch.equal(out, ImageTransform(64)(image))  # deterministic


def left_dark_right_light(size=48):
    image = Image.new("RGB", (size, size))
    image.paste((255, 255, 255), (size // 2, 0, size, size))
    return image


def test_flip_is_off_by_default():
    transform = ImageTransform(48, crop="random")
    for _ in range(10):
        out = transform(left_dark_right_light())
        assert out[0, 0, 0] == -1 and out[0, 0, -1] == 1


def test_random_flip_flips_about_half_the_time_and_follows_the_generator():
    def flips(seed):
        generator = torch.Generator().manual_seed(seed)
        transform = ImageTransform(48, random_flip=True, modality="dermoscopy", generator=generator)
        return [transform(left_dark_right_light())[0, 0, 0].item() == 1 for _ in range(40)]

    assert 10 < sum(flips(0)) < 30
    assert flips(0) == flips(0) and flips(0) != flips(1)


def test_random_crop_moves_and_is_reproducible_with_a_generator():
    image = noise((96, 48))

    def crops(seed):
        transform = ImageTransform(48, crop="random", generator=torch.Generator().manual_seed(seed))
        return torch.stack([transform(image) for _ in range(8)])

    first = crops(3)
    assert torch.equal(first, crops(3))
    assert len({tuple(c[0, 0, :4].tolist()) for c in first}) > 1  # not always the same window


def test_flip_on_chest_xrays_warns_once_at_construction():
    with pytest.warns(UserWarning, match="heart lands on the wrong side"):
        transform = ImageTransform(32, random_flip=True, modality="chest_xray")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform(noise((32, 32)))  # no warning per image
        ImageTransform(32, modality="chest_xray")  # no flip, no warning


@pytest.mark.parametrize("kwargs", [{"crop": "corner"}, {"modality": "mri"}, {"resolution": 0}])
def test_transform_rejects_unknown_settings(kwargs):
    with pytest.raises(ValueError, match="unsupported|positive"):
        ImageTransform(**{"resolution": 32, **kwargs})


def test_an_inverted_radiograph_is_flagged_and_a_normal_one_is_not(tmp_path):
    from sdtune.phantom import render_chest_xray

    radiograph = render_chest_xray({}, 96, np.random.default_rng(0))
    radiograph.save(tmp_path / "normal.png")
    Image.fromarray(255 - np.asarray(radiograph)).save(tmp_path / "inverted.png")
    assert check_image(tmp_path / "normal.png") == []
    (problem,) = check_image(tmp_path / "inverted.png")
    assert problem.severity == "warning" and "looks inverted" in problem.what and "invert it" in problem.what


@pytest.mark.parametrize("element, written", [("WindowCenter", b"1234.5"), ("RescaleSlope", b"1.25")])
def test_malformed_dicom_header_values_are_one_problem_of_that_file(tmp_path, element, written):
    """A hand-edited or broken exporter's "abc" as a window centre or rescale slope: one line, not a crash."""
    others = {"WindowCenter": {"WindowWidth": 1000.0}, "RescaleSlope": {"RescaleIntercept": -100.0}}[element]
    path = write_dicom(tmp_path / "a.dcm", STORED_12BIT, **{element: float(written)}, **others)
    data = path.read_bytes()
    assert data.count(written) == 1
    path.write_bytes(data.replace(written, b"abc".ljust(len(written))))  # the same length: the file stays parseable
    with pytest.raises(ImageError, match="its DICOM rescale or window values cannot be applied .*: re-export it"):
        load_image(path)
    problems = check_image(path)
    assert len(problems) == 1 and "cannot be applied" in problems[0].what
