"""A trial's data as MLflow 3 datasets: one input per split, with MLflow's ``training`` / ``validation`` /
``test`` contexts, so the run page's *Datasets* panel and dataset filters show what each trial saw.

Built from the data lineage a trial logs as params (``DataSplits.lineage()``), so the journal writes them
for trials of fresh processes and replays alike. Metadata only (``MetaDataset``): the source is the folder
or the tfds name and split, the digest comes from the data fingerprint (file list, split and image size).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag

from tracking.layout import DATASET_CONTEXT, DATASET_CONTEXTS


class ImageDataSource(DatasetSource):
    """Where a split came from: a folder of class folders, or a tensorflow-datasets name and split."""

    def __init__(self, kind: str, location: str, split: str):
        self.kind, self.location, self.split = kind, location, split

    @staticmethod
    def _get_source_type() -> str:
        return "tlsweep_images"

    def load(self, **kwargs: Any) -> str:
        return self.location

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> "ImageDataSource":
        raise NotImplementedError

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.location, "split": self.split}

    @classmethod
    def from_dict(cls, source_dict: dict[str, str]) -> "ImageDataSource":
        return cls(source_dict["kind"], source_dict["location"], source_dict["split"])


def split_specs(source: str, split_spec: str) -> dict[str, str]:
    """Each split's own spec: tfds ``train[:75%],train[75%:90%],train[90%:]`` -> one slice each; a folder's
    ``75/15/10`` -> ``75%``, ``15%``, ``10%`` of its files (stratified, by seed); anything else as it is."""
    if source == "tfds":
        parts = [p.strip() for p in split_spec.split(",")]
    else:
        parts = [f"{p.strip()}%" if p.strip().replace(".", "").isdigit() else p.strip() for p in split_spec.split("/")]
    if len(parts) != len(DATASET_CONTEXTS):
        parts = [split_spec] * len(DATASET_CONTEXTS)
    return dict(zip(DATASET_CONTEXTS, parts))


def dataset_inputs(params: Mapping[str, str]) -> list[DatasetInput]:
    """The trial's three splits as MLflow dataset inputs (none when the lineage params are missing)."""
    if not params.get("data_fingerprint") or not params.get("data_name"):
        return []
    name, source, fingerprint = params["data_name"], params.get("data_source", ""), params["data_fingerprint"]
    sizes = {"training": params.get("train_size"), "validation": params.get("validation_size"),
             "test": params.get("test_size")}
    short = name.rstrip("/").rsplit("/", 1)[-1] or name
    inputs = []
    for context, spec in split_specs(source, params.get("split_spec", "")).items():
        digest = hashlib.sha256(f"{fingerprint}:{context}".encode()).hexdigest()[:16]
        dataset = MetaDataset(ImageDataSource(source, name, spec), name=f"{short}-{context}", digest=digest)
        meta = dataset._to_mlflow_entity()
        profile = {"num_images": int(sizes[context]) if str(sizes[context]).isdigit() else None,
                   "classes": params.get("class_names"), "fingerprint": fingerprint}
        entity = Dataset(name=meta.name, digest=meta.digest, source_type=meta.source_type, source=meta.source,
                         schema=meta.schema, profile=json.dumps(profile))
        inputs.append(DatasetInput(entity, tags=[InputTag(DATASET_CONTEXT, context)]))
    return inputs
