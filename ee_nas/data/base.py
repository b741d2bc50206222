"""Shared machinery for every image data source.

Each source only has to say how to load its three splits as *raw* datasets
(float images in [0, 1], already `image_size` square, no normalization). The
base class adds the transforms, so train/val/test/search all see exactly the
same eval pipeline (NSGANetV2 users lost their accuracy to mismatched
search/validation transforms).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset

from ee_nas.utils import mix_seed

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
AUGMENT_KEYS = {"random_crop_padding": 0, "horizontal_flip": False, "rotation_degrees": 0.0, "scale": 0.0}


class DataError(ValueError):
    """A data problem the user can fix (missing folder, bad file, bad key); the message says how."""


def to_plain(value: Any) -> Any:
    """Hydra hands us DictConfig/ListConfig; the rest of the code wants plain Python."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_augment(augment: Mapping[str, Any], key: str = "data.augment") -> dict:
    """`augment` over the defaults, its keys and ranges checked (`key` names it in the message)."""
    augment = to_plain(augment) or {}
    if not isinstance(augment, dict):
        raise DataError(f"{key}={augment!r} must be a mapping of {sorted(AUGMENT_KEYS)}")
    unknown = set(augment) - set(AUGMENT_KEYS)
    if unknown:
        raise DataError(f"unknown {key} keys {sorted(unknown)}; known: {sorted(AUGMENT_KEYS)}")
    out = {**AUGMENT_KEYS, **augment}
    for name, ok, rule in (("random_crop_padding", lambda v: v >= 0, ">= 0"),
                           ("rotation_degrees", lambda v: 0 <= v <= 180, "in [0, 180]"),
                           ("scale", lambda v: 0 <= v < 1, "in [0, 1): images are scaled by 1 +- scale")):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise DataError(f"{key}.{name}={v!r} is invalid; must be a number {rule}")
    return out


def set_keys(augment: Mapping[str, Any] | None) -> dict:
    """The keys of an augment override (`finetune.augment`) that are set: null keeps data.augment's value."""
    return {k: v for k, v in (to_plain(augment) or {}).items() if v is not None}


def split_indices(
    labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split positions 0..N-1 into len(fractions)+1 parts: the first gets the rest.

    Each fraction is of the whole N. Stratified by label when sklearn can
    (every class needs enough members); otherwise a seeded plain shuffle, with
    a warning, so tiny user datasets still work.
    """
    labels = np.asarray(labels)
    rest = np.arange(len(labels))
    parts: list[np.ndarray] = []
    for frac in fractions:
        n = int(round(frac * len(labels)))
        if n == 0:
            parts.append(np.array([], dtype=np.int64))
            continue
        if n >= len(rest):
            raise DataError(f"split fractions {list(fractions)} leave no training samples out of {len(labels)}")
        try:
            rest, part = train_test_split(rest, test_size=n, random_state=seed, stratify=labels[rest])
        except ValueError as err:
            log.warning("stratified split impossible (%s); using a seeded random split", err)
            rest, part = train_test_split(rest, test_size=n, random_state=seed)
        parts.append(np.sort(part))
    return [np.sort(rest), *parts]


def check_fractions(**fractions: float) -> None:
    for key, frac in fractions.items():
        if not 0.0 <= float(frac) < 1.0:
            raise DataError(f"data.{key}={frac} must be in [0, 1)")
    if sum(fractions.values()) >= 1.0:
        raise DataError(f"data fractions {fractions} sum to >= 1: nothing left to train on")


class TensorImages(Dataset):
    """In-memory images [N,C,H,W] (uint8 0..255 or float 0..1) -> float [C,S,S] in [0,1], int label.

    Resizing happens per sample so a 224-pixel run on CIFAR doesn't blow up memory.
    """

    def __init__(self, x: Tensor, y: Tensor, size: int, source_index: np.ndarray | None = None):
        self.x, self.y, self.size = x, y.long(), size
        self.source_index = source_index  # position of each sample in the source it was carved from

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> np.ndarray:
        return self.y.numpy()

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    def describe(self, i: int) -> str:
        src = f" (index {int(self.source_index[i])} of the source)" if self.source_index is not None else ""
        return f"sample {i}{src}"

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.x[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)[0].clamp_(0, 1)
        return x, int(self.y[i])


class _Transformed(Dataset):
    """A raw split with its transform. A key `(i, seed)` (from `EpochShuffle`) runs the random
    transform under its own seed, so augmentation does not depend on worker or process history."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            i, seed = key
            x, y = self.base[i]
            # a CPU generator of its own: torch.manual_seed would also seed every accelerator
            # backend and cost ~2 ms a sample (a quarter of a digits epoch)
            return self.transform(x, torch.Generator().manual_seed(seed)), y
        x, y = self.base[key]
        return self.transform(x, torch.default_generator), y  # plain indexing: the global RNG


def rotate_scale(x: Tensor, degrees: float, scale: float) -> Tensor:
    """Image `x` [C, H, W] rotated by `degrees` about its centre and scaled by `scale` (bilinear, zeros outside)."""
    a = math.radians(degrees)
    c, s = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=x.dtype)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, align_corners=False, padding_mode="zeros")[0]


