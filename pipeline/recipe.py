"""One recipe for "train one configuration": ``make train``, a sweep's trial and best-export all use it.

``plan(config)`` resolves a ``RunConfig`` once: the backbone spec, the image size, the first backbone
layer to unfreeze, whether the run fine-tunes. ``train_run(plan, data)`` chooses between a head on
cached frozen-backbone features and the full model, trains both phases and returns the outcome;
``full_model(plan, ...)`` assembles the classifier wherever one is needed (fine-tuning, export).
The checkpoint names and the rule "does this run need a fresh process" live here too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import keras

from pipeline import crossval, features, precision
from pipeline import weights as weights_file
from pipeline import cut as cuts
from pipeline.backbones import BackboneSpec, check_image_size, check_weights_file, get_spec
from pipeline.data import DataSplits, load_data
from pipeline.errors import UserError
from pipeline.export import load_keras_model
from pipeline.hparams import DEFAULTS, RunConfig, check
from pipeline.model import build_head, build_model, is_head, resolve_fine_tune_at
from pipeline.training import TrainResult, check_warmup, train

CHECKPOINT = "model.keras"  # a trained full classifier, with its optimizer (what Hyperband continues)
HEAD_CHECKPOINT = "head.keras"  # a head trained on cached features (a few KB)
WEIGHTS_CHECKPOINT = "weights.npz"  # a trained full classifier's weights (pipeline.weights), rebuilt by its recipe


class Diverged(UserError):
    """The loss became NaN or infinite: the configuration (usually the learning rate) must change."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """A ``RunConfig`` resolved against its backbone: everything decided before any data is touched."""

    config: RunConfig
    spec: BackboneSpec
    image_size: int
    unfreeze_from: int | None  # first backbone layer to unfreeze; None: head only
    fine_tune_epochs: int
    fine_tune_learning_rate: float
    precision: str = "float32"  # the Keras dtype policy, mixed_precision resolved on this process's device

    @property
    def fine_tunes(self) -> bool:
        return self.unfreeze_from is not None and self.fine_tune_epochs > 0

    def feature_key(self, data: DataSplits) -> str | None:
        """The frozen-feature cache key, or None when cached features cannot stand in (off, augmentation
        before the backbone, random weights no other run shares)."""
        if not self.config.feature_cache or self.config.augment:
            return None
        return features.key_for(self.spec, self.config.weights, self.image_size, data, self.precision)

    def architecture(self, num_classes: int) -> tuple[str, int, int, bool, str]:
        """What the classifier's cost (size, parameters, latency) depends on, its trained weights not: the key under
        which trials and the export helper measure it once (backbone, image size, classes, augmentation, and the
        dtype policy as resolved on this device)."""
        c = self.config
        return str(c.backbone), int(self.image_size), int(num_classes), bool(c.augment), self.precision


def plan(config: RunConfig) -> Plan:
    """Resolve ``config`` once; a configuration that cannot run is a ``UserError`` here, before any work."""
    config = check(config)
    spec = get_spec(config.backbone)
    if config.weights not in ("imagenet", "none", "") and not spec.is_ensemble:  # a weights file is one, before work
        check_weights_file(config.weights, config.backbone)
    image_size = int(config.image_size or 0) or spec.native_size
    check_image_size(spec, image_size)
    if config.cv_folds:
        crossval.check_folds(config.cv_folds, max(int(config.cv_folds), 2))
    unfreeze_from = resolve_fine_tune_at(config.fine_tune_at, spec) if config.fine_tune else None
    fine_tune_epochs = int(config.fine_tune_epochs or 0) if config.fine_tune else 0
    if spec.is_ensemble and unfreeze_from is not None and fine_tune_epochs > 0:
        raise UserError(f"backbone {spec.name!r} is an ensemble: it trains its head only and does not fine-tune; "
                        "set fine_tune: false in the sweep's space (train: --fine-tune-at none)")
    if unfreeze_from is not None:
        check_warmup(float(config.warmup_epochs or 0), fine_tune_epochs)
    lr = config.fine_tune_learning_rate
    return Plan(config, spec, image_size, unfreeze_from, fine_tune_epochs,
                float(lr if lr is not None else DEFAULTS["fine_tune_learning_rate"]),
                precision.policy_for(config.mixed_precision))


def load_data_for(plan: Plan, dataset: str, split: str | None, cache: dict[int, DataSplits] | None = None,
                  data_dir: str | None = None, decode: bool = True) -> DataSplits:
    """The data set at the plan's image size, decoded once per process (``cache``: image size -> data).
    ``decode=False``: only mapped from the image cache, else ``pipeline.data.NotDecoded``."""
    cache = {} if cache is None else cache
    if plan.image_size not in cache:
        cache[plan.image_size] = load_data(dataset, plan.image_size, seed=plan.config.seed, split=split,
                                           data_dir=data_dir, decode=decode)
    return cache[plan.image_size]


@dataclasses.dataclass
class Outcome:
    result: TrainResult
    model: keras.Model  # the full classifier, or the head alone when it trained on cached features
    data: DataSplits
    plan: Plan
    trained_at: float  # perf_counter() when training and evaluation ended
    cv: crossval.CVResult | None = None  # k-fold cross-validation of a head on cached features (cv_folds)


def train_run(
    plan: Plan,
    data: DataSplits,
    *,
    verbose: int | str = 2,
    previous: str | None = None,
    start_from: str | None = None,
    initial_epoch: int = 0,
    stop_epoch: int | None = None,
    checkpoint_dir: str | Path | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> Outcome:
    """Train one configuration: a head on cached features when that is all it trains, else the full model.

    ``previous``: a Hyperband promotion continues that checkpoint from ``initial_epoch``;
    ``start_from``: a staged search's stage 2 fine-tunes that stage-1 checkpoint's trained head;
    ``checkpoint_dir``: keep the trained model there (``checkpoint_name``).
    """
    config = plan.config
    keras.utils.set_random_seed(config.seed)
    key = plan.feature_key(data)
    cached, feature_seconds = (features.load(key) if key else None), 0.0
    if previous:  # Hyperband promotion: continue the earlier trial's model where it stopped
        model = load_keras_model(previous)
    elif start_from:  # staged search, stage 2: fine-tune the stage-1 trial's trained head
        model = full_model(plan, data.num_classes, load_keras_model(start_from))
        initial_epoch = int(config.epochs)
    elif cached is not None and not plan.fine_tunes:
        # Head only, on cached features: the full model is built only if something needs it (export).
        model = build_head(cached["train"][0].shape[1], data.num_classes, float(config.dropout), seed=config.seed,
                           precision=plan.precision)
    else:
        model = full_model(plan, data.num_classes)
    at_cut, cut_seconds = None, 0.0
    if key and plan.fine_tunes and (stop_epoch is None or stop_epoch > int(config.epochs)) and not is_head(model):
        # Fine-tune only the top on cached activations at the cut (pipeline/cut.py): the same model.
        split = cuts.split(model, plan.unfreeze_from)
        if split is not None:
            activations, cut_seconds = cuts.load_or_compute(split, data, split.key(key))
            at_cut = (split, activations)
            if cached is None:  # the pooled features from the activations: one pass over the images for both
                start = time.perf_counter()
                cached = cuts.pooled_features(split, activations)
                features.save(key, cached)
                feature_seconds = time.perf_counter() - start
    if key and cached is None and not is_head(model):
        cached, feature_seconds = features.load_or_compute(model, data, key)
    result = train(
        model, data, features=cached, epochs=int(config.epochs), fine_tune_epochs=plan.fine_tune_epochs,
        unfreeze_from=plan.unfreeze_from, learning_rate=float(config.learning_rate),
        fine_tune_learning_rate=plan.fine_tune_learning_rate, batch_size=int(config.batch_size), seed=config.seed,
        verbose=verbose, initial_epoch=initial_epoch, stop_epoch=stop_epoch, jit_compile=config.xla,
        callbacks=callbacks, early_stopping_patience=int(config.early_stopping_patience or 0), cut=at_cut,
        label_smoothing=float(config.label_smoothing), weight_decay=float(config.weight_decay),
        fine_tune_schedule=config.fine_tune_schedule or "constant", warmup_epochs=float(config.warmup_epochs or 0),
    )
    if any(math.isnan(v) or math.isinf(v) for k in ("loss", "val_loss") for v in result.history.get(k, [])):
        raise Diverged("loss became NaN/inf; lower the learning rate")
    if checkpoint_dir is not None:
        (Path(checkpoint_dir) / WEIGHTS_CHECKPOINT).unlink(missing_ok=True)  # checkpoint_in would prefer it
        model.save(Path(checkpoint_dir) / checkpoint_name(model))
    result.feature_seconds = feature_seconds
    result.cut_seconds = cut_seconds
    cv = None
    if cached is not None and not previous and not start_from:  # the head epochs the run kept (early stopping)
        cv = cross_validate(plan, data, cached, epochs=len(result.history["loss"]))
    return Outcome(result, model, data, plan, time.perf_counter(), cv)


def cross_validate(plan: Plan, data: DataSplits, cached: dict | None, epochs: int | None = None,
                   ) -> crossval.CVResult | None:
    """k-fold cross-validation (``cv_folds``) of the plan's head on cached features over train+validation; None
    when off or when the run is not a head on cached features (a fine-tuning run is scored on validation only)."""
    config = plan.config
    if not config.cv_folds or cached is None or plan.fine_tunes:
        return None
    return crossval.cross_validate(cached, data.num_classes, folds=int(config.cv_folds),
                                   epochs=int(epochs or config.epochs),
                                   learning_rate=float(config.learning_rate), dropout=float(config.dropout),
                                   batch_size=int(config.batch_size), seed=config.seed,
                                   label_smoothing=float(config.label_smoothing),
                                   weight_decay=float(config.weight_decay))


def full_model(plan: Plan, num_classes: int, trained: keras.Model | None = None) -> keras.Model:
    """The plan's full classifier; given a trained head it takes the head's weights, a full model is kept as is."""
    if trained is not None and not is_head(trained):
        return trained
    config = plan.config
    return build_model(
        config.backbone, num_classes, plan.image_size, dropout=float(config.dropout), augment=bool(config.augment),
        weights=config.weights, seed=config.seed, precision=plan.precision, head=trained,
    )


def checkpoint_name(model: keras.Model) -> str:
    return HEAD_CHECKPOINT if is_head(model) else CHECKPOINT


def checkpoint_in(folder: str | Path) -> Path:
    """The checkpoint a run kept in ``folder``: the head alone, the full model's weights, or the full model."""
    for name in (HEAD_CHECKPOINT, WEIGHTS_CHECKPOINT):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return Path(folder) / CHECKPOINT


