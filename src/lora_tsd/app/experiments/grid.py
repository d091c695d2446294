"""A comparison grid: what it compares (:class:`GridSpec`: tasks × method variants × ranks × learning rates ×
seeds on one model), how each run is named (:class:`RunKey`) and where it lives, the TrainConfig each run
trains with, and the ``lora-tsd compare`` command that makes a given grid."""

from __future__ import annotations

import shlex
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tsd.app.formats import option_flags, slug
from lora_tsd.errors import ConfigError

DEFAULT_METHODS = ("lora", "dash", "init", "tsd", "pissa", "milora", "dora")
#: TrainConfig fields the grid sets per run: a variant or --config may not set them.
GRID_FIELDS = ("model", "task", "method", "r", "lr", "seed", "output_dir", "overwrite", "progress")


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


def run_slug(text: str, limit: int = 48) -> str:
    """A task or method label as a run-folder name (``+`` for other characters, long names cut and hashed)."""
    source, _, arg = text.partition(":")
    if source == "jsonl" and arg:  # a path: its stem plus a hash, so two files named alike stay apart
        return f"jsonl_{slug(Path(arg).name.removesuffix('.jsonl'), strip=False)}-{zlib.crc32(arg.encode()):08x}"
    return slug(text, sep="+", keep="._=-", limit=limit)


def lr_text(lr: float) -> str:
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
        return (Path(out) / "runs" / run_slug(self.task) / run_slug(self.variant.label) / f"r{self.r}"
                / f"lr{lr_text(self.lr)}" / f"seed{self.seed}")

    def describe(self) -> str:
        return f"{self.task} {self.variant.label} r={self.r} lr={lr_text(self.lr)} seed={self.seed}"


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


def all_keys(spec: GridSpec) -> list[RunKey]:
    """Every run folder the grid could have made (all lrs × all seeds), for collection."""
    return [RunKey(t, v, r, lr, s) for t, v, r in groups(spec) for lr in spec.lrs for s in spec.seeds]


def command_line(spec: GridSpec, out: str | Path) -> str:
    """A ``lora-tsd compare`` command that makes exactly this grid (fixed options spelled out as flags)."""
    parts = ["lora-tsd", "compare", "--model", spec.model, "--tasks", *spec.tasks,
             "--methods", *(m.label for m in spec.methods), "--seeds", *map(str, spec.seeds),
             "--r", *map(str, spec.ranks), "--lr", *map(lr_text, spec.lrs)]
    if spec.tune_seeds is not None:
        parts += ["--tune-seeds", *map(str, spec.tune_seeds)]
    if spec.baseline != "lora":
        parts += ["--baseline", spec.baseline]
    if spec.metric != "accuracy":
        parts += ["--metric", spec.metric]
    for key, value in sorted(spec.base.items()):
        parts += option_flags(key, value)
    parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)

