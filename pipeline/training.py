"""Two-phase training: a head on the frozen backbone, then fine-tuning from ``fine_tune_at``.

Both phases form one history on one epoch axis: phase 2 continues from ``initial_epoch``.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Callable, Iterable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.cut import Activations, Cut, top_trainer
from pipeline.data import DataSplits
from pipeline.errors import UserError
from pipeline.features import feature_batches
from pipeline.features import head as feature_head
from pipeline.hparams import RunConfig, check
from pipeline.model import backbone_of, compile_model, is_head, set_trainable, trainable_params

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclasses.dataclass
class TrainResult:
    history: dict[str, list[float]]  # METRICS, one value per epoch over both phases
    fine_tune_start: int | None  # first epoch index of phase 2, None when head only
    head_seconds: float
    fine_tune_seconds: float
    trainable_params: int
    test_loss: float | None = None
    test_accuracy: float | None = None
    head_test_accuracy: float | None = None  # test accuracy before fine-tuning (measured, never used to choose)
    first_epoch: int = 0  # epoch index of history[...][0] (non-zero when a slice was trained)
    feature_seconds: float = 0.0  # spent computing frozen-backbone features (0 when cached or unused)
    cut_seconds: float = 0.0  # spent computing activations at the fine-tuning cut (0 when cached or unused)
    eval_seconds: float = 0.0  # in evaluation steps: the test score before fine-tuning and the test predictions
    trace_seconds: float = 0.0  # of head/fine_tune seconds: first steps beyond a typical one (tracing; estimate)
    eval_trace_seconds: float = 0.0  # the same, of eval_seconds
    step_seconds: float = 0.0  # in the steps themselves (every batch of fit, evaluate, predict; first ones included)
    cut_index: int | None = None  # first backbone layer of the top that fine-tuned on cached activations
    features: dict | None = dataclasses.field(default=None, repr=False)  # the cached features used, if any
    # (labels, probabilities) on the test split, from the pass that gave test_loss and test_accuracy
    test_predictions: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(default=None, repr=False)
    # the same on the validation split, from the final model (what a sweep's ensemble is chosen on)
    val_predictions: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    @property
    def val_accuracy(self) -> float:
        """Validation accuracy of the final model (last epoch)."""
        return float(self.history["val_accuracy"][-1])

    @property
    def used_feature_cache(self) -> bool:
        return self.features is not None


def check_warmup(warmup_epochs: float, fine_tune_epochs: float) -> None:
    """A warmup is the start of the fine-tuning phase: it must end inside it (checked where the run fine-tunes)."""
    if fine_tune_epochs and warmup_epochs >= fine_tune_epochs:
        raise UserError(f"warmup_epochs {warmup_epochs:g} must be fewer than fine_tune_epochs {fine_tune_epochs:g}: "
                        "the warmup is the start of the fine-tuning phase; lower warmup_epochs or fine-tune longer")


def fine_tune_rate(learning_rate: float, schedule: str, warmup_epochs: float, epochs: int, steps_per_epoch: int,
                   ) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The fine-tuning learning rate: ``learning_rate`` as it is (constant, no warmup: the plain recipe), or a schedule
    over the phase's ``epochs * steps_per_epoch`` steps: a linear rise from 0 over ``warmup_epochs``, then constant or a
    cosine down to 0 (Keras's ``CosineDecay``; ``alpha`` 1 keeps it constant). The schedule reads the optimizer's step
    count, which starts at 0 when the phase compiles and is saved in a checkpoint with the optimizer: a Hyperband
    slice that continues the phase continues its schedule, on every path (images, top at the cut) alike."""
    if schedule == "constant" and not warmup_epochs:
        return learning_rate
    warmup = max(1, round(warmup_epochs * steps_per_epoch)) if warmup_epochs else 0
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else learning_rate, max(epochs * steps_per_epoch - warmup, 1),
        alpha=1.0 if schedule == "constant" else 0.0, warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup)