class SeededAugment:
    """Random rotation and scale, random crop (zero padding) and horizontal flip drawn from a given
    generator, then normalize.

    The draws come from the sample's own generator, so augmentation depends on (seed, epoch,
    sample) only. Evaluation transforms have none of them and only normalize.
    """

    def __init__(self, size: int, padding: int, flip: bool, mean: Sequence[float], std: Sequence[float],
                 degrees: float = 0.0, scale: float = 0.0):
        self.size, self.padding, self.flip, self.degrees, self.scale = size, padding, flip, degrees, scale
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.degrees > 0 or self.scale > 0:
            u = (torch.rand(2, generator=generator) * 2 - 1).tolist()
            x = rotate_scale(x, u[0] * self.degrees, 1 + u[1] * self.scale)
        if self.padding > 0:
            p = self.padding
            top, left = torch.randint(0, 2 * p + 1, (2,), generator=generator).tolist()
            x = F.pad(x, (p, p, p, p))[..., top:top + self.size, left:left + self.size]
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return (x - self.mean) / self.std


class EpochShuffle(Sampler):
    """Training order and augmentation seeds as a function of (seed, epoch) only.

    Yields `(index, augmentation_seed)` pairs. A run resumed from a checkpoint therefore sees
    exactly the batches an uninterrupted run sees, whatever random numbers the process drew
    before: Lightning calls `set_epoch` before every epoch (also through its distributed
    wrapper), and `skip` drops the samples a mid-epoch checkpoint had already trained on.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, skip: int = 0):
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=gen)
        seeds = torch.randint(0, 2**62, (self.n,), generator=gen)
        skip, self.skip = self.skip, 0  # only the first pass of a resumed epoch skips
        yield from zip(order[skip:].tolist(), seeds[skip:].tolist())


class ImageDataModule(L.LightningDataModule):
    """Base LightningDataModule: splits, transforms, loaders and in-memory split tensors.

    Subclasses set `name`, `num_classes`, `in_channels` (class attributes or
    before calling `super().__init__`) and implement `_load_splits`.
    """

    name: str = "base"
    num_classes: int
    in_channels: int
    default_mean: tuple = (0.5,)
    default_std: tuple = (0.5,)

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool = False,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Mapping[str, Any] | None = None,
        bad_data: str = "error",
    ):
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.split_seed = int(split_seed)
        self.val_fraction = float(val_fraction)
        self.image_size = int(image_size)
        self.mean = self._per_channel("mean", to_plain(mean) or self.default_mean)
        self.std = self._per_channel("std", to_plain(std) or self.default_std)
        self.augment = check_augment(augment)
        if bad_data not in ("error", "skip"):
            raise DataError(f"data.bad_data={bad_data!r} must be 'error' or 'skip'")
        self.bad_data = bad_data
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.image_size < 1:
            raise DataError("data.batch_size, data.eval_batch_size and data.image_size must be positive")
        self.skipped_files: list[str] = []
        #: positions of each split in the source it was carved from (set by sources that carve)
        self.split_indices: dict[str, np.ndarray] = {}
        self._raw: dict[str, Dataset] | None = None
        self._tensor_cache: dict[tuple[str, int | None], tuple[Tensor, Tensor]] = {}

    def _per_channel(self, key: str, values) -> tuple:
        values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
        if len(values) == 1:
            values = values * self.in_channels
        if len(values) != self.in_channels:
            raise DataError(f"data.{key} has {len(values)} values but in_channels={self.in_channels}")
        return values

    # ----- to implement -------------------------------------------------
    def _load_splits(self) -> dict[str, Dataset]:
        """Return {'train','val','test'} -> dataset of (float [C,S,S] in [0,1], int label)."""
        raise NotImplementedError

    # ----- Lightning hooks ------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._raw is not None:
            return
        raw = self._load_splits()
        missing = set(SPLITS) - set(raw)
        assert not missing, f"{type(self).__name__}._load_splits lacks {missing}"
        self._check_samples(raw)
        self._raw = raw
        log.info("%s splits: %s", self.name, self.split_sizes())

    def _check_samples(self, raw: dict[str, Dataset]) -> None:
        """Every label must be a class of the dataset and every image must have `in_channels`."""
        for split in SPLITS:
            ds = raw[split]
            channels = getattr(ds, "channels", self.in_channels)
            if channels != self.in_channels:
                raise DataError(f"{self.name}: the {split} images have {channels} channels but "
                                f"in_channels={self.in_channels}")
            labels = getattr(ds, "labels", None)
            if labels is None or not len(labels):
                continue
            labels = np.asarray(labels)
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
            if len(bad):
                i = int(bad[0])
                where = ds.describe(i) if hasattr(ds, "describe") else f"sample {i}"
                raise DataError(f"{self.name}: {split} {where} has label {int(labels[i])}, but the dataset has "
                                f"num_classes={self.num_classes} (valid labels 0..{self.num_classes - 1}); "
                                f"{len(bad)} of {len(labels)} {split} labels are out of range")

    def _transform(self, train: bool, augment: Mapping[str, Any] | None = None) -> SeededAugment:
        if not train:
            return SeededAugment(self.image_size, 0, False, self.mean, self.std)
        a = check_augment({**self.augment, **set_keys(augment)}, "augment")
        return SeededAugment(self.image_size, int(a["random_crop_padding"]), bool(a["horizontal_flip"]), self.mean,
                             self.std, float(a["rotation_degrees"]), float(a["scale"]))

    def dataset(self, split: str, train_transforms: bool = False, augment: Mapping[str, Any] | None = None) -> Dataset:
        """The split with normalization (and augmentation if `train_transforms`: `data.augment`, with the keys
        of `augment` in place of its own)."""
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        return _Transformed(self._raw[split], self._transform(train_transforms, augment))

    def _loader(self, ds: Dataset, batch_size: int, sampler: Sampler | None = None,
                drop_last: bool = False) -> DataLoader:
        pin = self.pin_memory and torch.cuda.is_available()  # pinning without CUDA only warns
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=pin, persistent_workers=self.num_workers > 0)

    def train_dataloader(self, augment: Mapping[str, Any] | None = None, with_val: bool = False) -> DataLoader:
        """Shuffled by (split_seed, epoch) with per-sample augmentation seeds (`EpochShuffle`); `augment`
        overrides keys of `data.augment` for this loader (`finetune.augment`; a null key keeps data.augment's);
        `with_val` adds the val images, with the training transforms (`finetune.refit`)."""
        ds = self.dataset("train", train_transforms=True, augment=augment)
        if with_val:
            ds = _Transformed(ConcatDataset([self._raw["train"], self._raw["val"]]), ds.transform)
        # drop a last batch that could be 1 sample: BatchNorm fails on it in training
        drop_last = len(ds) > self.batch_size
        epoch, done = self._resume_position()
        sampler = EpochShuffle(len(ds), self.split_seed, epoch=epoch, skip=done * self.batch_size)
        return self._loader(ds, self.batch_size, sampler=sampler, drop_last=drop_last)

    def _resume_position(self) -> tuple[int, int]:
        """(epoch about to run, batches of it already trained) as the trainer restored them.

        The first loader iterator is created before Lightning calls `set_epoch`, so a resumed
        run must start its sampler at the restored epoch (and past the batches a mid-epoch
        checkpoint already trained).
        """
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        epochs = trainer.fit_loop.epoch_progress.current
        mid_epoch = epochs.started > epochs.processed
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed if mid_epoch else 0
        return epochs.processed, int(done)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str) -> DataLoader:
        """Any split with eval transforms, in order (train here = BatchNorm recalibration)."""
        return self._loader(self.dataset(split), self.eval_batch_size)

    # ----- search helpers -------------------------------------------------
    def split_sizes(self) -> dict[str, int]:
        self.setup()
        return {s: len(self._raw[s]) for s in SPLITS}

    def split_tensors(self, split: str, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
        """Whole eval-transformed split in memory (x float32 [N,C,H,W], y int64 [N]), cached.

        The NAS search scores hundreds of candidates on the same data; loading it
        once avoids re-running the loader per candidate. `max_samples` (the BN
        recalibration images) picks a subset, all of the split if it is smaller,
        in an order shuffled by `split_seed`: every candidate sees the same images
        in the same batches, and no batch holds one class only (an image folder
        lists its samples class by class, and per-batch BN statistics of
        single-class batches underestimate the variance).
        """
        key = (split, max_samples)
        if key in self._tensor_cache:
            return self._tensor_cache[key]
        ds = self.dataset(split)
        if max_samples is not None:
            gen = torch.Generator().manual_seed(self.split_seed)
            idx = torch.randperm(len(ds), generator=gen)[:max_samples]
            ds = Subset(ds, idx.tolist())
        xs, ys = [], []
        for x, y in self._loader(ds, self.eval_batch_size):
            xs.append(x)
            ys.append(y)
        if xs:
            out = (torch.cat(xs).float(), torch.cat(ys).long())
        else:
            out = (torch.empty(0, self.in_channels, self.image_size, self.image_size), torch.empty(0, dtype=torch.long))
        self._tensor_cache[key] = out
        return out
