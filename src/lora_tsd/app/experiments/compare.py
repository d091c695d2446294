"""``lora-tsd compare``: a resumable grid of methods × seeds × tasks (× ranks, × a learning-rate sweep) on one
model, tuned the same way for every method, with mean ± std tables, paired differences to a baseline with
95 % confidence intervals over seeds, and plots.

Every run is the ``train`` workflow (:func:`lora_tsd.train.run_training`) into::

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
with other :class:`~lora_tsd.train.TrainConfig` values; the label (the whole string) names the row.

Carrying runs over: run folders hold adapters and are not meant to be committed, but ``results.json`` is.
``--reuse OLD/results.json`` copies the finished and failed runs of an earlier invocation (same model, same fixed
options) into ``<out>/reused.json``; from then on the grid treats them as finished (never trains them again)
and reports them with the runs it trains itself, so a grid can be continued on another machine from its
committed results. Each run's loss curve is kept in ``results.json``, so carried runs keep their learning
curves (runs carried from results written before curves were kept are left out of the curve plots).

Outputs in ``<out>``: ``results.csv`` (one row per run), ``results.json`` (runs, selection, summary, paired
differences, the command), ``results.md`` (the tables), ``accuracy.png`` and ``curves_<task>_r<r>.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tsd.atomic import atomic_write, atomic_write_json
from lora_tsd.errors import ConfigError, TSDError

DEFAULT_METHODS = ("lora", "dash", "init", "tsd", "pissa", "milora", "dora")
#: TrainConfig fields the grid sets per run: a variant or --config may not set them.
GRID_FIELDS = ("model", "task", "method", "r", "lr", "seed", "output_dir", "overwrite", "progress")
#: Fields that do not change what a run computes (ignored when checking a finished run's settings).
#: ``svd_cache`` only decides whether the switch's SVDs are read back or recomputed (the same decomposition).
# Options that do not change what a run computes (checkpointing is bit-identical to not checkpointing: tested).
NEUTRAL_FIELDS = ("output_dir", "overwrite", "progress", "eval_batch_size", "svd_cache", "checkpoint_every")
FAILED_FILE = "failed.json"
#: Runs carried over from earlier results.json files (``--reuse``), inside the grid folder.
REUSED_FILE = "reused.json"

# ------------------------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for ``a, b > 0``, ``0 ≤ x ≤ 1``."""
    if not 0.0 <= x <= 1.0:
        raise ConfigError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    if df <= 0:
        raise ConfigError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile ``t_{p, df}`` of Student's t (e.g. ``t_quantile(0.975, 4) = 2.7764…``), to ~1e-10."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided Student-t interval of the mean (NaN bounds for n < 2)."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


# ------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class MethodVariant:
    """A row of the comparison: a method plus TrainConfig overrides, named by ``label``."""

    label: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MethodVariant:
        """``dash`` or ``dash:selector=top,dash_directions=4`` (values parsed as YAML scalars)."""
        import yaml

        from lora_tsd.app.workflow.config import TrainConfig

        method, _, rest = text.partition(":")
        method = method.strip()
        if not method:
            raise ConfigError(f"method variant {text!r} has no method name")
        known = set(TrainConfig.option_names())
        overrides = []
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq:
                raise ConfigError(f"method variant {text!r}: {item!r} is not KEY=VALUE")
            if key not in known:
                raise ConfigError(f"method variant {text!r}: unknown option {key!r}")
            if key in GRID_FIELDS:
                raise ConfigError(f"method variant {text!r}: {key!r} is a grid axis; use the compare flag instead")
            overrides.append((key, yaml.safe_load(value)))
        return cls(text, method, tuple(overrides))


@dataclass
class GridSpec:
    """What to compare. ``base`` holds fixed TrainConfig values shared by every run."""

    model: str
    tasks: list[str]
    methods: list[MethodVariant]
    seeds: list[int]
    ranks: list[int] = field(default_factory=lambda: [8])
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    tune_seeds: list[int] | None = None
    base: dict[str, Any] = field(default_factory=dict)
    baseline: str = "lora"
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        for name in ("tasks", "methods", "seeds", "ranks", "lrs"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"compare needs at least one value for {name}")
            keys = [v.label if isinstance(v, MethodVariant) else v for v in values]
            if len(set(keys)) != len(keys):
                raise ConfigError(f"{name} has duplicates: {keys}")
        if self.tune_seeds is not None:
            extra = sorted(set(self.tune_seeds) - set(self.seeds))
            if extra:
                raise ConfigError(f"--tune-seeds {extra} are not among --seeds {self.seeds}")
            if not self.tune_seeds:
                raise ConfigError("--tune-seeds needs at least one seed")
        bad = sorted(set(self.base) & set(GRID_FIELDS))
        if bad:
            raise ConfigError(f"fixed options may not set the grid axes {bad}")

    @property
    def tuning_seeds(self) -> list[int]:
        return list(self.tune_seeds) if self.tune_seeds is not None else list(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "tasks": self.tasks, "methods": [m.label for m in self.methods],
                "seeds": self.seeds, "ranks": self.ranks, "lrs": self.lrs, "tune_seeds": self.tuning_seeds,
                "base": self.base, "baseline": self.baseline, "metric": self.metric}


