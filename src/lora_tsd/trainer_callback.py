"""Hugging Face ``Trainer`` integration: the switch driven by the Trainer's optimizer steps."""

from __future__ import annotations

from itertools import islice

from transformers import TrainerCallback

from .errors import ConfigError
from .inject import adapted_layers
from .probe import gradient_probe
from .switching import step


class TSDCallback(TrainerCallback):
    """Drives a TSD adapter from a ``transformers.Trainer``: the gradient probe, then :func:`lora_tsd.step`.

    ``on_step_end`` fires once per optimizer update (after all gradient-accumulation micro-batches), never
    for evaluation or prediction forwards, so a pre-launch switch lands after exactly ``prelaunch_steps``
    updates. Methods that rank by the gradient estimator (LoRA-Init / LoRA-TSD by default) are probed in
    ``on_train_begin`` on the first ``probe_batches`` batches of the Trainer's own training dataloader, with
    the model's own loss (``model(**batch).loss``), and switch before the first step.

    Example::

        trainer = Trainer(model=lora_tsd.attach(model, cfg), args=args, train_dataset=ds,
                          callbacks=[lora_tsd.TSDCallback()])
    """

    def __init__(self, probe_batches: int = 8) -> None:
        if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 1:
            raise ConfigError(f"probe_batches must be a positive integer, got {probe_batches!r}")
        self.probe_batches = probe_batches

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None,  # noqa: ANN001
                       **kwargs):
        layers = adapted_layers(model)
        if not layers:
            return control
        first = layers[0][1]
        if not first.config.switches_on_probe or first.is_switched:
            return control  # pre-launch methods switch in on_step_end; a resumed run is switched already
        if train_dataloader is None:
            raise ConfigError("TSDCallback: the gradient probe needs the Trainer's training dataloader")
        batches = islice(iter(train_dataloader), self.probe_batches)
        gradient_probe(model, batches, lambda m, batch: m(**batch).loss, optimizer)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001
        step(model, optimizer)
        return control
