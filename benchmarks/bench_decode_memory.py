"""Peak memory of ``search.images.decode`` on small files that decode to many pixels.

Each case runs in a fresh subprocess: the file's bytes are read, then ``decode`` runs once, and the
process's peak RSS growth (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after minus before) is reported,
next to the file size and what ``decode`` budgeted for it (``decode_budget``, when the module has one).

    .venv/bin/python benchmarks/bench_decode_memory.py                      # the working tree's decoder
    git show HEAD~3:search/images.py > /tmp/images_before.py
    .venv/bin/python benchmarks/bench_decode_memory.py --impl /tmp/images_before.py   # another version

``--pixels`` sets the image size (default 39.9 MP, just under the 40 MP default LOOKALIKE_MAX_PIXELS);
``--concurrent 4`` decodes the file four times at once in threads, as the pipeline's decode pool does.
Results: benchmarks/results/decode_memory.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import importlib.util, json, resource, sys
sys.path.insert(0, {repo!r})
impl = {impl!r}
if impl:
    spec = importlib.util.spec_from_file_location("decoder_under_test", impl)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
else:
    import search.images as mod
data = open({path!r}, "rb").read()
import numpy  # imported by the float path; load it before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kwargs = {{"max_pixels": {max_pixels}}}
def one(_):
    try:
        out = mod.decode(data, "x", **kwargs)
        return "ok %dx%d" % (out.width, out.height)
    except Exception as exc:
        return "refused: %s" % exc
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor({concurrent}) as pool:  # as the pipeline's decode pool runs them
    result = sorted(set(pool.map(one, range({concurrent}))))[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
budget = None
if hasattr(mod, "decode_budget"):
    from PIL import Image
    import io
    with Image.open(io.BytesIO(data)) as im:
        budget = mod.decode_budget(im.mode, im.format, *im.size)
print(json.dumps({{"peak_mb": peak / 1024, "result": result,
                  "budget_mb": budget / 2**20 if budget else None}}))
"""


CASES = {"float TIFF (F, deflate)": "float.tif", "16-bit PNG (I;16)": "grey16.png",
         "int32 TIFF (I, deflate)": "int32.tif", "RGBA PNG": "rgba.png", "RGB JPEG": "rgb.jpg"}


def make_cases(folder: Path, pixels: int) -> dict[str, Path]:
    """Small files that decode to ``pixels`` pixels (flat bands, so deflate/PNG/JPEG shrink them to KBs)."""
    import numpy as np
    from PIL import Image

    side = math.isqrt(pixels)
    # 8 flat bands per row: every strip deflates to almost nothing, yet each pixel is a real value
    ramp = np.repeat(np.linspace(0.0, 1.0, 8, dtype=np.float32), -(-side // 8))[:side]
    out = {name: folder / file for name, file in CASES.items()}
    rows = (side, 1)
    Image.fromarray(np.tile(ramp, rows), "F").save(out["float TIFF (F, deflate)"], compression="tiff_adobe_deflate")
    Image.fromarray(np.tile((ramp * 65535).astype(np.uint16), rows)).save(out["16-bit PNG (I;16)"])
    Image.fromarray(np.tile((ramp * 1e6).astype(np.int32), rows), "I").save(
        out["int32 TIFF (I, deflate)"], compression="tiff_adobe_deflate")
    Image.new("RGBA", (side, side), (10, 20, 30, 128)).save(out["RGBA PNG"])
    Image.new("RGB", (side, side), (10, 20, 30)).save(out["RGB JPEG"], quality=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", help="path of an images.py to measure instead of search.images")
    parser.add_argument("--pixels", type=int, default=39_900_000)
    parser.add_argument("--max-pixels", type=int, default=40_000_000)
    parser.add_argument("--concurrent", type=int, default=1, help="decodes at once, in threads (the pipeline runs 4)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_cases(Path(args.make), args.pixels)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # The files are made in a child too: Linux carries a process's peak RSS across exec into its children.
        subprocess.run([sys.executable, __file__, "--make", tmp, "--pixels", str(args.pixels)], check=True)
        for name, file in CASES.items():
            path = Path(tmp) / file
            code = _CHILD.format(repo=str(REPO), impl=args.impl, path=str(path), max_pixels=args.max_pixels,
                                 concurrent=args.concurrent)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                rows.append({"case": name, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rows.append({"case": name, "file_kb": round(path.stat().st_size / 1024, 1), **json.loads(proc.stdout)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'case':28} {'file KB':>9} {'peak MB':>9} {'budget MB':>10}  result")
    for row in rows:
        if "error" in row:
            print(f"{row['case']:28} error: {row['error']}")
            continue
        budget = f"{row['budget_mb']:.0f}" if row.get("budget_mb") else "-"
        print(f"{row['case']:28} {row['file_kb']:9.1f} {row['peak_mb']:9.0f} {budget:>10}  {row['result']}")


if __name__ == "__main__":
    main()
