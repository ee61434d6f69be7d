"""Backbones built ahead of their trial: a warm spare trial process (``sweeps.trial``) builds the backbone its
trial will most likely use (the one the trial before it used) while that trial trains, and hands it over.

Building a backbone and loading its ImageNet weights takes seconds (EfficientNet-Lite0: 141 layers), and a
fine-tuning trial in a fresh process paid them on its path. A backbone taken from here is the one
``build_backbone`` would build: the same constructor, image size, weights and dtype policy (the key), and
only pretrained weights (``imagenet`` or a weights file): every variable is loaded, none drawn at random, so
the trial's seed gives the same run. One use each: a taken backbone leaves the pool.
"""

from __future__ import annotations

import keras

_POOL: dict[tuple, keras.Model] = {}


def _key(name: str, image_size: int, weights: str | None) -> tuple:
    return name, int(image_size), weights, keras.mixed_precision.dtype_policy().name


def prebuild(plan: "recipe.Plan") -> bool:  # noqa: F821 - pipeline.recipe imports this module's users
    """Build the plan's backbone now, for a later ``build_backbone`` of the same key; False when it does not
    qualify (random weights, an ensemble or a TF-Hub module)."""
    from pipeline.backbones import build_backbone
    from pipeline.model import _policy

    config = plan.config
    if config.weights in (None, "none", "") or plan.spec.is_ensemble or plan.spec.hub_handle:
        return False
    with _policy(plan.precision):
        _POOL[_key(plan.spec.name, plan.image_size, config.weights)] = build_backbone(
            plan.spec, plan.image_size, config.weights)
    return True


def take(name: str, image_size: int, weights: str | None) -> keras.Model | None:
    """The backbone built ahead for this key under the current dtype policy, once; else None."""
    return _POOL.pop(_key(name, image_size, weights), None)
