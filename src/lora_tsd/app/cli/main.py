"""``lora-tsd``: train, evaluate, export, and list the embedded models and tasks.

Thin by design: it parses arguments into a :class:`~lora_tsd.train.TrainConfig` and calls the library.
Exit codes: 0 success; 2 command-line misuse (unknown flag or config key, invalid option value, existing
output folder); 1 bad input data, missing assets or a failed run. Errors print one line, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from lora_tsd.errors import ConfigError, TSDError

TRAIN_HELP: dict[str, str] = {
    "model": "embedded alias (minilm, smollm2-135m), local model folder, or Hugging Face Hub id",
    "task": "bigbench:<task>[/<subtask>], reasoning-gym:<generator>, jsonl:<path>, or hf:<dataset>[:<config>]",
    "output_dir": "run folder (must not exist unless --overwrite)",
    "overwrite": "replace an existing run folder",
    "method": "lora, dash (LoRA-Dash), init (LoRA-Init), tsd (LoRA-TSD), pissa, milora, or dora (PEFT's DoRA baseline)",
    "r": "LoRA rank",
    "alpha": "LoRA alpha (default 2·r); the update is scaled by alpha/r",
    "dropout": "dropout on the adapter input",
    "target_modules": "module-name suffixes to adapt (default: per model type), or one regex",
    "prelaunch_steps": "t: optimizer steps of plain LoRA before the switch (default 100 for dash and for init/tsd "
                       "with --init-estimator prelaunch; 0 for the gradient estimator and top/bottom/random)",
    "dash_directions": "s: directions with a trainable dash coefficient",
    "init_directions": "directions moved into A, B by LoRA-Init (default r)",
    "selector": "direction selector: tsd, top, bottom, random (default: the method's)",
    "init_estimator": "how init/tsd rank their directions: gradient (full-weight gradient of --probe-batches "
                      "batches, switch before training; the default) or prelaunch (change rate of t steps of "
                      "LoRA, the paper's; the default when --prelaunch-steps is given)",
    "dash_placement": "LoRA-TSD: dash on the shared top-s (shared) or the next s directions (next)",
    "steps": "optimizer steps",
    "batch_size": "examples per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (AdamW, linear warm-up then linear decay)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps",
    "max_grad_norm": "gradient clipping norm (0 disables)",
    "bf16": "bf16 autocast (GPU; on CPUs without AVX-512 BF16 it is slower than fp32: 13x per SmolLM2 step on AVX2)",
    "seed": "seed of initialization, data order, dropout and random selectors",
    "data_seed": "seed of the train/validation/test split (fixed across training seeds so runs share a test set)",
    "max_length": "maximum tokens per sequence",
    "max_train": "cap on training examples",
    "max_eval": "cap on validation and test examples",
    "eval_every": "evaluate on the validation split every N optimizer steps (0: only at the end)",
    "eval_batch_size": "sequences per evaluation batch",
    "checkpoint_every": "save a resumable checkpoint every N optimizer steps (0: none; the newest 2 are kept)",
    "probe_batches": "micro-batches of the gradient probe (init/tsd with the gradient estimator switch before "
                     "training, ranking by the accumulated full-weight gradient)",
    "skip_nonfinite": "skip optimizer steps whose loss or gradient is NaN/inf (counted in the log) instead of stopping",
    "progress": "show a progress bar",
    "svd_cache": "reuse the switch's SVDs from the content-keyed cache in $LORA_TSD_CACHE/svd (changed weights miss; "
                 "default: on for CPU runs, off on GPUs, where recomputing the SVD is faster than reading it back)",
    "fsdp": "shard with FSDP2 (fully_shard) when launched on several processes (torchrun / accelerate launch)",
}


# `--r` is ambiguous to launchers that parse abbreviations (torchrun: --rdzv-*, --role, ...): `--rank` works
# everywhere.
FLAG_ALIASES = {"r": ["--rank"]}


def _field_type(field: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(_train_config())[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is bool:
        return bool
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if any(typing.get_origin(a) is list for a in args):
            return list
        return args[0]
    return hint


def _train_config():
    from lora_tsd.app.workflow.run import TrainConfig

    return TrainConfig


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    cls = _train_config()
    defaults = cls.__dataclass_fields__
    for field in dataclasses.fields(cls):
        flags = ["--" + field.name.replace("_", "-"), *FLAG_ALIASES.get(field.name, [])]
        default = defaults[field.name].default
        shown = "" if default is dataclasses.MISSING or default is None else f" (default: {default})"
        kind = _field_type(field)
        if kind is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=TRAIN_HELP[field.name] + shown)
        elif kind is list:
            parser.add_argument(*flags, dest=field.name, nargs="+", default=None, help=TRAIN_HELP[field.name])
        else:
            parser.add_argument(*flags, dest=field.name, type=kind, default=None,
                                help=TRAIN_HELP[field.name] + shown)


def _load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        parser.error(f"--config file {path!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        parser.error(f"--config file {path!r} is not valid YAML/JSON: {err}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"--config file {path!r} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(_train_config())}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        parser.error(f"unknown key(s) in {path}: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    if isinstance(data.get("target_modules"), str) and "," in data["target_modules"]:
        data["target_modules"] = data["target_modules"].split(",")
    return data


def _train_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    cls = _train_config()
    values: dict[str, Any] = {}
    if args.config:
        values.update(_load_config_file(args.config, parser))
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    tm = values.get("target_modules")
    if isinstance(tm, list) and len(tm) == 1 and any(c in tm[0] for c in "*()[]|\\^$+?"):
        values["target_modules"] = tm[0]  # a single regex
    return cls.from_dict(values)


# ----------------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.workflow.run import run_training

    cfg = _train_config_from_args(args, parser)
    if args.resume is not None:
        run_training(cfg, resume=True, resume_from=None if args.resume == "latest" else args.resume)
    else:
        run_training(cfg)
    return 0


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.workflow.run import evaluate_run

    if args.run is None and (args.model is None or args.task is None):
        parser.error("give a run folder, or --model and --task to score the bare base model")
    result = evaluate_run(args.run, model=args.model, task=args.task, split=args.split, adapter=args.adapter,
                          max_eval=args.max_eval, eval_batch_size=args.eval_batch_size, bf16=args.bf16)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        from lora_tsd.atomic import atomic_write_json

        atomic_write_json(args.output, result)
    return 0


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.workflow.run import export_run

    out = export_run(args.run, args.out, merged=args.merged, overwrite=args.overwrite)
    what = "merged model (load with AutoModel*.from_pretrained)" if args.merged else \
        "PEFT LoRA adapter (load with peft.PeftModel.from_pretrained)"
    print(f"wrote {what} to {out}")
    return 0


def cmd_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.assets.models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'alias':<14} {'kind':<8} {'params':>8} {'cached':<7} {'size':>9}  description")
    for row in rows:
        size = f"{row['size_bytes'] / 2**20:.0f} MiB" if row.get("size_bytes") else "-"
        params = f"{row['params'] / 1e6:.1f}M" if row.get("params") else "?"
        print(f"{row['alias']:<14} {row['kind']:<8} {params:>8} {'yes' if row['cached'] else 'no':<7} {size:>9}  "
              f"{row['description']}")
    print("\nAny local model folder or Hugging Face Hub id works too (--model PATH_OR_ID).")
    return 0


def cmd_tasks(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.assets.tasks import list_tasks

    rows = list_tasks()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        extras = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("name", "description"))
        print(f"{row['name']:<40} {row.get('description', '')}  [{extras}]")
    print("\nAlso: jsonl:<path> (text/label, input/choices/label or prompt/completion) and hf:<dataset>[:<config>].")
    return 0


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.bench import cli as bench

    return bench.main(args.bench_args)


def cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.experiments.compare import main_from_args

    return main_from_args(args)


def cmd_analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.experiments.analyze import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-tsd",
        description="Fine-tune with task-specific directions (LoRA-Dash, LoRA-Init, LoRA-TSD), evaluate, and "
                    "export a plain LoRA adapter. `lora-tsd train` with no arguments runs the embedded default "
                    "(MiniLM on BIG-bench multiemo sentiment, LoRA-TSD), offline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune a model on a task and export the adapter",
                           description="Fine-tune a model on a task with a TSD method. Options come from flags "
                                       "and/or --config FILE (YAML or JSON, same names); flags override the file.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", help="YAML or JSON file of options (keys as the flags, with _ or -)")
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue the run in --output-dir from its newest good checkpoint (or the given "
                            "checkpoint folder); the run's saved options are used")
    _add_train_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="score a trained run (or a bare base model) on a task split",
                        description="Score the adapter of a run folder on its task (or another --task), or the "
                                    "bare base model with --model and --task.")
    ev.add_argument("run", nargs="?", help="run folder written by `lora-tsd train`")
    ev.add_argument("--model", help="base model (default: the run's); alone with --task: score the bare model")
    ev.add_argument("--task", help="task spec (default: the run's)")
    ev.add_argument("--adapter", help="adapter folder (default: <run>/adapter)")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"], help="split to score")
    ev.add_argument("--max-eval", type=int, default=None, help="cap on evaluation examples")
    ev.add_argument("--eval-batch-size", type=int, default=None, help="sequences per batch")
    ev.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    ev.add_argument("--output", help="also write the result as JSON to this file")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write a run's adapter as a stock PEFT adapter or a merged model",
                        description="Export the adapter of a run folder as a stock PEFT LoRA adapter (default) or "
                                    "as a full model with the adapter merged (--merged).")
    ex.add_argument("run", help="run folder written by `lora-tsd train`")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--merged", action="store_true", help="write a merged full model instead of an adapter")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ex.set_defaults(func=cmd_export)

    models = sub.add_parser("models", help="list the embedded models (size, cached or not)")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=cmd_models)

    tasks = sub.add_parser("tasks", help="list the embedded tasks")
    tasks.add_argument("--json", action="store_true", help="machine-readable output")
    tasks.set_defaults(func=cmd_tasks)

    bench = sub.add_parser("bench", help="performance benchmarks (see `lora-tsd bench -- --help`)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    from lora_tsd.app.experiments import analyze, compare

    cmp = sub.add_parser("compare", help="a resumable grid of methods × seeds × tasks with tables and plots",
                         description="Train every method × seed × task (× rank, × lr sweep) with the train "
                                     "workflow, tune the lr on validation for every method alike, and report test "
                                     "mean ± std and paired differences to the baseline with 95% confidence "
                                     "intervals (results.csv/json/md, PNG plots). Finished runs are skipped on "
                                     "re-invocation.")
    compare.add_arguments(cmp)
    cmp.set_defaults(func=cmd_compare)

    ana = sub.add_parser("analyze", help="change-rate spectra of a fine-tune, TSD overlap, and TSD capture",
                         description="spectrum: per-layer change-rate spectra of an adapter, a run or a fully "
                                     "fine-tuned checkpoint (and the TSD overlap of two); capture: how well LoRA's "
                                     "estimated TSDs match a full fine-tune's along training.")
    analyze.add_arguments(ana)
    ana.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]  # for error messages
    try:
        return int(args.func(args, sub_parser) or 0)
    except ConfigError as err:  # a bad option or config value: command-line misuse
        print(f"lora-tsd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TSDError as err:
        print(f"lora-tsd {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lora-tsd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
