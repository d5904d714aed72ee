"""Datasets as in-memory uint8 tensors, their loaders and on-device augmentation.

Loader modules in this package register themselves; every submodule is imported here so a new loader
needs only its own file.
"""

from ..registry import import_submodules
from .imageset import DatasetSplits, ImageSet, PaperSettings, from_numpy_nhwc
from .registry import DATASETS, default_data_root, load_dataset, register_dataset

import_submodules(__name__, __path__)

__all__ = ["DATASETS", "DatasetSplits", "ImageSet", "PaperSettings", "default_data_root", "from_numpy_nhwc",
           "load_dataset", "register_dataset"]
