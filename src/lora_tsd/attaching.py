"""``attach``: the entry point of the library. Insert the adapters, then let the switch policy act at step 0.

Methods whose selector needs no training (PiSSA's ``top``, MiLoRA's ``bottom``, ``random``) switch right here:
data-dependent initialization always runs after the real weights are loaded. Composing the two steps here keeps
adapter insertion (:mod:`lora_tsd.inject`) free of any switch policy (:mod:`lora_tsd.switch`).
"""

from __future__ import annotations

from torch import nn

from .config import TSDConfig
from .inject import insert_adapters
from .switching import switch


def attach(model: nn.Module, config: TSDConfig) -> nn.Module:
    """Insert TSD adapters into ``model`` in place, freeze the base, and return the model.

    Every trainable parameter afterwards is an adapter tensor (A, B, dash coefficients) or belongs to a
    module named in ``config.modules_to_save``. Attaching leaves the model's outputs unchanged.
    """
    insert_adapters(model, config)
    if config.switches_at_attach:
        switch(model)
    return model
