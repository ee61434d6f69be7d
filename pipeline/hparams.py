"""Every hyperparameter and its default, and the typed configuration of one training run.

``RunConfig``'s defaults are the baseline run: ``make train`` with no options and the default point
of every sweep's space. ``DEFAULTS`` (the hyperparameters a sweep can search) is read off it. Each field
declares its type, bounds and description once (``pipeline.settings``): ``check`` validates a configuration
against them, and ``tlsweep train`` gets one flag per field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import AfterValidator, BeforeValidator, Field, Strict, ValidationInfo

from pipeline import precision
from pipeline.errors import UserError
from pipeline.settings import Number, Whole, checked

FineTuneAt = Union[int, float, str, None]
SEED_MAX = 2**32 - 1  # NumPy's seeds (keras.utils.set_random_seed) stop here


def _weights(value: str) -> str:
    if value not in ("imagenet", "none", "") and not Path(value).expanduser().is_file():
        raise UserError(f"weights {value!r} is not 'imagenet', 'none' or an existing weights file; pass a path to a "
                        ".h5/.weights.h5 file saved for the backbone without its top")
    return value


def _mixed_precision(value: Any, info: ValidationInfo) -> str:
    return precision.setting(value, (info.context or {}).get("source", ""))


MixedPrecision = Annotated[str | bool, BeforeValidator(_mixed_precision), Field(
    description="auto: bfloat16 compute on GPUs of compute capability >= 8.0, float16 with loss scaling below, "
    "float32 on CPU; or float32, mixed_float16, mixed_bfloat16 (true = mixed_float16)")]
Switch = Annotated[bool, Strict()]  # true or false, not "yes" or 1
Seed = Annotated[Whole, Field(ge=0, le=SEED_MAX, description="seed of the split, the weights' initialisation and "
                                                             "the data order")]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: what ``make train``, a sweep's trial and best-export all train."""

    # -- hyperparameters (a sweep's space may search each of these) --
    backbone: Annotated[str, Field(description="registry name or hub:<URL or SavedModel dir>")] = "efficientnet_lite0"
    weights: Annotated[str, AfterValidator(_weights),
                       Field(description="'imagenet', 'none', or a local weights file")] = "imagenet"
    image_size: Annotated[Whole, Field(ge=0, description="square input size (0: the backbone's native size)")] = 0
    epochs: Annotated[Whole, Field(ge=1, description="head epochs with the backbone frozen")] = 10
    fine_tune: Switch = True
    fine_tune_at: Annotated[FineTuneAt, Field(
        description="first backbone layer to unfreeze: index, fraction of depth, 'all', or 0/'none' for head "
        "only")] = 0.75  # unfreeze the top quarter of the backbone
    fine_tune_epochs: Annotated[Whole | None, Field(ge=0, description="fine-tuning epochs (0: head only)")] = 5
    fine_tune_learning_rate: Annotated[Number | None, Field(
        gt=0, description="Adam learning rate when fine-tuning")] = 1e-5
    dropout: Annotated[Number, Field(ge=0, lt=1, description="dropout before the classifier")] = 0.2
    batch_size: Annotated[Whole, Field(ge=1)] = 32
    learning_rate: Annotated[Number, Field(gt=0, description="Adam learning rate of the head phase")] = 1e-3
    augment: Annotated[Switch, Field(description="random flip + rotation in training")] = False
    early_stopping_patience: Annotated[Whole, Field(
        ge=0, description="stop the head phase when val_loss has not improved for this many epochs, keeping the "
        "best epoch's weights (0: off)")] = 0
    cv_folds: Annotated[Whole, Field(
        ge=0, description="score a head-only run on cached features by k-fold cross-validation over "
        "train+validation (0: off; 5 is usual); an extra, steadier score: never the objective, never the test "
        "split")] = 0
    # Modern fine-tuning knobs (docs/knobs.md); each default keeps the plain recipe exactly.
    label_smoothing: Annotated[Number, Field(
        ge=0, lt=1, description="cross-entropy against smoothed labels ((1 - s) one-hot + s / classes), both phases "
        "(0: off; 0.1 is usual)")] = 0.0
    weight_decay: Annotated[Number, Field(
        ge=0, description="AdamW's decoupled weight decay in both phases, biases and norms excluded (0: Adam, as "
        "before)")] = 0.0
    fine_tune_schedule: Annotated[Literal["constant", "cosine"] | None, Field(
        description="the fine-tuning learning rate over its phase: constant, or a cosine decay to 0")] = "constant"
    warmup_epochs: Annotated[Number | None, Field(
        ge=0, description="the fine-tuning learning rate rises linearly from 0 over these first epochs of the phase "
        "(0: none; fewer than fine_tune_epochs)")] = 0.0
    # -- run settings (not searched) --
    seed: Seed = 42
    mixed_precision: MixedPrecision = "auto"
    xla: Annotated[Switch, Field(description="compile training steps with XLA (for GPUs)")] = False
    feature_cache: Annotated[Switch, Field(
        description="train the frozen-backbone head on cached backbone features (same model, far faster; not "
        "used with augmentation or random weights)")] = True

    @classmethod
    def from_values(cls, values: Mapping[str, Any], **settings: Any) -> "RunConfig":
        """A sweep trial's hyperparameter values (fine-tuning ones None when ``fine_tune`` is false) plus settings."""
        return cls(**{**values, **settings})

    def hyperparameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in DEFAULTS}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls(**json.loads(text))


def check(config: RunConfig, **context: Any) -> RunConfig:
    """``config`` with every value checked against its declaration (numbers given as text converted), or a
    ``UserError`` with a line per bad value: before any work, not deep in Keras."""
    return checked(RunConfig, config.__dict__, context=context)


SETTINGS = ("seed", "mixed_precision", "xla", "feature_cache")
DEFAULTS: dict[str, object] = {
    f.name: f.default for f in dataclasses.fields(RunConfig) if f.name not in SETTINGS
}
# Only meaningful when fine_tune is true.
FINE_TUNE_ONLY = ("fine_tune_at", "fine_tune_epochs", "fine_tune_learning_rate", "fine_tune_schedule", "warmup_epochs")
# Declared to Keras Tuner only when a sweep's space names them: a space without them draws what it drew before.
KNOBS = ("label_smoothing", "weight_decay", "fine_tune_schedule", "warmup_epochs")
