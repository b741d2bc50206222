"""SVHN, CIFAR-10 and CIFAR-100 through torchvision (the paper's datasets).

torchvision keeps these arrays in memory anyway; we take them as uint8 tensors
and use the same tensor transforms as every other source (no PIL round trip).
The validation split is carved from the official train split by `split_seed`;
test is the official test split.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from .base import DataError, ImageDataModule, TensorImages, check_fractions, split_indices


class _TorchvisionDataModule(ImageDataModule):
    in_channels = 3
    #: files torchvision needs under root, checked in __init__ so a wrong path fails before training
    required_files: tuple[str, ...] = ()

    def _required_files(self) -> tuple[str, ...]:
        return self.required_files

    def __init__(self, root: str = "data", download: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(os.path.expanduser(str(root)))
        self.download = bool(download)
        check_fractions(val_fraction=self.val_fraction)
        if not self.download:
            if not self.root.is_dir():
                raise DataError(f"{self.name}: data.root={self.root} does not exist; set data.download=true "
                                f"or point data.root at the folder that holds the {self.name} files")
            missing = [f for f in self._required_files() if not (self.root / f).exists()]
            if missing:
                raise DataError(f"{self.name}: missing {missing} in data.root={self.root}; set "
                                f"data.download=true or point data.root at the folder that holds them")

    def _open(self, train: bool, download: bool):
        """Return (uint8 tensor [N,3,H,W], int64 labels) of the official train or test split."""
        raise NotImplementedError

    def _open_checked(self, train: bool, download: bool):
        try:
            return self._open(train, download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise DataError(f"{self.name}: {err} (data.root={self.root}); set data.download=true "
                            f"or point data.root at a folder with intact files") from err
        except OSError as err:  # no network, disk full, permissions
            raise DataError(f"{self.name}: could not download to data.root={self.root}: {err}; "
                            f"download the files by hand and set data.download=false") from err

    def prepare_data(self) -> None:
        """Download once (Lightning calls this on one process only)."""
        if self.download:
            self._open_checked(True, True)
            self._open_checked(False, True)

    def _load_splits(self):
        x, y = self._open_checked(True, self.download)
        x_test, y_test = self._open_checked(False, self.download)
        train, val = split_indices(y.numpy(), [self.val_fraction], self.split_seed)
        self.split_indices = {"train": train, "val": val}
        return {
            "train": TensorImages(x[train], y[train], self.image_size, train),
            "val": TensorImages(x[val], y[val], self.image_size, val),
            "test": TensorImages(x_test, y_test, self.image_size),
        }


class SVHNDataModule(_TorchvisionDataModule):
    """Street View House Numbers (train/test .mat files; the 'extra' split is not used)."""

    name = "svhn"
    num_classes = 10
    default_mean = (0.4377, 0.4438, 0.4728)
    default_std = (0.1980, 0.2010, 0.1970)
    required_files = ("train_32x32.mat", "test_32x32.mat")

    def _open(self, train, download):
        ds = datasets.SVHN(str(self.root), split="train" if train else "test", download=download)
        return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels).long()


class CIFAR10DataModule(_TorchvisionDataModule):
    name = "cifar10"
    num_classes = 10
    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)
    dataset_cls = datasets.CIFAR10

    def _required_files(self):
        c = self.dataset_cls
        files = [f for f, _ in c.train_list + c.test_list] + [c.meta["filename"]]
        return tuple(f"{c.base_folder}/{f}" for f in files)

    def _open(self, train, download):
        ds = self.dataset_cls(str(self.root), train=train, download=download)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
        return x, torch.tensor(ds.targets, dtype=torch.long)



class CIFAR100DataModule(CIFAR10DataModule):
    name = "cifar100"
    num_classes = 100
    default_mean = (0.5071, 0.4865, 0.4409)
    default_std = (0.2673, 0.2564, 0.2762)
    dataset_cls = datasets.CIFAR100
