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
    """

    name = "digits"
    num_classes = 10
    in_channels = 1
    default_mean = (0.3053,)  # of the 32x32 upscaled images, all 1797
    default_std = (0.3236,)

    def __init__(self, test_fraction: float = 0.2, val_fraction: float = 0.2, **kwargs):
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.test_fraction = float(test_fraction)
        check_fractions(val_fraction=self.val_fraction, test_fraction=self.test_fraction)

    def _load_splits(self):
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True).clamp_(0, 1)
        y = torch.tensor(digits.target, dtype=torch.long)
        train, test, val = split_indices(digits.target, [self.test_fraction, self.val_fraction], self.split_seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        return {s: TensorImages(x[idx], y[idx], self.image_size, idx) for s, idx in self.split_indices.items()}
