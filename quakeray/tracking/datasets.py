"""The data a run used, as MLflow datasets: the "Dataset" column and a run's inputs.

One QuakeSet file serves every split; each split a run used is its own dataset
(``earthquakes/train``: MLflow keeps one input per dataset and run, so one dataset with
three context tags would show one), with MLflow's context tag (``train``, ``validation``,
``test``) and the file as its source. The digest identifies the file's content without
reading all of a 9 GB file: SHA-256 over its size and its first and last MiB (and the
split), 16 hex digits.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence

from quakeray import storage
from quakeray.compat import mlflow_dataset_entity
from quakeray.tracking.store import mlflow_client

__all__ = ["CONTEXT_TAG", "file_digest", "log_dataset"]

CONTEXT_TAG = "mlflow.data.context"
_EDGE = 1 << 20


def file_digest(path: str) -> str | None:
    """A content digest of a local file (size, first and last MiB); None when not local."""
    if not storage.on_local_disk(path):
        return None
    local = storage.local_path(path)
    try:
        size = local.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with local.open("rb") as f:
            h.update(f.read(_EDGE))
            if size > _EDGE:
                f.seek(max(_EDGE, size - _EDGE), os.SEEK_SET)
                h.update(f.read(_EDGE))
    except OSError:
        return None
    return h.hexdigest()[:16]


def log_dataset(uri: str, run_id: str, path: str, contexts: Sequence[str]) -> None:
    """Log the splits ``contexts`` of the data file ``path`` as the run's inputs."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(storage.resolve(path))
    stem = storage.name(path).split(".")[0] or "quakeset"
    digest = file_digest(path) or ""
    inputs = []
    for context in contexts:
        split_digest = hashlib.sha256(f"{digest}/{context}".encode()).hexdigest()[:16]
        name = f"{stem}/{context}"
        dataset = MetaDataset(source, name=name, digest=split_digest)  # type: ignore[abstract]
        tags = [InputTag(CONTEXT_TAG, context)]
        inputs.append(DatasetInput(mlflow_dataset_entity(dataset), tags=tags))
    mlflow_client(uri).log_inputs(run_id, datasets=inputs)
