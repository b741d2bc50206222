"""Tiny fake datasets in torchvision's on-disk format, shared by tests (no download)."""
import pickle

import numpy as np
import scipy.io
import torchvision.datasets.cifar
import torchvision.datasets.svhn


def fake_images(n, seed):
    """uint8 [N,3,32,32] (CHW), random: any H/W or channel mix-up in loading changes them."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def write_svhn(root, n_train=60, n_test=20):
    imgs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = fake_images(n, seed=len(split))
        y = np.arange(n) % 10
        # SVHN .mat: X [H,W,C,N], labels 1..10 with 10 meaning digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat",
                         {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y)[:, None].astype(np.uint8)})
        imgs[split] = (x, y)
    return imgs


def write_cifar(root, dataset_cls, n_per_batch=20, n_classes=10):
    folder = root / dataset_cls.base_folder
    folder.mkdir(parents=True)
    key = "labels" if n_classes == 10 else "fine_labels"
    imgs = {}
    for split, files in (("train", dataset_cls.train_list), ("test", dataset_cls.test_list)):
        xs, ys = [], []
        for i, (name, _) in enumerate(files):
            n = n_per_batch * (5 if dataset_cls is torchvision.datasets.CIFAR100 else 1)
            x = fake_images(n, seed=i + 10 * len(split))
            y = (np.arange(n) + i) % n_classes
            with open(folder / name, "wb") as f:
                pickle.dump({"data": x.reshape(n, -1), key: y.tolist()}, f)
            xs.append(x)
            ys.append(y)
        imgs[split] = (np.concatenate(xs), np.concatenate(ys))
    meta = dataset_cls.meta
    with open(folder / meta["filename"], "wb") as f:
        pickle.dump({meta["key"]: [f"c{i}" for i in range(n_classes)]}, f)
    return imgs



def write_fake(name: str, root):
    """Write a fake `name` (svhn | cifar10 | cifar100) dataset under `root`; returns its images."""
    root.mkdir(parents=True, exist_ok=True)
    if name == "svhn":
        return write_svhn(root)
    if name == "cifar10":
        return write_cifar(root, torchvision.datasets.CIFAR10)
    return write_cifar(root, torchvision.datasets.CIFAR100, n_classes=100)
