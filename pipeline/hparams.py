"""Every hyperparameter and its default, and the typed configuration of one training run.

``RunConfig``'s defaults are the baseline run: ``make train`` with no options and the default point
of every sweep's space. ``DEFAULTS`` (the hyperparameters a sweep can search) is read off it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Union

FineTuneAt = Union[int, float, str, None]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: what ``make train``, a sweep's trial and best-export all train."""

    # -- hyperparameters (a sweep's space may search each of these) --
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"  # "imagenet", "none", or a local weights file
    image_size: int = 0  # 0: the backbone's native size
    epochs: int = 10  # head epochs, backbone frozen
    fine_tune: bool = True
    fine_tune_at: FineTuneAt = 0.75  # unfreeze the top quarter of the backbone
    fine_tune_epochs: int | None = 5
    fine_tune_learning_rate: float | None = 1e-5
    dropout: float = 0.2
    batch_size: int = 32
    learning_rate: float = 1e-3
    augment: bool = False
    # Stop the head phase when val_loss has not improved for this many epochs, keeping its best epoch's
    # weights (0: off, every epoch runs). See pipeline.training.train.
    early_stopping_patience: int = 0
    # Score a head-only run on cached features by k-fold cross-validation over train+validation
    # (0: off; pipeline.crossval). An extra, steadier score: never the objective, never the test split.
    cv_folds: int = 0
    # -- run settings (not searched) --
    seed: int = 42
    # auto: bfloat16 on GPUs of compute capability >= 8.0, float16 below, float32 on CPU (pipeline/precision.py);
    # or float32, mixed_float16, mixed_bfloat16 (true/false: mixed_float16/float32, as before)
    mixed_precision: str | bool = "auto"
    xla: bool = False  # XLA-compiled training steps, for GPUs
    feature_cache: bool = True  # heads train on cached frozen-backbone features (same model, far faster)

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


SETTINGS = ("seed", "mixed_precision", "xla", "feature_cache")
DEFAULTS: dict[str, object] = {
    f.name: f.default for f in dataclasses.fields(RunConfig) if f.name not in SETTINGS
}
# Only meaningful when fine_tune is true.
FINE_TUNE_ONLY = ("fine_tune_at", "fine_tune_epochs", "fine_tune_learning_rate")
