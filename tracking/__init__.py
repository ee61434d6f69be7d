"""MLflow tracking: the store, runs, batched metrics, plots, the pyfunc model, leaderboards.

Never imports keras_tuner: the sweep (``sweeps/``) passes plain values in.
"""
