from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ee_nas.data import DataError, DigitsDataModule
from ee_nas.data.base import rotate_scale
from ee_nas import CONF_DIR

CONF = CONF_DIR / "data" / "digits.yaml"


def make(**kw):
    dm = DigitsDataModule(**{"split_seed": 0, **kw})
    dm.setup()
    return dm


def test_attributes_known_before_setup():
    dm = DigitsDataModule()
    assert (dm.name, dm.num_classes, dm.in_channels, dm.image_size) == ("digits", 10, 1, 32)
    assert len(dm.mean) == len(dm.std) == 1


def test_splits_disjoint_cover_all_and_stratified():
    dm = make()
    idx = dm.split_indices
    assert sum(len(v) for v in idx.values()) == 1797
    assert len(np.unique(np.concatenate(list(idx.values())))) == 1797
    assert dm.split_sizes() == {s: len(idx[s]) for s in ("train", "val", "test")}
    assert abs(dm.split_sizes()["val"] - 0.2 * 1797) <= 1
    for split in ("val", "test"):
        counts = np.bincount(dm.split_tensors(split)[1].numpy(), minlength=10)
        # stratified: ~36 per class; a random split would often stray further
        assert counts.min() >= 34 and counts.max() <= 38, counts


def test_split_deterministic_by_seed():
    a, b, c = make(split_seed=5), make(split_seed=5), make(split_seed=6)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split_indices[s], b.split_indices[s])
    assert not np.array_equal(a.split_indices["val"], c.split_indices["val"])
    torch.testing.assert_close(a.split_tensors("val"), b.split_tensors("val"))


def test_shapes_normalization_and_split_tensors_match_loader():
    dm = make()
    x, y = dm.split_tensors("test")
    assert x.shape == (dm.split_sizes()["test"], 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    xs, ys = zip(*dm.eval_dataloader("test"))
    torch.testing.assert_close(torch.cat(xs), x)
    torch.testing.assert_close(torch.cat(ys), y)
    # config mean/std really normalize the data
    xt, _ = dm.split_tensors("train")
    assert abs(xt.mean().item()) < 0.05 and abs(xt.std().item() - 1) < 0.05


def test_split_tensors_subset_is_seeded_and_cached():
    dm = make()
    x, y = dm.split_tensors("val", max_samples=50)
    assert x.shape[0] == 50
    assert dm.split_tensors("val", max_samples=50)[0] is x  # cached
    x2, y2 = make().split_tensors("val", max_samples=50)
    torch.testing.assert_close(x2, x)
    full_x, _ = dm.split_tensors("val")
    # the subset consists of rows of the full split
    assert all((full_x == row).flatten(1).all(1).any() for row in x[:5])


def test_setup_is_idempotent():
    dm = make()
    raw = dm._raw
    dm.setup("fit")
    assert dm._raw is raw


def test_augmentation_only_on_train_loader():
    dm = make(augment={"random_crop_padding": 4, "horizontal_flip": False})
    torch.manual_seed(0)
    aug = torch.stack([dm.dataset("train", train_transforms=True)[i][0] for i in range(32)])
    plain = torch.stack([dm.dataset("train")[i][0] for i in range(32)])
    assert not torch.equal(aug, plain)
    torch.testing.assert_close(plain, dm.split_tensors("train")[0][:32])
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (64, 1, 32, 32) and yb.shape == (64,)
    # eval loader of train split: unshuffled and unaugmented
    torch.testing.assert_close(next(iter(dm.eval_dataloader("train")))[0][:32], plain)
    no_aug = make(augment={"random_crop_padding": 0})
    torch.testing.assert_close(no_aug.dataset("train", train_transforms=True)[3][0], no_aug.dataset("train")[3][0])


def test_rotate_scale_turns_and_scales_about_the_centre():
    x = torch.rand(1, 6, 6)
    torch.testing.assert_close(rotate_scale(x, 0.0, 1.0), x)
    torch.testing.assert_close(rotate_scale(x, 90.0, 1.0), torch.rot90(x, 1, (1, 2)), atol=1e-5, rtol=0)
    dot = torch.zeros(1, 6, 6)
    dot[0, 2:4, 2:4] = 1  # the centre 2x2 block
    grown = rotate_scale(dot, 0.0, 2.0)
    assert 3 * 4 < grown.sum() < 5 * 4 and grown[0, 2:4, 2:4].sum() == 4  # 2x the side: about 4x the area
    torch.testing.assert_close(grown, grown.flip(1).flip(2))  # still centred


def test_rotation_and_scale_augment_only_the_loader_asked_for_them():
    dm = make(augment={"random_crop_padding": 0})
    plain = next(iter(dm.train_dataloader()))[0]
    turned = next(iter(dm.train_dataloader({"rotation_degrees": 12, "scale": 0.1})))[0]
    assert turned.shape == plain.shape and not torch.allclose(turned, plain)
    torch.testing.assert_close(next(iter(dm.train_dataloader()))[0], plain)  # the override is the loader's only
    again = next(iter(dm.train_dataloader({"rotation_degrees": 12, "scale": 0.1})))[0]
    torch.testing.assert_close(again, turned)  # seeded per (seed, epoch, sample), like the crop
    g = torch.Generator().manual_seed(3)
    u = (torch.rand(2, generator=g) * 2 - 1).tolist()  # the draws, in the order the transform makes them
    x = dm._raw["train"][0][0]
    expected = (rotate_scale(x, 12 * u[0], 1 + 0.1 * u[1]) - dm.mean[0]) / dm.std[0]
    aug = dm.dataset("train", train_transforms=True, augment={"rotation_degrees": 12, "scale": 0.1}).transform
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(3)), expected)


