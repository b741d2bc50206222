"""Bad data stops the run (or is skipped) with a message naming the file or the sample.

Wrong channel count: a grayscale image in an RGB folder (and the reverse) is converted, with one warning;
an image that cannot be converted is an error naming the file. Labels out of range name the sample.
"""
import logging

import numpy as np
import pytest
from PIL import Image

from ee_nas.data import DataError, DigitsDataModule, ImageFolderDataModule


def write_folder(root, mode="RGB", per_class=4, odd=None):
    """Two classes of small images in `mode`; `odd` = (class, name, PIL image) adds one more file."""
    for cls, value in (("a", 60), ("b", 200)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new(mode, (8, 8), (value,) * len(mode) if mode != "L" else value).save(root / cls / f"{i}.png")
    if odd:
        cls, name, img = odd
        img.save(root / cls / name)
        return root / cls / name


def test_grayscale_image_in_an_rgb_folder_is_converted_with_one_warning(tmp_path, caplog):
    gray = write_folder(tmp_path, "RGB", odd=("a", "gray.png", Image.new("L", (8, 8), 128)))
    (tmp_path / "b" / "gray2.png").write_bytes(gray.read_bytes())
    dm = ImageFolderDataModule(root=str(tmp_path), in_channels=3, val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="ee_nas.data.imagefolder"):
        dm.setup()
    warnings = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "2 images are not RGB" in warnings[0] and "2 L" in warnings[0] and "gray" in warnings[0]
    assert sorted(dm.converted["L"]) == [str(gray), str(tmp_path / "b" / "gray2.png")]
    x, _ = dm.split_tensors("train")
    assert x.shape[1] == 3


def test_rgb_image_in_a_grayscale_folder_is_converted(tmp_path, caplog):
    color = write_folder(tmp_path, "L", odd=("b", "color.png", Image.new("RGB", (8, 8), (10, 200, 30))))
    dm = ImageFolderDataModule(root=str(tmp_path), in_channels=1, val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="ee_nas.data.imagefolder"):
        dm.setup()
    assert dm.converted == {"RGB": [str(color)]}
    assert any("not L and are converted to L" in r.getMessage() for r in caplog.records)
    assert dm.split_tensors("train")[0].shape[1] == 1


def test_an_image_that_cannot_be_converted_names_the_file(tmp_path):
    lab = write_folder(tmp_path, "L", odd=("a", "lab.tif", Image.new("LAB", (8, 8))))  # LAB -> L: unsupported
    dm = ImageFolderDataModule(root=str(tmp_path), in_channels=1, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError, match=f"unconvertible image {lab}.*mode LAB cannot be converted to L"):
        dm.setup()
    skip = ImageFolderDataModule(root=str(tmp_path), in_channels=1, val_fraction=0.2, test_fraction=0.2,
                                 bad_data="skip")
    skip.setup()
    assert skip.skipped_files == [str(lab)] and sum(skip.split_sizes().values()) == 8


def test_labels_beyond_the_classes_name_the_sample():
    class FiveDigits(DigitsDataModule):  # a dataset that declares fewer classes than its labels use
        num_classes = 5

    dm = FiveDigits(image_size=8)
    with pytest.raises(DataError, match=r"digits: train sample \d+ \(index \d+ of the source\) has label [5-9], but "
                                        r"the dataset has num_classes=5 \(valid labels 0..4\)"):
        dm.setup()


def test_labels_beyond_the_classes_name_the_file(tmp_path):
    write_folder(tmp_path, "RGB")
    dm = ImageFolderDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    dm.num_classes = 1  # e.g. a class list that lost a folder
    with pytest.raises(DataError, match=f"image {tmp_path}/b/.*png has label 1, but the dataset has num_classes=1"):
        dm.setup()


def test_images_with_the_wrong_channel_count_are_refused():
    class RGBDigits(DigitsDataModule):
        in_channels = 3

    with pytest.raises(DataError, match="train images have 1 channels but in_channels=3"):
        RGBDigits(image_size=8, mean=[0.5], std=[0.5]).setup()


def test_corrupt_image_is_an_error_or_skipped(tmp_path):
    write_folder(tmp_path, "RGB")
    broken = tmp_path / "a" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + np.arange(40, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=f"unreadable image {broken}"):
        ImageFolderDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2).setup()
    dm = ImageFolderDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, bad_data="skip")
    dm.setup()
    assert dm.skipped_files == [str(broken)]
