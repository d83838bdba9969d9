"""Typed configs from YAML/JSON: every stage's spec is a dataclass, and one loader checks field
names and types so that an error names the field, the value and what it should be.

Overrides use ``key=value`` (the value parsed as YAML: ``epochs=3``, ``use_gpu=true``,
``lrs=[0.1,0.05]``), so recipes stay files and the command line only adjusts them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bitstorm.errors import ConfigError

T = TypeVar("T")


def load_config(
    cls: type[T],
    spec: str | Path,
    overrides: Sequence[str] = (),
    *,
    package: str,
    folder: str,
) -> T:
    """Dataclass ``cls`` from a YAML file, or from the file ``<folder>/<spec>.yaml`` shipped in
    ``package`` (see ``shipped_config``), with ``key=value`` overrides applied; errors name
    ``spec`` as given."""
    data = load_config_data(spec, overrides, package=package, folder=folder)
    return from_dict(cls, data, str(spec))


def load_config_data(
    spec: str | Path, overrides: Sequence[str] = (), *, package: str, folder: str
) -> dict[str, Any]:
    """The mapping ``load_config`` builds its dataclass from: the file, overrides applied."""
    return apply_overrides(
        read_config_file(shipped_config(spec, folder, package=package)), overrides
    )


def shipped_config(spec: str | Path, folder: str, *, package: str) -> Path:
    """``spec`` itself if it is a file, else the file ``<folder>/<spec>.yaml`` shipped in
    ``package`` (``trainers``' ``configs`` for training recipes and ``sweeps`` for Tune sweeps;
    ``campaign``'s ``specs`` for campaign presets, named with their subfolder:
    ``paper/digits_resnet18``). An unknown name lists the shipped ones."""
    path = Path(spec)
    if path.is_file():
        return path
    root = resources.files(package).joinpath(folder)
    shipped = root.joinpath(f"{spec}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    names = ", ".join(_yaml_names(root))
    raise ConfigError(f"no config file {spec!r}; shipped {folder}: {names}")


def _yaml_names(folder: Traversable, prefix: str = "") -> list[str]:
    """Names of the YAML files under ``folder`` without the suffix, subfolders as ``sub/name``."""
    names = []
    for entry in folder.iterdir():
        if entry.is_dir():
            names += _yaml_names(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(".yaml"):
            names.append(prefix + entry.name.removesuffix(".yaml"))
    return sorted(names)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON, a subset of YAML) mapping from ``path``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of field: value")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``key=value`` applied (value parsed as YAML); a dotted key
    (``resources.actors=4``) sets a field of a nested mapping, made where there was none."""
    merged = dict(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        *parents, last = key.strip().split(".")
        target = merged
        for parent in parents:
            inner = target.get(parent)
            # a plain value becomes a mapping (sampling.margin=0.01 on sampling: per_stratum
            # gives sampling: {margin: 0.01}); the field's own type check then rules on it
            nested = dict(inner) if isinstance(inner, Mapping) else {}
            target[parent] = nested
            target = nested
        target[last] = parsed
    return merged


def from_dict(cls: type[T], data: Mapping[str, Any], origin: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, refusing unknown fields and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=3)
        raise ConfigError(
            f"{origin}: unknown field {key!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" (fields: {', '.join(fields)})"
        )
    values = {
        key: _coerce(value, hints[key], f"{origin}: field {key!r}") for key, value in data.items()
    }
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{origin}: missing required field(s) {', '.join(missing)}")
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where} may not be null")
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of field: value, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {hint!r}")
