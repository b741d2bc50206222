"""scikit-learn's 8x8 digits: the embedded offline default, so a fresh machine runs end to end."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from .base import ImageDataModule, TensorImages, check_fractions, split_indices


class DigitsDataModule(ImageDataModule):
    """1797 digits, scaled to [0,1], bilinearly upscaled to `image_size`, 1 channel.

    Everything lives in memory; the stratified train/val/test split depends
    only on `split_seed`, so runs with the same seed compare on the same data.
    Without `mean` / `std` the normalization statistics are those of this
    instance's train split (at its `image_size`): no val or test image leaks in.
    """

    name = "digits"
    num_classes = 10
    in_channels = 1

    def __init__(self, test_fraction: float = 0.2, val_fraction: float = 0.2, **kwargs):
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.test_fraction = float(test_fraction)
        check_fractions(val_fraction=self.val_fraction, test_fraction=self.test_fraction)
        if kwargs.get("mean") is None or kwargs.get("std") is None:  # known before setup, as configured ones are
            x, _, splits = self._images()
            train = x[splits["train"]]
            if kwargs.get("mean") is None:
                self.mean = (float(train.mean()),)
            if kwargs.get("std") is None:
                self.std = (float(train.std()),)

    def _images(self):
        """All images upscaled (x [N,1,S,S] in [0,1]), labels, and the split's indices."""
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True).clamp_(0, 1)
        y = torch.tensor(digits.target, dtype=torch.long)
        train, test, val = split_indices(digits.target, [self.test_fraction, self.val_fraction], self.split_seed)
        return x, y, {"train": train, "val": val, "test": test}

    def _load_splits(self):
        x, y, self.split_indices = self._images()
        return {s: TensorImages(x[idx], y[idx], self.image_size, idx) for s, idx in self.split_indices.items()}
