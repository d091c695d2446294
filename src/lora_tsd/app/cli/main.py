"""``lora-tsd``: train, evaluate, export, and list the embedded models and tasks.

Thin by design: it parses arguments into a :class:`~lora_tsd.app.workflow.config.TrainConfig` and calls the
workflow.
Exit codes: 0 success; 2 command-line misuse (unknown flag or config key, invalid option value, existing
output folder); 1 bad input data, missing assets or a failed run. Errors print one line, no traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

from lora_tsd.app.cli.console import add_verbose_flag, configure_console
from lora_tsd.app.cli.options import add_option_flags, load_config_file, option_values
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.errors import ConfigError, TargetError, TSDError

# ----------------------------------------------------------------------------------------- commands


def train_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options: the ``--config`` file's, overridden by the flags given."""
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    values.update(option_values(args))
    return values


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the ``--config`` file's options, overridden by the flags given."""
    return TrainConfig.from_dict(train_values(args))


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import lora_tsd.app.cli.lr_auto_command as lr_auto_command
    from lora_tsd.app.workflow.restarts import train_with_restarts
    from lora_tsd.app.workflow.run import run_training

    values = train_values(args)
    auto = lr_auto_command.check_flags(args, values)
    cfg = TrainConfig.from_dict({k: v for k, v in values.items() if not (auto and k == "lr")})
    first: Callable[[TrainConfig], dict[str, Any]] = run_training
    if auto:
        first = functools.partial(lr_auto_command.run_lr_auto, args)
    elif args.resume is not None:
        from pathlib import Path

        from lora_tsd.app.workflow.outputs import read_run_config
        from lora_tsd.app.workflow.validation import check_resume_options

        if cfg.output_dir is None:
            raise ConfigError("--resume needs --output-dir: the run folder to continue")
        given = {**(load_config_file(args.config) if args.config else {}), **option_values(args)}
        saved = read_run_config(cfg.output_dir).to_dict()
        check_resume_options(Path(cfg.output_dir), saved, given)  # options a resume would ignore are refused
        first = functools.partial(run_training, resume=True,
                                  resume_from=None if args.resume == "latest" else args.resume)
    train_with_restarts(cfg, args.stuck_restarts, first)
    return 0


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.workflow.run import evaluate_run

    if args.run is None and (args.model is None or args.task is None):
        parser.error("give a run folder, or --model and --task to score the bare base model")
    if args.output:
        check_output_file(args.output, args.overwrite)  # before the evaluation, so nothing is wasted
    result = evaluate_run(args.run, model=args.model, task=args.task, split=args.split, adapter=args.adapter,
                          max_eval=args.max_eval, eval_batch_size=args.eval_batch_size, bf16=args.bf16)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        from lora_tsd.atomic import atomic_write_json

        atomic_write_json(args.output, result)
    return 0


def check_output_file(path: str, overwrite: bool) -> None:
    """Refuse an ``--output`` file that exists (unless ``overwrite``), is a folder, or has no folder to go in."""
    from pathlib import Path

    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"--output {path!r} is a folder; give a file name")
    if (file.exists() or file.is_symlink()) and not overwrite:
        raise ConfigError(f"--output file {path!r} already exists; pass --overwrite to replace it")
    if not file.parent.is_dir():
        raise ConfigError(f"--output {path!r}: folder {str(file.parent)!r} does not exist")


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.cli.dreambooth_command import export_diffusers_if_asked
    from lora_tsd.app.workflow.run import export_run

    if (code := export_diffusers_if_asked(args)) is not None:  # --format diffusers, or a dreambooth run folder
        return code
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
        extras = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("name", "description", "cached"))
        print(f"{row['name']:<40} {row.get('description', '')}  [{extras}]")
    print("\nAlso: jsonl:<path> (text/label, input/choices/label or prompt/completion) and hf:<dataset>[:<config>].")
    return 0


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.bench import cli as bench

    return bench.main(args.bench_args)


def cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.cli.compare_command import run_compare

    return run_compare(args)


