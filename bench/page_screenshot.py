"""The README's picture of the comparison page: a real `ssmgen continue` grid with the bundled
model on examples/prompt.flac, screenshot by headless Chromium, then re-encoded with a palette of
its 255 most used colours (the page's colours are few; the file drops from ~320 KB to well under
300 KB, which the repository's size rule asks).

    .venv/bin/python bench/page_screenshot.py                 # -> docs/continue-page.png

Run from the repository root; needs chromium on PATH. Work files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from numba import njit

from ssmgen.listen import png_bytes

ROOT = Path(__file__).resolve().parents[1]


@njit(cache=True)
def _unfilter(raw, h, stride, bpp):
    out = np.zeros((h, stride), np.uint8)
    for y in range(h):
        f = raw[y, 0]
        for i in range(stride):
            x = np.int32(raw[y, 1 + i])
            a = np.int32(out[y, i - bpp]) if i >= bpp else 0
            b = np.int32(out[y - 1, i]) if y > 0 else 0
            c = np.int32(out[y - 1, i - bpp]) if (y > 0 and i >= bpp) else 0
            if f == 1:
                x += a
            elif f == 2:
                x += b
            elif f == 3:
                x += (a + b) // 2
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                x += a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out[y, i] = x & 255
    return out


def read_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) as (H, W, 3) uint8."""
    pos, idat = 8, []
    w = h = kind = 0
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            w, h, depth, kind, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or kind not in (2, 6) or interlace:
                raise SystemExit(f"unexpected PNG (depth {depth}, colour type {kind})")
        elif tag == b"IDAT":
            idat.append(body)
        pos += 12 + n
    bpp = 3 if kind == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * bpp)
    return _unfilter(raw, h, w * bpp, bpp).reshape(h, w, bpp)[..., :3]


def palette_png(rgb: np.ndarray, colours: int = 255) -> bytes:
    """`rgb` with every pixel replaced by the nearest of its `colours` most used colours."""
    flat = rgb.reshape(-1, 3).astype(np.int32)
    keys = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    uniq, counts = np.unique(keys, return_counts=True)
    top = uniq[np.argsort(-counts)[:colours]]
    palette = np.stack([(top >> 16) & 255, (top >> 8) & 255, top & 255], 1)
    index = np.empty(len(flat), np.uint8)
    for s in range(0, len(flat), 1 << 16):
        d = ((flat[s:s + (1 << 16), None, :] - palette[None]) ** 2).sum(-1)
        index[s:s + (1 << 16)] = d.argmin(1)
    return png_bytes(index.reshape(rgb.shape[:2]), palette.astype(np.uint8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "continue-page.png"))
    ap.add_argument("--window", default="1000,1400")
    a = ap.parse_args()
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("no chromium on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(ROOT / "examples" / "prompt.flac", work / "prompt.flac")
        subprocess.run([sys.executable, "-m", "ssmgen", "continue", "prompt.flac", "--model",
                        "ablated-s4d-pieces", "--seconds", "4", "--prompt-seconds", "4",
                        "--temp", "0.8,1.0", "--top-p", "1,0.95", "--seed", "7", "-q"],
                       cwd=work, check=True)
        shot = work / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--no-first-run", "--disable-sync", f"--user-data-dir={work / 'p'}",
                        "--hide-scrollbars", f"--screenshot={shot}", f"--window-size={a.window}",
                        (work / "prompt-continued.html").as_uri()],
                       check=True, capture_output=True)
        data = palette_png(read_png(shot.read_bytes()))
    Path(a.out).write_bytes(data)
    print(f"wrote {a.out} ({len(data) / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
