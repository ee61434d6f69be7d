"""MLflow tracking: the store, runs, batched metrics, plots, the pyfunc model, leaderboards.

Never imports keras_tuner: the sweep (``sweeps/``) passes plain values in.
"""

import os

# MLflow draws a "Downloading artifacts" / "Uploading artifacts" progress bar per transfer; in best-export,
# report, the bench and every trial's model they drown the output. Every entry point imports this package.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
