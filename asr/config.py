"""Frozen dataclass configs: defaults stated once, YAML files and ``key=value`` overrides on top.

An override may only name an existing field and must parse to that field's type; anything else is
an error. The resolved config is written into the stage's output directory so the directory says
how it was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from asr.io import atomic_write_text

__all__ = ["load_config", "apply_overrides", "config_to_dict", "config_yaml", "write_config", "config_hash",
           "add_config_args", "config_from_args", "resolve_config_args", "exit_if_print_config"]

C = TypeVar("C")


def _coerce(name: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(name, value, non_none[0])
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {name!r}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(name, v, inner) if inner is not Any and inner is not Ellipsis else v for v in value]
        return tuple(items) if origin is tuple else items
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"config field {name!r}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"config field {name!r}: expected {typ.__name__}, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"config field {name!r}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ValueError(f"config field {name!r}: expected int, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"config field {name!r}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_overrides(cfg: C, overrides: dict[str, Any]) -> C:
    """Return a copy of ``cfg`` with ``overrides`` applied; unknown keys raise ``KeyError``."""
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise KeyError(f"unknown config key(s) for {type(cfg).__name__}: {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(fields))}")
    changes = {k: _coerce(k, v, hints[k]) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **changes)


def parse_kv(items: list[str] | None) -> dict[str, str]:
    """Parse ``key=value`` strings from a command line."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build ``cls()`` defaults, apply a YAML file (if given), then ``overrides``."""
    cfg = cls()
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping, got {type(data).__name__}")
        try:
            cfg = apply_overrides(cfg, data)
        except (KeyError, ValueError) as e:
            raise type(e)(f"{path}: {e.args[0]}") from None
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_hash(cfg: Any) -> str:
    """A short hash of the resolved config: a stage reruns when its config changes."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML, fields in their declared order (as ``config.yaml`` holds it)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def write_config(cfg: Any, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    path = Path(directory) / name
    atomic_write_text(path, config_yaml(cfg))
    return path


def add_config_args(parser: "argparse.ArgumentParser") -> None:
    """The config options every step shares: ``--config FILE`` (optional: without it the step runs
    on its defaults), ``--set key=value`` and ``--print-config``."""
    parser.add_argument("--config", default=None, help="YAML file of config overrides (default: none)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="config override(s), applied after --config")
    add_print_config_arg(parser)


def add_print_config_arg(parser: "argparse.ArgumentParser") -> None:
    """``--print-config``, for a step that parses its own config options."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults + --config + --set) as YAML and exit")


def resolve_config_args(cls: type[C], args: "argparse.Namespace", **flags: Any) -> C:
    """A step's config from the options added by :func:`add_config_args`: defaults, then the
    ``--config`` file, then ``--set``, then ``flags``.

    ``flags`` are config fields that the command also offers as options of their own (``--seed``,
    ``--device``, ...); those given (not None) win over ``--set``.
    """
    overrides: dict[str, Any] = parse_kv(args.overrides)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(cls, args.config, overrides)


def exit_if_print_config(args: "argparse.Namespace", cfg: Any) -> None:
    """With ``--print-config``: write ``cfg`` as YAML to stdout and stop with status 0, as ``--help``
    does, before the step reads or writes anything."""
    if getattr(args, "print_config", False):
        sys.stdout.write(config_yaml(cfg))
        sys.stdout.flush()
        raise SystemExit(0)


def config_from_args(cls: type[C], args: "argparse.Namespace", **flags: Any) -> C:
    """:func:`resolve_config_args`, then :func:`exit_if_print_config`."""
    cfg = resolve_config_args(cls, args, **flags)
    exit_if_print_config(args, cfg)
    return cfg
