"""Embedders: CLIP through sentence-transformers (a tiny random CLIP), EfficientNet wiring with random
weights (fast), and the real EfficientNet-Lite0 on sample photos (slow)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search import models
from search.config import get_settings
from search.errors import ModelError
from search.models import EfficientNetEmbedder, build_efficientnet, builtin_models, clear_embedders, get_embedder
from tests.clip_fixture import build_tiny_clip


@pytest.fixture(autouse=True)
def _fresh_registry():
    clear_embedders()
    yield
    clear_embedders()


def _photo(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _unit(vectors: np.ndarray) -> None:
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- CLIP path


def test_clip_embeds_images_and_texts_in_one_space(tiny_clip: Path) -> None:
    embedder = get_embedder(str(tiny_clip), get_settings())
    assert embedder.supports_text
    images = embedder.embed_images([_photo(1), _photo(2)])
    texts = embedder.embed_texts(["a cat", "a dog car"])
    assert images.shape == texts.shape == (2, embedder.dim)
    _unit(images)
    _unit(texts)
    assert not np.allclose(images[0], images[1])
    assert not np.allclose(texts[0], texts[1])
    assert not np.allclose(images[0], texts[0])
    # deterministic, and embed_images is prepare + embed_prepared
    np.testing.assert_allclose(embedder.embed_images([_photo(1)])[0], images[0], atol=1e-6)
    prepared = [embedder.prepare(_photo(2))]
    np.testing.assert_allclose(embedder.embed_prepared(prepared)[0], images[1], atol=1e-6)
    np.testing.assert_allclose(embedder.embed_texts(["a cat"])[0], texts[0], atol=1e-5)
    meta = embedder.meta()
    assert (meta.model, meta.dim) == (str(tiny_clip), embedder.dim)
    assert meta.preprocessing.startswith("st-v1+w")


def test_clip_text_that_names_an_image_file_is_embedded_as_text(tiny_clip: Path, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    _photo(3).save(path)
    embedder = get_embedder(str(tiny_clip), get_settings())
    as_text = embedder.embed_texts([str(path)])
    as_image = embedder.embed_images([Image.open(path)])
    assert not np.allclose(as_text, as_image, atol=1e-3)


def test_empty_batches(tiny_clip: Path) -> None:
    embedder = get_embedder(str(tiny_clip), get_settings())
    assert embedder.embed_images([]).shape == (0, embedder.dim)
    assert embedder.embed_texts([]).shape == (0, embedder.dim)


def test_saved_model_under_data_dir_is_found_by_name(tiny_clip: Path) -> None:
    settings = get_settings()
    get_embedder(str(tiny_clip), settings).model.save(str(settings.data_dir / "models" / "my-clip"))
    embedder = get_embedder("my-clip", settings)
    assert embedder.name == "my-clip" and embedder.supports_text
    np.testing.assert_allclose(embedder.embed_images([_photo(4)]),
                               get_embedder(str(tiny_clip), settings).embed_images([_photo(4)]), atol=1e-5)


def test_concatenation_is_renormalised_and_weighs_parts_equally(tiny_clip: Path, tmp_path: Path) -> None:
    settings = get_settings()
    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    a, b = get_embedder(str(tiny_clip), settings), get_embedder(str(other), settings)
    both = get_embedder(f"{tiny_clip}+{other}", settings)
    assert both.dim == a.dim + b.dim and both.supports_text
    images = [_photo(5), _photo(6)]
    vectors = both.embed_images(images)
    _unit(vectors)
    expected = np.concatenate([a.embed_images(images), b.embed_images(images)], axis=1) / np.sqrt(2)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    _unit(both.embed_texts(["a cat"]))
    assert both.meta().preprocessing == f"{a.preprocessing}|{b.preprocessing}"
    with pytest.raises(ModelError, match="combines several models"):
        _ = both.model


# ------------------------------------------------------------------ saved heads on a named (combined) base


def _save_head(base: models.Embedder, folder: Path, dims: tuple[int, ...] = (6,), seed: int = 0,
               overwrite: bool = False) -> list:
    """A head saved exactly as ``lookalike finetune`` saves one (random Dense layers, then Normalize)."""
    from ingest.lab.finetune import Layer, ModelInfo, save_model

    rng = np.random.default_rng(seed)
    layers, width = [], base.dim
    for kind, out in zip(("pca", "head"), dims, strict=False):
        layers.append(Layer(weight=rng.normal(0, 1, (out, width)).astype(np.float32),
                            bias=rng.normal(0, 0.1, out).astype(np.float32), kind=kind))
        width = out
    info = ModelInfo(name=folder.name, base=base.name, dim=width,
                     layers=[{"kind": la.kind, "in": la.in_features, "out": la.out_features} for la in layers])
    save_model(base, layers, folder, info, overwrite=overwrite)
    return layers


def test_head_on_a_combined_base_loads_by_name(tiny_clip: Path, tmp_path: Path) -> None:
    from ingest.lab.finetune import apply_layers, read_info

    settings = get_settings()
    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    base = get_embedder(f"{tiny_clip}+{other}", settings)
    folder = settings.data_dir / "models" / "combo-head"
    layers = _save_head(base, folder, dims=(10, 6))
    assert read_info(folder)["format"] == "head"

    embedder = get_embedder("combo-head", settings)
    assert isinstance(embedder, models.HeadEmbedder) and embedder.base is base
    assert embedder.dim == 6 and embedder.supports_text
    images = [_photo(20), _photo(21), _photo(22)]
    vectors = embedder.embed_images(images)
    assert vectors.shape == (3, 6)
    _unit(vectors)
    # what finetune measured: the head applied to the base's vectors
    expected = apply_layers(base.embed_images(images), layers)
    assert np.sum(vectors * expected, axis=1).min() > 0.999
    # the decode threads still prepare: prepare is the base's, embed_prepared finishes the job
    prepared = [embedder.prepare(image) for image in images]
    assert all(isinstance(item, tuple) and len(item) == 2 for item in prepared)
    np.testing.assert_allclose(embedder.embed_prepared(prepared), vectors, atol=1e-6)
    assert embedder.embed_prepared([]).shape == (0, 6)
    # texts go through the head too (CLIP bases)
    texts = embedder.embed_texts(["a cat", "a dog car"])
    _unit(texts)
    assert np.sum(texts * apply_layers(base.embed_texts(["a cat", "a dog car"]), layers), axis=1).min() > 0.999
    assert embedder.embed_texts([]).shape == (0, 6)

    meta = embedder.meta()
    assert (meta.model, meta.dim) == ("combo-head", 6)
    assert meta.preprocessing == f"{base.preprocessing}+w{models.folder_digest(folder)}"
    assert meta.extra == {"kind": "HeadEmbedder", "base": base.name}
    with pytest.raises(ModelError, match="is a head on"):
        _ = embedder.model
    # by folder path too, and a retrained head under the same name is a different version
    assert get_embedder(str(folder), settings).preprocessing == embedder.preprocessing
    _save_head(base, folder, dims=(10, 6), seed=1, overwrite=True)
    clear_embedders()
    assert get_embedder("combo-head", settings).preprocessing != embedder.preprocessing


def test_folder_digest_is_stable() -> None:
    """Collections and embedding caches record this digest: changing how it is computed orphans them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "head" / "0_Dense").mkdir(parents=True)
        (folder / "lookalike.json").write_text('{"format": "head"}')
        (folder / "head" / "0_Dense" / "model.safetensors").write_bytes(b"weights")
        (folder / "README.md").write_text("model card: not part of the digest")
        (folder / ".cache").mkdir()
        (folder / ".cache" / "x").write_text("hidden: not part of the digest")
        assert models.folder_digest(folder) == "bfe42c8ee603"


