"""Search-space files (``search_spaces/*.yaml``): parsing and validation before Ray starts.

A file declares an experiment: fixed settings for every trial, named ablation arms (each a set of
overrides), an Optuna-sampled search space, grid factors (folds, seeds, repeats), the protocol, the
early-stopping scheduler and the resources of a trial. Every problem is reported with the file, the
key and what is allowed; names of arms, schedules and config keys get a did-you-mean suggestion.

Example (all keys; see README "Search-space files")::

    name: demo
    protocol: nested_ablation    # sweep | fair_ablation | nested_ablation
    metric: val_dice             # tuning metric, reported by every trial
    mode: max
    fixed: {epochs: 8, slice_size: 64, base_channels: 8}
    arms:                        # ablation rows: overrides of the fixed settings
      unet: {arm: unet, schedule: constant}
      seg+recon+loc: {schedule: recon_dependent}   # the arm defaults to the row's name
    search:                      # sampled by Optuna (TPE, seeded)
      lr: {loguniform: [1.0e-4, 3.0e-3]}
      loc_margin_mm: {uniform: [5, 20]}
      schedule_params.pretrain_epochs: {int: [1, 3]}
      gating: {categorical: [multiply, residual]}
    trials: 4                    # per row (and per outer fold for nested_ablation)
    tuning_fold: 0               # the fold searched on (nested_ablation: the inner fold, in every outer fold)
    folds: [0, 1, 2]             # the folds reported: fair_ablation stage 2 (never the tuning fold);
                                 # nested_ablation: the outer folds
    inner_folds: 3               # nested_ablation: inner folds of each outer fold's training patients
    seeds: [0, 1]
    search_per_seed: true        # every seed is a replicate of the whole pipeline: its own stage-1 search
    repeats: 1
    primary_metric: dice         # the verdicts' metric (a per-case metric); the others are descriptive
    reference: unet              # default: unet, else the first row
    groups:                      # the questions, each answered by its contrasts (Holm over all of them)
      "Does localisation help?": [unet, seg+loc]          # each row vs the reference
      "Is it the gate?": {rows: [seg+loc/no-gate], contrasts: [[seg+loc, seg+loc/no-gate]]}
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}   # or {type: none}
    resources: {cpu: 1, gpu: 0}
    max_concurrent: 2
    checkpoint: {frequency: 1, num_to_keep: 2}
    max_failures: 1
    sampler_seed: 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from avn_study.baselines.nnunet.run import is_nnunet
from avn_study.config import TrainConfig
from avn_study.errors import UsageError, look_up
from avn_study.study.folder import check_name, check_rows
from avn_study.vocabulary import ARMS, NNUNET_ARMS, TRIAL_METRICS

TOP_KEYS = {
    "name", "protocol", "metric", "mode", "fixed", "arms", "groups", "search", "trials", "tuning_fold", "folds",
    "inner_folds", "seeds", "repeats", "scheduler", "resources", "max_concurrent", "checkpoint", "max_failures",
    "sampler_seed", "concurrent_rows", "search_per_seed", "primary_metric", "reference", "alpha",
    "allow_no_verdict",
}  # fmt: skip
PROTOCOLS = ("sweep", "fair_ablation", "nested_ablation")
ABLATIONS = ("fair_ablation", "nested_ablation")  # protocols with a stage 2 whose results are reported
DISTRIBUTIONS = ("loguniform", "uniform", "int", "categorical")
METRICS = tuple(name for name, m in TRIAL_METRICS.items() if m.tunable)  # what a space may tune on
FULL_ONLY_METRICS = tuple(name for name, m in TRIAL_METRICS.items() if m.full_only)  # (full_metrics_every)
SCHEDULERS = ("asha", "none")
SCHEDULE_PARAM_PREFIX = "schedule_params."
MAX_SPACE_BYTES = 1_000_000  # a search-space file is a page of YAML; anything this large is a mistake
MAX_MESSAGE = 600  # characters of an error message that quotes a value from the file
MAX_YAML_VALUES = 100_000  # values YAML aliases may expand to in one file
MAX_YAML_DEPTH = 32  # nested lists/mappings in one YAML value (a space needs 4; 500 would exhaust Python's stack)


@dataclass(frozen=True)
class Param:
    """One Optuna-sampled parameter: a flat config key (or ``schedule_params.<name>``)."""

    name: str
    kind: str  # loguniform | uniform | int | categorical
    values: tuple[Any, ...]  # (low, high) or the choices


@dataclass(frozen=True)
class Scheduler:
    type: str = "asha"  # asha | none
    grace_period: int = 1  # epochs every trial runs before it may be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung

    def rungs(self, epochs: int) -> list[int]:
        """The epochs (1-based, as ``training_iteration``) where ASHA compares trials, before the last:
        Ray's milestones ``grace_period * reduction_factor**k``, each decided at the first report at or after it."""
        out, k = [], 0
        while (rung := math.ceil(self.grace_period * self.reduction_factor**k - 1e-9)) < epochs:
            out.append(rung)
            k += 1
        return out


