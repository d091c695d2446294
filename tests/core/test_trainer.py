"""A stock transformers.Trainer drives the switch through lora_tsd.TSDCallback, counting optimizer steps."""

from __future__ import annotations

import torch
from conftest import TARGETS, tiny_llama, token_batch
from transformers import Trainer, TrainerCallback, TrainingArguments

import lora_tsd


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.items = [token_batch(i, batch=1)[0] for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.items[i], "labels": self.items[i]}


class PhaseRecorder(TrainerCallback):
    """Records (global optimizer step, adapter step counter, phase) after each step's TSDCallback ran."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        layer = lora_tsd.adapted_layers(model)[0][1]
        self.seen.append((state.global_step, int(layer.step), int(layer.phase)))


def test_trainer_switches_after_t_optimizer_steps(tmp_path):
    t = 3
    model = lora_tsd.attach(tiny_llama(), lora_tsd.TSDConfig(method="tsd", r=4, dash_directions=2,
                                                              prelaunch_steps=t, target_modules=TARGETS["llama"]))
    recorder = PhaseRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=5,
        learning_rate=1e-2, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2,
        save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(40), eval_dataset=TokenDataset(4),
                      callbacks=[lora_tsd.TSDCallback(), recorder])
    trainer.train()
    # 5 optimizer steps of 4 micro-batches each, an evaluation after every step: the switch is at step t.
    assert [s for s, _, _ in recorder.seen] == [1, 2, 3, 4, 5]
    assert [c for _, c, _ in recorder.seen] == [1, 2, 3, 4, 5]
    assert [p for _, _, p in recorder.seen] == [0, 0, 1, 1, 1]
    layers = lora_tsd.adapted_layers(model)
    assert all(layer.dash_c.abs().sum() > 0 for _, layer in layers)  # c trained after the switch
    assert all(layer.init_idx.min() >= 0 for _, layer in layers)
    state = trainer.optimizer.state  # A, B and c restarted at the switch (method.md §3)
    assert all(int(state[layer.lora_A]["step"]) == 5 - t for _, layer in layers)
    assert all(int(state[layer.dash_c]["step"]) == 5 - t for _, layer in layers)


def test_svd_cache_defaults_to_cpu_runs_only_and_obeys_an_explicit_choice():
    import torch

    from lora_tsd.app.workflow.run import use_svd_cache

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_svd_cache(None, cpu) is True
    assert use_svd_cache(None, cuda) is False  # recomputing with the checked gesvda is faster on a GPU
    assert use_svd_cache(True, cuda) is True and use_svd_cache(False, cpu) is False


def test_trainer_probes_the_gradient_estimator_before_the_first_step(tmp_path):
    """LoRA-Init's default estimator through a stock Trainer: probed in on_train_begin, switched at step 0."""
    config = lora_tsd.TSDConfig(method="init", r=4, target_modules=TARGETS["llama"])
    assert config.init_estimator == "gradient" and config.prelaunch_steps == 0
    model = lora_tsd.attach(tiny_llama(), config)
    base = {name: layer.weight.detach().clone() for name, layer in lora_tsd.adapted_layers(model)}
    recorder = PhaseRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(20),
                      callbacks=[lora_tsd.TSDCallback(probe_batches=2), recorder])
    trainer.train()
    assert [p for _, _, p in recorder.seen] == [1, 1, 1]  # switched before the first optimizer step
    layers = lora_tsd.adapted_layers(model)
    assert all(layer.init_idx.min() >= 0 for _, layer in layers)
    assert all(not torch.equal(layer.weight, base[name]) for name, layer in layers)  # W_res replaced W
    state = trainer.optimizer.state  # nothing discarded: A and B trained for every step
    assert all(int(state[layer.lora_A]["step"]) == 3 for _, layer in layers)


def test_trainer_callback_refuses_a_bad_probe_size():
    import pytest

    with pytest.raises(lora_tsd.ConfigError, match="probe_batches must be a positive integer"):
        lora_tsd.TSDCallback(probe_batches=0)
