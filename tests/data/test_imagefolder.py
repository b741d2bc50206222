import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ee_nas.data import DataError, ImageFolderDataModule

COLORS = {"cat": (250, 0, 0), "dog": (0, 250, 0), "emu": (0, 0, 250)}


def write_class_folders(folder, per_class=6):
    """Solid-colour PNGs of varying sizes, colour = class, so labels and resizing can be checked."""
    for cls, color in COLORS.items():
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10 + i, 14), color).save(folder / cls / f"{i}.png")


def check_labels_match_colors(dm, split):
    x, y = dm.split_tensors(split)
    x = x * torch.tensor(dm.std)[:, None, None] + torch.tensor(dm.mean)[:, None, None]
    for img, label in zip(x, y):
        expected = torch.tensor(COLORS[dm.classes[label]]) / 255
        torch.testing.assert_close(img.mean((1, 2)), expected, atol=2e-3, rtol=0)


def test_auto_split(tmp_path):
    write_class_folders(tmp_path, per_class=10)
    dm = ImageFolderDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, split_seed=1)
    assert dm.classes == ["cat", "dog", "emu"] and dm.num_classes == 3 and dm.in_channels == 3
    assert dm.split_sizes() == {"train": 18, "val": 6, "test": 6}
    idx = np.concatenate(list(dm.split_indices.values()))
    assert sorted(idx) == list(range(30))
    assert np.bincount(dm.split_tensors("val")[1].numpy()).tolist() == [2, 2, 2]  # stratified
    assert dm.split_tensors("train")[0].shape == (18, 3, 32, 32)
    for split in ("train", "val", "test"):
        check_labels_match_colors(dm, split)
    same = ImageFolderDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, split_seed=1)
    other = ImageFolderDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, split_seed=2)
    same.setup()
    other.setup()
    assert same.split_indices["val"].tolist() == dm.split_indices["val"].tolist()
    assert other.split_indices["val"].tolist() != dm.split_indices["val"].tolist()


def test_explicit_folders_grayscale_and_size(tmp_path):
    write_class_folders(tmp_path / "train", per_class=4)
    write_class_folders(tmp_path / "val", per_class=2)
    write_class_folders(tmp_path / "test", per_class=3)
    dm = ImageFolderDataModule(root=str(tmp_path), in_channels=1, image_size=16, mean=[0.5], std=[0.5])
    assert dm.split_sizes() == {"train": 12, "val": 6, "test": 9}
    x, y = dm.split_tensors("test")
    assert x.shape == (9, 1, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (12, 1, 16, 16)


def test_missing_val_folder_is_carved_from_train(tmp_path):
    write_class_folders(tmp_path / "train", per_class=5)
    write_class_folders(tmp_path / "test", per_class=1)
    dm = ImageFolderDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.5)
    assert dm.split_sizes() == {"train": 12, "val": 3, "test": 3}  # test_fraction unused: test folder exists
    check_labels_match_colors(dm, "val")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        ImageFolderDataModule(root=str(tmp_path / "nope"))


def test_no_classes_or_empty_class_folder(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataModule(root=str(tmp_path))
    write_class_folders(tmp_path)
    (tmp_path / "fox").mkdir()
    (tmp_path / "fox" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=str(tmp_path / "fox")):
        ImageFolderDataModule(root=str(tmp_path))


def test_unknown_class_in_val_folder(tmp_path):
    write_class_folders(tmp_path / "train")
    (tmp_path / "val" / "yak").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "yak" / "0.png")
    with pytest.raises(DataError, match="yak"):
        ImageFolderDataModule(root=str(tmp_path))


def test_corrupt_file_error_or_skip(tmp_path, caplog):
    write_class_folders(tmp_path, per_class=10)
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG garbage, not an image")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataModule(root=str(tmp_path), bad_data="error").setup()
    dm = ImageFolderDataModule(root=str(tmp_path), bad_data="skip", val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.skipped_files == [str(bad)]
    assert "skipped 1" in caplog.text
    assert sum(dm.split_sizes().values()) == 30
    with pytest.raises(DataError, match="bad_data"):
        ImageFolderDataModule(root=str(tmp_path), bad_data="ignore")


def test_calibration_images_are_shuffled_by_seed(tmp_path):
    """BN recalibration takes `split_tensors('train', max_samples)` in batches: an image folder lists its
    samples class by class, so the calibration subset must come shuffled (by split_seed), even when it
    holds the whole split."""
    write_class_folders(tmp_path / "train", per_class=8)
    write_class_folders(tmp_path / "val", per_class=1)

    def calibration(seed, n):
        dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, split_seed=seed, eval_batch_size=4)
        return dm.split_tensors("train")[1], dm.split_tensors("train", max_samples=n)[1]

    ordered, y = calibration(0, 24)  # the whole split
    assert ordered.tolist() == sorted(ordered.tolist())  # the folder's own order: class by class
    assert sorted(y.tolist()) == ordered.tolist() and y.tolist() != ordered.tolist()
    # no 4-image batch of a class-ordered 24 would mix classes this much: every early batch is mixed
    assert all(len(set(y[i:i + 4].tolist())) > 1 for i in range(0, 12, 4))
    again, other = calibration(0, 24)[1], calibration(1, 24)[1]
    assert again.tolist() == y.tolist() and other.tolist() != y.tolist()
    subset = calibration(0, 9)[1]
    assert len(subset) == 9 and len(set(subset.tolist())) > 1
