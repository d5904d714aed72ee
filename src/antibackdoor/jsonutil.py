"""Strict JSON for every file the tool writes: undefined numbers (NaN, +-inf) become ``null``.

Python's ``json`` writes NaN as the bare word ``NaN``, which is not JSON: browsers, ``jq`` and most other
languages reject the whole file. Everything the tool writes goes through :func:`dumps`, which checks with
``allow_nan=False`` that nothing slipped through.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .caching import atomic_write


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: NaN/inf -> None, tensors and arrays -> lists, paths and the rest -> str."""
    if obj is None or isinstance(obj, bool | str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # torch tensors, numpy arrays and numpy scalars
    if callable(tolist):
        return jsonable(tolist())
    return str(obj)


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (see :func:`jsonable`)."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as strict, indented JSON atomically (``caching.atomic_write``)."""
    text = dumps(data, indent=2)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))