def test_broken_heads_are_one_line_model_errors(tiny_clip: Path, tmp_path: Path) -> None:
    import json
    import shutil

    settings = get_settings()
    base = get_embedder(f"{tiny_clip}+{build_tiny_clip(tmp_path / 'other-clip', seed=1)}", settings)
    models_dir = settings.data_dir / "models"
    good = models_dir / "good"
    _save_head(base, good)

    def variant(name: str) -> Path:
        folder = models_dir / name
        shutil.copytree(good, folder)
        return folder

    def info_of(folder: Path) -> dict:
        return json.loads((folder / "lookalike.json").read_text())

    missing_base = variant("missing-base")
    (missing_base / "lookalike.json").write_text(json.dumps({**info_of(good), "base": str(tmp_path / "gone")}))
    no_base = variant("no-base")
    (no_base / "lookalike.json").write_text(json.dumps({**info_of(good), "base": ""}))
    itself = variant("itself")
    (itself / "lookalike.json").write_text(json.dumps({**info_of(good), "base": "itself"}))
    tanh = variant("tanh")
    config = tanh / "head" / "0_Dense" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "activation_function": "torch.nn.modules.activation.Tanh"}))
    no_weights = variant("no-weights")
    (no_weights / "head" / "0_Dense" / "model.safetensors").unlink()
    wrong_width = variant("wrong-width")
    (wrong_width / "lookalike.json").write_text(json.dumps({**info_of(good), "base": str(tiny_clip)}))

    cases = {"missing-base": "which does not load", "no-base": "names no base model", "itself": "depends on itself",
             "tanh": "only Identity is supported", "no-weights": "cannot read its head",
             "wrong-width": "do not fit its base"}
    for name, message in cases.items():
        with pytest.raises(ModelError, match=message) as err:
            get_embedder(name, settings)
        assert "\n" not in str(err.value) and repr(name) in str(err.value)
    assert get_embedder("good", settings).dim == 6