def _slug(text: str, limit: int = 48) -> str:
    source, _, arg = text.partition(":")
    if source == "jsonl" and arg:  # a path: its stem plus a hash, so two files named alike stay apart
        return f"jsonl_{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(arg).name.removesuffix('.jsonl'))}-" \
               f"{zlib.crc32(arg.encode()):08x}"
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "+", text).strip("+")
    if len(slug) > limit:
        slug = f"{slug[:limit - 9]}-{zlib.crc32(text.encode()):08x}"
    return slug


def _lr_text(lr: float) -> str:
    return f"{lr:g}"


#: (task, method label, r, lr, seed): how a run is named in results.json rows.
RowKey = tuple[str, str, int, float, int]


@dataclass(frozen=True)
class RunKey:
    task: str
    variant: MethodVariant
    r: int
    lr: float
    seed: int

    @property
    def group(self) -> tuple[str, str, int]:
        return (self.task, self.variant.label, self.r)

    @property
    def row_key(self) -> RowKey:
        return (self.task, self.variant.label, self.r, float(self.lr), self.seed)

    def path(self, out: Path) -> Path:
        return (Path(out) / "runs" / _slug(self.task) / _slug(self.variant.label) / f"r{self.r}"
                / f"lr{_lr_text(self.lr)}" / f"seed{self.seed}")

    def describe(self) -> str:
        return f"{self.task} {self.variant.label} r={self.r} lr={_lr_text(self.lr)} seed={self.seed}"


def make_config(spec: GridSpec, key: RunKey, out: Path):
    """The run's TrainConfig: spec.base, the variant's overrides, then the grid axes."""
    from lora_tsd.app.workflow.config import TrainConfig

    values = dict(spec.base)
    values.update(dict(key.variant.overrides))
    values.update(model=spec.model, task=key.task, method=key.variant.method, r=key.r, lr=key.lr, seed=key.seed,
                  output_dir=str(key.path(out)), overwrite=True, progress=False)
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{key.describe()}: {err}") from None


def groups(spec: GridSpec) -> list[tuple[str, MethodVariant, int]]:
    return [(task, variant, r) for task in spec.tasks for r in spec.ranks for variant in spec.methods]


def tuning_keys(spec: GridSpec) -> list[RunKey]:
    """Runs of the lr sweep (none when there is a single lr)."""
    if len(spec.lrs) == 1:
        return []
    return [RunKey(task, variant, r, lr, seed) for seed in spec.tuning_seeds for lr in spec.lrs
            for task, variant, r in groups(spec)]


# ------------------------------------------------------------------------------------------- run state


def run_status(path: Path) -> str:
    """``done`` (summary.json), ``failed`` (failed.json), ``partial`` (started, unfinished) or ``missing``."""
    if (path / "summary.json").is_file():  # a run killed in its final evaluation says "finished": false
        finished = json.loads((path / "summary.json").read_text(encoding="utf-8")).get("finished", True)
        return "done" if finished else "partial"
    if (path / FAILED_FILE).is_file():
        return "failed"
    return "partial" if path.exists() else "missing"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NEUTRAL_FIELDS}


