"""Reading images: every format and bit depth ends as (H, W, 3) uint8; bad files fail clearly."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_hemofm.core import io
from napari_hemofm.core.io import ImageReadError, LazyRGBImage, read_image, to_rgb8


def rgb(seed: int = 0, shape=(40, 60)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_rgb_formats_read_back_exactly(tmp_path, ext):
    """An 8-bit RGB image saved losslessly reads back pixel for pixel."""
    img = rgb()
    path = tmp_path / f"smear{ext}"
    if ext in (".tif", ".tiff"):
        tifffile.imwrite(path, img)
    else:
        Image.fromarray(img).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8
    assert out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, img)


def test_jpeg_reads_close_to_the_original(tmp_path):
    """A JPEG reads as uint8 RGB close to what was saved (lossy)."""
    img = np.full((32, 32, 3), (200, 120, 180), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - img).max() <= 3


def test_greyscale_becomes_three_equal_channels(tmp_path):
    """A greyscale PNG becomes RGB with R == G == B == the grey value."""
    grey = rgb()[..., 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (40, 60, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_is_composited_over_white(tmp_path):
    """Opaque pixels keep their colour; transparent ones become white; half is a blend."""
    img = np.zeros((2, 3, 4), dtype=np.uint8)
    img[..., :3] = (100, 50, 200)
    img[0, :, 3] = 255
    img[1, 0, 3] = 0
    img[1, 1:, 3] = 128
    Image.fromarray(img, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], (100, 50, 200))
    np.testing.assert_array_equal(out[1, 0], (255, 255, 255))
    expected = np.rint(np.array([100, 50, 200]) * 128 / 255 + 255 * (1 - 128 / 255))
    np.testing.assert_array_equal(out[1, 1], expected)


def test_16bit_tiff_keeps_contrast_of_its_effective_bit_depth(tmp_path):
    """A 12-bit image in uint16 is scaled by 4095 (not 65535); a full 16-bit one by 65535."""
    rng = np.random.default_rng(3)
    twelve = rng.integers(0, 4096, (30, 30, 3), dtype=np.uint16)
    twelve[0, 0, 0] = 4095
    tifffile.imwrite(tmp_path / "12.tif", twelve)
    out = read_image(tmp_path / "12.tif")
    np.testing.assert_array_equal(out, np.rint(twelve / 4095 * 255).astype(np.uint8))
    full = twelve.astype(np.uint16) * 16
    full[0, 0, 0] = 65535
    tifffile.imwrite(tmp_path / "16.tif", full)
    out16 = read_image(tmp_path / "16.tif")
    assert out16.max() == 255
    np.testing.assert_array_equal(out16, np.rint(full / 65535 * 255).astype(np.uint8))


def test_16bit_greyscale_png(tmp_path):
    """A 16-bit greyscale PNG reads as RGB uint8 with its full range used."""
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8
    assert out.shape == (64, 64, 3)
    assert out.min() == 0
    assert out.max() == 255


def test_to_rgb8_handles_napari_array_layouts():
    """Arrays as napari gives them (float 0-1, channel-first, bool, grey) normalise alike."""
    img = rgb(5)
    np.testing.assert_array_equal(to_rgb8(img / 255.0), img)
    np.testing.assert_array_equal(to_rgb8(np.moveaxis(img, -1, 0)), img)
    assert to_rgb8(np.ones((4, 4), bool)).min() == 255
    with pytest.raises(ImageReadError, match="not a 2-D image"):
        to_rgb8(np.zeros((2, 4, 4, 3)))
    with pytest.raises(ImageReadError, match="empty image"):
        to_rgb8(np.zeros((0, 4, 3)))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"hello, I am a text file", "not an image"),
    ],
)
def test_empty_and_non_image_files_raise_a_clear_error(tmp_path, content, reason):
    """0-byte and non-image files raise ImageReadError naming the file and the reason."""
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_truncated_jpeg_raises_corrupt(tmp_path):
    """A JPEG cut in half is reported as corrupt or truncated, not silently half-grey."""
    path = tmp_path / "cut.jpg"
    Image.fromarray(rgb(1, (200, 200))).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        read_image(path)


def test_missing_file_raises(tmp_path):
    """A path that does not exist raises ImageReadError, not FileNotFoundError."""
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")


def test_unicode_and_spaces_in_paths(tmp_path):
    """Paths with spaces and non-ASCII characters read normally."""
    folder = tmp_path / "Blutausstrich Probe ü 血液"
    folder.mkdir()
    img = rgb(2)
    Image.fromarray(img).save(folder / "zelle 1 é.png")
    np.testing.assert_array_equal(read_image(folder / "zelle 1 é.png"), img)


def test_png_too_large_for_memory_is_refused(tmp_path, monkeypatch):
    """A PNG whose decoded size exceeds the free-memory share is refused before decoding."""
    path = tmp_path / "big.png"
    Image.fromarray(rgb(0, (100, 100))).save(path)
    monkeypatch.setattr(io, "_free_memory_bytes", lambda: 10_000)
    with pytest.raises(ImageReadError, match="save it as a tiled TIFF"):
        read_image(path)


def test_large_tiff_is_memory_mapped_and_read_by_window(tmp_path, monkeypatch):
    """A TIFF above the lazy threshold opens as LazyRGBImage; windows equal the data."""
    monkeypatch.setattr(io, "LAZY_TIFF_BYTES", 1000)
    data = np.random.default_rng(4).integers(0, 4096, (300, 400), dtype=np.uint16)
    data[0, 0] = 4095
    tifffile.imwrite(tmp_path / "huge.tif", data)
    img = read_image(tmp_path / "huge.tif")
    assert isinstance(img, LazyRGBImage)
    assert img.shape == (300, 400, 3)
    window = img[100:150, 200:260]
    expected = np.rint(data[100:150, 200:260] / 4095 * 255).astype(np.uint8)
    np.testing.assert_array_equal(window[..., 1], expected)
    assert window.shape == (50, 60, 3)


def test_large_compressed_tiled_tiff_reads_tile_wise(tmp_path, monkeypatch):
    """A compressed, tiled TIFF (not memory-mappable) is read through a Zarr store."""
    monkeypatch.setattr(io, "LAZY_TIFF_BYTES", 1000)
    data = rgb(6, (256, 320))
    tifffile.imwrite(tmp_path / "tiled.tif", data, tile=(64, 64), compression="zlib")
    img = read_image(tmp_path / "tiled.tif")
    assert isinstance(img, LazyRGBImage)
    np.testing.assert_array_equal(img[64:128, 10:200], data[64:128, 10:200])
    np.testing.assert_array_equal(np.asarray(img), data)


def test_a_tiff_stack_is_refused(tmp_path):
    """A 3-D stack is not a smear: clear error rather than a wrong picture."""
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((7, 20, 20), np.uint8))
    with pytest.raises(ImageReadError, match="not a 2-D image"):
        read_image(tmp_path / "stack.tif")
