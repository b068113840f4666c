"""End to end through the CLI with the real EfficientNet-Lite0 model and the embedded store.

Photos come from scikit-image's bundled samples; altered copies (crop, JPEG q40, rotation, colour jitter)
must find their originals first, EXIF-rotated copies must be embedded upright, and broken files must be
reported without stopping the batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance

from search.cli import main
from tests import imagefactory

pytestmark = pytest.mark.slow

# (skimage's "cat" is the same picture as "chelsea": left out, duplicates are tested in test_pipeline)
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
           "camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "colorwheel", "retina")


def _altered(src: Image.Image, seed: int) -> Image.Image:
    """Crop to ~80 % of the area, rotate a few degrees, jitter colour (saved later as JPEG q40)."""
    rng = np.random.default_rng(seed)
    w, h = src.size
    scale = np.sqrt(rng.uniform(0.7, 0.9))
    cw, ch = int(w * scale), int(h * scale)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = src.crop((x, y, x + cw, y + ch)).rotate(float(rng.uniform(-10, 10)), expand=False, fillcolor=(128,) * 3)
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.8, 1.2)))
    return ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.85, 1.15)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("e2e")
    photos, queries = root / "photos", root / "queries"
    originals = {}
    for name in SAMPLES:
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        (photos / name).mkdir(parents=True)
        path = photos / name / f"{name}.jpg"
        img.save(path, quality=92)
        originals[name] = path
    queries.mkdir()
    for i, (name, path) in enumerate(originals.items()):
        _altered(Image.open(path).convert("RGB"), i).save(queries / f"{name}.jpg", quality=40)
    broken = imagefactory.write_broken_set(photos / "broken")
    return {"root": root, "photos": photos, "queries": queries, "originals": originals, "broken": broken,
            "env": {"LOOKALIKE_DATA_DIR": str(root / "data")}}


def _run(world: dict, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=world["env"], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_backfill_then_rerun(world: dict) -> None:
    code, out, err = _run(world, "backfill", "--labels-from-dirs", "--json", "--report",
                          str(world["root"] / "report.tsv"), str(world["photos"]))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["indexed"] == len(SAMPLES)
    assert summary["failed"] == len(world["broken"]) and summary["points"] == len(SAMPLES)
    for path in world["broken"]:
        assert f"skipping {path}: " in err  # one line per bad file, naming it and the reason
    assert len((world["root"] / "report.tsv").read_text().splitlines()) == 1 + len(world["broken"])

    code, out, _ = _run(world, "backfill", "--labels-from-dirs", "--json", str(world["photos"]))
    again = json.loads(out)
    assert (again["indexed"], again["present"], again["points"]) == (0, len(SAMPLES), len(SAMPLES))


def test_altered_copies_find_their_originals_first(world: dict) -> None:
    queries = sorted(world["queries"].iterdir())
    code, out, err = _run(world, "search", "-k", "3", "--json", *map(str, queries))
    assert code == 0, err
    answers = json.loads(out)
    assert [a["query"] for a in answers] == [str(q) for q in queries]
    for q, answer in zip(queries, answers, strict=True):
        top = answer["results"][0]
        assert top["uris"] == [str(world["originals"][q.stem])], f"{q.stem} found {top['uris']}"
        assert top["labels"] == [q.stem] and top["score"] > answer["results"][1]["score"]


def test_exif_rotated_copy_is_embedded_upright(world: dict, tmp_path: Path) -> None:
    original = world["originals"]["astronaut"]
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": store the pixels turned 90° counter-clockwise
    Image.open(original).transpose(Image.Transpose.ROTATE_90).save(rotated, quality=92, exif=exif.tobytes())
    code, out, err = _run(world, "search", "-k", "1", "--json", str(rotated))
    assert code == 0, err
    [answer] = json.loads(out)
    assert answer["results"][0]["uris"] == [str(original)]
    assert answer["results"][0]["score"] > 0.9


def test_search_by_id_filter_and_sheet(world: dict, tmp_path: Path) -> None:
    code, out, _ = _run(world, "search", "-k", "1", "--json", str(world["originals"]["chelsea"]))
    cat_id = json.loads(out)[0]["results"][0]["id"]
    code, out, err = _run(world, "search", "--id", cat_id, "-k", "4", "--json")
    assert code == 0, err
    ids = [r["id"] for r in json.loads(out)[0]["results"]]
    assert cat_id not in ids and len(ids) == 4
    code, out, _ = _run(world, "search", "--id", cat_id, "--filter", "label=coffee", "--json")
    assert [r["labels"] for r in json.loads(out)[0]["results"]] == [["coffee"]]

    sheet = tmp_path / "sheet.png"
    queries = [str(world["queries"] / "rocket.jpg"), str(world["queries"] / "coffee.jpg")]
    code, out, err = _run(world, "search", "-k", "3", "--sheet", str(sheet), *queries)
    assert code == 0, err
    with Image.open(sheet) as img:
        assert img.width > img.height > 300  # two rows of query + 3 results
    assert "image query:" in out and "labels=rocket" in out


def test_text_search_on_a_cnn_says_what_to_do(world: dict) -> None:
    code, _, err = _run(world, "search", "--text", "a cat")
    assert code == 1
    assert err.count("\n") == 1 and "CLIP" in err and "Traceback" not in err


def test_unreadable_query_keeps_answers_in_order_and_fails_the_exit_status(world: dict, tmp_path: Path) -> None:
    bad = imagefactory.truncated_jpeg(tmp_path / "bad.jpg")
    good = world["queries"] / "coffee.jpg"
    code, out, err = _run(world, "search", "-k", "1", "--json", str(bad), str(good))
    assert code == 2 and f"{bad}" in err
    first, second = json.loads(out)
    assert first["query"] == str(bad) and first["results"] == [] and first["error"]
    assert second["results"][0]["labels"] == ["coffee"]


def test_query_files_are_not_bound_by_the_event_roots(world: dict) -> None:
    env = {**world["env"], "LOOKALIKE_ALLOWED_ROOTS": str(world["photos"])}
    result = CliRunner().invoke(main, ["search", "-k", "1", "--json", str(world["queries"] / "rocket.jpg")], env=env)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["results"][0]["labels"] == ["rocket"]


@pytest.mark.parametrize("args, message", [
    (["-k", "0"], "Invalid value for '-k'"),
    (["--filter", "colour=red"], "unknown field 'colour'"),
    (["--filter", "height=tall"], "height takes a whole number"),
    (["--id", "cbc730a9"], "not a full point id"),
])
def test_bad_search_arguments_get_one_clear_line(world: dict, args: list[str], message: str) -> None:
    code, _, err = _run(world, "search", str(world["queries"] / "rocket.jpg"), *args)
    assert code != 0 and message in err and "Traceback" not in err
