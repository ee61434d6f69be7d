"""The classifier around a backbone, and the transfer-learning rules, in one place.

- Preprocessing is inside the model: it takes raw 0..255 RGB pixels.
- Optional augmentation (flip, rotation) is inside the model, active in training only.
- ``base(x, training=False)``: BatchNorm stays in inference mode, also when fine-tuning, and
  BatchNorm layers stay frozen.
- Changing ``trainable`` is always followed by a recompile (``compile_model``); fine-tuning uses
  its own, lower learning rate.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras

from pipeline.backbones import BackboneSpec, build_backbone, get_spec
from pipeline.errors import UserError
from pipeline.precision import AUTO
from pipeline.precision import setting as _setting
from pipeline.preprocessing import Preprocess

HEAD_ONLY = (None, "none", "None", "", 0, "0")


def build_model(
    backbone: str,
    num_classes: int,
    image_size: int,
    dropout: float = 0.2,
    augment: bool = False,
    weights: str | None = "imagenet",
    seed: int | None = None,
    precision: str = "float32",
    head: keras.Model | None = None,
) -> keras.Model:
    """Raw pixels -> [augmentation] -> preprocessing -> frozen backbone -> pool -> dropout -> softmax.

    ``precision``: the Keras dtype policy (``pipeline.precision``: ``float32``, ``mixed_float16`` or
    ``mixed_bfloat16``, which compute in 16 bits with float32 weights, for GPUs); the softmax output
    stays float32. ``head``: a head trained on cached features (``build_head``),
    whose weights the classifier takes.
    """
    with _policy(precision):
        model = _build(backbone, num_classes, image_size, dropout, augment, weights, seed)
    if head is not None:
        model.get_layer("classifier").set_weights(head.get_layer("classifier").get_weights())
    return model


def build_head(feature_dim: int, num_classes: int, dropout: float = 0.2, seed: int | None = None,
               precision: str = "float32") -> keras.Model:
    """Pooled backbone features -> dropout -> softmax: the classifier's head on its own.

    Its layers are the classifier's head layers (same names, initializers and seed), so a head
    trained on cached features is the head ``build_model`` would have trained, and
    ``build_model(..., head=head)`` puts it on the full model. It builds in milliseconds, the full
    model in seconds.
    """
    with _policy(precision):
        _check_head(num_classes, dropout)
        inputs = keras.Input(shape=(feature_dim,), name="features")
        return keras.Model(inputs, _head(inputs, num_classes, dropout, seed), name="head")


def is_head(model: keras.Model) -> bool:
    """True for a head built by ``build_head`` (features in, no backbone)."""
    return model.name == "head"


@contextlib.contextmanager
def _policy(precision: str) -> Iterator[None]:
    """Layers built inside take this dtype policy (and the model keeps it: ``compile`` then wraps the
    optimizer in a ``LossScaleOptimizer`` under ``mixed_float16``); the global policy is restored after."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision_setting(precision))
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def precision_setting(precision: str | bool) -> str:
    """A policy name (``true``/``false`` accepted as before); ``auto`` must be resolved first (``pipeline.recipe``)."""
    chosen = _setting(precision)
    if chosen == AUTO:
        raise ValueError("resolve mixed_precision 'auto' to a policy (pipeline.precision.policy_for) before building")
    return chosen


def _check_head(num_classes: int, dropout: float) -> None:
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout!r}")


def _head(x, num_classes: int, dropout: float, seed: int | None):
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    # A seeded initializer: the head must not depend on what else drew random numbers before it
    # (e.g. a first-time weight conversion), or the same seed would not give the same run.
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init, dtype="float32",
                              name="classifier")(x)


def _build(backbone: str, num_classes: int, image_size: int, dropout: float, augment: bool,
           weights: str | None, seed: int | None) -> keras.Model:
    _check_head(num_classes, dropout)
    spec = get_spec(backbone)
    base = build_backbone(spec, image_size, weights)
    base.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    if augment:
        x = keras.Sequential(
            [keras.layers.RandomFlip("horizontal", seed=seed), keras.layers.RandomRotation(0.1, seed=seed)],
            name="augmentation",
        )(x)
    x = Preprocess(**spec.preprocessing, name="preprocess")(x)
    x = base(x, training=False)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    name = "classifier_on_" + spec.name.replace(":", "_").replace("/", "_").replace("+", "_and_")[-40:]
    return keras.Model(inputs, _head(x, num_classes, dropout, seed), name=name)


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone model inside a classifier built by ``build_model``."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != "augmentation":
            return layer
    raise ValueError(f"model {model.name!r} has no nested backbone")