# ------------------------------------------------------------------------------------------ loading and names


def test_loaded_once_per_process(tiny_clip: Path) -> None:
    settings = get_settings()
    assert get_embedder(str(tiny_clip), settings) is get_embedder(str(tiny_clip), settings)


def test_concurrent_first_calls_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def slow_load(name: str, settings: object) -> object:
        calls.append(name)
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(models.registry, "_load", slow_load)
    settings = get_settings()
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(get_embedder("x", settings))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["x"]
    assert len(results) == 6 and all(r is results[0] for r in results)


def test_unknown_hub_model_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        get_embedder("clip-ViT-B-32", get_settings())
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "\n" not in message
    assert "'clip-ViT-B-32'" in message and "hub is unreachable" in message and "--model PATH" in message


def test_unreachable_hub_is_detected_without_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    assert models.sentence_transformer._hub_reachable(timeout=2.0) is False
    assert time.monotonic() - start < 5


def test_missing_folder_and_bad_combinations_are_model_errors(tmp_path: Path) -> None:
    settings = get_settings()
    with pytest.raises(ModelError, match="does not exist"):
        get_embedder(str(tmp_path / "no" / "such" / "model"), settings)
    with pytest.raises(ModelError, match="a\\+b"):
        get_embedder("efficientnet-lite0+", settings)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        get_embedder(str(tmp_path / "weights.bin"), settings)


def test_builtin_names() -> None:
    assert builtin_models()[:2] == ["efficientnet-lite0", "efficientnet-lite2"]


# ------------------------------------------------------------------ EfficientNet wiring (random weights, fast)


@pytest.fixture(scope="module")
def random_lite0(tmp_path_factory: pytest.TempPathFactory):
    settings = get_settings(data_dir=tmp_path_factory.mktemp("data"))
    model = build_efficientnet("efficientnet-lite0", "onnx", settings, pretrained=False)
    return EfficientNetEmbedder("random-lite0", model, settings)


def test_cnn_refuses_text_with_a_hint(random_lite0: EfficientNetEmbedder) -> None:
    assert not random_lite0.supports_text
    with pytest.raises(ModelError, match=r"embeds images only; text search needs a CLIP model, e\.g\. --model clip"):
        random_lite0.embed_texts(["a cat"])


def test_prepare_gives_resized_uint8_pixels_and_accepts_any_mode(random_lite0: EfficientNetEmbedder) -> None:
    photo = _photo(7, (300, 100))
    prepared = random_lite0.prepare(photo)
    assert prepared.shape == (224, 224, 3) and prepared.dtype == np.uint8  # normalised inside the network
    np.testing.assert_array_equal(prepared, np.asarray(photo.resize((224, 224), Image.Resampling.BILINEAR)))
    grey = random_lite0.prepare(_photo(7).convert("L"))
    assert grey.shape == (224, 224, 3)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
    assert random_lite0.draft_size == (448, 448)


