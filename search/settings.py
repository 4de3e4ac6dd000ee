"""Typed settings of the search commands: each command parses its flags into one of these (field
name = flag name, ``moa_plan.args.settings_from``) and hands it to one call in ``steps.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CalibrateSettings:
    """`moa-plan calibrate`, and the first step of `search`."""

    model: str
    lengths: list[int]
    out: str | Path
    samples: int = 16
    tasks: list[str] = field(default_factory=lambda: ["docs"])
    seed: int = 0
    max_answer_tokens: int = 128
    text: str | None = None
    keep_wrong_answers: bool = False
    batch_size: int = 16
    device: str = "auto"
    overwrite: bool = False
    quiet: bool = False


@dataclass
class ProfileSettings:
    """`moa-plan profile`, and the second step of `search` (``data`` is then the first step's file)."""

    model: str
    data: str | Path | None
    out: str | Path
    sink: int = 64
    block_size: int = 64
    chunk: int = 256
    signed_influence: bool = False
    hold_out: int = 0
    measure_blocks: int = 0
    measure_samples: int = 16
    device: str = "auto"
    overwrite: bool = False
    quiet: bool = False


@dataclass
class OptimizeSettings:
    """`moa-plan optimize`, and the last step of `search`; ``model`` and ``data`` enable the
    measured validation of the Pareto plans."""

    density: list[float]
    out: str | Path
    profile: str | Path | None = None
    lengths: list[int] | None = None
    model: str | None = None
    data: str | Path | None = None
    validation_length: int | None = None
    extension_length: list[int] | None = None
    density_floor: float = 0.9
    solver: str = "glpk"
    time_limit: float | None = None
    mip_gap: float | None = None
    pareto: str = "epsilon"
    weight_steps: int = 4
    alpha_step: int | None = None
    beta_step: float = 0.125
    gqa: bool = False
    static_windows: bool = False
    max_rules_per_layer: int = 2
    measured_weight: float = 1.0
    validation_samples: int = 0
    select: str = "all"
    plots: str | None = None
    device: str = "auto"
    overwrite: bool = False
    quiet: bool = False

    def extension(self, lengths: list[int]) -> list[int]:
        """The extension lengths: as given, else twice the longest optimisation or validation length."""
        if self.extension_length is None:
            return [2 * max(lengths + ([self.validation_length] if self.validation_length else []))]
        return self.extension_length


@dataclass
class SearchSettings:
    """`moa-plan search`: the three steps' settings, their files under ``work``."""

    calibrate: CalibrateSettings
    profile: ProfileSettings
    optimize: OptimizeSettings
