"""Inputs too big or too odd to read are refused with one clear reason (issue 11.8).

- a JPEG / PNG whose reading would not fit in the memory the process may use (the
  cgroup limit of a container counts, not only the machine's memory) is refused from
  its header, before a byte of pixels is decoded;
- a pixel size at which no white cell fits in the image is refused before detection
  allocates anything;
- project settings (``uns["hemofm"]``) of the wrong type are named at load time.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from napari_hemofm.core import io
from napari_hemofm.core.detect import check_pixel_size_fits, detect_wbcs
from napari_hemofm.core.io import (
    ImageReadError,
    cgroup_memory_room,
    check_project_meta,
    decode_peak_bytes,
    image_size,
    read_image,
)


def png_header(width: int, height: int, colour_type: int = 2, bit_depth: int = 8) -> bytes:
    """A PNG that claims ``width`` x ``height`` in a valid IHDR (checksums right) and holds
    one tiny IDAT: Pillow opens it (header only) without complaint."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------ memory
def test_crafted_png_claiming_a_huge_size_is_refused_from_its_header(tmp_path):
    """100000 x 100000 RGB: about 90 GiB to read; refused at once, nothing decoded, and
    Pillow's own bomb limit is left as it was for the rest of the process."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100_000, 100_000))
    limit = Image.MAX_IMAGE_PIXELS
    assert image_size(path) == (100_000, 100_000)
    with pytest.raises(ImageReadError, match=r"100000x100000 PNG image needs about") as info:
        read_image(path)
    assert "tiled TIFF" in str(info.value)
    assert "\n" not in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == limit


@pytest.mark.parametrize(("mode_bits", "mode"), [((2, 8), "RGB"), ((6, 8), "RGBA"),
                                                 ((0, 16), "I;16"), ((0, 8), "L")])  # fmt: skip
def test_the_estimate_follows_the_header_mode(tmp_path, mode_bits, mode):
    """The refusal uses the file's own mode: the estimate Pillow's header implies."""
    path = tmp_path / "x.png"
    path.write_bytes(png_header(50_000, 40_000, *mode_bits))
    with io._open_pillow(path) as img:
        assert img.mode.startswith(mode)
        expected = decode_peak_bytes(50_000, 40_000, img.mode)
    with pytest.raises(ImageReadError, match=f"{expected / 2**30:.2f} GiB"):
        read_image(path)


def test_limit_is_the_memory_the_process_may_use(tmp_path, monkeypatch):
    """A real 600 x 500 PNG reads with room to spare and is refused once the (cgroup)
    room is below twice its peak; the free memory alone would have allowed it."""
    path = tmp_path / "real.png"
    rgb = np.random.default_rng(0).integers(0, 256, (500, 600, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    peak = decode_peak_bytes(600, 500, "RGB")
    monkeypatch.setattr(io, "_free_memory_bytes", lambda: 64 * 2**30)
    monkeypatch.setattr(io, "cgroup_memory_room", lambda: int(2.2 * peak))
    np.testing.assert_array_equal(read_image(path), rgb)
    monkeypatch.setattr(io, "cgroup_memory_room", lambda: int(1.8 * peak))
    with pytest.raises(ImageReadError, match="memory this process may use"):
        read_image(path)
    monkeypatch.setattr(io, "cgroup_memory_room", lambda: None)  # no cgroup limit
    np.testing.assert_array_equal(read_image(path), rgb)


def test_peak_estimate_properties():
    """Linear in the pixel count; alpha and 16 bit cost more than 8-bit RGB; a palette
    image with transparency costs as much as RGBA (it is decoded to RGBA)."""
    rgb = decode_peak_bytes(1000, 1000, "RGB")
    assert decode_peak_bytes(2000, 1000, "RGB") == 2 * rgb
    assert rgb >= 1000 * 1000 * 3  # at least the output
    assert decode_peak_bytes(1000, 1000, "RGBA") > 5 * rgb
    assert decode_peak_bytes(1000, 1000, "I;16") > 3 * rgb
    assert decode_peak_bytes(1000, 1000, "P", has_transparency=True) > decode_peak_bytes(
        1000, 1000, "P"
    )


def _write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_cgroup_v2_room(tmp_path):
    """limit - (usage - inactive page cache), at the process's own cgroup path."""
    root = tmp_path / "cg"
    own = root / "user.slice" / "job"
    _write(own, "memory.max", f"{4 * 2**30}\n")
    _write(own, "memory.current", f"{3 * 2**30}\n")
    _write(own, "memory.stat", f"anon 1\ninactive_file {2**30}\nactive_file 5\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/job\n")
    assert cgroup_memory_room(root, proc) == 2 * 2**30
    _write(own, "memory.max", "max\n")  # no limit
    assert cgroup_memory_room(root, proc) is None