def resolve_fine_tune_at(value: object, spec: BackboneSpec) -> int | None:
    """Turn a user's ``fine_tune_at`` into the first backbone layer index to unfreeze.

    Accepts a layer index (``100`` of MobileNetV2's 154), a fraction of depth in (0, 1)
    (``0.65``), ``"all"``, or ``0``/``"none"`` for head only (returns ``None``).
    """
    depth = spec.layer_count
    if value in HEAD_ONLY:
        return None
    if value == "all":
        return 0
    number: float
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if number != number or number < 0:
        raise UserError(
            f"fine_tune_at {value!r} is not a layer index, a fraction, 'all' or 'none'; "
            f"for {spec.name} give 1..{depth - 1}, a fraction like 0.5, 'all' or 'none'"
        )
    if 0 < number < 1:
        return min(int(number * depth), depth - 1)
    if number != int(number) or number >= depth:
        raise UserError(
            f"fine_tune_at {value!r} is beyond the depth of {spec.name} ({depth} layers); "
            f"give 1..{depth - 1}, a fraction like 0.5, 'all' or 'none'"
        )
    return int(number)


def set_trainable(model: keras.Model, unfreeze_from: int | None) -> int:
    """Freeze the backbone below ``unfreeze_from`` (all of it for ``None``); BatchNorm stays frozen.

    Returns the number of trainable parameters. Recompile afterwards.
    """
    base = backbone_of(model)
    base.trainable = unfreeze_from is not None
    if unfreeze_from is not None:
        for i, layer in enumerate(base.layers):
            layer.trainable = i >= unfreeze_from and not isinstance(layer, keras.layers.BatchNormalization)
    return trainable_params(model)


def trainable_params(model: keras.Model) -> int:
    return int(sum(keras.ops.size(w) for w in model.trainable_weights))


def compile_model(model: keras.Model, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
                  jit_compile: bool | str = False, label_smoothing: float = 0.0, weight_decay: float = 0.0) -> None:
    """Adam + sparse categorical cross-entropy on softmax outputs, accuracy metric; ``weight_decay`` > 0: AdamW
    (``DecayingAdamW``), ``label_smoothing`` > 0: the smoothed loss (``SmoothedSparseCrossentropy``). At their
    defaults (0) it is the plain recipe, object for object."""
    model.compile(
        optimizer=DecayingAdamW(learning_rate, weight_decay=weight_decay) if weight_decay
        else keras.optimizers.Adam(learning_rate),
        loss=SmoothedSparseCrossentropy(label_smoothing) if label_smoothing
        else keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )


@keras.saving.register_keras_serializable("tlsweep")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing on integer labels: Keras 3's sparse loss has no
    ``label_smoothing``, so the labels are one-hot here, inside the loss, and every input pipeline (images, cached
    features, activations at the cut) and the accuracy metric keep their integer labels."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_categorical_crossentropy",
                 **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):  # noqa: D102
        labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        one_hot = keras.ops.one_hot(labels, y_pred.shape[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:  # noqa: D102
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


# Variables AdamW does not decay (by name): biases, and the scales and offsets of normalization layers (BatchNorm
# stays frozen here anyway; a backbone's LayerNorm, as in ConvNeXt, may train), as AdamW recipes do.
NO_DECAY = ("bias", "gamma", "beta")


@keras.saving.register_keras_serializable("tlsweep")
class DecayingAdamW(keras.optimizers.AdamW):
    """AdamW that never decays ``NO_DECAY`` variables, also when rebuilt from a checkpoint: Keras's
    ``exclude_from_weight_decay`` is not part of the optimizer's config, so a reloaded AdamW would decay them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exclude_from_weight_decay(var_names=list(NO_DECAY))


def average_of(members: list[keras.Model]) -> keras.Model:
    """One classifier that averages the class probabilities of ``members`` (trained classifiers; a member listed
    twice counts twice). Members trained at one image size share one input, ``image``; members trained at several
    sizes get one input per size, ``image_<size>`` (raw 0..255 pixels, resized from the photo as for training).
    Why not one input resized inside: a member that sees a resized image resized again loses accuracy (measured on
    flower_photos: Lite1's test accuracy 0.937 -> 0.924, the Lite1+Lite2 average's 0.954 -> 0.948). Members keep
    their weights; the ensemble is not trained."""
    sizes = sorted({int(m.input_shape[1]) for m in members})
    inputs = {s: keras.Input(shape=(s, s, 3), name="image" if len(sizes) == 1 else f"image_{s}") for s in sizes}
    outputs: dict[int, object] = {}
    for member in dict.fromkeys(members):
        outputs[id(member)] = member(inputs[int(member.input_shape[1])], training=False)
    picked = [outputs[id(m)] for m in members]
    probs = picked[0] if len(picked) == 1 else keras.layers.Average(name="average")(picked)
    return keras.Model(inputs[sizes[0]] if len(sizes) == 1 else list(inputs.values()), probs, name="ensemble")