@dataclass(frozen=True)
class Contrast:
    """One comparison a study is run to make: ``row`` against ``against``, answering ``question``."""

    question: str
    row: str
    against: str

    @property
    def label(self) -> str:
        return f"{self.row} vs {self.against}"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search-space file."""

    path: Path
    name: str
    protocol: str
    metric: str
    mode: str
    fixed: dict[str, Any]
    arms: dict[str, dict[str, Any]]  # row name -> flat overrides (with "arm" resolved)
    search: tuple[Param, ...]
    trials: int
    tuning_fold: int
    folds: tuple[int, ...]
    inner_folds: int
    seeds: tuple[int, ...]
    repeats: int
    scheduler: Scheduler
    cpu: float
    gpu: float
    max_concurrent: int
    checkpoint_frequency: int
    num_to_keep: int
    max_failures: int
    sampler_seed: int
    concurrent_rows: bool = False  # the whole study in one Ray experiment: every search at once, stage 2 per row
    search_per_seed: bool = False  # each stage-2 seed has its own stage-1 search (a replicate of the pipeline)
    primary_metric: str = "dice"  # the per-case metric the verdicts are on (avn_study.analysis.stats.METRICS)
    reference: str = ""  # the row every other row is compared with by default
    alpha: float = 0.05  # family-wise error rate of the primary contrasts (Holm)
    contrasts: tuple[Contrast, ...] = ()  # the primary family: what the study is run to decide
    allow_no_verdict: bool = False  # run a design that can reach no verdict (a machinery test, not a study)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def replicates(self) -> int:
        """Stage-2 runs per row and reported fold (seeds x repeats)."""
        return len(self.seeds) * self.repeats

    def searches_per_row(self) -> int:
        """Stage-1 searches of one searched row."""
        if self.protocol == "sweep":
            return 1
        per_fold = len(self.seeds) if self.search_per_seed else 1
        if self.protocol == "nested_ablation" or self.search_per_seed:
            return len(self.folds) * per_fold
        return 1

    @property
    def searched_rows(self) -> list[str]:
        """The rows with a stage-1 search (all but nnU-Net rows, which configure themselves)."""
        return [row for row, overrides in self.arms.items() if not is_nnunet(overrides)]

    def trial_config(self, row: str, **flat: Any) -> dict[str, Any]:
        """The flat config of one trial of ``row``: fixed, then the row's overrides, then ``flat``."""
        return {**self.fixed, **self.arms[row], **flat}

    def plan(self) -> dict[str, Any]:
        """What the study will run: trials and epochs per stage (``avn-study sweep --plan``).

        Stage-1 epochs with ASHA are the synchronous successive-halving expectation (every trial to the
        grace period, 1/rf of them to each next rung, the survivors to the end); Ray's asynchronous ASHA
        promotes a little more while a rung is still filling, so take it as a lower estimate.
        """
        epochs = TrainConfig.from_flat(self.fixed).optim.epochs
        searches = len(self.searched_rows) * self.searches_per_row()
        stage1 = searches * self.trials
        runs = len(self.folds) * len(self.seeds) * self.repeats if self.protocol in ABLATIONS else 0  # per row
        stage2, nnunet = len(self.searched_rows) * runs, (len(self.arms) - len(self.searched_rows)) * runs
        per_trial = float(epochs)
        if self.scheduler.type == "asha":
            rungs = self.scheduler.rungs(epochs)
            per_trial, previous = 0.0, 0
            for k, end in enumerate([*rungs, epochs]):
                per_trial += (end - previous) / self.scheduler.reduction_factor**k
                previous = end
        return {"protocol": self.protocol, "rows": len(self.arms), "searches": searches, "nnunet_trials": nnunet,
                "stage1_trials": stage1, "stage1_epochs": stage1 * per_trial, "stage1_epochs_max": stage1 * epochs,
                "stage2_trials": stage2, "stage2_epochs": stage2 * epochs}  # fmt: skip


