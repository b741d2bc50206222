"""The same seed gives the same front and metrics on the CPU; the training order depends on (seed, epoch) only.

Two separate command-line runs with the same seed ending with identical summary.json, pareto_front.json and
search_progress.csv is proven by test_resume.py: its interrupted run starts from scratch in a process of its
own, and must end with exactly the reference run's results."""
import torch

from ee_nas.data.base import EpochShuffle


def test_training_order_is_a_function_of_seed_and_epoch():
    sampler = EpochShuffle(100, seed=3)
    epoch0 = list(sampler)
    torch.manual_seed(123)  # the process's own random state plays no part
    assert list(sampler) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(i for i, _ in epoch1) == list(range(100))
    assert list(EpochShuffle(100, seed=4)) != epoch0
    # a run resumed mid-epoch skips exactly the samples it already trained on, once
    resumed = EpochShuffle(100, seed=3, epoch=1, skip=40)
    assert list(resumed) == epoch1[40:]
    assert list(resumed) == epoch1


def test_augmentation_follows_the_sample_seed():
    from ee_nas.data import DigitsDataModule

    dm = DigitsDataModule(image_size=16, augment={"random_crop_padding": 4, "horizontal_flip": True})
    ds = dm.dataset("train", train_transforms=True)
    a = ds[(5, 1234)][0]
    torch.rand(10)  # global random state moves on
    assert torch.equal(ds[(5, 1234)][0], a)
    assert any(not torch.equal(ds[(5, s)][0], a) for s in range(10))
