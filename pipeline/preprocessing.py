"""Backbone input preprocessing as a serialisable layer, so models take raw 0..255 pixels."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tlsweep")
class Preprocess(keras.layers.Layer):
    """``y = x * scale + offset`` per channel, optionally after RGB -> BGR.

    Covers every registry backbone: ``[-1, 1]`` (MobileNetV2, Xception, InceptionV3),
    Caffe BGR mean subtraction (ResNet50), ``(x - 127) / 128`` (EfficientNet-Lite),
    ``[0, 1]`` (TF-Hub) and identity (Keras EfficientNet normalises inside the model).
    """

    def __init__(self, scale=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0), bgr: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.scale = tuple(float(s) for s in scale)
        self.offset = tuple(float(o) for o in offset)
        self.bgr = bool(bgr)

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.bgr:
            x = ops.flip(x, axis=-1)
        return x * ops.convert_to_tensor(self.scale, x.dtype) + ops.convert_to_tensor(self.offset, x.dtype)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset, "bgr": self.bgr}


def affine(scale: float, offset: float) -> dict:
    return {"scale": (scale,) * 3, "offset": (offset,) * 3, "bgr": False}


MINUS_ONE_TO_ONE = affine(1 / 127.5, -1.0)
ZERO_TO_ONE = affine(1 / 255.0, 0.0)
IDENTITY = affine(1.0, 0.0)
LITE = affine(1 / 128.0, -127.0 / 128.0)
CAFFE = {"scale": (1.0, 1.0, 1.0), "offset": (-103.939, -116.779, -123.68), "bgr": True}