class _Reader:
    """Typed access to a YAML mapping that reports errors as ``FILE: key: problem``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> UsageError:
        if len(message) > MAX_MESSAGE:  # a value quoted back can be long: the file has it all
            message = message[: MAX_MESSAGE - 20] + f"... ({len(message):,} characters)"
        return UsageError(f"{self.path}: {key}: {message}")

    def number(self, data: dict, key: str, default: Any, *, kind: type = int, low: float | None = None) -> Any:
        value = data.get(key.rsplit(".", 1)[-1], default)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or (low is not None and value < low):
            bound = f" >= {low}" if low is not None else ""
            raise self.fail(key, f"expected {'an integer' if kind is int else 'a number'}{bound}, got {value!r}")
        return kind(value)

    def mapping(self, data: dict, key: str, allowed: set[str] | None = None) -> dict:
        value = data.get(key.rsplit(".", 1)[-1], {})
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            for sub in value:
                self.known(sub, allowed, f"{key}.{sub}")
        return value

    def known(self, name: Any, allowed: set[str] | tuple[str, ...], key: str) -> str:
        try:
            return look_up(str(name), allowed, what="key" if isinstance(allowed, set) else "value")
        except UsageError as err:
            raise self.fail(key, str(err)) from None

    def int_list(self, data: dict, key: str, default: list[int]) -> tuple[int, ...]:
        value = data.get(key, default)
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
            raise self.fail(key, f"expected a non-empty list of integers >= 0, got {value!r}")
        if len(set(value)) != len(value):
            raise self.fail(key, f"values must not repeat, got {value!r}")
        return tuple(value)


class _TooLarge(Exception):
    def __init__(self, line: int, anchor: str, size: int) -> None:
        self.line, self.anchor, self.size = line, anchor, size


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that counts what aliases (``*name``) expand to and stops past a budget, and
    bounds how deeply lists and mappings nest (its composer recurses once per level).

    Aliases themselves are fine (PyYAML writes them for shared objects, and a user may reuse a block);
    nested ones multiply: ten levels of nine turn a 1 kB file into 3.5 billion values ("billion laughs").
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._budget = MAX_YAML_VALUES
        self._sizes: dict[int, int] = {}
        self._depth = 0

    def _size(self, node: yaml.Node) -> int:
        if id(node) not in self._sizes:
            if isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(v) for v in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        return self._sizes[id(node)]

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            if event.anchor in self.anchors:
                self._budget -= self._size(self.anchors[event.anchor])
                if self._budget < 0:
                    raise _TooLarge(event.start_mark.line + 1, str(event.anchor), MAX_YAML_VALUES)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with a budget on what aliases expand to (see :class:`_BoundedLoader`).

    Raises:
        UsageError: aliases that expand beyond :data:`MAX_YAML_VALUES` values (naming ``source``, the line
            and the alias), lists or mappings nested deeper than :data:`MAX_YAML_DEPTH`, or invalid YAML.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except _TooDeep as deep:
        raise UsageError(
            f"{source}: line {deep.line}: lists or mappings nested more than {MAX_YAML_DEPTH} levels deep; an "
            "avn-study file needs a few: check the brackets"
        ) from None
    except _TooLarge as big:
        raise UsageError(
            f"{source}: line {big.line}: YAML aliases (*{big.anchor}...) expand to more than {big.size:,} values; "
            "an avn-study file needs a few hundred: write the values out"
        ) from None
    except yaml.YAMLError as err:
        raise UsageError(f"{source}: not valid YAML ({err})") from None


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file.

    Raises:
        UsageError: a missing, unreadable, oversized, non-UTF-8 or unparsable file, YAML aliases, an
            unknown key, a bad value or range, an unknown arm, schedule or config key, row names that
            are unsafe or map to one folder; the message names the file and the key.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPACE_BYTES:
            raise UsageError(f"{path}: {size:,} bytes; a search-space file is at most {MAX_SPACE_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise UsageError(f"{path}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    raw = safe_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of settings at the top level")
    return parse_space(raw, path)


def parse_space(raw: dict[str, Any], path: Path = Path("<space>")) -> SearchSpace:
    r = _Reader(path)
    for key in raw:
        r.known(key, TOP_KEYS, str(key))
    name = raw.get("name", path.stem)
    check_name(name, f"{path}: name: the study")
    protocol = r.known(raw.get("protocol", "sweep"), PROTOCOLS, "protocol")
    metric = r.known(raw.get("metric", "val_dice"), METRICS, "metric")
    mode = r.known(raw.get("mode", "max"), ("max", "min"), "mode")
    fixed = r.mapping(raw, "fixed")
    _check_flat(r, fixed, "fixed")
    arms = _parse_arms(r, raw, fixed)
    search = tuple(_parse_param(r, key, spec) for key, spec in r.mapping(raw, "search").items())
    n_folds = TrainConfig.from_flat({**fixed}).data.n_folds
    folds, tuning_fold, inner_folds = _parse_folds(r, raw, protocol, n_folds)
    sched = r.mapping(raw, "scheduler", {"type", "grace_period", "reduction_factor"})
    scheduler = Scheduler(
        type=r.known(sched.get("type", "asha"), SCHEDULERS, "scheduler.type"),
        grace_period=r.number(sched, "scheduler.grace_period", 1, low=1),
        reduction_factor=r.number(sched, "scheduler.reduction_factor", 2.0, kind=float, low=1.01),
    )
    epochs = TrainConfig.from_flat(fixed).optim.epochs
    if scheduler.type == "asha" and scheduler.grace_period > epochs:
        raise r.fail("scheduler.grace_period", f"must be <= epochs ({epochs}), got {scheduler.grace_period}")
    resources = r.mapping(raw, "resources", {"cpu", "gpu"})
    ckpt = r.mapping(raw, "checkpoint", {"frequency", "num_to_keep"})
    space = SearchSpace(
        path=path, name=name, protocol=protocol, metric=metric, mode=mode, fixed=fixed, arms=arms, search=search,
        trials=r.number(raw, "trials", 1, low=1), tuning_fold=tuning_fold, folds=folds, inner_folds=inner_folds,
        seeds=r.int_list(raw, "seeds", [0]), repeats=r.number(raw, "repeats", 1, low=1), scheduler=scheduler,
        cpu=r.number(resources, "resources.cpu", 1.0, kind=float, low=0.01),
        gpu=r.number(resources, "resources.gpu", 0.0, kind=float, low=0.0),
        max_concurrent=r.number(raw, "max_concurrent", 0, low=0),
        checkpoint_frequency=r.number(ckpt, "checkpoint.frequency", 1, low=1),
        num_to_keep=r.number(ckpt, "checkpoint.num_to_keep", 2, low=1),
        max_failures=r.number(raw, "max_failures", 1, low=0), sampler_seed=r.number(raw, "sampler_seed", 0, low=0),
        concurrent_rows=_flag(r, raw, "concurrent_rows"), search_per_seed=_flag(r, raw, "search_per_seed"),
        primary_metric=_primary_metric(r, raw), reference=_reference(r, raw, arms),
        alpha=r.number(raw, "alpha", 0.05, kind=float, low=1e-6),
        allow_no_verdict=_flag(r, raw, "allow_no_verdict"), raw=raw,
    )  # fmt: skip
    if not space.alpha < 0.5:
        raise r.fail("alpha", f"the family-wise error rate must be < 0.5, got {space.alpha}")
    space = replace(space, contrasts=_parse_contrasts(r, raw, arms, space.reference))
    if space.gpu > 1 and not space.gpu.is_integer():
        raise r.fail(
            "resources.gpu", f"fractions are for sharing one GPU: use a value <= 1 or an integer, got {space.gpu}"
        )
    _check_every_row(r, space)
    return space


def _flag(r: _Reader, raw: dict[str, Any], key: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise r.fail(key, f"must be true or false, got {value!r}")
    return value


def _parse_folds(r: _Reader, raw: dict[str, Any], protocol: str, n_folds: int) -> tuple[tuple[int, ...], int, int]:
    """(folds, tuning_fold, inner_folds), checked so that no reported patient chose its row's configuration.

    ``fair_ablation`` tunes on ``tuning_fold`` and reports ``folds``, which therefore must not contain
    it (default: every other fold). ``nested_ablation`` reports the outer ``folds`` (default: all) and
    tunes inside each on inner fold ``tuning_fold`` of ``inner_folds``.
    """
    inner_folds = r.number(raw, "inner_folds", 3, low=2)
    if protocol != "nested_ablation" and "inner_folds" in raw:
        raise r.fail("inner_folds", f"only nested_ablation has inner folds (protocol is {protocol})")
    if protocol == "nested_ablation":
        tuning_fold = r.number(raw, "tuning_fold", 0, low=0)
        if tuning_fold >= inner_folds:
            raise r.fail("tuning_fold", f"nested_ablation: the inner fold searched on must be < inner_folds="
                                        f"{inner_folds}, got {tuning_fold}")  # fmt: skip
        folds = r.int_list(raw, "folds", list(range(n_folds)))
    else:
        tuning_fold = r.number(raw, "tuning_fold", 0, low=0)
        default = [f for f in range(n_folds) if f != tuning_fold] if protocol == "fair_ablation" else [tuning_fold]
        folds = r.int_list(raw, "folds", default)
        if tuning_fold >= n_folds:
            raise r.fail("tuning_fold", f"fold indices must be < n_folds={n_folds}, got [{tuning_fold}]")
    if max(folds) >= n_folds:
        raise r.fail("folds", f"fold indices must be < n_folds={n_folds}, got {list(folds)}")
    if protocol == "fair_ablation" and tuning_fold in folds:
        raise r.fail("folds", f"fair_ablation reports folds {list(folds)}, but tuning_fold {tuning_fold} chose every "
                              "row's configuration: its patients cannot also be reported. Drop it from folds (the "
                              "default is every other fold) or use protocol: nested_ablation, which reports every "
                              "patient")  # fmt: skip
    return folds, tuning_fold, inner_folds


def _primary_metric(r: _Reader, raw: dict[str, Any]) -> str:
    from avn_study.vocabulary import CASE_METRICS

    return r.known(raw.get("primary_metric", "dice"), tuple(CASE_METRICS), "primary_metric")


def _reference(r: _Reader, raw: dict[str, Any], arms: dict[str, dict[str, Any]]) -> str:
    if "reference" in raw:
        return r.known(str(raw["reference"]), tuple(arms), "reference")
    return "unet" if "unet" in arms else next(iter(arms))


def group_rows(groups: dict[str, Any]) -> dict[str, list[str]]:
    """``groups`` of a space (as written) -> title: its rows, in order (both forms: a list, or ``rows:``)."""
    return {str(t): list(g.get("rows", []) if isinstance(g, dict) else g) for t, g in (groups or {}).items()}


def default_contrasts(rows: list[str], reference: str,
                      arms: dict[str, dict[str, Any]] | None = None) -> list[tuple[str, str]]:  # fmt: skip
    """Each row vs the reference, and each control vs the row it controls: a row named ``X/...`` whose
    arm is the row ``X`` (``seg+loc/no-gate`` is ``seg+loc`` without its gate)."""
    pairs = [(row, reference) for row in rows if row != reference]
    for row in rows:
        base = (arms or {}).get(row, {}).get("arm", row.split("/", 1)[0])
        if "/" in row and base in (arms or {}) and base != reference and base != row:
            pairs.append((row, base))
    return pairs


def _parse_contrasts(r: _Reader, raw: dict[str, Any], arms: dict[str, dict[str, Any]],
                     reference: str) -> tuple[Contrast, ...]:  # fmt: skip
    """``groups``: the questions (report headings), each with its rows and the contrasts that answer it.

    A group is a list of rows (its contrasts: each row vs the reference, and each control vs the row it
    controls) or a mapping ``{rows: [...], contrasts: [[row, against], ...]}``. Without groups, every
    row is compared with the reference. A contrast appears once, under the first question that asks it.
    """
    rows = list(arms)
    groups = r.mapping(raw, "groups")
    if not groups:
        groups = {"Every row against the reference": rows}
    out: dict[tuple[str, str], Contrast] = {}
    for title, group in groups.items():
        key = f"groups.{title}"
        if isinstance(group, dict):
            for sub in group:
                r.known(sub, {"rows", "contrasts"}, f"{key}.{sub}")
            members, pairs = group.get("rows", []), group.get("contrasts")
        else:
            members, pairs = group, None
        if not isinstance(members, list) or not members:
            raise r.fail(key, f"expected a non-empty list of row names (or {{rows: [...], contrasts: [...]}}), "
                              f"got {group!r}")  # fmt: skip
        members = [r.known(str(row), tuple(rows), key) for row in members]
        if pairs is None:
            pairs = [list(p) for p in default_contrasts(members, reference, arms)]
            if not pairs:  # a group of the reference alone asks nothing
                continue
        if not isinstance(pairs, list) or not pairs:
            raise r.fail(f"{key}.contrasts", f"expected a non-empty list of [row, against] pairs, got {pairs!r}")
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise r.fail(f"{key}.contrasts", f"each contrast is a pair [row, against], got {pair!r}")
            row, against = (r.known(str(x), tuple(rows), f"{key}.contrasts") for x in pair)
            if row == against:
                raise r.fail(f"{key}.contrasts", f"a row cannot be compared with itself: {pair!r}")
            if (row, against) not in out and (against, row) not in out:
                out[(row, against)] = Contrast(str(title), row, against)
    return tuple(out.values())


def _check_flat(r: _Reader, flat: dict[str, Any], key: str) -> None:
    try:
        TrainConfig.from_flat(flat, source=f"{r.path}: {key}")
    except UsageError as err:
        message = str(err)
        raise UsageError(message if str(r.path) in message else f"{r.path}: {key}: {message}") from None


def _parse_arms(r: _Reader, raw: dict[str, Any], fixed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    arms_raw = raw.get("arms")
    if arms_raw is None:
        return {str(fixed.get("arm", TrainConfig().model.arm)): {}}
    if isinstance(arms_raw, list):  # shorthand: a list of arm names
        arms_raw = {str(a): {} for a in arms_raw}
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise r.fail("arms", "expected a non-empty mapping of row name -> overrides (or a list of arm names)")
    arms = {}
    for row, overrides in arms_raw.items():
        overrides = dict(overrides or {})
        if "arm" not in overrides:
            if row not in ARMS and row not in NNUNET_ARMS:
                try:
                    look_up(str(row), [*ARMS, *NNUNET_ARMS], what="arm")
                except UsageError as err:
                    raise r.fail(f"arms.{row}", f"{err} (or give the row an 'arm:' override)") from None
            overrides["arm"] = row
        if is_nnunet(overrides):
            _check_nnunet_row(r, raw, {**fixed, **overrides}, f"arms.{row}")
        else:
            _check_flat(r, {**fixed, **overrides}, f"arms.{row}")
        arms[str(row)] = overrides
    check_rows(list(arms), str(r.path))
    return arms


def _check_nnunet_row(r: _Reader, raw: dict[str, Any], flat: dict[str, Any], key: str) -> None:
    """An nnU-Net row: valid keys, an ablation protocol (it has no search of its own), the extra installed."""
    from avn_study.baselines.nnunet.run import NnUNetConfig, require_nnunet

    protocol = raw.get("protocol", "sweep")
    if protocol not in ABLATIONS:
        raise r.fail(key, f"an nnU-Net row configures itself and runs in stage 2 only, which protocol {protocol!r} "
                          f"does not have: use {' or '.join(ABLATIONS)}")  # fmt: skip
    try:
        NnUNetConfig.from_flat(flat, source=f"{r.path}: {key}")
    except UsageError as err:
        raise UsageError(str(err)) from None
    require_nnunet(f"{r.path}: {key}")


def _parse_param(r: _Reader, key: str, spec: Any) -> Param:
    base = key.removeprefix(SCHEDULE_PARAM_PREFIX)
    if key == base:
        r.known(key, set(TrainConfig.flat_keys()) - {"schedule_params"}, f"search.{key}")
    elif not base:
        raise r.fail(f"search.{key}", "name the schedule parameter: schedule_params.<name>")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise r.fail(f"search.{key}", f"expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, values), = spec.items()  # fmt: skip
    kind = r.known(kind, DISTRIBUTIONS, f"search.{key}")
    if kind == "categorical":
        if not isinstance(values, list) or len(values) < 2:
            raise r.fail(f"search.{key}", f"categorical needs a list of at least 2 choices, got {values!r}")
        return Param(key, kind, tuple(values))
    ok = isinstance(values, list) and len(values) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values)  # fmt: skip
    if not ok or not values[0] < values[1]:
        raise r.fail(f"search.{key}", f"{kind} needs [low, high] with low < high, got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise r.fail(f"search.{key}", f"loguniform needs low > 0, got {values!r}")
    if kind == "int" and not all(float(v).is_integer() for v in values):
        raise r.fail(f"search.{key}", f"int needs integer bounds, got {values!r}")
    return Param(key, kind, tuple(values))


def _check_every_row(r: _Reader, space: SearchSpace) -> None:
    """Build every row's config with the extreme search values and its schedule, as a trial would."""
    from avn_study.models.runtime import arm_branches
    from avn_study.training.schedules import create_schedule

    for row in space.searched_rows:
        for pick in (0, -1):
            sample = {}
            for p in space.search:
                sample[p.name] = p.values[pick] if p.kind != "int" else int(p.values[pick])
            flat = resolve_sampled(space.trial_config(row), sample)
            try:
                config = TrainConfig.from_flat(flat, source=f"{r.path}: arms.{row}")
                branches = arm_branches(config)
                create_schedule(config.optim.schedule, branches, **config.optim.schedule_params)
            except (UsageError, ValueError) as err:
                message = str(err)
                raise UsageError(message if str(r.path) in message else f"{r.path}: arms.{row}: {message}") from None
            every = config.runtime.eval_every
            missed = (
                [r for r in space.scheduler.rungs(config.optim.epochs) if r % every]
                if space.scheduler.type == "asha"
                else []
            )
            if missed:
                raise r.fail(
                    f"arms.{row}",
                    f"ASHA compares trials at epochs {missed}, but eval_every={every} evaluates only epochs that are "
                    f"multiples of {every}: choose a grace_period and reduction_factor whose rungs are multiples "
                    f"of {every}, or eval_every 1",
                )
            if space.metric in FULL_ONLY_METRICS and config.runtime.full_metrics_every > 1:
                raise r.fail(
                    f"arms.{row}",
                    f"metric {space.metric} is computed only on full validations, but full_metrics_every="
                    f"{config.runtime.full_metrics_every}: the scheduler would miss it (use 1, or metric val_dice)",
                )


def resolve_sampled(flat: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """Merge sampled values into a flat config; ``schedule_params.<p>`` keys go into the dict."""
    out = dict(flat)
    params = dict(out.get("schedule_params") or {})
    for key, value in sample.items():
        if key.startswith(SCHEDULE_PARAM_PREFIX):
            params[key.removeprefix(SCHEDULE_PARAM_PREFIX)] = value
        else:
            out[key] = value
    out["schedule_params"] = params
    return out
