"""``lora-tsd dreambooth``: subject-driven fine-tuning of a diffusers pipeline's UNet with a TSD method.

The flags are generated from :class:`~lora_tsd.app.diffusion.config.DreamBoothConfig` (the options of ``train`` that
apply, plus the pipeline, images, prompts, prior preservation and sampling), like ``train``'s from its config.
"""

from __future__ import annotations

import argparse
from typing import Any

from lora_tsd.app.cli.options import add_option_flags, load_config_file, option_values

DESCRIPTION = (
    "DreamBooth-style fine-tuning of a diffusers pipeline (Stable Diffusion 1.x/2.x, SDXL) on a few images of a "
    "subject with a TSD method (default LoRA-Dash on the UNet's attention projections to_q, to_k, to_v, to_out.0), "
    "with the noise-prediction loss and optional prior preservation. Writes the adapter, checkpoints, summary.json "
    "and samples.png (the instance prompt from fixed seeds: the row before training above the row after). "
    "Export with `lora-tsd export RUN --format diffusers --out DIR` and load with pipeline.load_lora_weights(DIR).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lora_tsd.app.diffusion.config import DreamBoothConfig

    parser.add_argument("--config", help="YAML or JSON file of options (keys as the flags, with _ or -)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the run in --output-dir from its newest good checkpoint (or the given "
                             "checkpoint folder); the run's saved options are used")
    add_option_flags(parser, config_cls=DreamBoothConfig)


def run_dreambooth_command(args: argparse.Namespace) -> int:
    from lora_tsd.app.diffusion.config import DreamBoothConfig
    from lora_tsd.app.diffusion.training import run_dreambooth

    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config, DreamBoothConfig))
    values.update(option_values(args, config_cls=DreamBoothConfig))
    if args.resume is not None:
        out = values.get("output_dir", DreamBoothConfig.option_defaults()["output_dir"])
        summary = run_dreambooth(_resume_config(out, values), resume=True,
                                 resume_from=None if args.resume == "latest" else args.resume)
    else:
        summary = run_dreambooth(DreamBoothConfig.from_dict(values))
    print(f"trained {summary['config']['method']} r={summary['config']['r']} for {summary['config']['steps']} steps "
          f"in {summary['wall_time_s']:.0f} s; outputs in {summary['config']['output_dir']}: adapter/, samples.png, "
          "summary.json (export: lora-tsd export RUN --format diffusers --out DIR)")
    return 0


def _resume_config(out: str, values: dict[str, Any]) -> Any:
    """A placeholder config naming the run folder; ``run_dreambooth(resume=True)`` reads the run's own options."""
    from lora_tsd.app.diffusion.config import DreamBoothConfig

    placeholder = {"model": "-", "images": "-", "prompt": "-", "output_dir": out}
    if "progress" in values:
        placeholder["progress"] = values["progress"]
    return DreamBoothConfig.from_dict(placeholder)


def export_diffusers_if_asked(args: argparse.Namespace) -> int | None:
    """``lora-tsd export`` of a dreambooth run (or ``--format diffusers``); ``None`` leaves it to the PEFT export."""
    from pathlib import Path

    from lora_tsd.app.diffusion.config import RUN_MARKER

    if args.format == "peft" or (args.format is None and not (Path(args.run) / RUN_MARKER).is_file()):
        return None
    from lora_tsd.app.diffusion.export import export_diffusers

    out = export_diffusers(args.run, args.out, merged=args.merged, overwrite=args.overwrite)
    what = ("pipeline with the merged UNet (load with DiffusionPipeline.from_pretrained)" if args.merged else
            "diffusers LoRA (load with pipeline.load_lora_weights)")
    print(f"wrote {what} to {out}")
    return 0
