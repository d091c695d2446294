"""``lora-tsd analyze``: the flags of its two analyses (``spectrum``, ``capture``) and the commands that run them
(:mod:`lora_tsd.app.experiments.spectrum`, :mod:`lora_tsd.app.experiments.capture`) and print their summaries."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lora_tsd.app.cli.options import normalize_targets
from lora_tsd.app.experiments.capture import analyze_capture
from lora_tsd.app.experiments.spectrum import analyze_spectrum
from lora_tsd.app.workflow.config import DEFAULT_TASK, TrainConfig


def add_arguments(parser: Any) -> None:
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    sp = sub.add_parser("spectrum", help="change-rate spectra of one or two fine-tunes, and their TSD overlap",
                        description="Per-layer change-rate spectra of a run folder, a lora-tsd or PEFT adapter, or "
                                    "a fully fine-tuned model folder against the pretrained weights; with two "
                                    "sources (e.g. two tasks), the overlap of their top TSDs.")
    sp.add_argument("sources", nargs="+", metavar="SOURCE", help="one or two run/adapter/model folders")
    sp.add_argument("--out", required=True, help="output folder (spectrum.json and PNGs)")
    sp.add_argument("--model", help="pretrained base model (default: the run's or the adapter's)")
    sp.add_argument("--labels", nargs="+", help="a name per source (default: folder names)")
    sp.add_argument("--top", type=int, default=8, help="top-N TSDs per layer (default 8)")
    sp.add_argument("--target-modules", nargs="+", help="layers of a dense source (default: the model type's)")
    sp.add_argument("--max-layers", type=int, default=36, help="layers drawn in the spectra grid (default 36)")
    sp.add_argument("--no-plots", action="store_true", help="JSON only")
    sp.add_argument("--check-precision", action="store_true",
                    help="also decompose every weight in float64 and report how many of the top-N TSDs the fp32 SVD "
                         "(the method's) agrees on (one float64 SVD per layer: slow for large models)")

    cp = sub.add_parser("capture", help="recall/accuracy of LoRA's TSDs against a full fine-tune, along training",
                        description="Fine-tune the model fully (the reference TSDs, or --reference) and train LoRA "
                                    "(or read --lora-run's checkpoints); at steps along training, the paper's "
                                    "recall (reference top-4 in predicted top-8) and accuracy (predicted top-8 "
                                    "in reference top-16), mean over layers.")
    cp.add_argument("--out", required=True, help="output folder (capture.json, capture.png, full_ft/)")
    cp.add_argument("--model", default="minilm", help="base model (default: minilm)")
    cp.add_argument("--task", default=DEFAULT_TASK, help=f"task spec (default: {DEFAULT_TASK})")
    cp.add_argument("--steps", type=int, default=200, help="optimizer steps of both runs (default 200)")
    cp.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (default 1e-3)")
    cp.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tune learning rate (default 5e-5)")
    cp.add_argument("--r", "--rank", dest="r", type=int, default=8, help="LoRA rank (default 8)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--data-seed", type=int, default=0)
    cp.add_argument("--max-train", type=int, default=None)
    cp.add_argument("--max-eval", type=int, default=500)
    cp.add_argument("--max-length", type=int, default=128)
    cp.add_argument("--batch-size", type=int, default=16)
    cp.add_argument("--warmup-steps", type=int, default=25)
    cp.add_argument("--eval-batch-size", type=int, default=64)
    cp.add_argument("--bf16", action="store_true", help="bf16 autocast")
    cp.add_argument("--target-modules", nargs="+", default=None)
    cp.add_argument("--every", type=int, default=None, help="measure every N steps (default steps/10, plus 1, 2, 5)")
    cp.add_argument("--snapshot-steps", nargs="+", type=int, default=None, help="explicit steps to measure at")
    cp.add_argument("--lora-run", help="a `lora-tsd train` run whose checkpoints/step-N/adapter are LoRA's snapshots")
    cp.add_argument("--reference", help="a fully fine-tuned model folder to use as the reference")
    cp.add_argument("--top", type=int, default=8, help="top-N TSDs in the reference spectra (default 8)")
    cp.add_argument("--no-save-reference", action="store_true", help="do not save the full fine-tune to out/full_ft")
    cp.add_argument("--no-plots", action="store_true", help="JSON only")


def run_analyze(args: argparse.Namespace) -> int:
    if args.analysis == "spectrum":
        report = analyze_spectrum(args.sources, args.out, model=args.model, labels=args.labels, top=args.top,
                                  target_modules=_targets(args.target_modules),
                                  max_layers=args.max_layers,
                                  plots=not args.no_plots, check_precision=args.check_precision)
        for label, summary in report["summary"].items():
            s = summary["all"]
            if "median_dash_share" in s:
                print(f"{label}: dash term ‖c‖ / ‖(α/r)BA‖_F: median {s['median_dash_share']:.4f}, "
                      f"max {s['max_dash_share']:.4f} over layers")
            if "median_init_start_ratio" in s:
                print(f"{label}: LoRA-Init's starting factors ‖A₀‖_F / ‖A_LoRA‖_F: median "
                      f"{s['median_init_start_ratio']:.3f} (range {s['min_init_start_ratio']:.3f}–"
                      f"{s['max_init_start_ratio']:.3f}) over layers")
            if "mean_fp64_top_agreement" in s:
                print(f"{label}: fp32 vs float64 SVD, top-{report['top']} TSDs agree on "
                      f"{100 * s['mean_fp64_top_agreement']:.1f}% on average (min "
                      f"{100 * s['min_fp64_top_agreement']:.1f}%; identical in {s['layers_fp64_top_equal']} of "
                      f"{s['layers']} layers)")
            print(f"{label}: {s['layers']} layers; top-{report['top']} TSDs at mean spectral position "
                  f"{s['mean_position']:.2f} (0 = largest σ), {100 * s['share_in_top_decile']:.0f}% in the top "
                  f"decile, {100 * s['share_in_bottom_decile']:.0f}% in the bottom decile; n50 {s['mean_n50']:.1f}, "
                  f"n90 {s['mean_n90']:.1f} of k≈{s['mean_k']:.0f}; top-{report['top']} share of the rate mass "
                  f"{100 * s['mean_top_share']:.1f}% (uniform {100 * s['uniform_top_share']:.1f}%)")
        if report["overlap"]:
            o = report["overlap"]
            print(f"overlap of the top-{o['top']} TSDs: mean {o['mean']:.3f} (chance {o['mean_chance']:.3f})")
        print(f"wrote {Path(args.out) / 'spectrum.json'}" + (f", {', '.join(report['plots'])}"
                                                              if report["plots"] else ""))
        return 0
    cfg = TrainConfig.from_dict(normalize_targets(dict(
        model=args.model, task=args.task, method="lora", r=args.r, lr=args.lr, steps=args.steps, seed=args.seed,
        data_seed=args.data_seed, max_train=args.max_train, max_eval=args.max_eval, max_length=args.max_length,
        batch_size=args.batch_size, warmup_steps=args.warmup_steps, eval_batch_size=args.eval_batch_size,
        bf16=args.bf16, target_modules=args.target_modules, output_dir=args.out, progress=False)))
    result = analyze_capture(cfg, args.out, full_lr=args.full_lr, snapshots=args.snapshot_steps, every=args.every,
                             lora_run=args.lora_run, reference=args.reference, top=args.top,
                             save_reference=not args.no_save_reference, plots=not args.no_plots)
    for label, s in result["series"].items():
        pairs = ", ".join(f"{step}: {a:.2f}/{r:.2f}" for step, a, r in zip(s["steps"], s["accuracy"], s["recall"],
                                                                              strict=True))
        print(f"{label} — step: accuracy/recall — {pairs}")
    print(f"random directions: accuracy {result['chance']['accuracy']:.3f}, recall {result['chance']['recall']:.3f}")
    print(f"wrote {Path(args.out) / 'capture.json'}" + (f", {', '.join(result['plots'])}" if result["plots"] else ""))
    return 0


def _targets(values: list[str] | None) -> list[str] | str | None:
    return normalize_targets({"target_modules": values})["target_modules"]
