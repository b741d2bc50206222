"""The user's own images, one folder per class (what OFA users kept asking for).

Layouts:
  root/train/<class>/*.png [+ root/val/<class>/..., root/test/<class>/...]
      val/test folders are optional; a missing one is carved from train by seed.
  root/<class>/*.png
      split automatically, stratified, by `val_fraction`/`test_fraction`.
Classes are the sorted folder names of root/train (or root).
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

from .base import DataError, ImageDataModule, check_fractions, split_indices

log = logging.getLogger(__name__)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


@lru_cache(maxsize=None)
def _convertible(mode: str, target: str) -> bool:
    """Whether PIL converts images of `mode` to `target` (1 = 'L' or 3 = 'RGB' channels)."""
    try:
        blank = Image.new(mode, (1, 1))
    except Exception:  # a mode PIL cannot create blank: loading the image will tell
        return True
    try:
        blank.convert(target)
    except ValueError:  # "conversion from LAB to L not supported"
        return False
    return True


class FileImages(Dataset):
    """(path, label) pairs -> float [C,S,S] in [0,1]; the image is squashed to S x S (no crop)."""

    def __init__(self, samples: list[tuple[str, int]], size: int, mode: str):
        self.samples, self.size, self.mode = samples, size, mode

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples], dtype=np.int64)

    def describe(self, i: int) -> str:
        return f"image {self.samples[i][0]}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode).resize((self.size, self.size), Image.BILINEAR)
        except Exception as err:
            raise DataError(f"cannot read image {path}: {err}") from err
        return TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True), label


class ImageFolderDataModule(ImageDataModule):
    """Class-per-folder images; classes and layout are read in __init__ so config mistakes fail early."""

    def __init__(self, root: str, in_channels: int = 3, test_fraction: float = 0.1,
                 name: str = "imagefolder", **kwargs):
        if int(in_channels) not in (1, 3):
            raise DataError(f"data.in_channels={in_channels} must be 1 (grayscale) or 3 (RGB)")
        self.in_channels = int(in_channels)
        self.name = str(name)
        super().__init__(**kwargs)
        self.test_fraction = float(test_fraction)
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise DataError(f"imagefolder: data.root={self.root} does not exist; point data.root at a "
                            f"folder with one subfolder of images per class (or train/val/test of those)")
        #: split -> folder holding class folders; a split without a folder is carved from train
        self.split_dirs = {s: self.root / s for s in ("train", "val", "test") if (self.root / s).is_dir()}
        if "train" not in self.split_dirs:
            self.split_dirs = {"train": self.root}
        carve = {k: f for k, f in (("val", self.val_fraction), ("test", self.test_fraction))
                 if k not in self.split_dirs}
        check_fractions(**{f"{k}_fraction": f for k, f in carve.items()})
        self._carve = carve
        self.classes = _class_dirs(self.split_dirs["train"])
        if not self.classes:
            raise DataError(f"imagefolder: no class folders in {self.split_dirs['train']}; "
                            f"expected one subfolder of images per class")
        self.num_classes = len(self.classes)
        for split, folder in self.split_dirs.items():
            for cls in _class_dirs(folder):
                if cls not in self.classes:
                    raise DataError(f"imagefolder: class folder {folder / cls} is not a class of "
                                    f"{self.split_dirs['train']} ({self.classes})")
                if not any(_is_image(e.name) for e in os.scandir(folder / cls) if e.is_file()):
                    raise DataError(f"imagefolder: class folder {folder / cls} holds no images "
                                    f"({', '.join(IMG_EXTENSIONS)}); remove it or add images")

    @property
    def mode(self) -> str:
        """The PIL mode every image is converted to."""
        return "L" if self.in_channels == 1 else "RGB"

    def _scan(self, folder: Path) -> list[tuple[str, int]]:
        """List images and check each with PIL once: bad files fail (or are skipped) here, not mid-epoch.

        An image whose mode is not `self.mode` (grayscale in an RGB folder, RGBA, palette...) is
        converted when loaded and counted in `self.converted`; one that cannot be converted is bad data.
        """
        samples = []
        for cls in _class_dirs(folder):
            for name in sorted(os.listdir(folder / cls)):
                path = folder / cls / name
                if not (_is_image(name) and path.is_file()):
                    continue
                try:
                    with Image.open(path) as img:
                        mode = img.mode
                        img.verify()
                    if not _convertible(mode, self.mode):
                        raise DataError(f"PIL mode {mode} cannot be converted to {self.mode} "
                                        f"(data.in_channels={self.in_channels})")
                except Exception as err:
                    if self.bad_data == "error":
                        what = "unconvertible" if isinstance(err, DataError) else "unreadable"
                        raise DataError(f"imagefolder: {what} image {path} ({err}); delete or convert it, or "
                                        f"set data.bad_data=skip") from err
                    self.skipped_files.append(str(path))
                    continue
                if mode != self.mode:
                    self.converted.setdefault(mode, []).append(str(path))
                samples.append((str(path), self.classes.index(cls)))
        return samples

    def _load_splits(self):
        self.skipped_files = []
        #: PIL mode -> files converted to `self.mode` when loaded
        self.converted: dict[str, list[str]] = {}
        samples = {s: self._scan(folder) for s, folder in self.split_dirs.items()}
        if self.skipped_files:
            log.warning("imagefolder: skipped %d unreadable or unconvertible images (data.bad_data=skip): %s",
                        len(self.skipped_files), self.skipped_files)
        if self.converted:
            counts = ", ".join(f"{len(files)} {mode} (e.g. {files[0]})" for mode, files in self.converted.items())
            log.warning("imagefolder: %d images are not %s and are converted to %s when loaded "
                        "(data.in_channels=%d): %s", sum(map(len, self.converted.values())), self.mode,
                        self.mode, self.in_channels, counts)
        train = samples["train"]
        if not train:
            raise DataError(f"imagefolder: no readable images in {self.split_dirs['train']}")
        labels = np.array([label for _, label in train])
        parts = split_indices(labels, list(self._carve.values()), self.split_seed)
        self.split_indices = {"train": parts[0], **dict(zip(self._carve, parts[1:]))}
        for split, idx in self.split_indices.items():
            samples[split] = [train[i] for i in idx]
        return {s: FileImages(samples[s], self.image_size, self.mode) for s in ("train", "val", "test")}