def test_a_null_key_of_the_override_keeps_data_augment_and_crop_0_turns_the_crop_off():
    """finetune.augment's default: the crop off, the other keys null (data.augment's values)."""
    dm = make(augment={"random_crop_padding": 4})
    cropped = next(iter(dm.train_dataloader()))[0]
    nulls = {"random_crop_padding": None, "horizontal_flip": None, "rotation_degrees": None, "scale": None}
    torch.testing.assert_close(next(iter(dm.train_dataloader(nulls)))[0], cropped)
    centred = next(iter(dm.train_dataloader({**nulls, "random_crop_padding": 0})))[0]
    torch.testing.assert_close(centred, next(iter(make(augment={"random_crop_padding": 0}).train_dataloader()))[0])
    assert not torch.allclose(centred, cropped)


def test_train_loader_with_val_trains_on_every_train_and_val_image_once_an_epoch():
    """finetune.refit's loader: the train and val images, each once an epoch, with the training transforms."""
    dm = make(augment={"random_crop_padding": 0})
    sizes = dm.split_sizes()
    loader = dm.train_dataloader(with_val=True)
    xs, ys = zip(*loader)
    seen = torch.cat(xs)
    assert len(seen) == (sizes["train"] + sizes["val"]) // 64 * 64  # the last partial batch dropped
    rows = {tuple(x.flatten().tolist()): y for x, y in zip(seen, torch.cat(ys).tolist())}
    found = 0
    for split in ("train", "val"):
        x, y = dm.split_tensors(split)
        hits = [rows.get(tuple(xi.flatten().tolist())) for xi in x]
        found += sum(h is not None for h in hits)
        assert all(h == yi for h, yi in zip(hits, y.tolist()) if h is not None)
    assert found == len(rows) == len(seen)  # every image seen is a train or val image, each once
    test = {tuple(x.flatten().tolist()) for x in dm.split_tensors("test")[0]}
    assert not test & rows.keys()  # never the test images
    assert len(dm.train_dataloader().dataset) == sizes["train"]  # without it: train only
    assert make(augment={"random_crop_padding": 4}).train_dataloader(with_val=True).dataset.transform.padding == 4


def test_bad_config_fails_early():
    with pytest.raises(DataError, match="mean"):
        DigitsDataModule(mean=[0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="random_crop"):
        DigitsDataModule(augment={"random_crop": 4})
    with pytest.raises(DataError, match=r"data\.augment\.scale=1\.0 is invalid; must be a number in \[0, 1\)"):
        DigitsDataModule(augment={"scale": 1.0})
    with pytest.raises(DataError, match=r"augment\.rotation_degrees=-5 is invalid"):
        make().train_dataloader({"rotation_degrees": -5})
    with pytest.raises(DataError, match="fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="split"):
        make().eval_dataloader("validation")


def test_yaml_instantiates():
    cfg = OmegaConf.create({"seed": 7, "paths": {"data_dir": "/nonexistent"}, "data": OmegaConf.load(CONF)})
    dm = instantiate(cfg.data)
    assert isinstance(dm, DigitsDataModule)
    assert dm.split_seed == 7 and dm.batch_size == 64 and dm.eval_batch_size == 512
    assert dm.augment == {"random_crop_padding": 4, "horizontal_flip": False, "rotation_degrees": 0.0, "scale": 0.0}
    assert dm.mean == DigitsDataModule(split_seed=7).mean  # the train split's statistics


def test_normalization_statistics_come_from_the_train_split_only():
    dm = make(split_seed=3)
    x, _, splits = dm._images()
    train, everything = x[splits["train"]], x
    assert dm.mean == pytest.approx((float(train.mean()),)) and dm.std == pytest.approx((float(train.std()),))
    assert dm.mean != pytest.approx((float(everything.mean()),), abs=1e-6)  # the test images left out
    # the train split comes out normalized, exactly
    xt, _ = dm.split_tensors("train")
    assert abs(xt.mean().item()) < 1e-4 and abs(xt.std().item() - 1) < 1e-3
    assert make(split_seed=4).mean != dm.mean  # another split, other train images
    given = DigitsDataModule(split_seed=3, mean=[0.5], std=[0.25])
    assert (given.mean, given.std) == ((0.5,), (0.25,))


def test_image_size_option():
    dm = make(image_size=16)
    assert dm.split_tensors("val")[0].shape[1:] == (1, 16, 16)