def keep_checkpoint(model: keras.Model, folder: str | Path, kept_by_run: bool = False) -> Path:
    """The checkpoint of a trained model in ``folder`` for readers that rebuild it (``load_checkpoint``): the ``.keras``
    this run kept there (``kept_by_run``: ``train_run``'s ``checkpoint_dir``), else a head's ``.keras`` or a full
    model's weights, written afresh (an earlier attempt of the trial in the same folder may have left another)."""
    if kept_by_run:
        return Path(folder) / checkpoint_name(model)
    for name in (HEAD_CHECKPOINT, WEIGHTS_CHECKPOINT, CHECKPOINT):
        (Path(folder) / name).unlink(missing_ok=True)
    if is_head(model):
        kept, partial = Path(folder) / HEAD_CHECKPOINT, Path(folder) / f".{HEAD_CHECKPOINT}.partial.keras"
        model.save(partial)
    else:
        kept, partial = Path(folder) / WEIGHTS_CHECKPOINT, Path(folder) / f".{WEIGHTS_CHECKPOINT}.partial"
        weights_file.save(model, partial)
    partial.replace(kept)  # a reader never sees half a file
    return kept


def load_checkpoint(plan: Plan, num_classes: int, path: str | Path) -> keras.Model:
    """The full classifier from a checkpoint (``checkpoint_in``): a ``.keras`` archive as saved, a head put on the
    plan's classifier, or the plan's classifier given the weights (``pipeline.weights``: built without pretrained
    weights, which the checkpoint replaces, so that no download or weights file is needed again)."""
    if Path(path).name == WEIGHTS_CHECKPOINT:
        bare = dataclasses.replace(plan, config=dataclasses.replace(plan.config, weights="none"))
        return weights_file.load_into(full_model(bare, num_classes), path)
    return full_model(plan, num_classes, load_keras_model(path))


def trains_network(plan: Plan, data: Callable[[], DataSplits], previous: str | None = None,
                   start_from: str | None = None) -> bool:
    """Whether the run runs the whole network: it fine-tunes, augments, continues a full model, or its frozen
    features are not cached yet. Otherwise it trains a head of a few KB on cached features (exporting it builds
    the network once: ~6 MB kept per run, measured, against ~60 MB for fine-tuning). Such runs are the ones a
    sweep starts in a fresh process. ``data`` is called only when the answer depends on the cache."""
    if start_from or plan.fine_tunes or plan.config.augment or not plan.config.feature_cache:
        return True
    if previous:
        return Path(previous).name != HEAD_CHECKPOINT
    key = plan.feature_key(data())
    return key is None or not features.is_cached(key)
