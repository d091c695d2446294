"""``lora-tsd export RUN --format diffusers``: a dreambooth run's adapter as a diffusers LoRA (loaded by stock
``pipeline.load_lora_weights``), or (``merged``) the whole pipeline with the adapter merged into its UNet.

Every method is a plain LoRA relative to the original UNet weights (ranks r, r+s, 2r, 2r+s): the core's
:func:`~lora_tsd.peft_export.peft_factors` give ``B' (out, r')``, ``A' (r', in)`` with the scale folded into B', and
the pipeline class's own ``save_lora_weights`` writes diffusers' key naming with ``lora_alpha = r'`` (scale 1).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lora_tsd.adapter_io import load_adapter
from lora_tsd.app.diffusion.config import RUN_MARKER, DreamBoothConfig
from lora_tsd.app.diffusion.pipeline import load_pipeline
from lora_tsd.errors import ConfigError
from lora_tsd.merge import merge
from lora_tsd.peft_export import peft_factors

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def is_dreambooth_run(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / RUN_MARKER).is_file()


def export_diffusers(run_dir: str, out_dir: str, merged: bool = False, overwrite: bool = False) -> Path:
    """Write ``out_dir``: the diffusers LoRA of the run's adapter, or the merged pipeline (``merged``)."""
    run = Path(run_dir)
    if not is_dreambooth_run(run):
        raise ConfigError(f"{run_dir!r} is not a dreambooth run folder (no {RUN_MARKER}); --format diffusers exports "
                          "runs of `lora-tsd dreambooth`")
    cfg = DreamBoothConfig.from_dict(json.loads((run / RUN_MARKER).read_text(encoding="utf-8")))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite")
    pipe = load_pipeline(cfg.model)
    unet = load_adapter(pipe.unet, run / "adapter")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if merged:
        pipe.unet = merge(unet)
        pipe.save_pretrained(tmp)
    else:
        factors = peft_factors(unet)
        rank = next(iter(factors.values()))[1].shape[0]
        layers = {}
        for name, (B, A) in factors.items():
            layers[f"{name}.lora_A.weight"] = A
            layers[f"{name}.lora_B.weight"] = B
        metadata = {"r": rank, "lora_alpha": rank, "target_modules": sorted(factors)}
        type(pipe).save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                     weight_name=LORA_WEIGHTS_FILE)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