def cmd_analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lora_tsd.app.cli.analyze_command import run_analyze

    return run_analyze(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-tsd",
        description="Fine-tune with task-specific directions (LoRA-Dash, LoRA-Init, LoRA-TSD), evaluate, and "
                    "export a plain LoRA adapter. `lora-tsd train` with no arguments runs the embedded default "
                    "(MiniLM on reasoning-gym syllogisms, Yes/No, with LoRA-TSD), offline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune a model on a task and export the adapter",
                           description="Fine-tune a model on a task with a TSD method. Options come from flags "
                                       "and/or --config FILE (YAML or JSON, same names); flags override the file.")
    train.add_argument("--config", help="YAML or JSON file of options (keys as the flags, with _ or -)")
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue the run in --output-dir from its newest good checkpoint (or the given "
                            "checkpoint folder); the run's saved options are used")
    add_option_flags(train)
    import lora_tsd.app.cli.lr_auto_command as lr_auto_command

    lr_auto_command.add_arguments(train)
    from lora_tsd.app.workflow.restarts import DEFAULT_RESTARTS

    train.add_argument("--stuck-restarts", type=int, default=DEFAULT_RESTARTS, metavar="N",
                       help="when the run ends stuck (validation never left a one-class prediction), train it "
                            "again with seed +1000, +2000, ... up to N times and export the best on validation; "
                            f"the others are kept in <run>/restarts/ (default: {DEFAULT_RESTARTS}; 0: never)")
    add_verbose_flag(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="score a trained run (or a bare base model) on a task split",
                        description="Score the adapter of a run folder on its task (or another --task), or the "
                                    "bare base model with --model and --task.")
    ev.add_argument("run", nargs="?", help="run folder written by `lora-tsd train`")
    ev.add_argument("--model", help="base model (default: the run's); alone with --task: score the bare model")
    ev.add_argument("--task", help="task spec (default: the run's)")
    ev.add_argument("--adapter", help="adapter folder (default: <run>/adapter)")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"],
                    help="split to score (default: test)")
    ev.add_argument("--max-eval", type=int, default=None,
                    help="cap on evaluation examples (default: the run's max_eval; 500 for a bare model)")
    ev.add_argument("--eval-batch-size", type=int, default=None,
                    help="sequences per batch (default: the run's eval_batch_size; 64 for a bare model)")
    ev.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: the run's bf16; off for a bare model)")
    ev.add_argument("--output", help="also write the result as JSON to this file (must not exist)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    add_verbose_flag(ev)
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write a run's adapter as a stock PEFT adapter or a merged model",
                        description="Export the adapter of a run folder as a stock PEFT LoRA adapter (default) or "
                                    "as a full model with the adapter merged (--merged).")
    ex.add_argument("run", help="run folder written by `lora-tsd train`")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--merged", action="store_true", help="write a merged full model instead of an adapter")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ex.add_argument("--format", choices=["peft", "diffusers"], default=None,
                    help="peft: a stock PEFT adapter; diffusers: a LoRA for pipeline.load_lora_weights, or with "
                         "--merged the pipeline with the merged UNet (default: diffusers for a dreambooth run)")
    add_verbose_flag(ex)
    ex.set_defaults(func=cmd_export)

    models = sub.add_parser("models", help="list the embedded models (size, cached or not)",
                            description="List the embedded models: alias, kind, parameters, whether the weights are "
                                        "already in the cache ($LORA_TSD_CACHE) and their size there.")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=cmd_models)

    tasks = sub.add_parser("tasks", help="list the embedded tasks (downloadable or already extracted)",
                           description="List the embedded tasks: kind, examples and where the data is: "
                                       "extracted (in the cache, ready offline), downloaded (the source archive is in "
                                       "the cache, the task is extracted on first use), download (fetched from PyPI "
                                       "on first use), generated (seeded generators, nothing to fetch) or unavailable "
                                       "(no pinned source: the BIG-bench archive, see the README).")
    tasks.add_argument("--json", action="store_true", help="machine-readable output")
    tasks.set_defaults(func=cmd_tasks)

    bench = sub.add_parser("bench", help="performance benchmarks (options: `lora-tsd bench --help`)",
                           description="Performance benchmarks; `lora-tsd bench --help` lists their options.",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    import lora_tsd.app.cli.analyze_command as analyze_command
    import lora_tsd.app.cli.compare_command as compare_command

    cmp = sub.add_parser("compare", help="a resumable grid of methods × seeds × tasks with tables and plots",
                         description="Train every method × seed × task (× rank, × lr sweep) with the train "
                                     "workflow, tune the lr on validation for every method alike, and report test "
                                     "mean ± std and paired differences to the baseline with 95% confidence "
                                     "intervals (results.csv/json/md, PNG plots). Finished runs are skipped on "
                                     "re-invocation.")
    compare_command.add_arguments(cmp)
    add_verbose_flag(cmp)
    cmp.set_defaults(func=cmd_compare)

    ana = sub.add_parser("analyze", help="change-rate spectra of a fine-tune, TSD overlap, and TSD capture",
                         description="spectrum: per-layer change-rate spectra of an adapter, a run or a fully "
                                     "fine-tuned checkpoint (and the TSD overlap of two); capture: how well LoRA's "
                                     "estimated TSDs match a full fine-tune's along training.")
    analyze_command.add_arguments(ana)
    ana.set_defaults(func=cmd_analyze)
    import lora_tsd.app.cli.dreambooth_command as db

    dreambooth = sub.add_parser("dreambooth", help="subject-driven fine-tuning of a diffusers pipeline (DreamBooth)",
                                description=db.DESCRIPTION)
    db.add_arguments(dreambooth)
    dreambooth.set_defaults(func=lambda args, parser: db.run_dreambooth_command(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the bench parses its own options, --help included (argparse's REMAINDER drops
        from lora_tsd.app.bench import cli as bench  # an option-first remainder)

        return bench.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_console(verbose=getattr(args, "verbose", False))
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]  # for error messages
    try:
        return int(args.func(args, sub_parser) or 0)
    except (ConfigError, TargetError) as err:  # a bad option or config value: command-line misuse
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
