"""Configuration of a TSD adapter: the method table and :class:`TSDConfig`.

The field names of :class:`TSDConfig` are a public contract (they appear in saved adapters and in the
command line). Everything a method *does* is described by its :class:`MethodSpec` row, so code branches on
properties (``spec.has_dash``), never on method-name strings.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .directions import DEFAULT_EPS, SELECTORS
from .errors import ConfigError

INIT_ESTIMATORS = ("prelaunch", "gradient")
DASH_PLACEMENTS = ("shared", "next")
DEFAULT_PRELAUNCH_STEPS = 100
DEFAULT_DASH_DIRECTIONS = 8


@dataclass(frozen=True)
class MethodSpec:
    """What a method does at its switch.

    Attributes:
        has_dash: a trainable coefficient per selected direction (LoRA-Dash term), zero until the switch.
        has_init: A, B re-initialized from the selected directions and the base weight replaced by the
            residual ``W - U_T diag(σ_T) V_Tᵀ`` (LoRA-Init, PiSSA, MiLoRA).
        selector: the default direction selector.
        needs_rates: the default selector ranks by change rate, so a pre-launch (or probe) is needed.
    """

    has_dash: bool
    has_init: bool
    selector: str
    description: str

    @property
    def has_switch(self) -> bool:
        return self.has_dash or self.has_init


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(False, False, "tsd", "plain LoRA (no switch)"),
    "dash": MethodSpec(True, False, "tsd", "LoRA-Dash: LoRA + trainable scales on the top-s TSDs after t steps"),
    "init": MethodSpec(False, True, "tsd", "LoRA-Init: re-initialize A, B from the top-r TSDs after t steps"),
    "tsd": MethodSpec(True, True, "tsd", "LoRA-TSD: LoRA-Init plus a dash term on the TSDs"),
    "pissa": MethodSpec(False, True, "top", "PiSSA: initialize from the largest singular directions"),
    "milora": MethodSpec(False, True, "bottom", "MiLoRA: initialize from the smallest singular directions"),
}


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages name the offending value, boundedly."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 12] + f"… ({len(text)} chars)"


def _matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` strictly: a string is never a number, a bool never an int, and a
    float must be finite."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches_type(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        item = (typing.get_args(hint) or (Any,))[0]
        return "a list of strings" if item is str else f"a list of {_type_name(item)}"
    if hint is float:
        return "a finite number"
    return {bool: "true/false", int: "an integer", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


class DictConfig:
    """Config dataclasses: strict field types (checked first thing in ``__post_init__`` by :meth:`check_types`),
    and a JSON round trip that refuses unknown keys by name."""

    def check_types(self) -> None:
        """Refuse a field whose value has the wrong type, naming the field and the value (a config file's
        ``"lr": "0.01"`` or ``"bf16": "no"`` is an error, never silently a number or a bool)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches_type(value, hints[f.name]):
                raise ConfigError(f"{f.name} must be {_type_name(hints[f.name])}, got {short_repr(value)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206 - returns an instance of the subclass
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be a mapping of option names to values, got {short_repr(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(map(short_repr, unknown))}; known keys: "
                              f"{', '.join(sorted(known))}")
        return cls(**data)


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field whose ``metadata["help"]`` documents it: the one place an option is described (the
    command line's ``--help`` shows the same text)."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(metadata={"help": help}, **kwargs)


def option_help(cls: type, name: str) -> str:
    """The help text of option ``name`` of the config dataclass ``cls``."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


@dataclass
class TSDConfig(DictConfig):
    """Hyper-parameters of a TSD adapter (docs/method.md). Each field's ``metadata["help"]`` documents it.

    ``None`` defaults are resolved in ``__post_init__`` (``alpha = 2·r``, the method's selector and estimator,
    ``prelaunch_steps``, ``init_directions = r``); :meth:`given_options` returns the values as they were given,
    and :meth:`with_options` derives a config from them, so that e.g. another ``r`` keeps ``alpha = 2·r``.
    """

    method: str = option("lora", "lora, dash (LoRA-Dash), init (LoRA-Init), tsd (LoRA-TSD), pissa or milora")
    r: int = option(8, "LoRA rank")
    alpha: float | None = option(None, "LoRA alpha; the LoRA product is scaled by alpha/r (default 2·r)")
    dropout: float = option(0.0, "dropout on the adapter input (independent masks for the LoRA and dash terms "
                                 "after the switch, as in the authors' code)")
    target_modules: list[str] | str | None = option(
        None, "module-name suffixes to adapt, or one regex matching the full name (default: per model type, the "
              "attention and MLP projections)")
    prelaunch_steps: int | None = option(
        None, "t: optimizer steps of plain LoRA before the switch (default 100 where a pre-launch ranks the "
              "directions: dash, and init/tsd with init_estimator prelaunch; 0 for the gradient estimator and the "
              "top/bottom/random selectors, which switch at once)")
    dash_directions: int = option(DEFAULT_DASH_DIRECTIONS, "s: directions with a trainable dash coefficient")
    init_directions: int | None = option(None, "directions LoRA-Init moves into A, B (default r)")
    selector: str | None = option(None, "direction selector: tsd, top, bottom or random (default: the method's)")
    init_estimator: str | None = option(
        None, "how init/tsd rank their directions: gradient (the full-weight gradient of a few batches, switch "
              "before training; the default) or prelaunch (the change rate of t steps of LoRA, the paper's; the "
              "default when prelaunch_steps is given)")
    dash_placement: str = option("shared", "LoRA-TSD: dash on the shared top-s (shared) or on the next s "
                                           "directions (next)")
    requantize_residual: bool = option(
        False, "quantized (bitsandbytes) bases, init-style methods: re-quantize the residual W - U_T S_T V_T^T into "
               "the base at the switch (as QPiSSA/LoftQ) instead of keeping the quantized W and subtracting the "
               "components in the adapter (exact; the default, see docs/performance.md)")
    eps: float = option(DEFAULT_EPS, "relative ε of the change rate: ε = eps·σ₁")
    seed: int = option(0, "seed of A's initialization and of the random selector")
    modules_to_save: list[str] = option(help="names (suffixes) of extra modules trained in full and saved with "
                                             "the adapter, e.g. a classification head", default_factory=list)

    def __post_init__(self) -> None:
        # The values as given, before the defaults below resolve them (not a field: not saved, not compared).
        self._given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        self.check_types()
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        spec = self.spec
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if self.alpha is None:
            self.alpha = float(2 * self.r)
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.selector is None:
            self.selector = spec.selector
        if self.selector not in SELECTORS:
            raise ConfigError(f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.init_estimator is None:
            ranks_by_gradient = spec.has_init and self.selector == "tsd" and not (
                isinstance(self.prelaunch_steps, int) and self.prelaunch_steps >= 1)
            self.init_estimator = "gradient" if ranks_by_gradient else "prelaunch"
        if self.init_estimator not in INIT_ESTIMATORS:
            raise ConfigError(f"unknown init_estimator {self.init_estimator!r}; choose one of "
                              f"{', '.join(INIT_ESTIMATORS)}")
        if self.init_estimator == "gradient":
            if not spec.has_init:
                raise ConfigError(f"init_estimator='gradient' applies to init-style methods, not {self.method!r}")
            if self.selector != "tsd":
                raise ConfigError(f"init_estimator='gradient' ranks TSDs; selector {self.selector!r} ranks by σ or "
                                  "at random and needs no estimator (leave init_estimator unset)")
        if self.dash_placement not in DASH_PLACEMENTS:
            raise ConfigError(f"unknown dash_placement {self.dash_placement!r}; choose one of "
                              f"{', '.join(DASH_PLACEMENTS)}")
        if self.prelaunch_steps is None:
            needs_rates = self.selector == "tsd" and self.init_estimator == "prelaunch" and spec.has_switch
            self.prelaunch_steps = DEFAULT_PRELAUNCH_STEPS if needs_rates else 0
        if not isinstance(self.prelaunch_steps, int) or self.prelaunch_steps < 0:
            raise ConfigError(f"prelaunch_steps (t) must be an integer ≥ 0, got {self.prelaunch_steps!r}")
        if self.init_estimator == "gradient" and self.prelaunch_steps:
            raise ConfigError(f"init_estimator='gradient' switches before training, so prelaunch_steps="
                              f"{self.prelaunch_steps} would never run; set prelaunch_steps=0 (or leave it unset), "
                              "or use init_estimator='prelaunch'")
        if self.selector == "tsd" and self.prelaunch_steps == 0 and spec.has_switch \
                and self.init_estimator == "prelaunch":
            raise ConfigError("selector 'tsd' ranks by the change rate of the pre-launch: prelaunch_steps "
                              "must be ≥ 1 (or use init_estimator='gradient', or a top/bottom/random selector)")
        if not isinstance(self.dash_directions, int) or self.dash_directions < 0:
            raise ConfigError(f"dash_directions (s) must be an integer ≥ 0, got {self.dash_directions!r}")
        if spec.has_dash and self.dash_directions == 0:
            raise ConfigError(f"method {self.method!r} needs dash_directions ≥ 1")
        if self.init_directions is None:
            self.init_directions = self.r
        if not isinstance(self.init_directions, int) or not 1 <= self.init_directions <= self.r:
            raise ConfigError(f"init_directions must be an integer in [1, r={self.r}], got "
                              f"{self.init_directions!r}")
        if not self.eps >= 0:
            raise ConfigError(f"eps must be ≥ 0, got {self.eps!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ConfigError(f"target_modules regex {self.target_modules!r} is invalid: {err}") from err
        elif self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError("target_modules must be a non-empty list of module-name suffixes or a regex")
        self.modules_to_save = list(self.modules_to_save)

    # ------------------------------------------------------------------------------------------------

    def given_options(self) -> dict[str, Any]:
        """The field values as they were passed (``None`` where a default was resolved)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._given.items()}

    def with_options(self, **changes: Any) -> TSDConfig:
        """A new config from the given values with ``changes``: defaults are resolved again (``alpha = 2·r`` for a
        new ``r`` unless alpha was given); a new ``method`` also resolves its own selector and estimator."""
        values = self.given_options()
        if "method" in changes:
            for derived in ("selector", "init_estimator"):
                changes.setdefault(derived, None)
        return TSDConfig(**{**values, **changes})

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def switches_on_probe(self) -> bool:
        """Whether the switch comes from :func:`lora_tsd.gradient_probe` before training (init-style methods with
        the gradient estimator; validation refuses the estimator for every other method)."""
        return self.init_estimator == "gradient"

    @property
    def switches_at_attach(self) -> bool:
        """Whether :func:`lora_tsd.attach` switches at once: selectors that need no training (``top``, ``bottom``,
        ``random``) with no pre-launch, e.g. PiSSA and MiLoRA."""
        return self.spec.has_switch and self.prelaunch_steps == 0 and self.init_estimator == "prelaunch"

    @property
    def scaling(self) -> float:
        """The LoRA scale ``alpha / r``."""
        return float(self.alpha) / self.r

    @property
    def dash_size(self) -> int:
        """Number of dash coefficients per layer (0 for methods without a dash term)."""
        return self.dash_directions if self.spec.has_dash else 0

    @property
    def init_size(self) -> int:
        """Number of directions moved into A, B at the switch (0 for methods without init)."""
        return int(self.init_directions) if self.spec.has_init else 0

    def directions_needed(self) -> int:
        """How many ranked directions a layer must have (k ≥ this), for validation."""
        if self.spec.has_init and self.spec.has_dash and self.dash_placement == "next":
            return self.init_size + self.dash_size
        return max(self.init_size, self.dash_size)

