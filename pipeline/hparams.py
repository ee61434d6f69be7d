"""Every hyperparameter and its default: the default point is a sensible baseline run.

The train CLI and the sweep search space both take their defaults from here.
"""

from __future__ import annotations

DEFAULTS: dict[str, object] = {
    "backbone": "efficientnet_lite0",
    "weights": "imagenet",
    "image_size": 0,  # 0: the backbone's native size
    "epochs": 10,  # head epochs, backbone frozen
    "fine_tune": True,
    "fine_tune_at": 0.75,  # unfreeze the top quarter of the backbone
    "fine_tune_epochs": 5,
    "fine_tune_learning_rate": 1e-5,
    "dropout": 0.2,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "augment": False,
}
# Only meaningful when fine_tune is true.
FINE_TUNE_ONLY = ("fine_tune_at", "fine_tune_epochs", "fine_tune_learning_rate")