def test_encode_accepts_images_and_prepared_arrays_alike(random_lite0: EfficientNetEmbedder) -> None:
    images = [_photo(8), _photo(9, (40, 90))]
    from_images = random_lite0.model.encode(images)
    from_prepared = random_lite0.embed_prepared([random_lite0.prepare(i) for i in images])
    np.testing.assert_allclose(from_images, from_prepared, atol=1e-5)
    assert from_prepared.shape == (2, 1280)
    _unit(from_prepared)


def test_onnx_and_torch_agree_and_onnx_file_is_cached(random_lite0: EfficientNetEmbedder) -> None:
    images = [_photo(10), _photo(11)]
    module = random_lite0.model[0]
    module.configure(backend="onnx")
    onnx = random_lite0.embed_images(images)
    path = module.onnx_path()
    assert path.exists() and path.parent == random_lite0.settings.data_dir / "cache" / "onnx"
    mtime = path.stat().st_mtime_ns
    module.configure(backend="torch")
    torch_vectors = random_lite0.embed_images(images)
    module.configure(backend="onnx")
    assert np.abs(onnx - torch_vectors).max() < 1e-4
    random_lite0.embed_images(images)
    assert path.stat().st_mtime_ns == mtime  # reused, not re-exported


def test_onnx_path_keeps_torch_thread_settings_of_other_threads(random_lite0: EfficientNetEmbedder) -> None:
    import torch

    before = torch.get_num_threads()
    random_lite0.embed_images([_photo(14)])
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == before and seen == [before]
    assert models.efficientnet._single_torch_thread().submit(torch.get_num_threads).result() == 1


def test_preprocessing_string_names_every_option() -> None:
    names = set()
    variations = ({}, {"pooling": "avg"}, {"pooling": "gem3"}, {"resize": "crop"}, {"activation": "relu6"},
                  {"normalization": "imagenet"}, {"image_size": 256})
    for options in variations:
        module = models.EfficientNetLite("efficientnet-lite0", pretrained=False, **options)
        names.add(module.preprocessing)
    assert len(names) == len(variations)
    default = models.EfficientNetLite("efficientnet-lite0", pretrained=False)
    assert default.preprocessing == "resize224-relu-cgem3-v1"
    with pytest.raises(ModelError, match="unknown pooling"):
        models.EfficientNetLite("efficientnet-lite0", pooling="max", pretrained=False)


def test_saved_efficientnet_round_trips_with_appended_dense(random_lite0: EfficientNetEmbedder, tmp_path: Path) -> None:
    import copy

    import torch
    from sentence_transformers.base.modules import Dense, Normalize

    model = copy.deepcopy(random_lite0.model)
    torch.manual_seed(0)
    model.append(Dense(1280, 64, activation_function=None))
    model.append(Normalize())
    folder = tmp_path / "finetuned"
    model.save(str(folder), create_model_card=False)
    settings = random_lite0.settings
    loaded = get_embedder(str(folder), settings)
    assert isinstance(loaded, EfficientNetEmbedder) and loaded.dim == 64
    images = [_photo(12), _photo(13)]
    np.testing.assert_allclose(loaded.embed_images(images), model.encode(images), atol=1e-5)
    assert loaded.meta().preprocessing.startswith("resize224-relu-cgem3-v1+w")
    # a retrained model under the same path must not pass for the old one
    with torch.no_grad():
        model[2].linear.weight.mul_(2.0).add_(0.01)
    model.save(str(folder), create_model_card=False)
    clear_embedders()
    assert get_embedder(str(folder), settings).preprocessing != loaded.preprocessing


