"""Configs from YAML files and ``key=value`` overrides, into the library's dataclasses.

``load_config(ImagePretrainConfig, "run.yaml", ["steps=5000", "family=rf"])`` reads the YAML
mapping (if given), applies the overrides in order, converts each value to its field's type
(``int``, ``float``, ``bool``, ``str``, tuples, ``X | None``), and returns the dataclass. An
unknown key is a :class:`ConfigError` that names it and suggests the closest field; so is a
value that does not convert, a malformed override, or a file that is not a YAML mapping.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

__all__ = ["override_config", "ConfigError", "load_config", "load_sections", "parse_overrides"]


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message says which and what would be valid."""


def parse_overrides(items) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (values stay strings until typed)."""
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        out[key.strip()] = value
    return out


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, type(f.default)) for f in dataclasses.fields(cls)}


def _convert(name: str, value, kind):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: cannot convert {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}")
        try:
            if kind is int:
                number = float(value) if isinstance(value, str) else value
                if float(number) != int(float(number)):
                    raise ValueError
                return int(float(number))
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}") from None
        return out
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    if origin is tuple or kind is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        inner = args[0] if args else int
        return tuple(_convert(name, v, inner if inner is not Ellipsis else int) for v in value)
    return value


def load_config(cls, path=None, overrides=(), **values):
    """The dataclass ``cls`` from the YAML file ``path``, then ``values``, then ``key=value``
    ``overrides`` (later wins)."""
    raw: dict = dict(_read_yaml(path)) if path is not None else {}
    raw.update(values)
    raw.update(parse_overrides(overrides))
    kinds = _field_types(cls)
    out = {}
    for key, value in raw.items():
        if key not in kinds:
            close = difflib.get_close_matches(str(key), list(kinds), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(kinds)}"
            raise ConfigError(f"unknown {cls.__name__} key {key!r}{hint}")
        out[key] = _convert(key, value, kinds[key])
    return cls(**out)


def override_config(cfg, overrides=(), *, only=None):
    """A copy of the dataclass ``cfg`` with ``key=value`` ``overrides`` typed as its fields; with
    ``only``, keys outside it are refused (e.g. a trained agent's acting-only settings)."""
    raw = parse_overrides(overrides)
    kinds = _field_types(type(cfg))
    for key in raw:
        if only is not None and key not in only:
            allowed = ", ".join(only) if only else "none"
            raise ConfigError(f"{key!r} cannot change here: only {allowed} can (others need a new run)")
        if key not in kinds:
            raise ConfigError(f"unknown {type(cfg).__name__} key {key!r}; valid: {', '.join(kinds)}")
    try:
        return dataclasses.replace(cfg, **{k: _convert(k, v, kinds[k]) for k, v in raw.items()})
    except ValueError as e:  # the dataclass's own checks
        raise ConfigError(str(e)) from None


def _read_yaml(path) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


def load_sections(sections: dict, path=None, overrides=()) -> dict:
    """Several dataclasses from one YAML file and one list of ``key=value`` overrides.

    ``sections`` maps a section name to its dataclass, e.g. ``{"agent": DiffusionQLConfig,
    "train": TrainConfig}``. A key may name its section (``train.steps=5000``, or a YAML
    mapping under ``train:``); a bare key goes to the first section that has that field. A key
    no section has is a :class:`ConfigError` naming the closest valid one.
    Returns ``{section: instance}``.
    """
    kinds = {name: _field_types(cls) for name, cls in sections.items()}
    raw: dict = {name: {} for name in sections}

    def put(key: str, value, origin: str):
        head, dot, rest = str(key).partition(".")
        if dot and head in sections:
            if rest not in kinds[head]:
                close = difflib.get_close_matches(rest, list(kinds[head]), n=1)
                hint = f"; did you mean {head}.{close[0]}?" if close else f"; valid: {', '.join(kinds[head])}"
                raise ConfigError(f"unknown {head} key {rest!r} ({origin}){hint}")
            raw[head][rest] = value
            return
        for name in sections:
            if key in kinds[name]:
                raw[name][key] = value
                return
        every = [f"{n}.{k}" for n in sections for k in kinds[n]] + [k for n in sections for k in kinds[n]]
        close = difflib.get_close_matches(str(key), every, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key {key!r} ({origin}){hint}; sections: "
                          + "; ".join(f"{n}: {', '.join(kinds[n])}" for n in sections))

    if path is not None:
        for key, value in _read_yaml(path).items():
            if key in sections and isinstance(value, dict):
                for k, v in value.items():
                    put(f"{key}.{k}", v, str(path))
            else:
                put(key, value, str(path))
    for key, value in parse_overrides(overrides).items():
        put(key, value, "command line")
    return {name: load_config(cls, **raw[name]) for name, cls in sections.items()}

