"""The QuakeSet data layer: dataset, transforms, synthetic files, download, inspect, prepare.

Heavy submodules are imported on first use of a name, so ``import quakeray.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SPLITS": "quakeray.data.quakeset",
    "QuakeSetDataset": "quakeray.data.quakeset",
    "collate": "quakeray.data.quakeset",
    "ChannelStats": "quakeray.data.transforms",
    "BatchTransform": "quakeray.data.transforms",
    "build_transform": "quakeray.data.transforms",
    "compute_stats": "quakeray.data.transforms",
    "default_stats_path": "quakeray.data.transforms",
    "write_synthetic": "quakeray.data.synthetic",
    "QUAKESET_URL": "quakeray.data.download",
    "QUAKESET_MD5": "quakeray.data.download",
    "inspect_file": "quakeray.data.inspect",
    "InspectReport": "quakeray.data.inspect",
    "PreparedData": "quakeray.data.prepare",
    "prepare_data": "quakeray.data.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quakeray.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