def train(
    model: keras.Model,
    data: DataSplits,
    *,
    epochs: int = 10,
    fine_tune_epochs: int = 5,
    unfreeze_from: int | None = None,
    learning_rate: float = 1e-3,
    fine_tune_learning_rate: float = 1e-5,
    batch_size: int = 32,
    seed: int = 42,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = 2,
    evaluate_test: bool = True,
    initial_epoch: int = 0,
    stop_epoch: int | None = None,
    features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    jit_compile: bool = False,
    early_stopping_patience: int = 0,
    cut: tuple[Cut, Activations] | None = None,
    label_smoothing: float = 0.0,
    weight_decay: float = 0.0,
    fine_tune_schedule: str = "constant",
    warmup_epochs: float = 0,
) -> TrainResult:
    """Train the head with the backbone frozen, then fine-tune from ``unfreeze_from`` (if not None).

    Epochs ``[0, epochs)`` are the head phase and ``[epochs, epochs + fine_tune_epochs)`` the
    fine-tuning phase, on one axis. ``initial_epoch``/``stop_epoch`` run only a slice of it (as
    Hyperband does): a phase that starts inside the slice freezes/unfreezes and recompiles; a
    slice that starts in the middle of a phase continues the model as given, so pass the model
    reloaded from the previous slice (it keeps its trainable flags and optimizer state).

    ``features`` (from ``pipeline.features.load_or_compute``) trains the head phase on cached
    frozen-backbone features instead of images: the same model, without running the backbone.
    ``jit_compile`` compiles training steps with XLA (for GPUs; off by default).

    ``early_stopping_patience`` > 0 stops the head phase once ``val_loss`` has not improved for that many
    epochs and keeps the weights of its best epoch; the history then ends at that epoch and fine-tuning
    continues from the next one (only when the whole axis is trained, not a Hyperband slice).

    ``cut`` (``pipeline.cut.split`` at ``unfreeze_from`` and its cached activations) fine-tunes only the
    top on the activations at the cut: the same variables, losses and weights, without running the
    frozen bottom each step; validation and test go through the top too.

    ``model`` may also be a head alone (``pipeline.model.build_head``): it then trains and is
    evaluated on ``features`` only, head phase only; ``build_model(..., head=head)`` puts it on
    the full model.

    ``label_smoothing`` and ``weight_decay`` (AdamW) apply to both phases, ``fine_tune_schedule`` and
    ``warmup_epochs`` to the fine-tuning learning rate (``fine_tune_rate``); every path above (images, cached
    features, the top at the cut, a head alone) trains the same loss and optimizer, as they share the classifier's.
    """
    check(RunConfig(epochs=epochs, fine_tune_epochs=fine_tune_epochs, learning_rate=learning_rate, batch_size=batch_size,
                    fine_tune_learning_rate=fine_tune_learning_rate, early_stopping_patience=early_stopping_patience,
                    label_smoothing=label_smoothing, weight_decay=weight_decay, fine_tune_schedule=fine_tune_schedule,
                    warmup_epochs=warmup_epochs))
    if unfreeze_from is not None:
        check_warmup(warmup_epochs, fine_tune_epochs)
    fine_tunes = unfreeze_from is not None and fine_tune_epochs > 0
    knobs = dict(jit_compile=jit_compile, label_smoothing=label_smoothing, weight_decay=weight_decay)
    if is_head(model) and (features is None or fine_tunes):
        raise ValueError("a head alone trains on cached features and cannot fine-tune; "
                         "build the full model (build_model(..., head=head)) to fine-tune")
    total = epochs + (fine_tune_epochs if fine_tunes else 0)
    stop = total if stop_epoch is None else min(stop_epoch, total)
    nets: dict[str, keras.Model] = {}  # what each phase trained (its traced functions are reused)
    scored: dict[int, Scored] = {}  # epoch -> the net that validated it, the labels and probabilities

    def frozen_scorer() -> keras.Model:
        """What scores the classifier while its backbone is frozen: the head that trained on cached features (its
        inference function traced by validation), a head on them, or the model itself on images."""
        return nets["head"] if "head" in nets else model if features is None or is_head(model) else feature_head(model)

    def inputs(net: keras.Model, split: str) -> Iterable[tuple[object, np.ndarray]]:
        """Unshuffled batches of ``split`` for ``net``: the cached activations at the cut for the top, cached features
        for a head, else images (each call makes its own pipeline, as each phase makes its own training one)."""
        if cut is not None and net is cut[0].top:
            return array_batches(cut[1][split], batch_size)
        if net is model and not is_head(model):
            return data.batches(split, batch_size)
        return array_batches(features[split], batch_size)
    merged: dict[str, list[float]] = {k: [] for k in METRICS}
    seconds = {"head": 0.0, "fine_tune": 0.0, "eval": 0.0, "trace": 0.0, "trace_eval": 0.0, "steps": 0.0}
    head_test_accuracy = None
    stopped = []  # a callback stopped training (pruning): the run ends there, no further phase
    stopper = None
    if early_stopping_patience and initial_epoch == 0 and stop_epoch is None:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(early_stopping_patience),
                                                restore_best_weights=True)

    def run(phase: str, first: int, last: int, phase_start: int = 0) -> None:
        start = time.perf_counter()
        for callback in callbacks:  # e.g. pruning compares fine-tuning epochs by their index in the phase
            if hasattr(callback, "on_phase_begin"):
                callback.on_phase_begin(phase, phase_start)
        net, train_in = model, None
        if phase == "head" and features is not None:
            net = model if is_head(model) else head_on_features(model)
            train_in = feature_batches(features["train"], batch_size, shuffle=True, seed=seed)
        elif phase == "fine_tune" and cut is not None:
            net = top_trainer(cut[0], model)  # the classifier's own layers and optimizer
            train_in = feature_batches(cut[1]["train"], batch_size, shuffle=True, seed=seed)
        else:
            train_in = data.batches("train", batch_size, shuffle=True, seed=seed)
        stopping = [stopper] if stopper is not None and phase == "head" else []
        nets[phase] = net
        build_optimizer(net)
        tracer = StepTimer()
        validating = Validation(net, lambda: inputs(net, "validation"), tracer, scored)  # first: the others read its logs
        history = net.fit(
            train_in, initial_epoch=first, epochs=last, callbacks=[validating, *callbacks, *stopping, tracer],
            verbose=verbose, shuffle=False,  # the pipeline shuffles, seeded
        )
        seconds[phase] += time.perf_counter() - start
        seconds["trace"] += tracer.extra()
        seconds["steps"] += tracer.total
        if getattr(net, "stop_training", False) and not (stopping and stopper.stopped_epoch):
            stopped.append(phase)  # stopped by a callback (pruning), not by early stopping
        kept = stopper.best_epoch - first + 1 if stopping else None  # the epochs up to the weights kept
        for k in METRICS:
            merged[k] += list(map(float, history.history.get(k, [])))[:kept]

    if initial_epoch < min(epochs, stop):
        if initial_epoch == 0 or not _compiled(model):
            if not is_head(model):
                set_trainable(model, None)
            compile_model(model, learning_rate, **knobs)
        run("head", initial_epoch, min(epochs, stop))
    fine_tune_start = epochs
    if stopper is not None:  # the head phase may have stopped early: fine-tuning follows its kept epochs
        fine_tune_start = len(merged["loss"])
        stop = fine_tune_start + (fine_tune_epochs if fine_tunes else 0)
    if fine_tunes and max(initial_epoch, fine_tune_start) < stop and not stopped:
        if initial_epoch <= fine_tune_start or not _compiled(model):
            if evaluate_test:
                evaluating = time.perf_counter()
                tracer = StepTimer()
                head = frozen_scorer()
                head_test_accuracy = loss_and_accuracy(*predict_batches(head, inputs(head, "test"), tracer))[1]
                seconds["eval"] = time.perf_counter() - evaluating
                seconds["trace_eval"] = tracer.extra()
                seconds["steps"] += tracer.total
            set_trainable(model, unfreeze_from)
            rate = fine_tune_rate(fine_tune_learning_rate, fine_tune_schedule, warmup_epochs, fine_tune_epochs,
                                  -(-data.sizes["train"] // batch_size))
            compile_model(model, rate, **knobs)  # recompile after `trainable`
        run("fine_tune", max(initial_epoch, fine_tune_start), stop, fine_tune_start)

    result = TrainResult(
        merged, fine_tune_start if fine_tunes and stop > fine_tune_start and "head" not in stopped else None,
        seconds["head"], seconds["fine_tune"], trainable_params(model), first_epoch=initial_epoch, features=features,
        cut_index=cut[0].index if cut is not None else None, trace_seconds=seconds["trace"],
        step_seconds=seconds["steps"],
    )
    if evaluate_test:  # one pass over the test split gives the scores and the predictions (confusion matrix)
        evaluating, tracer = time.perf_counter(), StepTimer()
        if cut is not None and backbone_trainable(model):
            net = cut[0].top
        elif features is not None and not backbone_trainable(model):
            net = frozen_scorer()
        else:
            net = model
        result.test_predictions = predict_batches(net, inputs(net, "test"), tracer)
        # The model is the one the last kept epoch validated (early stopping restores that epoch's weights): its
        # validation probabilities are already known (for ensembles), no second pass over the split.
        kept = initial_epoch + len(merged["loss"]) - 1
        result.val_predictions = (scored[kept][1:] if kept in scored and scored[kept][0] is net
                                  else predict_batches(net, inputs(net, "validation"), tracer))
        result.test_loss, result.test_accuracy = loss_and_accuracy(*result.test_predictions)
        result.head_test_accuracy = result.test_accuracy if head_test_accuracy is None else head_test_accuracy
        result.eval_seconds = seconds["eval"] + time.perf_counter() - evaluating
        result.eval_trace_seconds = seconds["trace_eval"] + tracer.extra()
        result.step_seconds += tracer.total
    return result


class StepTimer(keras.callbacks.Callback):
    """Times the training, validation and prediction steps of one ``fit``/``evaluate``/``predict``: ``total`` is
    the time in steps (what a trial's fixed cost is measured against: everything else in its wall time is fixed),
    and the first step's excess over the second is mostly tracing the step function (Keras traces on the first
    call), which ``extra()`` gives."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[str, list[float]] = {"train": [], "test": [], "predict": []}
        self.total = 0.0
        self._began = 0.0

    def _begin(self, kind: str) -> None:
        self._began = time.perf_counter()

    def _end(self, kind: str) -> None:
        self.record(kind, time.perf_counter() - self._began)

    def record(self, kind: str, seconds: float) -> None:
        """One step of ``kind`` (``train``, ``test`` or ``predict``) that took ``seconds``."""
        self.total += seconds
        if len(self.steps[kind]) < 2:
            self.steps[kind].append(seconds)

    def on_train_batch_begin(self, batch, logs=None):  # noqa: D102
        self._begin("train")

    def on_train_batch_end(self, batch, logs=None):  # noqa: D102
        self._end("train")

    def on_test_batch_begin(self, batch, logs=None):  # noqa: D102
        self._begin("test")

    def on_test_batch_end(self, batch, logs=None):  # noqa: D102
        self._end("test")

    def on_predict_batch_begin(self, batch, logs=None):  # noqa: D102
        self._begin("predict")

    def on_predict_batch_end(self, batch, logs=None):  # noqa: D102
        self._end("predict")

    def extra(self) -> float:
        """Seconds of the first steps beyond the second ones (0 when a kind ran a single step)."""
        return sum(max(0.0, s[0] - s[1]) for s in self.steps.values() if len(s) == 2)


Scored = tuple[keras.Model, np.ndarray, np.ndarray]  # the net that scored an epoch, labels, probabilities


class Validation(keras.callbacks.Callback):
    """Scores each epoch on the validation split through the model's inference function (``predict_batches``) and
    puts ``val_loss`` and ``val_accuracy`` into the epoch's logs, as ``fit``'s own validation does (the same
    cross-entropy and accuracy; callbacks after it, and the history, read them; ``on_train_end``'s logs do not have
    them). Why not ``validation_data``: it traces a test step of its own for every model, and the test predictions
    then trace the inference step anyway; this way one traced function serves both. It keeps each epoch's scoring
    in ``scored``: the net, the labels and the probabilities."""

    def __init__(self, net: keras.Model, batches: Callable[[], Iterable[tuple[object, object]]],
                 tracer: "StepTimer | None", scored: dict[int, "Scored"]) -> None:
        super().__init__()
        self.net, self.batches, self.tracer, self.scored = net, batches, tracer, scored

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        labels, probs = predict_batches(self.net, self.batches(), self.tracer, kind="test")
        self.scored[epoch] = (self.net, labels, probs)
        if logs is not None:
            logs["val_loss"], logs["val_accuracy"] = loss_and_accuracy(labels, probs)


_INFERENCE: "weakref.WeakKeyDictionary[keras.Model, Callable]" = weakref.WeakKeyDictionary()


def inference(net: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """``net(x, training=False)`` as one function traced once for every batch size (one per model, kept while the
    model lives). Keras's ``predict`` traces its step for the first batch's shape and again for a last, smaller
    batch (``reduce_retracing``); this one is traced with the batch dimension unknown from the start. With XLA
    (the model compiled with ``jit_compile=True`` when first asked) each new batch shape is still compiled."""
    step = _INFERENCE.get(net)
    if step is None:
        ref = weakref.ref(net)  # the traced graph holds the variables, never the model (the cache stays weak)
        spec = tf.TensorSpec([None, *net.inputs[0].shape[1:]], net.inputs[0].dtype)
        step = tf.function(lambda x: ref()(x, training=False), input_signature=[spec], autograph=False,
                           jit_compile=getattr(net, "jit_compile", False) is True)
        _INFERENCE[net] = step
    return step


def array_batches(arrays: tuple[np.ndarray, np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Unshuffled batches of in-memory (or memory-mapped) features or activations and their labels, sliced in order:
    for scoring, where a tf.data pipeline per pass would only add its start-up."""
    x, y = arrays
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def predict_batches(net: keras.Model, batches: Iterable[tuple[object, object]], tracer: "StepTimer | None" = None,
                    kind: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted probabilities over ``(x, y)`` batches, through ``inference(net)``. ``tracer`` times each
    step as ``kind`` (``test`` for validation), its input's wait included as in Keras's own loops."""
    step = inference(net)
    dtype = step.input_signature[0].dtype
    labels, probs = [], []
    batches = iter(batches)
    while True:
        began = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        probs.append(np.asarray(step(tf.cast(x, dtype))))
        labels.append(np.asarray(y))
        if tracer is not None:
            tracer.record(kind, time.perf_counter() - began)
    if not labels:
        return np.zeros((0,), np.int32), np.zeros((0, int(net.outputs[0].shape[-1])), np.float32)
    return np.concatenate(labels), np.concatenate(probs)


def loss_and_accuracy(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """``(loss, accuracy)`` from predicted probabilities, as ``model.evaluate`` reports them (NaN when empty)."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = keras.losses.sparse_categorical_crossentropy(labels, probs.astype(np.float32))
    return float(np.mean(keras.ops.convert_to_numpy(loss))), float(np.mean(probs.argmax(axis=1) == labels))


def build_optimizer(net: keras.Model) -> None:
    """Create the optimizer's variables before ``fit`` traces the train step, as Keras does itself under a
    distribution strategy. Without one, Keras creates them inside the first trace, and a ``tf.function`` that
    creates variables on its first call is traced a second time without them: measured 1.0 to 1.2 s more for
    the first training step of the top at the cut (``benchmarks/bench_trace.py``). The variables are the
    same (zeros, a step counter) either way; an optimizer already built (a continued slice) is left as it is."""
    optimizer = getattr(net, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(net.trainable_variables)


def _compiled(model: keras.Model) -> bool:
    return getattr(model, "optimizer", None) is not None


def head_on_features(model: keras.Model) -> keras.Model:
    """The classifier's head, compiled with the classifier's own optimizer (its state carries over)."""
    net = feature_head(model)
    net.compile(optimizer=model.optimizer, loss=model.loss,
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return net


def backbone_trainable(model: keras.Model) -> bool:
    return not is_head(model) and bool(backbone_of(model).trainable_weights)


def evaluate(model: keras.Model, data: DataSplits, split: str, batch_size: int = 32,
             features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on one split by Keras's own ``evaluate`` (on cached features while the backbone
    is frozen): the reference a run's scores, taken through ``predict_batches``, are checked against."""
    if data.sizes.get(split, 0) == 0:
        return float("nan"), float("nan")
    if features is not None and not backbone_trainable(model):
        if not _compiled(model):
            compile_model(model, 1e-3)
        net = model if is_head(model) else head_on_features(model)
        scores = net.evaluate(feature_batches(features[split], batch_size), verbose=0, return_dict=True)
        return float(scores["loss"]), float(scores["accuracy"])
    scores = model.evaluate(data.batches(split, batch_size), verbose=0, return_dict=True)
    return float(scores["loss"]), float(scores["accuracy"])


def predictions(model: keras.Model, data: DataSplits, split: str, batch_size: int = 64,
                features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                tracer: StepTimer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """True labels and predicted probabilities on one split (on cached features while the backbone is frozen)."""
    if features is not None and not backbone_trainable(model):
        net = model if is_head(model) else feature_head(model)
        return predict_batches(net, array_batches(features[split], batch_size), tracer)
    return predict_batches(model, data.batches(split, batch_size), tracer)
