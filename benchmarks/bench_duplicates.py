"""Near-duplicate groups: how the default threshold of ``lookalike duplicates`` (and of ``duplicate_of`` at
ingestion) was chosen, and how long grouping 100k points takes.

    .venv/bin/python benchmarks/bench_duplicates.py ../shared/data/caltech101-dev [--scale 100000] [--sheets DIR]

1. Every photo of the dataset gets one altered copy; the kinds take turns over a seeded shuffle: ``crop``
   (keep 70–90 % of the area), ``reencode`` (JPEG q25–60), ``resize`` (25–60 % of the side), ``rotate``
   (2–10°, cropped to the rotated frame), ``colour`` (brightness, contrast, saturation ×0.8–1.2) and
   ``combined`` (``evaluate --near-duplicates``'s copy: all of them at once, JPEG q40). Photos and copies
   are embedded through the lab's embedding cache (``--data-dir``; re-runs compute nothing).
2. Grouping as the command does it (every pair at or above T, joined by union-find), here with exact numpy
   similarities, for every T of the grid; each predicted pair of a group
   is *planted* (a photo and its copy), a *Caltech duplicate* (two photos of the set that are copies of one
   picture or consecutive frames of one scene: Faces/X and Faces_easy/X by name, other pairs verified by
   geometry — ORB keypoints matched under an affine map, mirrored too, ≥ ``MIN_INLIERS`` RANSAC inliers;
   pairs of photos with cosine ≥ ``VERIFY_FLOOR`` are verified, lower ones count as false) or *false*.
   Pair precision counts Caltech duplicates as true (strict precision does not); recall is over planted
   pairs. The default is the lowest T from which precision stays ≥ 99 %.
3. Hard negatives: similarities of different photos of one class (verified duplicates left out).
4. The command's own code (``ingest.duplicates.find_groups`` on the embedded store) at the chosen T must
   find exactly the groups of step 2.
5. Scale: ``--scale N`` points (the real photos and copies, then layers of them with Gaussian noise; a photo
   and its copy share their noise so they stay a pair), HNSW built, then ``find_groups`` timed.

Results (Markdown) go to stdout and ``--out``; progress to stderr. ``--sheets DIR`` writes contact sheets of
the photo pairs above the chosen threshold (verified and rejected) to look at.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ingest.duplicates import UnionFind, find_groups  # noqa: E402
from ingest.lab.datasets import load_dataset  # noqa: E402
from ingest.lab.embedcache import EmbeddingCache, draft_size, embed_images  # noqa: E402
from ingest.lab.nearduplicates import altered_copy  # noqa: E402
from search.config import get_settings  # noqa: E402
from search.images import decode  # noqa: E402
from search.models import get_embedder  # noqa: E402
from search.reading import read_bytes  # noqa: E402
from search.schema import CollectionMeta, PointRecord, build_payload, point_id, sha256_hex  # noqa: E402

KINDS = ("crop", "reencode", "resize", "rotate", "colour", "combined")
GRID = [round(t, 3) for t in np.arange(0.86, 0.995, 0.01)]
TARGET = 0.99  # pair precision the default must reach
VERIFY_FLOOR = 0.90  # photo pairs at least this similar are verified by geometry (lower ones count as false)
MIN_INLIERS = 25
SIDE, KEYPOINTS = 320, 400  # ORB on the grey image scaled to fit SIDE²


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- 1. altered copies ---------------------------------------------------------------------------------
def _jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def alter(image, kind: str, rng: np.random.Generator) -> bytes:
    from PIL import Image, ImageEnhance

    image = image.convert("RGB")
    w, h = image.size
    if kind == "crop":
        area, aspect = rng.uniform(0.70, 0.90), rng.uniform(0.9, 1.1)
        cw = max(8, min(w, round(w * math.sqrt(area) * aspect)))
        ch = max(8, min(h, round(w * h * area / cw)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return _jpeg(image.crop((x0, y0, x0 + cw, y0 + ch)), 90)
    if kind == "reencode":
        return _jpeg(image, int(rng.integers(25, 61)))
    if kind == "resize":
        s = rng.uniform(0.25, 0.60)
        return _jpeg(image.resize((max(8, round(w * s)), max(8, round(h * s))), Image.Resampling.LANCZOS), 90)
    if kind == "rotate":
        angle = float(rng.uniform(2, 10) * rng.choice([-1, 1]))
        a = math.radians(abs(angle))
        # the largest axis-aligned rectangle of the original's proportions inside the rotated frame
        scale = min(w, h) / (min(w, h) * math.cos(a) + max(w, h) * math.sin(a))
        rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
        cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return _jpeg(rotated.crop((x0, y0, x0 + cw, y0 + ch)), 90)
    if kind == "colour":
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhancer(image).enhance(float(rng.uniform(0.8, 1.2)))
        return _jpeg(image, 90)
    if kind == "combined":
        return altered_copy(image, rng)
    raise ValueError(kind)


def embed_copies(data, kinds: list[str], embedder, cache, settings, seed: int) -> np.ndarray:
    """Vectors of one altered copy per photo, keyed in the cache by (seed, kind, photo hash)."""
    keys = [f"dup-copy:v1:{seed}:{kind}:{sha}" for kind, sha in zip(kinds, data.sha256, strict=True)]
    have = cache.vectors(keys)
    todo = [i for i, k in enumerate(keys) if k not in have]
    say(f"{len(keys) - len(todo)} copies cached, {len(todo)} to make and embed")
    for start in range(0, len(todo), 256):
        items = []
        for i in todo[start:start + 256]:
            original = decode(read_bytes(data.uris[i], settings), data.uris[i], max_pixels=settings.max_pixels).image
            blob = alter(original, kinds[i], np.random.default_rng([seed, i]))
            image = decode(blob, f"copy:{data.keys[i]}", max_pixels=settings.max_pixels,
                           draft=draft_size(embedder)).image
            items.append((keys[i], image))
        embed_images(items, embedder, cache=cache)
        say(f"  {min(start + 256, len(todo))}/{len(todo)} copies embedded")
    have = cache.vectors(keys)
    return np.stack([have[k] for k in keys]).astype(np.float32)


# -- 2. neighbours, truth, the curve --------------------------------------------------------------------
def close_pairs(x: np.ndarray, floor: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows of ``x`` (unit vectors) with cosine ≥ ``floor``, exactly: (i, j, cosine), i < j."""
    found = []
    for start in range(0, len(x), block):
        s = x[start:start + block] @ x.T
        rows, cols = np.nonzero(s >= floor)
        keep = cols > rows + start
        found.append((rows[keep] + start, cols[keep], s[rows[keep], cols[keep]]))
    return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))  # type: ignore[return-value]


