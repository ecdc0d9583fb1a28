"""Type checks for the frozen config dataclasses (``AdapterSpec``, ``TrainConfig``).

A value of the wrong type (``--set steps=abc``) must end in one line naming the field and the
fix, not in a ``TypeError`` deep inside validation. ``check_types`` reads the dataclass's own
annotations, so a new field is checked without another line here. ints are accepted where a
float is declared (and stored as float); bools never pass as numbers.
"""
from __future__ import annotations

import dataclasses
import types
import typing


def _ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(_ok(v, t) for v, t in zip(value, args))
    if origin is dict:
        k_t, v_t = typing.get_args(tp) or (typing.Any, typing.Any)
        return isinstance(value, dict) and all(_ok(k, k_t) and _ok(v, v_t) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_name(t) for t in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else "a list"
    if origin is dict:
        return "a table"
    return {type(None): "none", int: "an int", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def check_types(obj, label: str | None = None) -> None:
    """Raise ``ValueError`` for the first field of dataclass ``obj`` whose value has the wrong type;
    convert ints in float fields to float (frozen dataclasses included)."""
    label = label or type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if not _ok(value, tp):
            raise ValueError(f"{label}.{f.name} must be {_name(tp)}, got {value!r} ({type(value).__name__}): "
                             f"e.g. {f.name} = {_example(f)}")
        if tp is float and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))


def _example(f) -> str:
    d = f.default
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, (int, float)):
        return repr(d)
    return f'"{d}"' if isinstance(d, str) and d else "..."
