"""Shared fixtures: a small shapes world on disk and the embedded tiny backbone (real, no mocks)."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for sub in ("data_prep", "eval"):
    path = os.path.join(ROOT, sub)
    if path not in sys.path:
        sys.path.insert(0, path)


def pytest_configure(config):
    import torch

    # 2-core CI: one intra-op thread avoids oversubscription with DataLoader workers and subprocesses
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() or os.environ.get("VLALIGN_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes world (the same generator as the embedded default, fewer images)."""
    from vlalign.data.shapes import build_shapes

    out = tmp_path_factory.mktemp("shapes")
    build_shapes(str(out), train_images=300, val_images=60, test_images=60, shard_size=100, progress=False)
    return str(out)


@pytest.fixture(autouse=True)
def _shared_shapes_world_is_not_rebuilt(request):
    """Fail the test that rebuilds the session's shapes world (e.g. by passing it as ``data.shapes_dir`` with
    ``data.train: shapes``: ensure_shapes then rebuilds it at the CLI's sizes), which changes every later test's data.
    Read it as shards instead (``data.train: <dir>/sft/train-*.tar``)."""
    if "shapes_dir" not in request.fixturenames:
        yield
        return
    manifest = os.path.join(request.getfixturevalue("shapes_dir"), "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    yield
    assert os.stat(manifest).st_mtime_ns == before, "this test rebuilt the shared shapes world (see conftest.py)"


@pytest.fixture(scope="session")
def tiny_processor_backbone():
    """An unbuilt tiny backbone (processor only): cheap, for data tests."""
    from vlalign.backbone import Backbone, BackboneConfig

    return Backbone(BackboneConfig())


@pytest.fixture(scope="session")
def make_backbone():
    """Factory: ``make_backbone(lora={"r": 4}, train_vision=True, ...)`` -> a built tiny Backbone."""
    from vlalign.backbone import Backbone, BackboneConfig

    def make(**overrides):
        return Backbone(BackboneConfig(**overrides)).build()

    return make


@pytest.fixture(scope="session")
def reward_export(tmp_path_factory, make_backbone):
    """(base, reward): a tiny merged checkpoint standing in for the SFT model, and a reward model exported from it
    through RewardModule's export path (its merged backbone and a freshly initialised value head)."""
    from vlalign.backbone import BackboneConfig
    from vlalign.reward import RewardModule, save_head

    root = tmp_path_factory.mktemp("reward_export")
    base = str(root / "base")
    make_backbone().export_merged(base)
    rm = RewardModule(BackboneConfig(checkpoint=base, train_vision=False, train_projector=False, train_language=False))
    rm.configure_model()
    reward = str(root / "reward")
    rm.backbone.export_merged(f"{reward}/merged")
    save_head(rm.head, reward, rm.backbone)
    return base, reward