def _settings_diff(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the options (neutral fields aside) on which two settings dicts differ, sorted."""
    saved, wanted = _comparable(saved), _comparable(wanted)
    return sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))


def _as_saved(config: dict[str, Any]) -> dict[str, Any]:
    """A run's saved settings, with options added to TrainConfig since then at their default (what it ran with)."""
    from lora_tsd.app.workflow.config import ABSENT_MEANS, TrainConfig

    return {**TrainConfig.option_defaults(), **ABSENT_MEANS, **config}


def _run_settings_diff(config: dict[str, Any], cfg: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A run's recorded settings against the TrainConfig the grid gives it: (saved, wanted, differing names)."""
    saved, wanted = _as_saved(config), cfg.to_dict()
    return saved, wanted, _settings_diff(saved, wanted)


def _check_settings(path: Path, cfg: Any) -> None:
    """A finished run made with other settings than the grid asks for is an error, never silently reused."""
    summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    saved, wanted, diff = _run_settings_diff(summary.get("config", {}), cfg)
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} → {wanted.get(k)!r}" for k in diff[:5])
        raise ConfigError(f"the finished run {path} was trained with other settings ({shown}); use another --out "
                          "or delete that run folder")


def resumable_checkpoint(path: Path, cfg: Any) -> Path | None:
    """The checkpoint a killed run continues from: its newest good one, when the grid checkpoints and the folder
    was started with the settings the grid gives it now (else None: the run restarts from scratch)."""
    from lora_tsd.app.workflow.checkpoint import find_checkpoint
    from lora_tsd.app.workflow.outputs import RUN_MARKER, read_run_config

    if not cfg.checkpoint_every or not (path / RUN_MARKER).is_file():
        return None
    try:  # the same reader the resumed run uses, so a folder that passes here resumes
        started = read_run_config(path)
    except (ConfigError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if _run_settings_diff(started.to_dict(), cfg)[2]:
        return None
    return find_checkpoint(path)


def _row_key(row: dict[str, Any]) -> RowKey:
    return (row["task"], row["method"], int(row["r"]), float(row["lr"]), int(row["seed"]))


def carried_run(key: RunKey, out: Path, reused: dict[RowKey, dict[str, Any]]) -> dict[str, Any] | None:
    """The reused row that stands for ``key``: only when its run folder holds no finished or failed run."""
    if run_status(key.path(out)) in ("done", "failed"):
        return None
    return reused.get(key.row_key)


def load_reused(out: Path) -> dict[RowKey, dict[str, Any]]:
    """The runs carried into this grid folder by ``--reuse`` (empty when there are none)."""
    path = Path(out) / REUSED_FILE
    if not path.is_file():
        return {}
    return {_row_key(row): row for row in json.loads(path.read_text(encoding="utf-8"))["runs"]}


def reuse_results(spec: GridSpec, out: str | Path, sources: Sequence[str | Path]) -> tuple[int, int]:
    """Carry the finished and failed runs of earlier ``results.json`` files into ``<out>/reused.json``.

    A source must come from a grid on the same model with the same fixed options (neutral fields aside), or it
    is refused; its runs that are not part of this grid are ignored. Each carried run's recorded settings
    (``config``) must be the ones this grid would train it with, so a label whose meaning changed (a new
    default, say) is refused rather than carried. A run found in two sources with different results is an
    error. Returns ``(runs carried, runs of the sources outside this grid)``.
    """
    out = Path(out)
    wanted = {k.row_key: k for k in _all_keys(spec)}
    reused = load_reused(out)
    carried = outside = 0
    for source in map(Path, sources):
        if not source.is_file():
            raise ConfigError(f"--reuse {str(source)!r}: no such file (give a results.json written by compare)")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
            old, runs = data["spec"], data["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"--reuse {str(source)!r} is not a compare results.json ({err})") from None
        if old.get("model") != spec.model:
            raise ConfigError(f"--reuse {str(source)!r} is a grid on model {old.get('model')!r}, this one is on "
                              f"{spec.model!r}")
        saved, mine = old.get("base", {}), spec.base
        diff = _settings_diff(saved, mine)
        if diff:
            shown = ", ".join(f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} here" for k in diff)
            raise ConfigError(f"--reuse {str(source)!r} was run with other fixed options ({shown})")
        for row in runs:
            if row.get("status") not in ("done", "failed"):
                continue
            key = _row_key(row)
            if key not in wanted:
                outside += 1
                continue
            _check_carried_settings(source, row, make_config(spec, wanted[key], out))
            row = {**row, "reused_from": row.get("reused_from") or str(source)}
            known = reused.get(key)
            if known is not None:
                if _comparable_row(known) != _comparable_row(row):
                    raise ConfigError(f"--reuse: the run {key} has different results in {known['reused_from']!r} "
                                      f"and {str(source)!r}")
                continue
            reused[key] = row
            carried += 1
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / REUSED_FILE, _clean({"runs": list(reused.values())}))
    return carried, outside


def _check_carried_settings(source: Path, row: dict[str, Any], cfg: Any) -> None:
    run = f"{row['task']} {row['method']} r={row['r']} lr={_lr_text(float(row['lr']))} seed={row['seed']}"
    if not isinstance(row.get("config"), dict):
        raise ConfigError(f"--reuse {str(source)!r}: the run {run} records no settings (a results.json from before "
                          "lora-tsd 0.2), so what it ran with cannot be checked")
    saved, wanted, diff = _run_settings_diff(row["config"], cfg)
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in diff[:5])
        raise ConfigError(f"--reuse {str(source)!r}: the run {run} was trained with other settings than this grid "
                          f"gives it ({shown}); name the option in the method (e.g. init:init_estimator=prelaunch)")


def _comparable_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k.startswith(("val_", "test_", "before_test_")) or k == "status"}


