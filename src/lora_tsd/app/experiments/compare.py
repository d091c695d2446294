"""``lora-tsd compare``: a resumable grid of methods × seeds × tasks (× ranks, × a learning-rate sweep) on one
model, tuned the same way for every method, with mean ± std tables, paired differences to a baseline with
95 % confidence intervals over seeds, and plots.

Every run is the ``train`` workflow (:func:`lora_tsd.app.workflow.run.run_training`) into::

    <out>/runs/<task>/<method>/r<r>/lr<lr>/seed<seed>/

A run folder with ``summary.json`` is finished and is never trained again; one without it (a killed run)
continues from its newest good checkpoint when the grid runs with ``--checkpoint-every`` and the folder's
settings are the grid's, and is restarted from scratch otherwise; one with ``failed.json`` (the run raised,
e.g. a diverging learning rate) is kept as failed unless ``--retry-failed``.

Tuning (the same budget for every method): each (task, method, r) group trains every ``--lr`` on the
``--tune-seeds`` (default: all seeds); the lr with the best mean *validation* metric is chosen, the other
seeds run at that lr only, and the *test* metric of the chosen lr is reported over all seeds. A failed run
ranks its lr below every lr whose runs all finished.

Statistics: mean ± sample std (ddof 1) over seeds; the paired difference to the baseline (default ``lora``)
over the seeds both finished, with a Student-t 95 % confidence interval ``d̄ ± t_{0.975, n-1} · s_d / √n``.
The t quantile is computed here (regularized incomplete beta + bisection; scipy is not a dependency).

Method variants: ``--methods dash dash:selector=top dash:dash_directions=4,prelaunch_steps=50`` runs LoRA-Dash
with other :class:`~lora_tsd.app.workflow.config.TrainConfig` values; the label (the whole string) names the row.

Carrying runs over: run folders hold adapters and are not meant to be committed, but ``results.json`` is.
``--reuse OLD/results.json`` copies the finished and failed runs of an earlier invocation (same model, same fixed
options) into ``<out>/reused.json``; from then on the grid treats them as finished (never trains them again)
and reports them with the runs it trains itself, so a grid can be continued on another machine from its
committed results. Each run's loss curve is kept in ``results.json``, so carried runs keep their learning
curves (runs carried from results written before curves were kept are left out of the curve plots).

Outputs in ``<out>``: ``results.csv`` (one row per run), ``results.json`` (runs, selection, summary, paired
differences, the command), ``results.md`` (the tables), ``accuracy.png`` and ``curves_<task>_r<r>.png``.

This module is the public face of the grid; each concept lives in its own module, re-exported here:
:mod:`.grid` (the spec, run keys and configs), :mod:`.grid_state` (finished / failed / partial runs, settings
checks, ``--reuse``), :mod:`.grid_training` (training the missing runs), :mod:`.grid_results` (collecting runs,
the lr selection, summary and paired differences), :mod:`.grid_report` (results.csv/json/md and plots) and
:mod:`.statistics` (mean ± std, Student-t intervals).
"""

from lora_tsd.app.experiments.grid import (
    DEFAULT_METHODS,
    GRID_FIELDS,
    GridSpec,
    MethodVariant,
    RowKey,
    RunKey,
    command_line,
    groups,
    lr_text,
    make_config,
    run_slug,
    tuning_keys,
)
from lora_tsd.app.experiments.grid_report import markdown_report, write_csv, write_outputs
from lora_tsd.app.experiments.grid_results import (
    choose_lrs,
    collect_runs,
    learning_curves,
    lr_scores,
    summarize,
)
from lora_tsd.app.experiments.grid_state import (
    FAILED_FILE,
    NEUTRAL_FIELDS,
    REUSED_FILE,
    carried_run,
    load_reused,
    resumable_checkpoint,
    reuse_results,
    run_status,
)
from lora_tsd.app.experiments.grid_training import GridProgress, run_grid
from lora_tsd.app.experiments.statistics import betainc, confidence_interval, mean_std, t_cdf, t_quantile

__all__ = [
    "DEFAULT_METHODS", "FAILED_FILE", "GRID_FIELDS", "NEUTRAL_FIELDS", "REUSED_FILE", "GridProgress", "GridSpec",
    "MethodVariant", "RowKey", "RunKey", "betainc", "carried_run", "choose_lrs", "collect_runs", "command_line",
    "confidence_interval", "groups", "learning_curves", "load_reused", "lr_scores", "lr_text", "make_config",
    "markdown_report", "mean_std", "resumable_checkpoint", "reuse_results", "run_grid", "run_slug", "run_status",
    "summarize", "t_cdf", "t_quantile", "tuning_keys", "write_csv", "write_outputs",
]
