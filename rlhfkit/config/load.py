"""The config loader: dataclass defaults <- YAML file <- ``key.sub=value`` overrides, coercion
and range checks with errors that name the key, ``key=null`` to unset, the help text, and the
``module:function`` importer that config values use to name code (reward functions, tools,
environment factories): plumbing below every stage's schema."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or range."""


def knob(
    default: Any,
    help: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
):
    """A config field with help text and an optional range [lo, hi] (or (lo, hi] with lo_open)."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def sub(cls: type, help: str = ""):
    return field(default_factory=cls, metadata={"help": help})


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # from a command-line override: a,b,c
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _check_range(f: dataclasses.Field, value: Any, key: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    lo, hi, lo_open = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{key}: {value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} must be <= {hi}")


def _build(cls: type, data: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = (
                f"; did you mean '{prefix}{close[0]}'?"
                if close
                else f"; valid keys: {sorted(fields)}"
            )
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        raw = data[name]
        shorthand = getattr(hints[name], "SHORTHAND", None)  # `env: m:f` = `env.factory: m:f`
        if isinstance(raw, dict) and _SHORT in raw:
            if not shorthand:
                raise ConfigError(f"'{prefix}{name}' is not a section; it cannot have sub-keys")
            raw = {shorthand: raw[_SHORT], **{k: v for k, v in raw.items() if k != _SHORT}}
        if shorthand and isinstance(raw, str):
            raw = {shorthand: raw}
        if dataclasses.is_dataclass(f.default) and isinstance(raw, dict):
            raw = _merge(dataclasses.asdict(f.default), raw)  # a section's own defaults (critic.lr)
        if raw is None:
            raw = _unset(f, hints[name], prefix + name)
        value = _coerce(raw, hints[name], prefix + name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(f, value, prefix + name)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def _unset(f: dataclasses.Field, tp: Any, key: str) -> Any:
    """``key=null`` (YAML's null, or ``null`` / ``~`` on the command line): the key unset, for
    keys whose unset value is their empty default (``reward_model=null`` undoes a preset's RM)
    or None. Any other key needs a value, and the error says which one it has by default."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    if type(None) in args:
        return None
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default in ("", []):
        return default
    raise ConfigError(
        f"{key}: null unsets only keys that can be empty; this one needs a value "
        f"(its default is {default!r})"
    )


_SHORT = "__shorthand__"  # a section given as one value (``EnvConfig.SHORTHAND``) plus sub-keys


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):  # `env=m:f env.timeout=5`: a section's shorthand value
            nxt = node[p] = {_SHORT: nxt}
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-5", "model.lora.enabled=true"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = (
                raw  # not a YAML scalar: keep the text; the type check names the key if it is wrong
            )
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and k in out and not isinstance(out[k], dict):
            out[k] = {_SHORT: out[k]}  # a shorthand value, then keys of its section
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file with yaml.safe_load (no tags, so a config cannot execute code)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not valid UTF-8 (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """defaults <- YAML file <- overrides; raises ConfigError naming the key (and the file)."""
    tree = read_yaml(path) if path else {}
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return _build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def from_dict(cls: type, data: dict[str, Any]):
    """Rebuild a config saved with ``to_dict`` (validated the same way)."""
    return _build(cls, data)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def help_text(cls: type, prefix: str = "") -> str:
    """One line per knob: key, type, default, help (the config reference in the README comes from this)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(help_text(tp, key + "."))  # nested defaults shown from the class
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{key:<34} {_type_name(tp):<26} {default!r:<12} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def load_callable(spec: str, key: str) -> Any:
    """``'package.module:function'`` -> the callable a config value names (a reward function, a
    tool, an environment factory). ``key``: the config key that named it, for the error."""
    if ":" not in spec:
        raise ConfigError(f"{key}: {spec!r} is not of the form 'module:function'")
    mod, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {spec!r} ({e})") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return fn
