"""``lora-tsd analyze capture``: how early LoRA finds the task-specific directions of a full fine-tune.

``capture``: the paper's recall (reference top-4 inside predicted top-8) and accuracy (predicted top-8 inside
reference top-16) of LoRA's estimated TSDs, at steps along a LoRA run, against the TSDs of a full fine-tune
of the same model on the same data (the reference). The command runs the full fine-tune itself (a run of the
training workflow with a full fine-tune back end, fine for MiniLM-sized models) or takes ``--reference`` (a
fine-tuned model folder); LoRA's snapshots come from its own LoRA run (callbacks of the training loop take them)
or from the checkpoints of a run (``--lora-run``: ``checkpoints/step-N/adapter`` plus the final ``adapter``).

"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lora_tsd.app.experiments.spectrum import (
    Delta,
    _out_in,
    aggregate,
    resolve_source,
    source_deltas,
    spectra,
    target_names,
    write_spectrum_outputs,
)
from lora_tsd.app.formats import finite_or_none
from lora_tsd.app.workflow.callbacks import LoopCallback
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.atomic import atomic_write_json
from lora_tsd.directions import (
    ThinSVD,
    projections,
    rates_from_projections,
    select_directions,
    thin_svd,
    tsd_accuracy,
    tsd_recall,
)
from lora_tsd.errors import ConfigError


def snapshot_steps(steps: int, every: int | None = None, explicit: Sequence[int] | None = None) -> list[int]:
    """Steps to measure at: ``explicit``, else 1, 2, 5 and every ``every`` (default steps // 10), and the last."""
    if explicit:
        chosen = sorted({int(s) for s in explicit if 1 <= int(s) <= steps})
        if not chosen:
            raise ConfigError(f"no snapshot step lies in 1..{steps}")
        return chosen
    every = every or max(1, steps // 10)
    return sorted({s for s in (1, 2, 5) if s <= steps} | set(range(every, steps + 1, every)) | {steps})


class _Snapshots(LoopCallback):
    """Calls ``on_snapshot(step, model)`` (model in eval mode) after the chosen optimizer steps, and keeps the
    trained model and its final test metrics."""

    def __init__(self, steps: Iterable[int], on_snapshot: Callable[[int, nn.Module], None]) -> None:
        self.steps, self.on_snapshot = set(steps), on_snapshot
        self.model: nn.Module | None = None
        self.test: dict[str, float] = {}

    def on_step_end(self, state: Any, step: int) -> None:
        if step in self.steps:
            state.core.eval()
            self.on_snapshot(step, state.core)
            state.core.train()

    def on_train_end(self, state: Any, summary: dict[str, Any]) -> None:
        self.model = state.core
        self.test = summary.get("metrics_after", {}).get("test", {})


def train_with_snapshots(cfg: TrainConfig, mode: str, steps_to_snap: Iterable[int],
                         on_snapshot: Callable[[int, nn.Module], None]) -> tuple[nn.Module, dict[str, float]]:
    """A run of the training workflow (``cfg.output_dir``) that calls ``on_snapshot(step, model)`` after the chosen
    optimizer steps: ``mode='full'`` trains every parameter (the reference full fine-tune), ``mode='lora'`` plain
    LoRA. Returns the trained model and its test metrics."""
    from lora_tsd.app.workflow.backends import FullFineTuneBackend
    from lora_tsd.app.workflow.run import run_training

    if mode not in ("full", "lora"):
        raise ConfigError(f"mode must be 'full' or 'lora', got {mode!r}")
    snapshots = _Snapshots(steps_to_snap, on_snapshot)
    run_training(cfg, callbacks=[snapshots], backend=FullFineTuneBackend() if mode == "full" else None)
    return snapshots.model, snapshots.test


def _lora_factors(model: nn.Module) -> dict[str, Delta]:
    from lora_tsd.inject import adapted_layers

    out = {}
    for name, layer in adapted_layers(model):
        B, A = layer.original_delta_factors()
        out[name] = (B.detach().float().cpu(), A.detach().float().cpu())
    return out


def _rankings(svds: Mapping[str, ThinSVD], deltas: Mapping[str, Delta], keep: int) -> dict[str, list[int]]:
    """Top-``keep`` TSD ranking per layer; layers whose change is exactly zero have no ranking (left out).

    (With a warm-up schedule the first optimizer step has lr 0, so ΔW is still zero there.)
    """
    out = {}
    for name, delta in deltas.items():
        rates = rates_from_projections(projections(svds[name], delta), svds[name].S)
        if bool(rates.any()):
            out[name] = select_directions(rates, min(keep, int(rates.numel())), "tsd").tolist()
    return out


def capture_scores(predicted: Mapping[str, Sequence[int]], reference: Mapping[str, Sequence[int]],
                   n_pred: int = 8, n_recall: int = 4, n_acc: int = 16) -> dict[str, Any]:
    """Mean over layers of the paper's recall and accuracy, plus the share of layers with perfect recall."""
    names = [n for n in reference if n in predicted]
    if not names:
        raise ConfigError("the prediction and the reference have no layer in common")
    recall = [tsd_recall(predicted[n], reference[n], n_pred, n_recall) for n in names]
    accuracy = [tsd_accuracy(predicted[n], reference[n], n_pred, n_acc) for n in names]
    return {"recall": sum(recall) / len(names), "accuracy": sum(accuracy) / len(names),
            "recall_event": sum(r == 1.0 for r in recall) / len(names),
            "accuracy_at_least_0.75": sum(a >= 0.75 for a in accuracy) / len(names), "layers": len(names)}


def _chance(ks: Iterable[int], n_pred: int, n_recall: int, n_acc: int) -> dict[str, float]:
    """Expected recall and accuracy of a uniformly random top-n_pred set (mean over layers)."""
    ks = list(ks)
    return {"accuracy": sum(n_acc / k for k in ks) / len(ks), "recall": sum(n_pred / k for k in ks) / len(ks)}


def _lora_run_snapshots(run: Path, svds: Mapping[str, ThinSVD], keep: int) -> dict[int, dict[str, list[int]]]:
    """Rankings of a LoRA run's checkpoint adapters (``checkpoints/step-N/adapter``) and final adapter."""
    from lora_tsd.app.workflow.checkpoint import list_checkpoints

    found = [(step, path / "adapter") for step, path in list_checkpoints(run)]
    if (run / "summary.json").is_file():
        steps = json.loads((run / "summary.json").read_text(encoding="utf-8"))["config"]["steps"]
        found.append((steps, run / "adapter"))
    if not found:
        raise ConfigError(f"{run} has no checkpoints (train with --checkpoint-every N) and no final adapter")
    out = {}
    for step, adapter in sorted(found):
        source = resolve_source(run)
        source = dataclasses.replace(source, path=adapter)
        deltas = source_deltas(source).deltas
        out[step] = _rankings(svds, deltas, keep)
    return out


def analyze_capture(cfg: TrainConfig, out: str | Path, full_lr: float = 5e-5, snapshots: Sequence[int] | None = None,
                    every: int | None = None, lora_run: str | Path | None = None,
                    reference: str | Path | None = None, n_pred: int = 8, n_recall: int = 4, n_acc: int = 16,
                    top: int = 8, save_reference: bool = True, plots: bool = True,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """TSD capture along training (see the module docstring); writes ``capture.json`` and ``capture.png``.

    Args:
        cfg: a :class:`~lora_tsd.app.workflow.config.TrainConfig` (model, task, data, steps, LoRA lr and r, seed).
        full_lr: the learning rate of the reference full fine-tune.
        lora_run: take LoRA's snapshots from this run's checkpoints instead of training LoRA here.
        reference: a fully fine-tuned model folder as the reference instead of fine-tuning here.
    """
    from lora_tsd.app.assets.models import load_model
    from lora_tsd.app.workflow.outputs import read_run_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if lora_run is not None:
        run_cfg = read_run_config(lora_run)
        cfg = cfg.with_options(model=run_cfg.model, task=run_cfg.task, data_seed=run_cfg.data_seed,
                               max_train=run_cfg.max_train, max_length=run_cfg.max_length, r=run_cfg.adapter.r,
                               steps=run_cfg.steps, seed=run_cfg.seed, lr=run_cfg.lr)
        if run_cfg.method != "lora":
            say(f"note: {lora_run} trained {run_cfg.method!r}, not plain LoRA; its ΔW is analyzed all the same")
    keep = max(n_pred, n_acc, top)
    steps = snapshot_steps(cfg.steps, every, snapshots)
    # Pretrained weights and their SVDs (once): the targets of the library's default (or the run's) config.
    probe, _, _ = load_model(cfg.model, num_labels=2)
    names = target_names(probe, cfg.adapter.target_modules)
    svds = {n: thin_svd(_out_in(probe.get_submodule(n))) for n in names}
    originals = {n: _out_in(probe.get_submodule(n)) for n in names}
    del probe

    full_traj: dict[int, dict[str, list[int]]] = {}
    result: dict[str, Any] = {"config": cfg.to_dict(), "full_lr": full_lr, "snapshot_steps": steps,
                              "n_pred": n_pred, "n_recall": n_recall, "n_acc": n_acc}
    if reference is None:
        say(f"full fine-tune of {cfg.model} on {cfg.task}: {cfg.steps} steps at lr {full_lr:g}")

        def full_snapshot(step: int, model: nn.Module) -> None:
            deltas = {n: _out_in(model.get_submodule(n)).cpu() - originals[n] for n in names}
            full_traj[step] = _rankings(svds, deltas, keep)

        full_cfg = cfg.with_options(lr=full_lr, method="lora", output_dir=str(out / "full_ft_run"), overwrite=True)
        model, metrics = train_with_snapshots(full_cfg, "full", steps, full_snapshot)
        result["full_ft_test"] = metrics
        say(f"full fine-tune: test {metrics}")
        ref_deltas = {n: _out_in(model.get_submodule(n)).cpu() - originals[n] for n in names}
        if save_reference:
            from transformers import AutoTokenizer

            from lora_tsd.app.assets.models import resolve_model

            model.save_pretrained(out / "full_ft")
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model), trust_remote_code=False)
            tokenizer.save_pretrained(out / "full_ft")
        del model
    else:
        source = resolve_source(reference, cfg.model, "reference")
        ref_deltas = source_deltas(source, cfg.adapter.target_modules).deltas
        ref_deltas = {n: d for n, d in ref_deltas.items() if n in svds}
    ref_spectra = spectra(originals, ref_deltas, top, svds)
    reference_rank = {n: info["ranking"][:keep] for n, info in ref_spectra.items()}

    lora_traj: dict[int, dict[str, list[int]]] = {}
    if lora_run is None:
        say(f"LoRA r={cfg.adapter.r} on {cfg.task}: {cfg.steps} steps at lr {cfg.lr:g}")

        def lora_snapshot(step: int, model: nn.Module) -> None:
            lora_traj[step] = _rankings(svds, _lora_factors(model), keep)

        lora_cfg = cfg.with_options(method="lora", output_dir=str(out / "lora_run"), overwrite=True)
        _, metrics = train_with_snapshots(lora_cfg, "lora", steps, lora_snapshot)
        result["lora_test"] = metrics
        say(f"LoRA: test {metrics}")
    else:
        lora_traj = _lora_run_snapshots(Path(lora_run), svds, keep)

    ks = [svds[n].S.numel() for n in reference_rank]
    chance = _chance(ks, n_pred, n_recall, n_acc)
    series: dict[str, dict[str, list[float]]] = {}
    for label, traj in (("LoRA ΔW = BA", lora_traj), ("full fine-tune ΔW (at step t)", full_traj)):
        if not traj:
            continue
        rows = {step: capture_scores(traj[step], reference_rank, n_pred, n_recall, n_acc) for step in sorted(traj)
                if traj[step]}
        series[label] = {"steps": list(rows), **{m: [r[m] for r in rows.values()] for m in
                                                 ("accuracy", "recall", "recall_event", "accuracy_at_least_0.75")}}
    result.update(chance=chance, series=series, reference_summary=aggregate(ref_spectra, top),
                  reference_layers={n: {k: v for k, v in info.items() if k not in ("rates", "sigma")}
                                    for n, info in ref_spectra.items()})
    made = []
    if plots:
        try:
            from lora_tsd.app.experiments import plots as plot_module  # matplotlib: an optional extra
        except ImportError as err:
            say(f"plots skipped ({err}); pip install 'lora-tsd[plots]'")
        else:
            plot_module.plot_capture(series, chance, out / "capture.png",
                                     title=f"{cfg.model} on {cfg.task}: TSD capture against the final full "
                                           f"fine-tune (r={cfg.adapter.r})")
            made.append("capture.png")
            made += write_spectrum_outputs({"full fine-tune": ref_spectra}, out, top, say=say,
                                           title=f"{cfg.model} on {cfg.task}, ")
    result["plots"] = made
    atomic_write_json(out / "capture.json", finite_or_none(result))
    return result


# ------------------------------------------------------------------------------------------- command line
