"""Typed config loading: YAML -> frozen dataclasses, validated field by field.

Every config in steerl is a tree of frozen dataclasses. ``load_dataclass`` walks the tree using
the type hints, so a YAML file can only contain fields the schema declares, with values of the
declared types. Any mistake raises :class:`ConfigError` naming the file and the dotted field path,
e.g. ``sim_panda_reach.yaml: robot.safety.watchdog_ms: expected int, got 'fast'``.

Supported annotations: bool, int, float, str, Literal[...], Optional[X], tuple[X, ...],
fixed-length tuple[X, Y], list[X], dict[str, X] and nested dataclasses. A dataclass may define
``validate(self)`` raising ``ValueError`` for cross-field rules; the message is prefixed with the
field path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or mapping does not match its schema."""


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _convert(annotation: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: expected one of {choices}, got {_describe(value)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for option in non_none:
            try:
                return _convert(option, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: no type matched: {errors}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    if annotation is Any:
        return value
    raise TypeError(f"{path}: unsupported annotation {annotation!r} in config schema")


def _build(cls: type[T], data: Any, path: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = path or "top level"
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{_join(path, str(unknown[0]))}: unknown field (known fields: {known})")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required field is missing")
    try:
        instance = cls(**kwargs)
    except ValueError as error:  # a check that runs on construction (__post_init__)
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"{path or cls.__name__}: {error}") from None
    return instance


def load_dataclass(cls: type[T], data: Any, source: str = "") -> T:
    """Build ``cls`` from a plain mapping; errors are prefixed with ``source`` (a file name)."""
    try:
        return _build(cls, data, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into ``cls``; every error names the file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    return load_dataclass(cls, data, str(path))


def to_dict(instance: Any) -> Any:
    """Plain-data form of a config tree (tuples become lists), suitable for YAML or hashing."""
    if dataclasses.is_dataclass(instance):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    return instance
