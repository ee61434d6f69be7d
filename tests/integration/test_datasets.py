"""A trial's splits as MLflow 3 datasets (tracking/datasets.py), written by the journal with the trial."""

from __future__ import annotations

import json

import mlflow

from tracking import layout
from tracking.datasets import dataset_inputs, split_specs


def lineage(folder: str = "/data/flowers", fingerprint: str = "abc123") -> dict[str, str]:
    return {"data_name": folder, "data_source": "folder", "split_spec": "75/15/10", "class_names": "['a', 'b']",
            "num_classes": "2", "train_size": "30", "validation_size": "6", "test_size": "4", "skipped_files": "0",
            "data_fingerprint": fingerprint}


def test_each_split_is_a_dataset_with_its_context_source_and_digest(tracking_store):
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("d")
    run = client.create_run(exp).info.run_id
    client.log_inputs(run, datasets=dataset_inputs(lineage()))
    client.set_terminated(run)
    inputs = client.get_run(run).inputs.dataset_inputs
    by_context = {t.value: d.dataset for d in inputs for t in d.tags if t.key == layout.DATASET_CONTEXT}
    assert set(by_context) == set(layout.DATASET_CONTEXTS)
    train = by_context["training"]
    assert train.name == "flowers-training"
    assert json.loads(train.source) == {"kind": "folder", "location": "/data/flowers", "split": "75%"}
    assert json.loads(train.profile)["num_images"] == 30
    assert len({d.digest for d in by_context.values()}) == 3, "each split its own digest"
    again = {d.dataset.digest for d in dataset_inputs(lineage())}
    other = {d.dataset.digest for d in dataset_inputs(lineage(fingerprint="changed"))}
    assert again == {d.digest for d in by_context.values()} and not again & other, "the digest follows the data"


def test_tfds_splits_and_runs_without_lineage():
    assert split_specs("tfds", "train[:75%],train[75%:90%],train[90%:]") == {
        "training": "train[:75%]", "validation": "train[75%:90%]", "test": "train[90%:]"}
    tfds = dataset_inputs({**lineage("tf_flowers"), "data_source": "tfds",
                           "split_spec": "train[:75%],train[75%:90%],train[90%:]"})
    assert json.loads(tfds[2].dataset.source) == {"kind": "tfds", "location": "tf_flowers", "split": "train[90%:]"}
    assert dataset_inputs({"backbone": "x"}) == []
