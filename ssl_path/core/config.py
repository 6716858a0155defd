"""Typed configs: YAML files and ``key=value`` overrides turned into nested dataclasses.

A config is a tree of dataclasses; :func:`from_dict` builds one from plain data, checking every
key and converting values to the declared types (tuples, floats given as ints, ...), so a typo in a
YAML file or on the command line is one clear error instead of a silently ignored setting.
Fields typed ``dict`` take any keys (e.g. timm model kwargs). Values are checked for range and
choice by each dataclass's ``__post_init__``, which raises :class:`~ssl_path.core.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from ssl_path.core.errors import ConfigError, UserError

T = TypeVar("T")
CONFIG_DIR = Path(__file__).parents[1] / "configs"


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a string; YAML 1.2 and everyone else read a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML text as plain data, with ``1e-3`` a number."""
    return yaml.load(text, Loader=_Loader)


def config_path(name_or_path: str, shipped_dir: Path = CONFIG_DIR) -> Path:
    """A shipped config by name (``dinov2_vits16``, from ``shipped_dir``) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"--config {name_or_path}: no such file")
        return path
    shipped = shipped_dir / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in shipped_dir.glob("*.yaml")))
        raise UserError(f"--config {name_or_path}: not a YAML file nor a shipped config ({names})")
    return shipped


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = load_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: unreadable YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: a config must be a YAML mapping")
    return content


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``a.b=v`` sets ``data["a"]["b"] = yaml(v)``; a new copy is returned."""
    out = _deepcopy(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. optim.lr=0.001)")
        try:
            value = load_yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def overridden(overrides: Sequence[str], dotted: str) -> bool:
    """Whether any of ``overrides`` sets ``dotted``: by its own key (``a.b=v``) or inside a section's
    (``a={b: v}``); each on its own, as a later section's would hide an earlier key's."""

    def sets(override: str) -> bool:
        node: Any = apply_overrides({}, [override])
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    return any(sets(override) for override in overrides)


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, validating keys and converting types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{where}: {err}") from None


def to_dict(config: Any) -> Any:
    """A dataclass tree as plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key of the first value that differs between two config trees (lists equal tuples);
    a level's own values come before its sections, so that ``method`` differs before ``dinov2``."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        for key in sorted(keys, key=lambda k: (isinstance(a.get(k), dict) or isinstance(b.get(k), dict), k)):
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return None if a == b else prefix.rstrip(".")


def lookup(data: Any, dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None where a part is missing."""
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)}")
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
