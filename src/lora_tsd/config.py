"""Configuration of a TSD adapter: the method table and :class:`TSDConfig`.

The field names of :class:`TSDConfig` are a public contract (they appear in saved adapters and in the
command line). Everything a method *does* is described by its :class:`MethodSpec` row, so code branches on
properties (``spec.has_dash``), never on method-name strings.
"""

from __future__ import annotations

import dataclasses
import re
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


class DictConfig:
    """JSON round trip for config dataclasses, refusing unknown keys by name."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206 - returns an instance of the subclass
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class TSDConfig(DictConfig):
    """Hyper-parameters of a TSD adapter (method.md; defaults as there).

    Attributes:
        method: one of ``lora``, ``dash``, ``init``, ``tsd``, ``pissa``, ``milora``.
        r: LoRA rank.
        alpha: LoRA α; the LoRA product is scaled by ``alpha / r``. Default ``2·r``.
        dropout: dropout on the adapter input (shared by the LoRA and dash terms).
        target_modules: list of module-name suffixes (``["q_proj", "v_proj"]``) or one regex string that
            must match the full module name. ``None`` picks the usual attention/MLP projections.
        prelaunch_steps: t, optimizer steps of plain LoRA before the switch. Default 100 where the change rates
            of a pre-launch rank the directions (``dash``, and ``init``/``tsd`` with ``init_estimator=
            'prelaunch'``); 0 otherwise: the gradient estimator and the ``top``/``bottom``/``random`` selectors
            need no pre-launch (the latter switch at attach).
        dash_directions: s, directions with a trainable dash coefficient (dash, tsd).
        init_directions: directions LoRA-Init takes into A, B (init, tsd, pissa, milora). Default r.
        selector: ``tsd`` / ``top`` / ``bottom`` / ``random``; default the method's own.
        init_estimator: how LoRA-Init and LoRA-TSD rank their directions: ``gradient`` (by the full-weight
            gradient accumulated by :func:`lora_tsd.gradient_probe` before training, no throw-away steps) or
            ``prelaunch`` (by the change rate of t steps of LoRA whose A, B are then discarded, the paper's
            pre-launch). Default ``None``: ``gradient`` for ``init``/``tsd`` with the ``tsd`` selector unless
            ``prelaunch_steps ≥ 1`` asks for a pre-launch; ``prelaunch`` (the only estimator) for every other
            method. The default follows docs/results.md: at a fixed step budget the gradient estimator beat
            the pre-launch on every task measured.
        dash_placement: ``shared`` (dash on the top-s of the ranking) or ``next`` (on ranks r+1..r+s),
            LoRA-TSD only.
        eps: relative ε of the change rate, ``ε = eps · σ_1``.
        seed: seeds the initialization of A and the ``random`` selector.
        modules_to_save: names (suffixes) of extra modules trained in full and saved with the adapter,
            e.g. a classification head.
    """

    method: str = "lora"
    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    prelaunch_steps: int | None = None
    dash_directions: int = DEFAULT_DASH_DIRECTIONS
    init_directions: int | None = None
    selector: str | None = None
    init_estimator: str | None = None
    dash_placement: str = "shared"
    eps: float = DEFAULT_EPS
    seed: int = 0
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
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

