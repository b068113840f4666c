"""Fine-tuning on frozen embeddings: the head learns what matters, PCA is a Dense layer, the saved model is a
named model every command can load, and its split is honoured by ``evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ingest.lab.datasets import stratified_split
from ingest.lab.finetune import HeadConfig, apply_layers, fit_pca, train_head
from ingest.lab.metrics import knn_topk_hits, l2_normalize, nearest, pca_apply, pca_fit
from tests.clirun import run_cli as _run
from tests.imagefactory import make_tree

# embedders are cached per process; each test starts without any (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("_fresh_embedders")


def _synthetic(n_per_class: int = 40, n_classes: int = 5, dim: int = 24, seed: int = 0):
    """Classes separated in 4 dimensions, drowned by large nuisance variation in the other 20."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, 4))
    x, y = [], []
    for c in range(n_classes):
        signal = centres[c] + rng.normal(0, 0.25, (n_per_class, 4))
        nuisance = rng.normal(0, 1.5, (n_per_class, dim - 4))
        x.append(np.concatenate([signal, nuisance], axis=1))
        y += [c] * n_per_class
    return l2_normalize(np.concatenate(x)), np.array(y)


def _held_out_top1(x, y, train, test) -> float:
    ids, sims = nearest(x[train], x[test], 10)
    return float(knn_topk_hits(y[test], y[train][ids], sims, topk=1, n_classes=int(y.max()) + 1).mean())


@pytest.mark.parametrize("loss", ["proxy-anchor", "supcon", "normsoftmax"])
def test_head_improves_held_out_knn_accuracy(loss):
    x, y = _synthetic()
    train, test = stratified_split([str(c) for c in y], [str(i) for i in range(len(y))], 0.3, seed=0)
    before = _held_out_top1(x, y, train, test)
    head = train_head(x[train], y[train], HeadConfig(loss=loss, epochs=50, batch=32, lr=3e-2, seed=0))
    after = _held_out_top1(apply_layers(x, [head]), y, train, test)
    assert before < 0.5 and after > before + 0.3, (before, after)


def test_head_starts_from_identity_and_can_reduce_dimension():
    x, y = _synthetic()
    head = train_head(x, y, HeadConfig(epochs=1, lr=0.0, proxy_lr=0.0, seed=0))  # no steps taken
    assert np.allclose(head.weight, np.eye(x.shape[1]), atol=1e-6) and np.allclose(head.bias, 0)
    small = train_head(x, y, HeadConfig(dim=6, epochs=2, batch=64, seed=0))
    assert small.weight.shape == (6, x.shape[1]) and apply_layers(x, [small]).shape == (len(x), 6)


def test_pca_layer_is_the_pca_transform():
    x, _ = _synthetic()
    layer = fit_pca(x, 5)
    mean, comps = pca_fit(x, 5)
    assert np.allclose(apply_layers(x, [layer]), pca_apply(x, mean, comps), atol=1e-5)


# ---------------------------------------------------------------------------------------------- the command
def test_finetune_cli_saves_a_named_model_with_its_split(tmp_path, tiny_clip):
    from search.config import get_settings
    from search.models import get_embedder

    tree = make_tree(tmp_path / "tree", per_class=6)
    data = tmp_path / "data"
    result = _run(["finetune", tree, "--name", "tiny-head", "--base", tiny_clip, "--split", 0.34, "--dim", 8,
                   "--epochs", 3, "--json"], data)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["verified"] and summary["dim"] == 8 and summary["train"] == 12 and summary["held_out"] == 6
    assert {"top1", "book_precision_at_4", "map_at_10"} <= set(summary["before"]) == set(summary["after"])

    folder = data / "models" / "tiny-head"
    info = json.loads((folder / "lookalike.json").read_text())
    assert info["base"] == str(tiny_clip) and len(info["split"]["train"]) == 12
    assert len(info["split"]["train_sha256"]) == 12
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
    assert modules[-2:] == ["Dense", "Normalize"]

    embedder = get_embedder("tiny-head", get_settings(data_dir=data))
    assert embedder.dim == 8

    # evaluate with the same split: the model's cache was pre-filled, and no query was a training image
    row = json.loads(_run(["evaluate", tree, "-m", "tiny-head", "--split", 0.34, "--json", "--no-ann", "--pca", ""],
                          data).stdout)[0]
    assert row["embedded_now"] == 0 and row["queries"] == 6 and row["dim"] == 8
    # every image as a query: warned that the model saw some of them
    everything = _run(["evaluate", tree, "-m", "tiny-head", "--json", "--no-ann", "--pca", ""], data)
    assert "was trained on 12 of these images" in everything.stderr
    # a different split: the queries it trained on are dropped
    other = _run(["evaluate", tree, "-m", "tiny-head", "--split", 0.34, "--seed", 7, "--json", "--no-ann",
                  "--pca", ""], data)
    assert "dropping" in other.stderr and json.loads(other.stdout)[0]["queries"] < 6

    again = _run(["finetune", tree, "--name", "tiny-head", "--base", tiny_clip, "--epochs", 1], data)
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_finetune_cli_pca_model_and_a_combined_base(tmp_path, tiny_clip):
    from search.config import get_settings
    from search.models import get_embedder
    from tests.clip_fixture import build_tiny_clip

    tree = make_tree(tmp_path / "tree", per_class=6)
    data = tmp_path / "data"
    pca = _run(["finetune", tree, "--name", "tiny-pca", "--base", tiny_clip, "--pca", 4, "--json"], data)
    assert pca.exit_code == 0, pca.output
    assert json.loads(pca.stdout)["verified"]
    assert get_embedder("tiny-pca", get_settings(data_dir=data)).dim == 4

    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    combo = _run(["finetune", tree, "--name", "combo-pca", "--base", f"{tiny_clip}+{other}", "--pca", 6, "--json"],
                 data)
    assert combo.exit_code == 0, combo.output
    summary = json.loads(combo.stdout)
    assert summary["format"] == "head" and summary["verified"] and summary["dim"] == 6
    row = json.loads(_run(["evaluate", tree, "-m", "combo-pca", "--json", "--no-ann", "--pca", ""], data).stdout)[0]
    assert row["dim"] == 6 and row["embedded_now"] == 0


def test_finetune_refuses_nothing_to_do_and_bad_names(tmp_path, tiny_clip):
    tree = make_tree(tmp_path / "tree", per_class=3)
    data = tmp_path / "data"
    nothing = _run(["finetune", tree, "--name", "x", "--base", tiny_clip, "--no-head"], data)
    assert nothing.exit_code == 1 and "nothing to train" in nothing.output
    bad = _run(["finetune", tree, "--name", "../x", "--base", tiny_clip], data)
    assert bad.exit_code == 1 and "--name" in bad.output


@pytest.mark.slow
def test_finetune_real_lite0_end_to_end(tmp_path):
    """The real EfficientNet-Lite0: the saved head model embeds through ONNX and matches the trained vectors."""
    tree = make_tree(tmp_path / "tree", per_class=8)
    data = tmp_path / "data"
    result = _run(["finetune", tree, "--name", "lite0-head", "--base", "efficientnet-lite0", "--epochs", 5,
                   "--json"], data)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["verified"] and summary["dim"] == 1280
    assert summary["after"]["top1"] >= summary["before"]["top1"]
