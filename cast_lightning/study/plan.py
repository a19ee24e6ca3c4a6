"""The study plan: which variants, skip ratios and seeds run, from which recipe YAMLs. The one variant list.

A study is a YAML (``configs/world/demo.yaml``, ``demo_full.yaml``) read by jsonargparse into ``StudyPlan``, the
same machinery that reads the recipes. Each fine-tuning run is ``cast fit --config <fit recipe>`` with only its
conflict map, seed and output directory set per run (plus the plan's ``fit_args``, the same for every run); the
diagnosis is ``cast diagnose --config <diagnose recipe>``. The plan is validated once, before anything trains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from cast_lightning.errors import CastError


@dataclass(frozen=True)
class Variant:
    """One kind of run in a study."""

    name: str
    score: str | None  # the conflict-map score whose top heads it skips; None: no map (base model, full fine-tuning)
    label: str  # display name; ``{ratio}`` is the skip ratio
    selection_mode: str = "skip"  # skip: freeze the ratio's heads; train_only: train only them, freeze the rest
    control: str | None = "random"  # the budget-matched random variant it is compared with (None: it is a control)
    needs: str | None = None  # the diagnosis scorer its score needs (the diagnose recipe's --model.scorers)
    fit_args: tuple[str, ...] = ()  # what its fits add to the recipe (no-map variants: the method itself)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("base", None, "base model", control=None),
        Variant("full", None, "full fine-tuning", control=None),
        Variant("cast", "product", "CAST (product) @ {ratio}"),
        Variant("random", "random", "random skip @ {ratio}", control=None),
        Variant("oc", "oc", "OC-only @ {ratio}"),
        Variant("fs", "fs", "FS-only @ {ratio}"),
        Variant("rank", "rank", "CAST (rank) @ {ratio}"),
        Variant("weighted", "weighted", "CAST (weighted) @ {ratio}"),
        # The neighbours: head attribution (Ships) and the SNIP set difference, skipping the heads that matter
        # least for safety, or training only the ones that matter most (against random heads trained alone).
        Variant("ships", "ships", "Ships skip @ {ratio}", needs="ships"),
        Variant("snip", "snip", "SNIP skip @ {ratio}", needs="snip"),
        Variant("ships_train", "ships", "Ships train-only @ {ratio}", "train_only", "random_train", "ships"),
        Variant("snip_train", "snip", "SNIP train-only @ {ratio}", "train_only", "random_train", "snip"),
        Variant("random_train", "random", "random train-only @ {ratio}", "train_only", None),
        # Without a head map: PCGrad on the safety vs utility-replay gradients, and SPPFT-style freezing of the
        # safety layers the diagnosis located (layer_gap); both compared with full fine-tuning, paired by seed.
        Variant("pcgrad", None, "PCGrad (global)", control="full", fit_args=("--model.pcgrad=global",)),
        Variant("sppft", None, "SPPFT (located layers frozen)", control="full", needs="layer_gap",
                fit_args=("--model.skip_layers=from_map:diagnosis/conflict_map.json",)),
    )
}
MAP_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.score is not None)
# Training scopes a study can run its variants under (``--model.trainable``); each is compared within itself.
SCOPES = ("all", "attention", "lora")
CONTROLS = tuple(name for name, v in VARIANTS.items() if v.score is not None and v.control is None)
# Fine-tuning variants without a head map (each run once per seed, like full fine-tuning).
NO_MAP_FITS = tuple(name for name, v in VARIANTS.items() if v.score is None and name != "base")


def variant_label(variant: str, skip_ratio: float | None = None) -> str:
    """The display name of a variant group, e.g. ``CAST (product) @ 0.1``, ``random skip @ 0.25``."""
    known = VARIANTS.get(variant)
    template = known.label if known else f"{variant} @ {{ratio}}"
    return template.format(ratio=f"{float(skip_ratio or 0):g}")


# -- recipes ---------------------------------------------------------------------------------------------------------


def shipped_configs_dir() -> Path:
    """The shipped ``configs/`` folder: ``cast_lightning.configs`` when installed, else the checkout's ``configs/``."""
    from cast_lightning.shipped import shipped_folder

    return shipped_folder("cast_lightning.configs", "configs", "world")


