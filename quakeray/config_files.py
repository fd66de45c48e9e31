"""Experiment files: YAML read into nested mappings, one file able to extend another.

A file may start with ``extends: other.yaml`` (a path relative to the file itself): the
other file is read first (it may extend a third) and this file's sections are merged
over it key by key, so a variant of a preset states only what it changes::

    # experiments/paper/improved/mobilenetv3.yaml
    extends: ../mobilenetv3.yaml
    model:
      standardize_target: true   # everything else is the paper's

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "base.yaml").write_text("optim: {epochs: 10, lr: 0.001}")
    >>> _ = (d / "more.yaml").write_text("{extends: base.yaml, optim: {epochs: 30}}")
    >>> read_yaml(d / "more.yaml")
    {'optim': {'epochs': 30, 'lr': 0.001}}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from quakeray.errors import ConfigError

__all__ = ["EXTENDS_KEY", "merge", "read_yaml"]

EXTENDS_KEY = "extends"
"""The top-level key naming the file a file builds on."""


def read_yaml(path: Path) -> dict[str, Any]:
    """The file's mapping of sections, with the files it extends merged beneath it.

    Raises:
        ConfigError: A missing file, invalid YAML, a top level that is no mapping, or a
            chain of ``extends`` that comes back to a file already in it.
    """
    return _read(Path(path), chain=())


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            out[key] = merge(below, value)
        else:
            out[key] = value
    return out


def _read(path: Path, *, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(
            f"config file not found: {path}{where}; pass an existing YAML file with -c"
        )
    loaded = _load(path)
    parent = loaded.pop(EXTENDS_KEY, None)
    if parent is None:
        return loaded
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: {EXTENDS_KEY} must be a path to another YAML file")
    base_path = (path.parent / parent).resolve()
    seen = (*chain, path.resolve())
    if base_path in seen:
        raise ConfigError(
            f"{path}: {EXTENDS_KEY}: {parent} comes back to a file already extended "
            f"({' -> '.join(p.name for p in seen)}); break the cycle"
        )
    return merge(_read(base_path, chain=seen), loaded)


def _load(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML; fix the syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections, not {type(loaded).__name__}"
        )
    return loaded
