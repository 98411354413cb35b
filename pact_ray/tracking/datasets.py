"""The data set of a run as an MLflow dataset input (name, digest, source), so the runs
table's Dataset column says what each run trained and validated on."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # MLflow takes 1.2 s to import: describing a data set must not wait for it
    from mlflow.tracking import MlflowClient

DESCRIPTORS = ("dataset.json", "meta/info.json")  # the PAct object format's and LeRobot's descriptor files


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    digest: str
    source: str  # the folder (path or URI)


def describe_dataset(folder: str | os.PathLike) -> DatasetInfo:
    """Name (the folder's), digest and source of a data set folder. The digest hashes the
    descriptor file's bytes and every file's relative path and size: cheap on large data,
    and it changes when a sample is added, removed or rewritten with another size."""
    root = Path(folder)
    h = hashlib.sha256()
    for name in DESCRIPTORS:
        if (root / name).is_file():
            h.update((root / name).read_bytes())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return DatasetInfo(name=root.name, digest=h.hexdigest()[:8], source=str(root.resolve()))


def log_dataset(client: MlflowClient, run_id: str, info: DatasetInfo, context: str = "training") -> None:
    """Record ``info`` as the run's dataset input (MLflow's ``log_inputs``)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # MLflow warns that a local path matches two (equal) source kinds
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(info.source)
    dataset = MetaDataset(source=source, name=info.name, digest=info.digest)._to_mlflow_entity()
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