# ------------------------------------------------------------------------------------------- execution


@dataclass
class GridProgress:
    trained: int = 0
    skipped: int = 0
    failed: int = 0
    pending: int = 0
    seconds: float = 0.0


class _Executor:
    def __init__(self, spec: GridSpec, out: Path, train: Callable[..., Any], retry_failed: bool,
                 max_runs: int | None, say: Callable[[str], None], shard: tuple[int, int] = (0, 1)) -> None:
        self.spec, self.out, self.train, self.retry_failed = spec, out, train, retry_failed
        self.max_runs, self.say, self.shard = max_runs, say, shard
        self.progress = GridProgress()
        self.seen: set[RunKey] = set()
        self.reused = load_reused(out)

    def status(self, key: RunKey) -> str:
        carried = carried_run(key, self.out, self.reused)
        return carried["status"] if carried is not None else run_status(key.path(self.out))

    def budget_left(self) -> bool:
        return self.max_runs is None or self.progress.trained < self.max_runs

    def ensure(self, key: RunKey, index: int, total: int) -> str:
        if key in self.seen:
            return self.status(key)
        self.seen.add(key)
        path = key.path(self.out)
        cfg = make_config(self.spec, key, self.out)
        status = self.status(key)
        if status == "done":
            if (path / "summary.json").is_file():  # reused runs were checked when they were carried in
                _check_settings(path, cfg)
            self.progress.skipped += 1
            return status
        if status == "failed" and not self.retry_failed:
            self.progress.skipped += 1
            return status
        if not self.budget_left() or (index - 1) % self.shard[1] != self.shard[0]:
            self.progress.pending += 1
            return status
        checkpoint = resumable_checkpoint(path, cfg) if status == "partial" else None
        # Resume from exactly the checkpoint announced (not a re-search); a fresh run passes cfg alone.
        resume = {} if checkpoint is None else {"resume": True, "resume_from": str(checkpoint)}
        action = "train" if checkpoint is None else "resume"
        where = "" if checkpoint is None else f" from {checkpoint.name}"
        self.say(f"[{index}/{total}] {action} {key.describe()}{where}")
        (path / FAILED_FILE).unlink(missing_ok=True)
        started = time.time()
        try:
            self.train(cfg, **resume)
        except TSDError as err:  # e.g. NonFiniteError at a too-high lr: recorded, the grid goes on
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path / FAILED_FILE, {"error": str(err), "type": type(err).__name__})
            self.progress.failed += 1
            self.say(f"    failed: {type(err).__name__}: {err}")
        self.progress.trained += 1
        self.progress.seconds += time.time() - started
        return self.status(key)


def run_grid(spec: GridSpec, out: str | Path, train: Callable[..., Any] | None = None, retry_failed: bool = False,
             max_runs: int | None = None, say: Callable[[str], None] = print,
             shard: tuple[int, int] = (0, 1)) -> GridProgress:
    """Train every missing run of the grid (sweep first, then the other seeds at the chosen lr).

    Args:
        train: the training function (default :func:`lora_tsd.train.run_training`), called with a TrainConfig.
        max_runs: stop after training this many runs (the rest stays pending; re-invoke to continue).
        shard: ``(i, n)``: train only the runs at positions ≡ i (mod n) of the grid's order, so n processes
            (e.g. one per core or GPU) share a grid folder without training a run twice.
    Returns:
        counts of trained, skipped (already finished or failed), failed and pending runs.
    """
    if train is None:
        from lora_tsd.app.workflow.run import run_training as train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "grid.json", spec.to_dict())
    # Build every config first, so a bad variant or option fails before hours of training.
    sweep = tuning_keys(spec)
    for key in sweep or [RunKey(t, v, r, spec.lrs[0], s) for t, v, r in groups(spec) for s in spec.seeds]:
        make_config(spec, key, out)
    if not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"shard {shard[0]}/{shard[1]}: need 0 <= i < n")
    executor = _Executor(spec, out, train, retry_failed, max_runs, say, shard)
    total = len(sweep) + len(groups(spec)) * (len(spec.seeds) - (len(spec.tuning_seeds) if sweep else 0))
    index = 0
    for key in sweep:
        index += 1
        executor.ensure(key, index, total)
    rows = collect_runs(spec, out)
    chosen = choose_lrs(spec, rows)
    for seed in spec.seeds:
        for task, variant, r in groups(spec):
            lr = chosen.get((task, variant.label, r))
            if sweep and seed in spec.tuning_seeds:
                continue
            index += 1
            if lr is None:  # the sweep is unfinished (max_runs) or every lr failed
                executor.progress.pending += 1
                continue
            executor.ensure(RunKey(task, variant, r, lr, seed), index, total)
    return executor.progress


