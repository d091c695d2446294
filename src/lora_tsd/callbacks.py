"""Hugging Face ``Trainer`` integration: the switch driven by the Trainer's optimizer steps."""

from __future__ import annotations

from transformers import TrainerCallback

from .schedule import step


class TSDCallback(TrainerCallback):
    """Calls :func:`lora_tsd.step` after every optimizer step of a ``transformers.Trainer``.

    ``on_step_end`` fires once per optimizer update (after all gradient-accumulation micro-batches), never
    for evaluation or prediction forwards, so the switch lands after exactly ``prelaunch_steps`` updates.

    Example::

        trainer = Trainer(model=lora_tsd.attach(model, cfg), args=args, train_dataset=ds,
                          callbacks=[lora_tsd.TSDCallback()])
    """

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001
        step(model, optimizer)
        return control