def groups_at(pairs: tuple[np.ndarray, np.ndarray, np.ndarray], n: int, t: float) -> list[list[int]]:
    """The command's grouping at ``t``: connected components of the pairs at or above it."""
    uf = UnionFind()
    for _ in range(n):
        uf.add()
    a, b, s = pairs
    for i, j in zip(a[s >= t].tolist(), b[s >= t].tolist(), strict=True):
        uf.union(i, j)
    return uf.groups()


def pair_counts(groups: list[list[int]], family: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(all pairs, pairs of one family, pairs of one truth class) inside the groups."""
    total = planted = true = 0
    for g in groups:
        total += len(g) * (len(g) - 1) // 2
        for labels, acc in ((family[g], "p"), (truth[g], "t")):
            _, counts = np.unique(labels, return_counts=True)
            n = int((counts * (counts - 1) // 2).sum())
            if acc == "p":
                planted += n
            else:
                true += n
    return total, planted, true


@functools.cache
def _orb(path: str, mirror: bool):
    from PIL import Image, ImageOps
    from skimage.feature import ORB

    image = ImageOps.contain(Image.open(path).convert("L"), (SIDE, SIDE))
    if mirror:
        image = ImageOps.mirror(image)
    orb = ORB(n_keypoints=KEYPOINTS, fast_threshold=0.05)
    try:
        orb.detect_and_extract(np.asarray(image, dtype=np.float64) / 255)
    except RuntimeError:  # too few keypoints (flat clip art)
        return None
    return orb.keypoints, orb.descriptors


def inliers(a: str, b: str) -> int:
    """Keypoint matches of two files consistent with one affine map (b mirrored too): the larger count."""
    from skimage.feature import match_descriptors
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    best, fa = 0, _orb(a, False)
    for mirror in (False, True):
        fb = _orb(b, mirror)
        if fa is None or fb is None or len(fa[0]) < 6 or len(fb[0]) < 6:
            continue
        m = match_descriptors(fa[1], fb[1], cross_check=True, max_ratio=0.85)
        if len(m) < 6:
            continue
        _, ok = ransac((fa[0][m[:, 0]][:, ::-1], fb[0][m[:, 1]][:, ::-1]), AffineTransform, min_samples=3,
                       residual_threshold=4, max_trials=300, rng=0)
        best = max(best, int(ok.sum()) if ok is not None else 0)
    return best


# Photo pairs looked at by eye (contact sheets of every pair >= 0.95, and of the 36 rejected and the 40 least
# supported accepted pairs >= 0.92) where the eye disagreed with the geometry: True = copies of one picture.
EYE = {
    ("brain/image_0001.jpg", "brain/image_0048.jpg"): True,  # one diagram, its labels rewritten
    ("yin_yang/image_0002.jpg", "yin_yang/image_0014.jpg"): True,  # one drawing, white filled grey
    ("cougar_face/image_0028.jpg", "cougar_face/image_0067.jpg"): True,  # one photo, background replaced
    ("euphonium/image_0012.jpg", "euphonium/image_0051.jpg"): False,  # two instruments, one studio pose
    ("airplanes/image_0574.jpg", "airplanes/image_0589.jpg"): False,  # two photos of one aircraft type
    ("Motorbikes/image_0057.jpg", "Motorbikes/image_0063.jpg"): False,  # two bikes, one studio pose
    ("Motorbikes/image_0062.jpg", "Motorbikes/image_0063.jpg"): False,  # two bikes, one studio pose
    ("Motorbikes/image_0602.jpg", "Motorbikes/image_0605.jpg"): False,  # two bikes, one advert layout
}


def verify_photo_pairs(data, x: np.ndarray, cache_file: Path) -> dict[tuple[int, int], tuple[bool, str]]:
    """Photo pairs with cosine >= VERIFY_FLOOR (and Faces/X ~ Faces_easy/X at any cosine): whether they are
    copies of one picture, and how that was decided: by name, by geometry (>= MIN_INLIERS inliers; counts
    cached in ``cache_file``) or by eye (``EYE``)."""
    index = {k: i for i, k in enumerate(data.keys)}
    out: dict[tuple[int, int], tuple[bool, str]] = {}
    for key, i in index.items():
        cls, _, name = key.partition("/")
        if cls == "Faces" and f"Faces_easy/{name}" in index:
            out[tuple(sorted((i, index[f"Faces_easy/{name}"])))] = (True, "Faces/Faces_easy")
    known = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    s = x @ x.T
    rows, cols = np.nonzero(np.triu(s >= VERIFY_FLOOR, 1))
    todo = [(a, b) for a, b in zip(rows.tolist(), cols.tolist(), strict=True) if (a, b) not in out]
    say(f"{len(todo)} photo pairs with cosine >= {VERIFY_FLOOR} to verify "
        f"({sum(f'{data.keys[a]}|{data.keys[b]}' in known for a, b in todo)} cached)")
    for n, (a, b) in enumerate(todo):
        key = f"{data.keys[a]}|{data.keys[b]}"
        if key not in known:
            known[key] = inliers(data.uris[a], data.uris[b])
            if n % 50 == 0:
                say(f"  verified {n}/{len(todo)}")
                cache_file.write_text(json.dumps(known))
        eye = EYE.get((data.keys[a], data.keys[b]))
        out[(a, b)] = (known[key] >= MIN_INLIERS, f"{known[key]} inliers") if eye is None else \
            (eye, f"eye ({known[key]} inliers)")
    cache_file.write_text(json.dumps(known))
    return out


def truth_classes(n_photos: int, verdicts: dict[tuple[int, int], tuple[bool, str]]) -> np.ndarray:
    uf = UnionFind()
    for _ in range(n_photos):
        uf.add()
    for (a, b), (same, _) in verdicts.items():
        if same:
            uf.union(a, b)
    return np.array([uf.find(i) for i in range(n_photos)])


def curve(pairs, family: np.ndarray, truth: np.ndarray, kinds: list[str], n_photos: int) -> list[dict]:
    planted_total = n_photos  # one copy per photo: one planted pair per family
    rows = []
    for t in GRID:
        groups = groups_at(pairs, len(family), t)
        total, planted, true = pair_counts(groups, family, truth)
        where = np.full(len(family), -1)
        for g_no, g in enumerate(groups):
            where[g] = g_no
        found = (where[:n_photos] >= 0) & (where[:n_photos] == where[n_photos:])
        by_kind = {k: float(found[[i for i in range(n_photos) if kinds[i] == k]].mean()) for k in KINDS}
        rows.append({"t": t, "groups": len(groups), "pairs": total, "planted": planted, "caltech": true - planted,
                     "false": total - true, "precision": true / total if total else 1.0,
                     "strict": planted / total if total else 1.0, "recall": planted / planted_total,
                     "by_kind": by_kind})
    return rows


def choose(rows: list[dict]) -> dict:
    """The lowest threshold from which precision stays at or above TARGET."""
    chosen = rows[-1]
    for row in reversed(rows):
        if row["precision"] < TARGET:
            break
        chosen = row
    return chosen


def percentiles(values: np.ndarray, ps=(50, 90, 99, 99.9, 100)) -> str:
    return " / ".join(f"{v:.3f}" for v in np.percentile(values, ps)) if len(values) else "-"


def hard_negatives(x: np.ndarray, classes: list[str], truth: np.ndarray, t: float) -> dict:
    cls = np.asarray(classes)
    s = x @ x.T
    same_class = cls[:, None] == cls[None, :]
    duplicate = truth[:, None] == truth[None, :]
    neg = same_class & ~duplicate
    upper = np.triu(neg, 1)
    pairs = s[upper]
    nearest = np.where(neg, s, -np.inf).max(axis=1)
    nearest = nearest[np.isfinite(nearest)]
    return {"pairs": len(pairs), "pair_pct": percentiles(pairs), "nearest_pct": percentiles(nearest),
            "pairs_above": int((pairs >= t).sum()), "photos_above": int((nearest >= t).sum()),
            "photos": len(nearest)}


# -- 4. the command's own code on the embedded store ------------------------------------------------------
def fill_store(settings, dim: int, vectors: np.ndarray, batch: int = 512) -> tuple[object, list[str]]:
    from search.store import open_store

    store = open_store(settings)
    store.ensure_collection(CollectionMeta(model="bench-duplicates", dim=dim, preprocessing="none"))
    ids = [point_id(sha256_hex(f"bench-dup-{i}".encode())) for i in range(len(vectors))]
    with store.bulk():
        for start in range(0, len(vectors), batch):
            store.upsert([PointRecord(ids[i], vectors[i], build_payload(
                sha256=sha256_hex(f"bench-dup-{i}".encode()), uris=[f"/bench/{i}.jpg"], source="bench",
                width=640, height=480, format="JPEG", size=1, ingested_at="2026-01-01T00:00:00.000Z", labels=[],
                tags=[], model="bench-duplicates")) for i in range(start, min(start + batch, len(vectors)))])
    return store, ids


def product_check(x: np.ndarray, t: float, expected: list[list[int]], workdir: Path) -> dict:
    settings = get_settings(data_dir=workdir / "check")
    store, ids = fill_store(settings, x.shape[1], x)
    try:
        scan = find_groups(store, t)
    finally:
        store.close()
    row = {pid: i for i, pid in enumerate(ids)}
    found = {frozenset(row[scan.ids[i]] for i in g) for g in scan.groups}
    want = {frozenset(g) for g in expected}
    return {"groups": len(found), "same": found == want, "only_found": len(found - want),
            "only_numpy": len(want - found), "seconds": scan.seconds}


# -- 5. scale -------------------------------------------------------------------------------------------
def scale_set(x: np.ndarray, n_photos: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """The photos and copies, then noisy layers of them; a photo and its copy share their noise."""
    layers, s2 = [x], 0.25  # noise of squared norm 0.25: a noisy layer is at cosine ~0.8 from its source
    while sum(map(len, layers)) < n:
        noise = rng.standard_normal((n_photos, x.shape[1])).astype(np.float32) * math.sqrt(s2 / x.shape[1])
        layer = x + np.concatenate([noise, noise])
        layers.append((layer / np.linalg.norm(layer, axis=1, keepdims=True)).astype(np.float32))
    return np.concatenate(layers)[:n]


def scale_run(x: np.ndarray, n_photos: int, n: int, t: float, rng: np.random.Generator, workdir: Path) -> dict:
    from search.store import base as store_base

    big = scale_set(x, n_photos, n, rng)
    settings = get_settings(data_dir=workdir / "scale")
    t0 = time.perf_counter()
    store, ids = fill_store(settings, big.shape[1], big, batch=256)
    t_fill = time.perf_counter() - t0
    say(f"{n} points stored in {t_fill:.0f} s; building HNSW (m={store_base.HNSW_M}, ef_construct="
        f"{store_base.HNSW_EF_CONSTRUCT}) …")
    t0 = time.perf_counter()
    store.optimize(force=True)
    t_opt = time.perf_counter() - t0
    say(f"HNSW built in {t_opt:.0f} s; grouping …")
    import resource

    done = [0]

    def progress(k: int) -> None:
        done[0] += k
        if done[0] % 20480 < k:
            say(f"  {done[0]}/{n} points scanned")

    try:
        scan = find_groups(store, t, on_batch=progress)
    finally:
        store.close()
    # expected: the pairs a photo and its copy form in each layer where they are at least t apart, found exactly
    pos = {pid: i for i, pid in enumerate(ids)}
    group_of = np.full(n, -1)
    for g_no, g in enumerate(scan.groups):
        group_of[[pos[scan.ids[i]] for i in g]] = g_no
    layer_size = 2 * n_photos
    want = found = 0
    for base in range(0, n, layer_size):
        a = np.arange(base, min(base + n_photos, n))
        b = a + n_photos
        a, b = a[b < n], b[b < n]
        close = np.einsum("ij,ij->i", big[a], big[b]) >= t
        want += int(close.sum())
        found += int(((group_of[a] == group_of[b]) & (group_of[a] >= 0))[close].sum())
    sizes = [len(g) for g in scan.groups]
    return {"n": n, "fill_s": t_fill, "optimize_s": t_opt, "group_s": scan.seconds, "groups": len(scan.groups),
            "grouped": sum(sizes), "largest": max(sizes, default=0), "pairs_expected": want, "pairs_found": found,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# -- report -----------------------------------------------------------------------------------------------
def pair_sheet(data, pairs: list[tuple[int, int, float, str]], path: Path, settings, cols: int = 4,
               side: int = 150) -> None:
    from PIL import Image, ImageDraw, ImageOps

    from search.sheet import local_image

    rows = max(1, math.ceil(len(pairs) / cols))
    sheet = Image.new("RGB", (cols * (2 * side + 20), rows * (side + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (a, b, sim, note) in enumerate(pairs):
        x, y = (n % cols) * (2 * side + 20), (n // cols) * (side + 16)
        for offset, i in ((0, a), (side, b)):
            image = local_image([data.uris[i]], settings)
            sheet.paste(ImageOps.contain(image.convert("RGB"), (side - 2, side - 2)), (x + offset, y))
        draw.text((x, y + side + 1), f"{n} {sim:.3f} {note}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def photo_pairs_above(data, x, t, verdicts) -> list[tuple[int, int, float, str, bool]]:
    s = x @ x.T
    rows, cols = np.nonzero(np.triu(s >= t, 1))
    out = []
    for a, b in zip(rows.tolist(), cols.tolist(), strict=True):
        ok, note = verdicts.get((a, b), (False, "unverified"))
        out.append((a, b, float(s[a, b]), f"{data.keys[a].split('/')[0][:12]} {note}", ok))
    return sorted(out, key=lambda p: -p[2])


def report(args, data, rows, chosen, hard, photo_pairs, positives, check, scale, seconds) -> str:
    lines = [f"Command: `{shlex.join(['.venv/bin/python', 'benchmarks/bench_duplicates.py', *sys.argv[1:]])}`  ",
             f"Data: {len(data)} photos of {data.root.name} + one altered copy each ({', '.join(KINDS)}, "
             f"in turn), model {args.model}; groups = connected components of the pairs at or above the "
             f"threshold.  ",
             f"Machine: {os.cpu_count()} cores shared with other work (1-min load {os.getloadavg()[0]:.2f} at the "
             f"end); {seconds:.0f} s in all.", "",
             "| threshold | groups | pairs in groups | planted | Caltech duplicates | false | precision | strict "
             "precision | recall | " + " | ".join(KINDS) + " |",
             "|---" * (9 + len(KINDS)) + "|"]
    for r in rows:
        mark = "**" if r is chosen else ""
        lines.append(f"| {mark}{r['t']:.2f}{mark} | {r['groups']} | {r['pairs']} | {r['planted']} | {r['caltech']} | "
                     f"{r['false']} | {mark}{100 * r['precision']:.2f} %{mark} | {100 * r['strict']:.2f} % | "
                     f"{mark}{100 * r['recall']:.2f} %{mark} | "
                     + " | ".join(f"{100 * r['by_kind'][k]:.1f}" for k in KINDS) + " |")
    ok = sum(p[4] for p in photo_pairs)
    lines += ["", f"Chosen: **{chosen['t']:.2f}** (lowest threshold from which pair precision stays ≥ "
              f"{100 * TARGET:.0f} %): precision {100 * chosen['precision']:.2f} % (strict "
              f"{100 * chosen['strict']:.2f} %), recall {100 * chosen['recall']:.2f} %.", "",
              "Cosine similarity percentiles (p50 / p90 / p99 / p99.9 / max; for positives p50 / p10 / p1 / p0.1 / "
              "min):", "",
              "| what | n | percentiles | at or above the chosen threshold |", "|---|---|---|---|",
              f"| different photos of one class (hard negatives; verified duplicates left out) | {hard['pairs']} | "
              f"{hard['pair_pct']} | {hard['pairs_above']} pairs |",
              f"| each photo's most similar other photo of its class (not a verified duplicate) | {hard['photos']} | "
              f"{hard['nearest_pct']} | {hard['photos_above']} photos |"]
    for kind, values in positives.items():
        lines.append(f"| copy ↔ its photo: {kind} | {len(values)} | {percentiles(values, (50, 10, 1, 0.1, 0))} | "
                     f"{int((values >= chosen['t']).sum())} |")
    by_name = sum(1 for p in photo_pairs if "Faces/Faces_easy" in p[3])
    by_eye = [p for p in photo_pairs if " eye " in f" {p[3]}"]
    lines += ["", f"Photo pairs of the dataset at or above {chosen['t']:.2f}: {len(photo_pairs)}; Caltech duplicates "
              f"{ok} (Faces/Faces_easy by name {by_name}, by eye {sum(p[4] for p in by_eye)}, by geometry "
              f"{ok - by_name - sum(p[4] for p in by_eye)}); not duplicates {len(photo_pairs) - ok}: "
              + (", ".join(f"{data.keys[a]}~{data.keys[b].split('/')[-1]} ({s:.3f}, {note.split(' ', 1)[1]})"
                           for a, b, s, note, good in photo_pairs if not good) or "none"), ""]
    lines += [f"The command's code on the embedded store at {chosen['t']:.2f}: {check['groups']} groups, "
              f"{'the same as' if check['same'] else 'DIFFERENT from'} the numpy grouping "
              f"({check['only_found']} only in the store's, {check['only_numpy']} only in numpy's); "
              f"{check['seconds']:.1f} s for {2 * len(data)} points.", ""]
    if scale:
        lines += [f"Scale: {scale['n']} points (the {2 * len(data)} real vectors, then layers of them with noise; "
                  f"photo and copy share their noise), embedded store: upserts {scale['fill_s']:.0f} s, HNSW build "
                  f"{scale['optimize_s']:.0f} s; **grouping {scale['group_s']:.1f} s** at {chosen['t']:.2f}: "
                  f"{scale['groups']} groups holding {scale['grouped']} points (largest {scale['largest']}); "
                  f"photo–copy pairs at or above the threshold (exact): {scale['pairs_expected']}, grouped together: "
                  f"{scale['pairs_found']}; peak RSS {scale['rss_mb']:.0f} MB.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path, help="an ImageFolder tree, e.g. ../shared/data/caltech101-dev")
    ap.add_argument("--data-dir", type=Path, default=REPO / "bench-out" / "dupdata",
                    help="embedding cache and verdict cache (kept between runs)")
    ap.add_argument("-m", "--model", default="efficientnet-lite0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=100_000, help="points for the timing run (0: skip it)")
    ap.add_argument("--sheets", type=Path, help="write contact sheets of the photo pairs above the threshold here")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    start = time.perf_counter()
    settings = get_settings(data_dir=args.data_dir)
    embedder = get_embedder(args.model, settings)
    cache = EmbeddingCache.for_embedder(embedder, settings)
    data = load_dataset(args.dataset, embedder, settings, cache, progress=True)
    n = len(data)
    kinds: list[str] = [""] * n
    for r, i in enumerate(np.random.default_rng(args.seed).permutation(n)):
        kinds[i] = KINDS[r % len(KINDS)]
    copies = embed_copies(data, kinds, embedder, cache, settings, args.seed)
    x = np.concatenate([data.vectors, copies]).astype(np.float32)
    family = np.concatenate([np.arange(n), np.arange(n)])
    verdicts = verify_photo_pairs(data, data.vectors, args.data_dir / f"verdicts-{args.model}.json")
    truth_photo = truth_classes(n, verdicts)
    truth = np.concatenate([truth_photo, truth_photo])
    say("pairs and the curve …")
    pairs = close_pairs(x, GRID[0])
    rows = curve(pairs, family, truth, kinds, n)
    chosen = choose(rows)
    hard = hard_negatives(data.vectors, data.classes, truth_photo, chosen["t"])
    positives = {k: np.array([float(data.vectors[i] @ copies[i]) for i in range(n) if kinds[i] == k]) for k in KINDS}
    photo_pairs = photo_pairs_above(data, data.vectors, chosen["t"], verdicts)
    if args.sheets:
        good = [p[:4] for p in photo_pairs if p[4]]
        bad = [p[:4] for p in photo_pairs if not p[4]]
        for name, shown in (("verified", good), ("rejected", bad)):
            for part in range(0, len(shown), 40):
                pair_sheet(data, shown[part:part + 40], args.sheets / f"photo-pairs-{name}-{part // 40 + 1}.png",
                           settings)
        say(f"contact sheets in {args.sheets}")
    with tempfile.TemporaryDirectory(prefix="bench-dup-") as tmp:
        say("the command's grouping on the embedded store …")
        check = product_check(x, chosen["t"], groups_at(pairs, len(x), chosen["t"]), Path(tmp))
        scale = scale_run(x, n, args.scale, chosen["t"], np.random.default_rng(args.seed), Path(tmp)) \
            if args.scale else None
    text = report(args, data, rows, chosen, hard, photo_pairs, positives, check, scale, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