def test_cgroup_v1_room_and_unlimited(tmp_path):
    root = tmp_path / "cg"
    mem = root / "memory"
    _write(mem, "memory.limit_in_bytes", f"{2**30}\n")
    _write(mem, "memory.usage_in_bytes", f"{2**29}\n")
    _write(mem, "memory.stat", "total_inactive_file 0\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/\n0::/\n")
    assert cgroup_memory_room(root, proc) == 2**29
    _write(mem, "memory.usage_in_bytes", f"{2 * 2**30}\n")  # over the limit: no room
    assert cgroup_memory_room(root, proc) == 0
    _write(mem, "memory.limit_in_bytes", "9223372036854771712\n")  # "unlimited"
    assert cgroup_memory_room(root, proc) is None
    assert cgroup_memory_room(tmp_path / "nothing", tmp_path / "none") is None


# ------------------------------------------------------------------ pixel size
def test_pixel_size_that_fits_no_cell_is_refused_before_allocating():
    """At 1e-9 um per pixel a WBC is 1.2e10 px: refused at once (it used to ask NumPy
    for petabytes); plausible pixel sizes pass."""
    with pytest.raises(ValueError, match="too small for a 400x300 image"):
        check_pixel_size_fits((300, 400), 1e-9)
    with pytest.raises(ValueError, match="too small"):
        detect_wbcs(np.zeros((300, 400, 3), np.uint8), pixel_size_um=1e-9)
    limit = 12.0 / 400  # a WBC exactly as wide as the image
    check_pixel_size_fits((300, 400), limit)
    with pytest.raises(ValueError, match="too small"):
        check_pixel_size_fits((300, 400), limit * 0.99)
    check_pixel_size_fits((300, 400), None)
    check_pixel_size_fits((300, 400), 0.25)


# ------------------------------------------------------------------ project settings
def test_project_meta_check_names_every_bad_entry():
    good = {
        "schema_version": np.int64(2),
        "classes": np.array(["a", "b"], dtype=object),
        "pixel_size_um": np.float64(0.25),
        "unidentified_below": 0,
        "umap": {"n_neighbors": 15},
        "model": "handcrafted",
        "precision": "fp32",
        "something_new": [1, 2],  # unknown keys pass (newer files)
    }
    check_project_meta(good, "p.h5ad")
    check_project_meta({}, "p.h5ad")
    bad = {**good, "classes": 5, "unidentified_below": 1.5, "precision": "fp8"}
    with pytest.raises(ValueError, match=r"p\.h5ad") as info:
        check_project_meta(bad, "p.h5ad")
    text = str(info.value)
    for key in ("classes = 5", "unidentified_below = 1.5", "precision = 'fp8'"):
        assert key in text
    assert "pixel_size_um" not in text
    with pytest.raises(ValueError, match="must be a mapping"):
        check_project_meta("oops", "p.h5ad")
    with pytest.raises(ValueError, match="schema_version"):
        check_project_meta({"schema_version": True}, "p.h5ad")  # a bool is no version
