"""Shared fixtures: models and search spaces built from the config tree exactly as ``ee_nas.run`` builds them."""
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from ee_nas import CONF_DIR

# one thread: the test models are tiny, and with 2 threads on 2 shared cores every op waits on
# thread sync (measured: a 16ch 32x32 conv 23 ms with 2 threads under load vs 0.1 ms with 1)
torch.set_num_threads(1)

CONF = CONF_DIR
sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared helpers such as fake_data.py


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF


@pytest.fixture(scope="session")
def make_backbone():
    """``make_backbone(name)``: a fresh backbone from ``conf/backbone/<name>.yaml`` (3x32x32 input, 10 classes)."""
    def make(name: str, **overrides):
        kwargs = dict(in_channels=3, num_classes=10, image_size=32) | overrides
        return instantiate(OmegaConf.load(CONF / "backbone" / f"{name}.yaml"), **kwargs)
    return make


@pytest.fixture(scope="session")
def make_space():
    """``make_space(backbone, name, **overrides)``: a SearchSpace from ``conf/search_space/<name>.yaml``."""
    def make(backbone, name: str, **overrides):
        return instantiate(OmegaConf.load(CONF / "search_space" / f"{name}.yaml"), backbone=backbone, **overrides)
    return make


@pytest.fixture(scope="session")
def backbones(make_backbone) -> dict:
    """One shared instance per backbone config. Read-only: tests that touch weights build their own."""
    return {name: make_backbone(name) for name in ("mobilenetv3_small", "resnet")}


@pytest.fixture
def no_md5(monkeypatch):
    """Fake files cannot match torchvision's md5 sums; accept them."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *a, **k: True)
