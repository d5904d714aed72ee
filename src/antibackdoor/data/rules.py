"""The data rules a classifier's training data must meet, in one place, so that ``run`` (``load_dataset``) and
``defend`` (``load_user_data``: npz, folders, registered datasets) accept and refuse the same data.

Training data must have samples, at least two classes, and a sample of every class in its class list (a
class with none cannot be learned, and its accuracy would be meaningless). A test split may lack classes;
a test label that the training split has no sample of is named with the test split it comes from. Train and
test images must have the same size and channels. Every error is one line naming the data and the part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DataError

Labels = np.ndarray | torch.Tensor


def _np(y: Labels) -> np.ndarray:
    return y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)


def class_list(ids: Sequence[int], classes: Sequence[str], limit: int = 6) -> str:
    """``ids`` as the user knows them: ``1, 4`` when names are the label numbers, else ``'cat' (label 3)``."""
    shown = [str(i) if str(classes[i]) == str(i) else f"{classes[i]!r} (label {i})" for i in ids[:limit]]
    return ", ".join(shown) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def counts(y: Labels, n: int) -> np.ndarray:
    """Samples per class over ``n`` classes (labels outside [0, n) are not counted: other checks name them)."""
    y = _np(y).astype(np.int64, copy=False).ravel()
    return np.bincount(y[(y >= 0) & (y < n)], minlength=n)


def check_training_labels(y_train: Labels, classes: Sequence[str], where: str, train_part: str = "the training split",
                          y_test: Labels | None = None, test_part: str = "the test split") -> None:
    """Raise ``DataError`` unless the training labels can train a classifier over ``classes`` (module doc).

    ``where`` names the data (``npz:x.npz``), the parts name the arrays or splits (``y_train``, ``y_test``)."""
    n = len(classes)
    y = _np(y_train)
    if y.size == 0:
        raise DataError(f"{where}: {train_part} has no samples; a classifier needs training data")
    if n < 2:
        raise DataError(f"{where}: only one class ({', '.join(map(repr, classes)) or 'none'}); a classifier needs at "
                        "least two classes")
    missing = [int(i) for i in np.flatnonzero(counts(y, n) == 0)]
    if not missing:
        return
    if y_test is not None:
        in_test = [i for i in missing if counts(y_test, n)[i] > 0]
        if in_test:
            raise DataError(f"{where}: {train_part} has no sample of class {class_list(in_test, classes)}, which "
                            f"{test_part} has (labels in 0..{n - 1}); a classifier cannot learn a class it has no "
                            "training sample of")
    raise DataError(f"{where}: {train_part} has no sample of class {class_list(missing, classes)} (of {n} classes); "
                    "a classifier needs a training sample of every class")


def _image_shape(shape: Sequence[int], layout: str) -> str:
    """One image of an N x H x W [x C] (``nhwc``) or N x C x H x W (``nchw``) array, as ``8x8, 3 channel(s)``."""
    dims = tuple(int(v) for v in shape[1:])
    if layout == "nchw" and len(dims) == 3:
        return f"{dims[1]}x{dims[2]}, {dims[0]} channel(s)"
    if len(dims) == 2:
        return f"{dims[0]}x{dims[1]}, 1 channel(s)"
    if len(dims) == 3:
        return f"{dims[0]}x{dims[1]}, {dims[2]} channel(s)"
    return f"of shape {dims}"


def check_same_images(train_shape: Sequence[int], test_shape: Sequence[int], where: str, train_part: str,
                      test_part: str, layout: str = "nhwc") -> None:
    """Raise unless train and test images have the same size and channels, naming both (``layout``: ``nhwc``
    for arrays as stored, where N x H x W is grey, or ``nchw`` for an ImageSet)."""
    a, b = _image_shape(train_shape, layout), _image_shape(test_shape, layout)
    if a != b:
        raise DataError(f"{where}: {train_part} images are {a} but {test_part} images are {b}; train and test "
                        "images must have the same size and channels")


__all__ = ["check_same_images", "check_training_labels", "class_list", "counts"]
