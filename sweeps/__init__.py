"""Keras-Tuner sweeps over the pipeline, every trial tracked in MLflow: where the two meet."""
