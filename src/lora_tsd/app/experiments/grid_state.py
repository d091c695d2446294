"""The state of a grid's run folders: which runs are finished, failed or partial, whether a finished or
half-finished run was made with the settings the grid gives it now (else it is refused, or restarted), and the
runs carried over from earlier ``results.json`` files (``--reuse``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_tsd.app.experiments.grid import GridSpec, RowKey, RunKey, all_keys, lr_text, make_config
from lora_tsd.app.formats import finite_or_none
from lora_tsd.atomic import atomic_write_json
from lora_tsd.errors import ConfigError

#: Fields that do not change what a run computes (ignored when checking a finished run's settings).
#: ``svd_cache`` only decides whether the switch's SVDs are read back or recomputed (the same decomposition).
# Options that do not change what a run computes (checkpointing is bit-identical to not checkpointing: tested).
NEUTRAL_FIELDS = ("output_dir", "overwrite", "progress", "eval_batch_size", "svd_cache", "checkpoint_every")
FAILED_FILE = "failed.json"
#: Runs carried over from earlier results.json files (``--reuse``), inside the grid folder.
REUSED_FILE = "reused.json"



def run_status(path: Path) -> str:
    """``done`` (summary.json), ``failed`` (failed.json), ``partial`` (started, unfinished) or ``missing``."""
    if (path / "summary.json").is_file():  # a run killed in its final evaluation says "finished": false
        finished = json.loads((path / "summary.json").read_text(encoding="utf-8")).get("finished", True)
        return "done" if finished else "partial"
    if (path / FAILED_FILE).is_file():
        return "failed"
    return "partial" if path.exists() else "missing"


def comparable_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NEUTRAL_FIELDS}


def settings_diff(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the options (neutral fields aside) on which two settings dicts differ, sorted."""
    saved, wanted = comparable_settings(saved), comparable_settings(wanted)
    return sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))


def _as_saved(config: dict[str, Any]) -> dict[str, Any]:
    """A run's saved settings, with options added to TrainConfig since then at their default (what it ran with)."""
    from lora_tsd.app.workflow.config import ABSENT_MEANS, TrainConfig

    return {**TrainConfig.option_defaults(), **ABSENT_MEANS, **config}


def run_settings_diff(config: dict[str, Any], cfg: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A run's recorded settings against the TrainConfig the grid gives it: (saved, wanted, differing names)."""
    saved, wanted = _as_saved(config), cfg.to_dict()
    return saved, wanted, settings_diff(saved, wanted)


def check_settings(path: Path, cfg: Any) -> None:
    """A finished run made with other settings than the grid asks for is an error, never silently reused."""
    summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    saved, wanted, diff = run_settings_diff(summary.get("config", {}), cfg)
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
    if run_settings_diff(started.to_dict(), cfg)[2]:
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
    wanted = {k.row_key: k for k in all_keys(spec)}
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
        diff = settings_diff(saved, mine)
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
    atomic_write_json(out / REUSED_FILE, finite_or_none({"runs": list(reused.values())}))
    return carried, outside


def _check_carried_settings(source: Path, row: dict[str, Any], cfg: Any) -> None:
    run = f"{row['task']} {row['method']} r={row['r']} lr={lr_text(float(row['lr']))} seed={row['seed']}"
    if not isinstance(row.get("config"), dict):
        raise ConfigError(f"--reuse {str(source)!r}: the run {run} records no settings (a results.json from before "
                          "lora-tsd 0.2), so what it ran with cannot be checked")
    saved, wanted, diff = run_settings_diff(row["config"], cfg)
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in diff[:5])
        raise ConfigError(f"--reuse {str(source)!r}: the run {run} was trained with other settings than this grid "
                          f"gives it ({shown}); name the option in the method (e.g. init:init_estimator=prelaunch)")


def _comparable_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k.startswith(("val_", "test_", "before_test_")) or k == "status"}