def resolve_recipe(path: str, option: str) -> Path:
    """A recipe YAML named by a study: an absolute path, a path from the working directory, or a shipped config
    named from the repository root (``configs/world/fit.yaml`` works from anywhere)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.is_file():
        found = candidate
    else:
        parts = candidate.parts
        found = shipped_configs_dir().joinpath(*parts[1:]) if parts and parts[0] == "configs" else candidate
    if not found.is_file():
        raise CastError(f"{option} {path} does not exist: give a recipe YAML such as configs/world/fit.yaml")
    return found.resolve()


# -- the plan --------------------------------------------------------------------------------------------------------


@dataclass
class StudyPlan:
    """One study: every (variant, skip ratio, seed) to run and the recipes each run uses. Built by
    ``cast report`` / ``cast demo`` from their options (a study YAML given with ``--config``, e.g.
    ``configs/world/demo_full.yaml``), checked once by ``check`` before anything is built or trained."""

    output_dir: str
    fit_config: str
    diagnose_config: str
    variants: list[str]
    skip_ratios: list[float]
    seeds: list[int]
    single_head_validity: int = 0
    max_steps: int | None = None
    scopes: list[str] = field(default_factory=lambda: ["all"])
    eval_limit: int | None = None
    eval_batch_size: int = 64
    base_seed: int = 0
    fit_args: list[str] = field(default_factory=list)

    def check(self) -> StudyPlan:
        """Raise a one-line CastError naming the fix: a typo must cost a second, not a finished fine-tuning run."""
        from cast_lightning.io import ensure_writable

        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise CastError(f"unknown variant(s) {', '.join(map(str, unknown))}: use any of {', '.join(VARIANTS)}")
        if not self.variants:
            raise CastError(f"no variants given: give at least one of {', '.join(VARIANTS)}")
        if any(v in MAP_VARIANTS for v in self.variants) and not self.skip_ratios:
            raise CastError("no skip ratios given: give at least one, e.g. --skip_ratios '[0.1]'")
        bad = [r for r in self.skip_ratios if not 0.0 < float(r) <= 1.0]
        if bad:
            raise CastError(f"skip ratio(s) {', '.join(map(str, bad))} outside (0, 1]: give fractions of heads to skip")
        if not self.seeds:
            raise CastError("no seeds given: give at least one, e.g. --seeds '[0, 1, 2]'")
        bad_scopes = [sc for sc in self.scopes if sc not in SCOPES]
        if bad_scopes or not self.scopes:
            raise CastError(f"unknown or no training scope(s) {', '.join(map(str, bad_scopes))}: use any of {', '.join(SCOPES)}")
        if self.single_head_validity < 0:
            raise CastError(f"single_head_validity {self.single_head_validity} is negative: give 0 (no validity runs) or more heads")
        if self.max_steps is not None and self.max_steps < 1:
            raise CastError(f"max_steps {self.max_steps} is below 1: give at least 1 optimizer step per fine-tuning run")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise CastError(f"eval_limit {self.eval_limit} is below 1: give at least 1, or null to evaluate everything")
        if self.eval_batch_size < 1:
            raise CastError(f"eval_batch_size {self.eval_batch_size} is below 1: give at least 1")
        reserved = [a for a in self.fit_args if a.split("=", 1)[0] in PER_RUN_OPTIONS]
        if reserved:
            raise CastError(f"fit_args may not set {', '.join(reserved)}: the study sets it per run")
        resolve_recipe(self.fit_config, "--fit_config")
        resolve_recipe(self.diagnose_config, "--diagnose_config")
        ensure_writable(Path(self.output_dir) / "report.md", "--output_dir")
        self.variants = list(dict.fromkeys(self.variants))
        self.skip_ratios = [float(r) for r in dict.fromkeys(self.skip_ratios)]
        self.seeds = [int(s) for s in dict.fromkeys(self.seeds)]
        self.scopes = list(dict.fromkeys(self.scopes))
        return self

    def run_args(self) -> list[str]:
        """The overrides every fit of this study shares (after the recipe, before the per-run ones)."""
        steps = [f"--trainer.max_steps={self.max_steps}"] if self.max_steps is not None else []
        return [*steps, *self.fit_args]

    def record(self) -> dict:
        """The plan as experiments.json keeps it: inside the study directory, ``output_dir`` is ``.``."""
        return {**asdict(self), "output_dir": "."}


# What the study sets per fit; a plan's fit_args may not.
PER_RUN_OPTIONS = ("--model.conflict_map", "--model.skip_heads", "--seed_everything", "--data.seed",
                   "--trainer.default_root_dir", "--ckpt_path", "--model.trainable")
