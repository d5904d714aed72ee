"""Datasets as in-memory uint8 tensors, their loaders and on-device augmentation.

Loader modules in this package register themselves; every submodule is imported here so a new loader
needs only its own file.
"""

import importlib
import pkgutil

from .imageset import DatasetSplits, ImageSet, from_numpy_nhwc
from .registry import DATASETS, default_data_root, load_dataset, register_dataset

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["DATASETS", "DatasetSplits", "ImageSet", "default_data_root", "from_numpy_nhwc", "load_dataset",
           "register_dataset"]
