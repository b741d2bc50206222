"""The same seed gives the same front and metrics on the CPU; the training order depends on (seed, epoch) only."""
import torch

from ee_nas.data.base import EpochShuffle


def test_same_seed_same_results(cli, reference_run, tmp_path):
    done = cli.run(tmp_path / "again")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again, first = cli.results(tmp_path / "again"), cli.results(reference_run)
    assert again["summary"] == first["summary"]
    assert again["front"] == first["front"]
    assert again["progress"] == first["progress"]


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
