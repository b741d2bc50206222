"""LightningDataModules, one per data source; all share `ImageDataModule`'s interface."""
from .base import DataError, ImageDataModule
from .digits import DigitsDataModule
from .imagefolder import ImageFolderDataModule
from .torchvision_sets import CIFAR10DataModule, CIFAR100DataModule, SVHNDataModule

__all__ = [
    "DataError", "ImageDataModule", "DigitsDataModule", "ImageFolderDataModule",
    "SVHNDataModule", "CIFAR10DataModule", "CIFAR100DataModule",
]
