"""``lora-tsd compare``: its flags (grid axes, and every other training option as a fixed option) and the command
that trains the grid and writes the results (:mod:`lora_tsd.app.experiments.compare`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lora_tsd.app.cli.options import add_option_flags, load_config_file, option_values
from lora_tsd.app.experiments.compare import (
    DEFAULT_METHODS,
    GRID_FIELDS,
    REUSED_FILE,
    GridSpec,
    MethodVariant,
    RunKey,
    carried_run,
    command_line,
    groups,
    load_reused,
    make_config,
    markdown_report,
    reuse_results,
    run_grid,
    run_status,
    tuning_keys,
    write_outputs,
)
from lora_tsd.app.workflow.config import DEFAULT_TASK, TrainConfig
from lora_tsd.config import option_help
from lora_tsd.errors import ConfigError


def add_arguments(parser: Any) -> None:
    """The ``compare`` flags: grid axes as lists, every other TrainConfig field as a fixed option."""
    parser.add_argument("--out", required=True, help="grid folder (runs/, results.csv/json/md, plots)")
    parser.add_argument("--model", default="minilm", help=option_help(TrainConfig, "model") + " (default: minilm)")
    parser.add_argument("--tasks", nargs="+", default=[DEFAULT_TASK], help="task specs (as train --task)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="methods or variants METHOD[:KEY=VALUE,...], e.g. dash:selector=top "
                             f"(default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--r", "--rank", dest="ranks", nargs="+", type=int, default=[8], help="LoRA ranks")
    parser.add_argument("--lr", dest="lrs", nargs="+", type=float, default=[1e-3],
                        help="learning rates: with several, a sweep tuned on validation for every method alike")
    parser.add_argument("--tune-seeds", nargs="+", type=int, default=None,
                        help="seeds of the lr sweep (default: all); the other seeds run at the chosen lr only")
    parser.add_argument("--baseline", default="lora", help="method label of the paired differences")
    parser.add_argument("--metric", default="accuracy", help="metric to tune and report (accuracy, accuracy_norm)")
    parser.add_argument("--config", help="YAML/JSON file of fixed train options for every run")
    parser.add_argument("--max-runs", type=int, default=None, help="train at most this many runs, then report")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="train only every N-th run starting at I (run N processes on one grid folder)")
    parser.add_argument("--retry-failed", action="store_true", help="train runs that failed before once more")
    parser.add_argument("--reuse", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="carry the runs of earlier results.json files of this grid (same model and fixed "
                             "options) into --out: they count as finished and are reported, not trained again")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; rewrite the results from runs/ (and the runs carried by --reuse)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    fixed = parser.add_argument_group("fixed train options (the same for every run; see `lora-tsd train -h`)")
    add_option_flags(fixed, skip=GRID_FIELDS, dest_prefix="fixed_", defaults_shown=False)


def spec_from_args(args: argparse.Namespace) -> GridSpec:
    """The grid of a ``compare`` command line: axes from the list flags, fixed options from ``--config`` and flags."""
    base: dict[str, Any] = load_config_file(args.config) if args.config else {}
    base.update(option_values(args, dest_prefix="fixed_"))
    return GridSpec(model=args.model, tasks=list(args.tasks), methods=[MethodVariant.parse(m) for m in args.methods],
                    seeds=list(args.seeds), ranks=list(args.ranks), lrs=list(args.lrs), tune_seeds=args.tune_seeds,
                    base=base, baseline=args.baseline, metric=args.metric)


def run_compare(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    out = Path(args.out)
    command = command_line(spec, out)
    if args.reuse:
        carried, outside = reuse_results(spec, out, args.reuse)
        print(f"reuse: {carried} run(s) carried into {out / REUSED_FILE}" +
              (f"; {outside} run(s) of the sources are not part of this grid" if outside else ""))
    if args.dry_run:
        reused = load_reused(out)
        keys = tuning_keys(spec) or [RunKey(t, v, r, spec.lrs[0], s) for t, v, r in groups(spec) for s in spec.seeds]
        for key in keys:
            make_config(spec, key, out)
            status = "reused" if carried_run(key, out, reused) is not None else run_status(key.path(out))
            print(f"{status:<8} {key.describe()}")
        if len(spec.lrs) > 1:
            rest = len(groups(spec)) * (len(spec.seeds) - len(spec.tuning_seeds))
            print(f"+ {rest} run(s) of the other seeds at each group's chosen lr")
        return 0
    if not args.report_only:
        try:
            shard = tuple(int(x) for x in args.shard.split("/"))
            assert len(shard) == 2
        except (ValueError, AssertionError):
            raise ConfigError(f"--shard must be I/N, e.g. 0/2, got {args.shard!r}") from None
        progress = run_grid(spec, out, retry_failed=args.retry_failed, max_runs=args.max_runs, shard=shard)
        print(f"grid: {progress.trained} trained ({progress.failed} failed), {progress.skipped} already there, "
              f"{progress.pending} pending; {progress.seconds / 60:.1f} min")
    results = write_outputs(spec, out, command=command, plots=not args.no_plots)
    print(markdown_report(spec, results["runs"], results["summary"], results["paired"]).split("\n## Learning")[0])
    print(f"wrote {out / 'results.csv'}, results.json, results.md" + (f", {', '.join(results['plots'])}"
                                                                         if results["plots"] else ""))
    return 0