# ------------------------------------------------------------------------------------------- results


def _all_keys(spec: GridSpec) -> list[RunKey]:
    """Every run folder the grid could have made (all lrs × all seeds), for collection."""
    return [RunKey(t, v, r, lr, s) for t, v, r in groups(spec) for lr in spec.lrs for s in spec.seeds]


def _losses(path: Path, last: int = 10) -> tuple[float | None, list[list[float]] | None]:
    """From one read of a run's metrics log: the mean loss of the last ``last`` steps, and the loss curve
    ``[[step, loss], ...]`` (finite losses, 5 significant digits), kept in results.json so a run carried to
    another machine with ``--reuse`` keeps its learning curve. ``(None, None)`` without a log."""
    log = path / "metrics.jsonl"
    if not log.is_file():
        return None, None
    steps = [r for r in _read_jsonl(log) if r.get("event") == "step"]
    losses = [r["loss"] for r in steps]
    final = sum(losses[-last:]) / len(losses[-last:]) if losses else None
    curve = [[r["step"], float(f"{r['loss']:.5g}")] for r in steps
             if isinstance(r.get("loss"), int | float) and math.isfinite(r["loss"])]
    return final, curve


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def collect_runs(spec: GridSpec, out: str | Path) -> list[dict[str, Any]]:
    """One record per finished or failed run of the grid, in grid order: its run folder, else a reused run."""
    from lora_tsd.app.workflow.outputs import RUN_MARKER

    out = Path(out)
    reused = load_reused(out)
    rows = []
    for key in _all_keys(spec):
        path = key.path(out)
        carried = carried_run(key, out, reused)
        if carried is not None:
            rows.append(dict(carried))
            continue
        status = run_status(path)
        if status not in ("done", "failed"):
            continue
        row: dict[str, Any] = {"task": key.task, "method": key.variant.label, "base_method": key.variant.method,
                               "r": key.r, "lr": key.lr, "seed": key.seed, "status": status,
                               "run_dir": str(path.relative_to(out))}
        if status == "done":
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
            after, before = summary["metrics_after"], summary["metrics_before"]
            for split in ("validation", "test"):
                for name, value in after.get(split, {}).items():
                    row[f"{'val' if split == 'validation' else 'test'}_{name}"] = value
            for name, value in before.get("test", {}).items():
                row[f"before_test_{name}"] = value
            final_loss, curve = _losses(path)
            row.update(steps=summary["config"]["steps"], switch_step=summary.get("switch_step"),
                       trainable_parameters=summary["model"]["trainable_parameters"],
                       final_train_loss=final_loss, wall_time_s=summary.get("wall_time_s"), loss_curve=curve,
                       config=_comparable(summary["config"]))
        else:
            row["error"] = json.loads((path / FAILED_FILE).read_text(encoding="utf-8")).get("error")
            marker = path / RUN_MARKER
            if marker.is_file():
                row["config"] = _comparable(json.loads(marker.read_text(encoding="utf-8")))
        rows.append(row)
    return rows


def lr_scores(spec: GridSpec, rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[float, float | None]]:
    """Mean validation metric per lr over the tuning seeds: ``-inf`` if a run failed, None if incomplete."""
    metric = f"val_{spec.metric}"
    index = {(r["task"], r["method"], r["r"], r["lr"], r["seed"]): r for r in rows}
    scores: dict[tuple[str, str, int], dict[float, float | None]] = {}
    seeds = spec.tuning_seeds if len(spec.lrs) > 1 else spec.seeds
    for task, variant, r in groups(spec):
        per_lr: dict[float, float | None] = {}
        for lr in spec.lrs:
            found = [index.get((task, variant.label, r, lr, s)) for s in seeds]
            if any(f is not None and f["status"] == "failed" for f in found):
                per_lr[lr] = -math.inf
            elif any(f is None for f in found):
                per_lr[lr] = None
            else:
                per_lr[lr] = sum(f[metric] for f in found) / len(found)
        scores[(task, variant.label, r)] = per_lr
    return scores


