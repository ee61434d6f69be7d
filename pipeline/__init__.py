"""The single-configuration transfer-learning pipeline: data, backbones, model, training, export.

Never imports mlflow or keras_tuner: those meet in ``sweeps/``.
"""