def test_head_on_efficientnet_plus_clip_prepares_arrays(random_lite0: EfficientNetEmbedder, tiny_clip: Path,
                                                        tmp_path: Path) -> None:
    """A random-weight EfficientNet folder + CLIP as base: prepare gives the CNN its CHW array."""
    from ingest.lab.finetune import apply_layers

    settings = random_lite0.settings  # its ONNX export is cached there already
    lite_folder = tmp_path / "random-lite0"
    random_lite0.model.save(str(lite_folder), create_model_card=False)
    base = get_embedder(f"{lite_folder}+{tiny_clip}", settings)
    layers = _save_head(base, settings.data_dir / "models" / "lite-clip-pca", dims=(32,))
    embedder = get_embedder("lite-clip-pca", settings)
    assert embedder.dim == 32 and not embedder.supports_text and embedder.draft_size == base.draft_size
    prepared = embedder.prepare(_photo(23, (90, 60)).convert("L"))
    assert prepared[0].shape == (224, 224, 3) and prepared[0].dtype == np.uint8
    images = [_photo(23), _photo(24)]
    vectors = embedder.embed_images(images)
    _unit(vectors)
    assert np.sum(vectors * apply_layers(base.embed_images(images), layers), axis=1).min() > 0.999
    assert embedder.preprocessing.startswith(f"{base.preprocessing}+w")
    assert "resize224-relu-cgem3-v1" in embedder.meta().preprocessing
    with pytest.raises(ModelError, match="'lite-clip-pca' embeds images only"):
        embedder.embed_texts(["a cat"])


# ------------------------------------------------------------------------------- the real model (slow)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory):
    settings = get_settings(data_dir=tmp_path_factory.mktemp("data"))
    return get_embedder("efficientnet-lite0", settings)


def _sample_photos() -> dict[str, Image.Image]:
    from skimage import data

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")}
    return {name: Image.fromarray(arr).convert("RGB") for name, arr in photos.items()}


def _altered(image: Image.Image) -> Image.Image:
    w, h = image.size
    smaller = image.resize((int(w * 0.7), int(h * 0.7)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    smaller.save(buf, "JPEG", quality=60)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.mark.slow
def test_real_lite0_vectors(lite0) -> None:
    photos = _sample_photos()
    vectors = lite0.embed_images(list(photos.values()))
    assert lite0.dim == 1280 and vectors.shape == (len(photos), 1280)
    _unit(vectors)
    altered = lite0.embed_images([_altered(p) for p in photos.values()])
    similarity = altered @ vectors.T
    assert (similarity.argmax(axis=1) == np.arange(len(photos))).all(), similarity
    assert similarity.diagonal().min() > 0.9


@pytest.mark.slow
def test_real_lite0_onnx_matches_torch(lite0) -> None:
    photos = list(_sample_photos().values())
    torch_embedder = get_embedder("efficientnet-lite0", get_settings(data_dir=lite0.settings.data_dir, backend="torch"))
    assert torch_embedder is not lite0
    assert np.abs(lite0.embed_images(photos) - torch_embedder.embed_images(photos)).max() < 1e-4


@pytest.mark.slow
def test_real_lite0_save_load_round_trip(lite0, tmp_path: Path) -> None:
    photos = list(_sample_photos().values())
    folder = tmp_path / "lite0"
    lite0.model.save(str(folder), create_model_card=False)
    loaded = get_embedder(str(folder), lite0.settings)
    np.testing.assert_array_equal(loaded.embed_images(photos), lite0.embed_images(photos))
    assert loaded.meta().preprocessing.startswith(lite0.preprocessing + "+w")


@pytest.mark.slow
def test_real_lite0_plus_clip_head_matches_the_trained_vectors(lite0, tiny_clip: Path) -> None:
    """The real Lite0 (ONNX) in a combined base under a PCA head, loaded by name as backfill/search do."""
    from ingest.lab.finetune import apply_layers, fit_pca

    photos = list(_sample_photos().values())
    settings = lite0.settings
    base = get_embedder(f"efficientnet-lite0+{tiny_clip}", settings)
    base_vectors = base.embed_images(photos)
    layer = fit_pca(base_vectors, 4)
    from ingest.lab.finetune import ModelInfo, save_model

    folder = settings.data_dir / "models" / "lite0-clip-pca4"
    save_model(base, [layer], folder, ModelInfo(name="lite0-clip-pca4", base=base.name, dim=4, layers=[]))
    embedder = get_embedder("lite0-clip-pca4", settings)
    vectors = embedder.embed_images(photos)
    assert vectors.shape == (len(photos), 4)
    _unit(vectors)
    assert np.sum(vectors * apply_layers(base_vectors, [layer]), axis=1).min() > 0.999
    assert embedder.meta().preprocessing.startswith(lite0.preprocessing + "|st-v1+w")