def choose_lrs(spec: GridSpec, rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], float]:
    """The lr of each (task, method, r) group: best mean validation metric on the tuning seeds (ties: first lr)."""
    if len(spec.lrs) == 1:
        return {g: spec.lrs[0] for g in ((t, v.label, r) for t, v, r in groups(spec))}
    chosen = {}
    for group, per_lr in lr_scores(spec, rows).items():
        if any(v is None for v in per_lr.values()):
            continue  # the sweep of this group is unfinished
        best = max(spec.lrs, key=lambda lr: (per_lr[lr], -spec.lrs.index(lr)))
        if per_lr[best] != -math.inf:
            chosen[group] = best
    return chosen


def summarize(spec: GridSpec, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per group at its chosen lr: mean/std of val and test; paired test differences to the baseline."""
    chosen = choose_lrs(spec, rows)
    metric = spec.metric
    final: dict[tuple[str, str, int], dict[int, dict[str, Any]]] = {}
    for row in rows:
        group = (row["task"], row["method"], row["r"])
        if chosen.get(group) == row["lr"] and row["status"] == "done":
            final.setdefault(group, {})[row["seed"]] = row
    summary = []
    for task, variant, r in groups(spec):
        group = (task, variant.label, r)
        runs = final.get(group, {})
        seeds = sorted(runs)
        test = [runs[s][f"test_{metric}"] for s in seeds]
        val = [runs[s][f"val_{metric}"] for s in seeds]
        before = [runs[s].get(f"before_test_{metric}") for s in seeds]
        before = [b for b in before if b is not None]
        tm, ts = mean_std(test)
        vm, vs = mean_std(val)
        summary.append({"task": task, "method": variant.label, "base_method": variant.method, "r": r,
                        "lr": chosen.get(group), "n": len(seeds), "seeds": seeds, "test_mean": tm, "test_std": ts,
                        "val_mean": vm, "val_std": vs, "before_test_mean": mean_std(before)[0] if before else None,
                        "trainable_parameters": runs[seeds[0]]["trainable_parameters"] if seeds else None})
    paired = []
    for task, variant, r in groups(spec):
        if variant.label == spec.baseline:
            continue
        mine, base = final.get((task, variant.label, r), {}), final.get((task, spec.baseline, r), {})
        seeds = sorted(set(mine) & set(base))
        if not base:
            continue
        diffs = [mine[s][f"test_{metric}"] - base[s][f"test_{metric}"] for s in seeds]
        mean, low, high = confidence_interval(diffs) if diffs else (math.nan, math.nan, math.nan)
        _, std = mean_std(diffs)
        paired.append({"task": task, "method": variant.label, "r": r, "baseline": spec.baseline, "n": len(seeds),
                       "seeds": seeds, "diff_mean": mean, "diff_std": std, "ci_low": low, "ci_high": high,
                       "diffs": diffs})
    return summary, paired


# ------------------------------------------------------------------------------------------- writers


def _num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return _num(obj)


def write_csv(rows: list[dict[str, Any]], path: Path, chosen: dict[tuple[str, str, int], float]) -> None:
    first = ["task", "method", "base_method", "r", "lr", "seed", "status", "chosen_lr"]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in first and k not in keys
                 and k not in ("run_dir", "error", "reused_from", "loss_curve", "config")]  # both stay in results.json
    metric_keys = sorted(k for k in keys if k.startswith(("val_", "test_", "before_test_")))
    rest = [k for k in keys if k not in metric_keys]
    header = first + metric_keys + rest + ["run_dir", "error"] + (
        ["reused_from"] if any("reused_from" in row for row in rows) else [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = dict(row, chosen_lr=chosen.get((row["task"], row["method"], row["r"])) == row["lr"])
        writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in header})
    text = buffer.getvalue()
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def _columns(spec: GridSpec) -> list[tuple[str, int]]:
    return [(t, r) for t in spec.tasks for r in spec.ranks]


def _col_name(task: str, r: int, spec: GridSpec) -> str:
    return task if len(spec.ranks) == 1 else f"{task} r={r}"


def markdown_report(spec: GridSpec, rows: list[dict[str, Any]], summary: list[dict[str, Any]],
                    paired: list[dict[str, Any]], command: str | None = None, plots: Sequence[str] = ()) -> str:
    metric = spec.metric
    cols = _columns(spec)
    by = {(s["task"], s["method"], s["r"]): s for s in summary}
    lines = [f"# Method comparison on `{spec.model}`", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    base = ", ".join(f"{k}={v}" for k, v in sorted(spec.base.items())) or "defaults"
    tune = "all seeds" if spec.tune_seeds is None else f"seed(s) {', '.join(map(str, spec.tuning_seeds))}"
    lines += [f"Seeds {', '.join(map(str, spec.seeds))}; rank(s) {', '.join(map(str, spec.ranks))}; "
              f"learning rates {', '.join(_lr_text(lr) for lr in spec.lrs)}"
              + (f" (swept on {tune}, best mean validation {metric} per task, method and rank)"
                 if len(spec.lrs) > 1 else "") + f"; fixed options: {base}.", ""]
    lines += [f"## Test {metric} (%), mean ± std over seeds, at the chosen learning rate", ""]
    header = ["method", *(_col_name(t, r, spec) for t, r in cols)]
    with_avg = len(cols) > 1
    if with_avg:
        header.append("mean")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # The untrained model depends on the seed only (head initialization), so average over seeds, not over
    # methods: a method with fewer finished seeds must not tilt the row.
    before_cells = []
    for t, r in cols:
        per_seed: dict[int, list[float]] = {}
        for row in rows:
            value = row.get(f"before_test_{metric}")
            if row["task"] == t and row["r"] == r and row["status"] == "done" and value is not None:
                per_seed.setdefault(row["seed"], []).append(value)
        values = [sum(v) / len(v) for v in per_seed.values()]
        before_cells.append(_pct(sum(values) / len(values)) if values else "–")
    lines.append("| untrained | " + " | ".join(before_cells) + (" | |" if with_avg else " |"))
    for variant in spec.methods:
        cells, means = [], []
        for t, r in cols:
            s = by.get((t, variant.label, r))
            if s is None or not s["n"]:
                cells.append("–")
                continue
            spread = f" ± {_pct(s['test_std'])}" if s["n"] > 1 else ""
            cells.append(f"{_pct(s['test_mean'])}{spread}" + (f" (n={s['n']})" if s["n"] != len(spec.seeds) else ""))
            means.append(s["test_mean"])
        if with_avg:
            cells.append(_pct(sum(means) / len(means)) if len(means) == len(cols) else "–")
        lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
    lines.append("")
    if paired:
        lines += [f"## Paired difference to `{spec.baseline}` (test {metric}, percentage points), mean "
                  "[95 % CI over seeds]", "",
                  "Same seeds (same data order and head initialization), each method at its own chosen learning "
                  "rate; Student-t interval with n−1 degrees of freedom. **Bold**: the interval excludes 0.", ""]
        pby = {(p["task"], p["method"], p["r"]): p for p in paired}
        lines += ["| method | " + " | ".join(_col_name(t, r, spec) for t, r in cols) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        for variant in spec.methods:
            if variant.label == spec.baseline:
                continue
            cells = []
            for t, r in cols:
                p = pby.get((t, variant.label, r))
                if p is None or not p["n"]:
                    cells.append("–")
                elif p["n"] < 2:
                    cells.append(f"{_signed(p['diff_mean'])} (n=1)")
                else:
                    text = f"{_signed(p['diff_mean'])} [{_signed(p['ci_low'])}, {_signed(p['ci_high'])}]"
                    cells.append(f"**{text}**" if p["ci_low"] > 0 or p["ci_high"] < 0 else text)
            lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(spec.lrs) > 1:
        lines += [f"## Learning-rate sweep: mean validation {metric} (%) on the tuning seeds", ""]
        scores = lr_scores(spec, rows)
        chosen = choose_lrs(spec, rows)
        lines += ["| task | method | r | " + " | ".join(f"lr {_lr_text(lr)}" for lr in spec.lrs) + " | chosen |",
                  "|" + "---|" * (len(spec.lrs) + 4)]
        for t, v, r in groups(spec):
            per = scores[(t, v.label, r)]
            cells = ["failed" if per[lr] == -math.inf else _pct(per[lr]) for lr in spec.lrs]
            pick = chosen.get((t, v.label, r))
            lines.append(f"| {t} | {v.label} | {r} | " + " | ".join(cells) + f" | {_lr_text(pick) if pick else '–'} |")
        lines.append("")
    params = {(s["method"], s["r"]): s["trainable_parameters"] for s in summary if s["trainable_parameters"]}
    if params:
        lines += ["Trainable parameters per run (adapter + classification head where there is one): "
                  + "; ".join(f"{m} r={r}: {n:,}" for (m, r), n in params.items()) + ".", ""]
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    compute = sum(r.get("wall_time_s") or 0 for r in done)
    lines += [f"Runs: {len(done)} finished, {len(failed)} failed; summed run wall time {compute / 60:.1f} min.", ""]
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def write_outputs(spec: GridSpec, out: str | Path, command: str | None = None, plots: bool = True,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Collect the grid's runs and write results.csv/json/md and the plots; returns the results object."""
    out = Path(out)
    rows = collect_runs(spec, out)
    chosen = choose_lrs(spec, rows)
    summary, paired = summarize(spec, rows)
    made: list[str] = []
    if plots and any(r["status"] == "done" for r in rows):
        made = _make_plots(spec, out, rows, summary, chosen, say)
    write_csv(rows, out / "results.csv", chosen)
    results = {"command": command, "spec": spec.to_dict(), "runs": rows,
               "selection": [{"task": t, "method": m, "r": r, "lr": lr} for (t, m, r), lr in chosen.items()],
               "summary": summary, "paired": paired, "plots": made}
    atomic_write_json(out / "results.json", _clean(results))
    text = markdown_report(spec, rows, summary, paired, command, made)
    atomic_write(out / "results.md", lambda p: p.write_text(text, encoding="utf-8"))
    return results


def learning_curves(spec: GridSpec, rows: list[dict[str, Any]], chosen: dict, task: str,
                    r: int) -> dict[str, dict[str, Any]]:
    """Per method at its chosen lr: training loss per step averaged over seeds, and the switch step.

    Runs without a ``loss_curve`` (carried by ``--reuse`` from results written before curves were kept) are
    left out; ``seeds`` says how many runs each curve averages.
    """
    curves = {}
    for variant in spec.methods:
        lr = chosen.get((task, variant.label, r))
        runs = [row for row in rows if (row["task"], row["method"], row["r"], row["lr"]) ==
                (task, variant.label, r, lr) and row["status"] == "done" and row.get("loss_curve")]
        if not runs:
            continue
        per_step: dict[int, list[float]] = {}
        switch = next((row["switch_step"] for row in runs if row.get("switch_step") is not None), None)
        for row in runs:
            for step, loss in row["loss_curve"]:
                per_step.setdefault(int(step), []).append(loss)
        steps = sorted(per_step)
        curves[variant.label] = {"steps": steps, "loss": [sum(per_step[s]) / len(per_step[s]) for s in steps],
                                 "switch": switch, "seeds": len(runs)}
    return curves


def _make_plots(spec: GridSpec, out: Path, rows, summary, chosen, say) -> list[str]:
    try:
        from lora_tsd.app.experiments import plots
    except ImportError as err:  # matplotlib is an optional extra
        say(f"plots skipped ({err}); pip install 'lora-tsd[plots]'")
        return []
    made = []
    labels = [v.label for v in spec.methods]
    panels = []
    for t, r in _columns(spec):
        points = {}
        for variant in spec.methods:
            lr = chosen.get((t, variant.label, r))
            points[variant.label] = [row[f"test_{spec.metric}"] for row in rows
                                     if (row["task"], row["method"], row["r"], row["lr"]) == (t, variant.label, r, lr)
                                     and row["status"] == "done"]
        panels.append((_col_name(t, r, spec), points))
    plots.plot_accuracy(panels, labels, out / "accuracy.png", ylabel=f"test {spec.metric}",
                        title=f"{spec.model}: test {spec.metric} at the chosen lr (mean ± std, dots: seeds)")
    made.append("accuracy.png")
    for t, r in _columns(spec):
        curves = learning_curves(spec, rows, chosen, t, r)
        if not curves:
            continue
        name = f"curves_{_slug(t)}_r{r}.png"
        plots.plot_learning_curves(curves, out / name, title=f"{spec.model} on {t}, r={r}: training loss "
                                   "(mean over seeds; dashed: switch step)")
        made.append(name)
    return made


# ------------------------------------------------------------------------------------------- command line


def command_line(spec: GridSpec, out: str | Path) -> str:
    """A ``lora-tsd compare`` command that makes exactly this grid (fixed options spelled out as flags)."""
    parts = ["lora-tsd", "compare", "--model", spec.model, "--tasks", *spec.tasks,
             "--methods", *(m.label for m in spec.methods), "--seeds", *map(str, spec.seeds),
             "--r", *map(str, spec.ranks), "--lr", *map(_lr_text, spec.lrs)]
    if spec.tune_seeds is not None:
        parts += ["--tune-seeds", *map(str, spec.tune_seeds)]
    if spec.baseline != "lora":
        parts += ["--baseline", spec.baseline]
    if spec.metric != "accuracy":
        parts += ["--metric", spec.metric]
    for key, value in sorted(spec.base.items()):
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        elif value is not None:
            parts += [flag, str(value)]
    parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)
