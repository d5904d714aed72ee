"""Building nested config dataclasses from plain dicts (YAML), with errors that name the bad key, and
describing them (type, default, one-line doc per field) for the CLI listings and docs."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def param(default: Any = dataclasses.MISSING, *, doc: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line ``doc`` (shown by ``antibackdoor attacks`` / ``defenses``)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"doc": doc})


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(str(a) for a in args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value, where)
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is dict or tp is dict:  # a section of free keys (a part's parameters): checked by the part later
        # None (a YAML key left empty) stays None as it always has: it is part of the run ids already written
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of key: value, got {value!r}")
        return value
    if origin is tuple or tp is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) for v in value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError.

    Errors name the key as ``key_path(where, key)`` (nested keys joined by dots).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        keys = ", ".join(sorted(map(str, unknown)))  # YAML keys need not be strings (``1: 2``)
        raise ConfigError(f"{where}: unknown key(s) {keys}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, key_path(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def key_path(where: str, key: str) -> str:
    """The name of ``key`` below ``where``: after an option with a space (``--defense-param naive``), below a key
    with a dot (``--defense-param naive.epochs``). Every error about a part's parameter names it so."""
    return f"{where} {key}" if where.startswith("--") and " " not in where else f"{where}.{key}"


def check_tree(obj: Any, where: str) -> None:
    """Check a (nested) config dataclass before anything runs: every ``Literal`` field holds one of its values
    (also where the object was built in code rather than merged from a dict), then, depth first, every nested
    dataclass's and the object's own ``validate(where)``, which checks what types cannot (ranges, files).
    ``where`` names the object in errors (``--defense-param naive``)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = key_path(where, f.name)
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal:
            _coerce(tp, value, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_tree(value, name)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)


def deep_update(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` updated by ``b``, recursing into mappings present in both (neither is modified)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_update(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def merge(base: T, overrides: dict[str, Any], where: str = "config") -> T:
    """A copy of dataclass ``base`` with (nested) ``overrides`` applied."""
    return from_dict(type(base), deep_update(to_dict(base), overrides), where)


def to_dict(obj: Any) -> Any:
    """Dataclasses to plain dicts/lists (tuples as lists) for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def type_name(tp: Any) -> str:
    """A short readable name of a field type: ``float``, ``str | None``, ``all|bottom-right``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str  # dotted for fields of nested dataclasses: ``naive.epochs``
    type: str
    value: Any
    doc: str
    default: Any  # the field's declared default (``dataclasses.MISSING`` when it has none)
    #: a nested settings block itself (``naive``: its doc says what the stage is); its fields follow as rows
    group: bool = False


def _declared_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return to_dict(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return dataclasses.MISSING


def describe_fields(params: Any, prefix: str = "", groups: bool = False) -> list[FieldInfo]:
    """Name, type, value (in ``params``, a dataclass instance), doc and declared default of each field, for
    listings; the fields of nested dataclasses are listed one by one under dotted names (``naive.epochs``), the
    names ``--defense-param`` takes, each block first announced by a ``group`` row with its own doc when
    ``groups``."""
    hints = typing.get_type_hints(type(params))
    rows: list[FieldInfo] = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            if groups:
                rows.append(FieldInfo(prefix + f.name, type(value).__name__, None, f.metadata.get("doc", ""),
                                      dataclasses.MISSING, group=True))
            rows += describe_fields(value, f"{prefix}{f.name}.", groups)
        else:
            rows.append(FieldInfo(prefix + f.name, type_name(hints[f.name]), to_dict(value),
                                  f.metadata.get("doc", ""), _declared_default(f)))
    return rows
