#!/usr/bin/env bash
# Set up lookalike and run the main job on the embedded default (no server): index a folder of photos,
# then search it with one of them and draw a contact sheet.
#   bash scripts/quickstart.sh [IMAGE_FOLDER]
# Without a folder it uses ../shared/data/caltech101-dev when present, else scikit-image's sample photos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

folder="${1:-}"
if [ -z "$folder" ] && [ -d ../shared/data/caltech101-dev ]; then folder=../shared/data/caltech101-dev; fi
if [ -z "$folder" ]; then
    folder=out/sample-photos
    .venv/bin/pip install -q scikit-image
    .venv/bin/python - "$folder" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from skimage import data
out = Path(sys.argv[1])
for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry"):
    (out / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(data, name)()).convert("RGB").save(out / name / f"{name}.jpg", quality=92)
PY
fi

lookalike backfill --labels-from-dirs "$folder"
# awk reads all of its input: `head` would close the pipe early and pipefail would stop the script (SIGPIPE).
query=$(find "$folder" -type f \( -iname '*.jpg' -o -iname '*.png' \) | sort | awk 'NR == 1')
lookalike search "$query" -k 5 --sheet out/sheet.png
echo "contact sheet: out/sheet.png"
