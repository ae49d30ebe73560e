"""Peak memory of reading a JPEG / PNG, measured against io.decode_peak_bytes.

``io.read_image`` refuses a JPEG / PNG / BMP whose reading would not fit in the memory
the process may use; that refusal is only as good as its estimate of the peak. This
writes one image per Pillow mode (random pixels, so nothing compresses away), reads each
in a fresh Python process (Linux: the peak RSS is reset just before), and prints the
peak RSS growth beside the estimate
(``ratio = measured / estimate``; above 1 means the estimate is short).

Usage::

    python benchmarks/bench_decode_memory.py [--side 3000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so the
# peak read afterwards is that of read_image alone, not of the imports before it.
CHILD = """
import sys
from napari_hemofm.core import io

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

io.read_image(sys.argv[2])  # warm up: Pillow's plugins, NumPy's first allocations
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS")
io.read_image(sys.argv[1])
print(status("VmHWM") - before)
"""


def write_images(folder: Path, side: int) -> list[tuple[str, Path]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    cases = {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(rng.integers(0, 256, (side, side, 4), dtype=np.uint8)),
        "L": Image.fromarray(rgb[..., 0]),
        "P": Image.fromarray(rgb).convert("P"),
        "I;16": Image.fromarray(rng.integers(0, 4096, (side, side), dtype=np.uint16)),
    }
    out = []
    for mode, img in cases.items():
        path = folder / f"{mode.replace(';', '_')}.png"
        img.save(path, compress_level=1)
        out.append((mode, path))
    jpg = folder / "RGB.jpg"
    Image.fromarray(rgb).save(jpg, quality=90)
    out.append(("RGB (JPEG)", jpg))
    return out


def main() -> None:
    from PIL import Image

    from napari_hemofm.core.io import decode_peak_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=3000, help="image side in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.png"
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(small)
        print(f"{'mode':<12} {'size':>11} {'measured MB':>12} {'estimate MB':>12} {'ratio':>6}")
        for mode, path in write_images(Path(tmp), args.side):
            with Image.open(path) as img:
                w, h = img.size
                estimate = decode_peak_bytes(
                    w, h, img.mode, has_transparency="transparency" in img.info
                )
            run = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(small)],
                capture_output=True,
                text=True,
                check=True,
            )
            measured = int(run.stdout.strip())
            print(
                f"{mode:<12} {f'{w}x{h}':>11} {measured / 1e6:>12.0f} {estimate / 1e6:>12.0f} "
                f"{measured / estimate:>6.2f}"
            )


if __name__ == "__main__":
    main()
