"""Fold adapters into their base weights: for good (:func:`merge`) or reversibly (:func:`merge_in_place`)."""

from __future__ import annotations

from torch import nn

from .inject import replace_module, require_adapters


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layers back; returns the model.

    The result has no adapter modules left: it is an ordinary model (``save_pretrained`` works) whose
    weights are ``W + ΔW`` (for init-style methods ``W_res + ΔW``, i.e. the fine-tuned weight).
    """
    for name, layer in require_adapters(model, "merge"):
        layer.merge()
        replace_module(model, name, layer.base_layer)
    return model


def merge_in_place(model: nn.Module) -> None:
    """Merge every adapter but keep the adapter modules (reversible with :func:`unmerge`)."""
    for _, layer in require_adapters(model, "merge_in_place"):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge_in_place`: restore the base weights (up to the dtype's rounding)."""
    for _, layer in require_adapters(model, "unmerge"):
        layer.unmerge()
