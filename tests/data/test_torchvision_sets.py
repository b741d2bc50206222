"""Wiring of the torchvision sources on tiny fake files in torchvision's on-disk format (no download)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.svhn
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fake_data import write_cifar, write_svhn  # noqa: F401  (tests/ is on sys.path via conftest)

from ee_nas.data import CIFAR10DataModule, CIFAR100DataModule, DataError, SVHNDataModule
from ee_nas import CONF_DIR

CONF = CONF_DIR / "data"


CASES = {
    "svhn": (SVHNDataModule, lambda root: write_svhn(root), 60, 20),
    "cifar10": (CIFAR10DataModule, lambda root: write_cifar(root, torchvision.datasets.CIFAR10), 100, 20),
    "cifar100": (CIFAR100DataModule,
                 lambda root: write_cifar(root, torchvision.datasets.CIFAR100, n_classes=100), 100, 100),
}


def unnormalize(dm, x):
    return x * torch.tensor(dm.std)[:, None, None] + torch.tensor(dm.mean)[:, None, None]


@pytest.mark.parametrize("name", CASES)
def test_fake_dataset_wiring(tmp_path, no_md5, name):
    cls, write, n_train, n_test = CASES[name]
    imgs = write(tmp_path)
    dm = cls(root=str(tmp_path), download=False, split_seed=3, val_fraction=0.2)
    assert dm.name == name and dm.in_channels == 3 and len(dm.mean) == 3
    assert dm.num_classes == (100 if name == "cifar100" else 10)
    dm.setup()
    sizes = dm.split_sizes()
    assert sizes == {"train": n_train - n_train // 5, "val": n_train // 5, "test": n_test}
    tr, va = dm.split_indices["train"], dm.split_indices["val"]
    assert not set(tr) & set(va) and len(set(tr) | set(va)) == n_train

    # test split = official test files, in order, pixels and labels intact (CHW, SVHN 10 -> 0)
    x, y = dm.split_tensors("test")
    assert x.shape == (n_test, 3, 32, 32)
    torch.testing.assert_close(unnormalize(dm, x), torch.from_numpy(imgs["test"][0]).float() / 255, atol=1e-5, rtol=0)
    assert y.tolist() == imgs["test"][1].tolist()
    # val = the carved rows of the official train split
    xv, yv = dm.split_tensors("val")
    torch.testing.assert_close(unnormalize(dm, xv), torch.from_numpy(imgs["train"][0][va]).float() / 255,
                               atol=1e-5, rtol=0)
    assert yv.tolist() == imgs["train"][1][va].tolist()

    same = cls(root=str(tmp_path), download=False, split_seed=3, val_fraction=0.2)
    other = cls(root=str(tmp_path), download=False, split_seed=4, val_fraction=0.2)
    same.setup()
    other.setup()
    np.testing.assert_array_equal(same.split_indices["val"], va)
    assert not np.array_equal(other.split_indices["val"], va)

    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.shape[1:] == (3, 32, 32)


def test_svhn_flip_off_cifar_flip_on(tmp_path, no_md5):
    for ds in ("svhn", "cifar10", "cifar100"):
        cfg = OmegaConf.create({"seed": 1, "paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONF / f"{ds}.yaml")})
        cfg.data.download = False
        (tmp_path / ds).mkdir()
        CASES[ds][1](tmp_path / ds)
        dm = instantiate(cfg.data)
        assert dm.name == ds and dm.root == tmp_path / ds and dm.split_seed == 1
        assert dm.augment == {"random_crop_padding": 4, "horizontal_flip": ds != "svhn", "rotation_degrees": 0.0,
                              "scale": 0.0}


@pytest.mark.parametrize("cls", [SVHNDataModule, CIFAR10DataModule, CIFAR100DataModule])
def test_missing_root_or_files_fail_early(tmp_path, cls):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}.*data.download=true"):
        cls(root=str(missing), download=False)
    with pytest.raises(DataError, match=f"missing .*{tmp_path}"):
        cls(root=str(tmp_path), download=False)


def test_corrupt_files_raise_data_error(tmp_path):
    """Without the md5 patch the fake files fail torchvision's integrity check: a DataError naming root."""
    write_cifar(tmp_path, torchvision.datasets.CIFAR10)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataError, match=str(tmp_path)):
        dm.setup()
