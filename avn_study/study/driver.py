"""Running a search-space file on Ray Tune: sweeps, the fair-ablation protocol, resume.

A study lives in ``STORAGE/NAME/``::

    study.json            manifest: protocol, data, split hash, stages and their Ray experiments
    space.yaml            the search-space file as run
    splits.json           the patient-level split the study froze (its trials get it inline)
    optuna.journal        Optuna's journal storage: one study per row (optuna.load_study / optuna-dashboard)
    nested_splits.json    nested_ablation: the inner folds of each outer fold, frozen with their hashes
    stage1-<row>/         Ray Tune experiment: the Optuna search of one row on the tuning fold (ASHA)
    stage1-<row>-outer<k>/  nested_ablation: the search of one row inside outer fold k
    stage2/               Ray Tune experiment: each row's best configuration on every reported fold x seed
    stages/               concurrent_rows: both stages of every row in one Ray experiment (Study.run_concurrent)
    stage2-repair-<n>/    --resume: stage-2 trials re-run because theirs was missing or damaged (Study.repair_stage2)

``protocol: sweep`` runs stage 1 only. ``protocol: fair_ablation`` gives every row the same Optuna
budget on the tuning fold (stage 1, early stopping allowed), then re-trains each row's best
configuration on the other folds and every seed to the end (stage 2), so rows are compared at their
best and paired case by case. What holds for the reported patients: their validation results chose
nothing (no configuration, epoch or threshold was selected on them); they did take part in training
the stage-1 models of the search (the tuning fold's models train on every other fold), so they are
not untouched by the search, only not selected on. ``nested_ablation`` keeps them out of the search
entirely. ``protocol:
nested_ablation`` does stage 1 inside every outer fold, on an inner fold of its training patients,
and stage 2 trains each outer fold's choice on all of its training patients: every patient is
reported, always by models tuned without them. Every stage-2 trial records the patients its
configuration was selected on (``_selected_on`` in its parameters). Each stage folder is Ray Tune's
own format (``ExperimentAnalysis``, ``Tuner.restore``). ``--resume`` restores unfinished stages with
``Tuner.restore``, which unpickles Ray's state files: resume only experiments whose storage you trust.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from avn_study.errors import AvnError, DataError, UsageError
from avn_study.study.folder import (
    DRIVER_LOG,
    ERROR,
    JOURNAL,
    MANIFEST,
    NESTED_SPLITS,
    SPACE_COPY,
    SPLITS_COPY,
    STAGE1_ALL,
    STAGE2,
    STAGE2_PLAN,
    STAGE2_REPAIR,
    STAGES,
    TERMINATED,
    Stage1,
    StudyLock,
    check_name,
    repair_folders,
    stage_folders,
    storage_error,
    trial_folders,
    trial_statuses,
)
from avn_study.study.results import Selected, StudyResult, best_trial, read_trials, validated_patients
from avn_study.study.space import ABLATIONS, SearchSpace, group_rows
from avn_study.vocabulary import DAMAGED


class StudyInterrupted(KeyboardInterrupt):
    """The driver was interrupted; the study's state is saved and ``--resume`` continues it."""


class Study:
    """One study folder and the Ray runs that fill it."""

    def __init__(self, space: SearchSpace, data: Path, storage: str, name: str | None = None,
                 max_concurrent: int | None = None, gpus_per_trial: float | None = None,
                 progress: bool = True, fault: dict[str, Any] | None = None,
                 callbacks: list[Any] | None = None, force_unlock: bool = False,
                 track: list[str] | None = None, allow_no_verdict: bool = False) -> None:  # fmt: skip
        if track:  # before anything else touches the storage
            from avn_study.study.tracking import check_trackers

            check_trackers(list(track), storage)
        self.space = space
        self.data = Path(data).resolve()
        self.name = check_name(name, "--name") if name is not None else check_name(space.name, f"{space.path}: name")
        from avn_study.study.storage import open_study_storage

        # a folder, or an object store whose study files go through a local mirror (avn_study.study.storage)
        self.store = open_study_storage(storage, self.name)
        self.storage, self.root = self.store.storage, self.store.mirror
        self.force_unlock = force_unlock
        # a design none of whose declared contrasts can reach a verdict is refused before Ray starts
        self.allow_no_verdict = allow_no_verdict or space.allow_no_verdict
        self.verdict_warnings: list[str] = []
        self.lock: StudyLock | None = None
        self.max_concurrent = space.max_concurrent if max_concurrent is None else max_concurrent
        self.gpu = space.gpu if gpus_per_trial is None else gpus_per_trial
        self.progress = progress
        self.fault = fault or {}  # test hook, see avn_study.study.trainable._maybe_inject_fault
        self.callbacks = list(callbacks or [])  # extra ray.tune.Callback objects for every stage
        self.track = list(track or [])  # trackers (avn_study.study.tracking): tensorboard, mlflow, wandb
        # set by the driver's SIGTERM handler: a stop Ray Tune may not see (all trials of a run had just
        # finished, or it was still setting up) must still end the study instead of starting the next run
        self.stop_requested = threading.Event()
        self.split_hash = ""
        self.splits: Any = None  # the study's split (frozen in STUDY/splits.json), set by prepare
        self.patients: dict[str, str] = {}  # case id -> patient id, set by prepare
        self.inner: dict[int, dict[str, Any]] = {}  # nested_ablation: outer fold -> frozen inner splits

    # ---------------------------------------------------------------- preparation (driver side)
    def prepare(self, resume: bool) -> None:
        """Check the cohort, build the head node's cache and freeze the split, take the study's lock, and
        write the study's files (or, resuming, check them) before any trial starts: :meth:`check`, then
        :meth:`claim` (``run_study`` joins Ray between the two, so a cluster that cannot be reached leaves
        no study files)."""
        cases = self.check(resume)
        self.claim(resume, cases)

    def check(self, resume: bool) -> list[Any]:
        """Every check that writes nothing in the study folder: a bad ``--resume``/``--name``, broken
        cohorts, a design that can reach no verdict. Builds the cache and reads the split; returns the cases.
        """
        from avn_study.config import TrainConfig
        from avn_study.data.slices import crop_warning
        from avn_study.study.check import read_json
        from avn_study.training.engine import cohort_split, require_head_labels

        self._check_exists(resume)  # the common mistakes fail at once, before the cohort is read
        self._check_not_running(resume)  # a live driver too (read only: the lock is taken once Ray is up)
        searched = self.space.searched_rows
        config = TrainConfig.from_flat(self.space.trial_config(searched[0]) if searched else self.space.fixed)
        frozen = self.root / SPLITS_COPY
        cases, splits = cohort_split(self.data, config, frozen=read_json(frozen, "the study's frozen split")
                                     if resume and frozen.is_file() else None)  # fmt: skip
        self.splits = splits
        self.patients = {c.case_id: c.patient_id for c in cases}
        for row in searched:  # a +loc row on a cohort without head labels: refused before Ray starts
            require_head_labels(TrainConfig.from_flat(self.space.trial_config(row)).model.arm, cases,
                                f"{self.space.path}: arms.{row}")  # fmt: skip
        self._check_nnunet_rows(cases)
        self._check_unlabelled(cases)
        warning = crop_warning(cases, config.data.slice_size, config.data.inplane_spacing_mm)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        self.split_hash = splits.hash
        if not resume:
            self._check_tuning_sets(splits, cases)
            from avn_study.study.plan import check_verdicts, reported_patients

            self.verdict_warnings = check_verdicts(self.space, reported_patients(self.space, cases, splits),
                                                   self.allow_no_verdict)  # fmt: skip
        return cases

    def claim(self, resume: bool, cases: list[Any]) -> None:
        """Take the study's lock and write the study's files (resuming: check them), after :meth:`check`.
        A fresh start that fails here leaves no folder behind."""
        created = self._take_lock(resume)
        try:
            self._check_exists(resume)  # again, now that no other driver can change it
            if resume:
                self._check_resume(self.splits, cases)
            else:
                self._write_study(self.splits, cases)
        except BaseException:
            self.close()
            if created and self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()  # a fresh start that failed leaves nothing behind
            raise

    def _check_nnunet_rows(self, cases: list[Any]) -> None:
        """nnU-Net rows: nnU-Net installed, and the labels they train on present, before Ray starts."""
        from avn_study.baselines.nnunet.run import NnUNetConfig, require_nnunet

        for row in set(self.space.arms) - set(self.space.searched_rows):
            where = f"{self.space.path}: arms.{row}"
            require_nnunet(where)
            cfg = NnUNetConfig.from_flat(self.space.trial_config(row), source=where)
            if cfg.labels == "with_head" and not all(c.has_head_labels for c in cases):
                raise DataError(f"{where}: nnunet_labels: with_head needs femoral head labels, which the cohort "
                                "does not have; use nnunet_labels: necrosis")  # fmt: skip

    def _check_unlabelled(self, cases: list[Any]) -> None:
        """Verify and cache imagesUnlabelled/ on the driver when a row will use it (a broken scan fails here,
        naming its file, not inside a trial)."""
        from avn_study.config import TrainConfig
        from avn_study.training.engine import arm_branches, usable_unlabelled

        for row in self.space.searched_rows:
            row_config = TrainConfig.from_flat(self.space.trial_config(row))
            if "recon" in arm_branches(row_config) and row_config.data.unlabelled_ratio > 0:
                usable_unlabelled(self.data, row_config, None, cases, cases)
                return

    def _check_exists(self, resume: bool) -> None:
        exists = self.store.exists(MANIFEST)
        if resume and not exists:
            raise UsageError(f"--resume: {self.location}/{MANIFEST} does not exist; run without --resume to start it")
        if not resume and exists:
            raise UsageError(
                f"{self.location} already holds a study; use --resume to continue it or --name to start another"
            )

    def _check_not_running(self, resume: bool) -> None:
        """Refuse a study that a live driver runs, before Ray starts and without writing anything."""
        from avn_study.study.folder import LOCK_FILE, LockFile
        from avn_study.study.storage import RemoteStudy

        if isinstance(self.store, RemoteStudy):
            where, _ = self.store.lock(resume)  # (an object-store lock: creates nothing)
        else:
            where = LockFile(self.root / LOCK_FILE)
        try:
            StudyLock(where, self.location).check_free(takeover_stale=resume, force=self.force_unlock)
        except OSError as err:
            raise storage_error(self.location, err) from None

    def _take_lock(self, resume: bool) -> bool:
        """Take the study's lock (see :class:`~avn_study.study.folder.StudyLock`); True if the folder is new."""
        where, created = self.store.lock(resume)
        self.lock = StudyLock(where, self.location)
        try:
            self.lock.acquire(takeover_stale=resume, force=self.force_unlock)
        except OSError as err:
            self.lock = None
            raise storage_error(self.location, err) from None
        except BaseException:
            self.lock = None
            if created and self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()
            raise
        return created

    @property
    def remote(self):  # the object store of a URI --storage, else None (for messages that name the mirror)
        from avn_study.study.storage import RemoteStudy

        return self.store if isinstance(self.store, RemoteStudy) else None

    def close(self) -> None:
        """Release the study's lock (a finished, failed or interrupted driver)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_resume(self, splits: Any, cases: list[Any]) -> None:
        self.store.pull_study()
        from avn_study.study.check import DamagedFile, read_json

        stored = read_json(self.root / MANIFEST, "the study's manifest")
        if not isinstance(stored, dict) or not {"space", "split_hash"} <= set(stored):
            raise DamagedFile(self.root / MANIFEST, "expected the study's manifest (a JSON object with space and "
                                                    "split_hash)")  # fmt: skip
        if stored["space"] != self.space.raw:
            raise UsageError(f"--resume: {self.space.path} differs from the space this study was started with "
                             f"({self.root / SPACE_COPY}); resume with that file")  # fmt: skip
        if stored["split_hash"] != self.split_hash:
            raise UsageError(f"--resume: the cohort's split changed (hash {self.split_hash[:12]} vs "
                             f"{stored['split_hash'][:12]}); a resumed study must use the same split")  # fmt: skip
        self._freeze_inner(splits, cases, resume=True)
        self._check_search_files()

    def _check_search_files(self) -> None:
        """Before a resume: every searcher state Ray would restore and Optuna's journal are whole, and the
        journal holds the Optuna study of every search that has trials (a garbage or missing one would
        make Ray or Optuna silently start that search again, past its budget).

        Raises:
            DamagedFile: naming the file, what was expected and a way out (exit 2).
        """
        from avn_study.study.check import DamagedFile, check_journal, check_searcher_state

        if not self.space.search:
            return  # no searcher, no journal
        expected: list[str] = []
        for run in self.stage1_runs():
            folder = self.root / self._stage1_experiment(run)
            if not any(folder.glob("experiment_state-*.json")):
                continue  # never saved: the search starts afresh (and its abandoned trials are set aside)
            if self.space.concurrent_rows or trial_folders(folder):
                expected.append(run.optuna_study(self.name))
        # an object store's mirror holds JSON only: Ray's pickled searcher states stay in the store, unchecked
        folders = {self.root / self._stage1_experiment(run) for run in self.stage1_runs()} if not self.remote else set()
        for folder in sorted(f for f in folders if any(f.glob("experiment_state-*.json"))):
            states = sorted(folder.glob("searcher-state-*.pkl"))
            if not states:
                raise DamagedFile(folder, "has no searcher-state-*.pkl, expected Ray's saved searcher next to its "
                                          "experiment state. Restore it from a copy, or start the study again "
                                          "under another --name")  # fmt: skip
            check_searcher_state(states[-1])
            for state in sorted(folder.glob("search_gen_state-*.json"))[-1:]:
                check_searcher_state(state)
        check_journal(self.root / JOURNAL, expected)

    def _write_study(self, splits: Any, cases: list[Any]) -> None:
        self.store.start_fresh()
        try:
            if self.space.path.is_file():
                shutil.copyfile(self.space.path, self.root / SPACE_COPY)
            self._freeze_inner(splits, cases, resume=False)
            (self.root / SPLITS_COPY).write_text(json.dumps(splits.to_dict(), indent=1) + "\n")
            (self.root / MANIFEST).write_text(json.dumps({
                "name": self.name, "protocol": self.space.protocol, "metric": self.space.metric,
                "mode": self.space.mode, "data": str(self.data), "split_hash": self.split_hash,
                "test_cases": len(splits.test), "rows": list(self.space.arms),
                "stage1": [{"row": s.row, "outer": s.outer, "seed": s.seed, "fold": s.fold, "experiment": s.experiment,
                            "optuna_study": s.optuna_study(self.name)} for s in self.stage1_runs()],
                "primary_metric": self.space.primary_metric, "alpha": self.space.alpha,
                "reference": self.space.reference, "search_per_seed": self.space.search_per_seed,
                "questions": group_rows(self.space.raw.get("groups") or {}),
                "contrasts": [[c.question, c.row, c.against] for c in self.space.contrasts],
                "resources": {"cpu": self.space.cpu, "gpu": self.gpu},
                "space": self.space.raw,
            }, indent=1, default=str))  # fmt: skip
        except OSError as err:
            raise storage_error(self.location, err) from None
        self._push(MANIFEST, SPACE_COPY, NESTED_SPLITS, SPLITS_COPY)

    def stage1_runs(self) -> list[Stage1]:
        """The stage-1 searches in the order they run: per row, per outer fold for nested_ablation, and
        with ``search_per_seed`` per seed (and, in a fair ablation, per reported fold)."""
        rows = self.space.searched_rows  # nnU-Net rows configure themselves: stage 2 only
        per_seed = self.space.search_per_seed and self.space.protocol in ABLATIONS
        seeds: list[int | None] = list(self.space.seeds) if per_seed else [None]
        if self.space.protocol == "nested_ablation":
            return [Stage1(row, outer, seed) for outer in self.space.folds for row in rows for seed in seeds]
        if per_seed:
            return [Stage1(row, None, seed, fold) for fold in self.space.folds for row in rows for seed in seeds]
        return [Stage1(row) for row in rows]

    def _replicate_of(self, run: Stage1) -> tuple[list[int], list[int]]:
        """(folds, seeds) of the stage-2 runs trained from ``run``'s choice."""
        if run.outer is not None:
            folds = [run.outer]
        elif run.fold is not None:
            folds = [run.fold]
        else:
            folds = list(self.space.folds)
        return folds, list(self.space.seeds) if run.seed is None else [run.seed]

    def _freeze_inner(self, splits: Any, cases: list[Any], resume: bool) -> None:
        """nested_ablation: make (or, resuming, read back) the inner folds of every outer fold."""
        from avn_study.data.splits import inner_splits, read_nested, write_nested

        if self.space.protocol != "nested_ablation":
            return
        path = self.root / NESTED_SPLITS
        if resume:
            inner = {k: read_nested(path, splits, k) for k in self.space.folds}
        else:
            patients = {c.case_id: c.patient_id for c in cases}
            necrosis = {c.case_id: c.has_necrosis for c in cases}
            try:
                inner = {
                    k: inner_splits(splits, k, patients, necrosis, self.space.inner_folds) for k in self.space.folds
                }
            except ValueError as err:
                raise UsageError(f"{self.space.path}: inner_folds: {err}") from None
            write_nested(splits, inner, path)
        self.inner = {k: v.to_dict() for k, v in inner.items()}

    def _check_tuning_sets(self, splits: Any, cases: list[Any]) -> None:
        """Refuse, before Ray starts, a tuning validation set on which the tuning metric is undefined."""
        from avn_study.data.splits import inner_splits

        if self.space.metric not in ("val_dice", "lesion_sensitivity"):
            return  # defined on every validation set
        necrotic = {c.case_id for c in cases if c.has_necrosis}
        if self.space.protocol == "nested_ablation":
            patients = {c.case_id: c.patient_id for c in cases}
            flags = {c.case_id: c.has_necrosis for c in cases}
            sets = {f"inner fold {self.space.tuning_fold} of outer fold {k}":
                    inner_splits(splits, k, patients, flags, self.space.inner_folds).fold(self.space.tuning_fold).val
                    for k in self.space.folds}  # fmt: skip
        else:
            sets = {f"tuning fold {self.space.tuning_fold}": splits.fold(self.space.tuning_fold).val}
        for name, val in sets.items():
            if not necrotic & set(val):
                raise UsageError(
                    f"{self.space.path}: {name} has no case with necrosis, so {self.space.metric} (the tuning "
                    f"metric) is undefined on it: the cohort has {len(necrotic)} case(s) with necrosis; use fewer "
                    "folds, another split seed, or a metric defined on every case (val_dice_all)"
                )

    @property
    def location(self) -> str:
        """Where the study lives: its folder, or ``URI/NAME`` on an object store."""
        return self.store.uri

    def _push(self, *names: str) -> None:
        self.store.push(*names)

    def _meta(self, outer: int | None = None, test: bool = False) -> dict[str, Any]:
        """What every trial of a stage needs to find its data (the same for all its trials)."""
        # the split inline, like the inner folds: readable on any node and storage, never a file in DATA
        meta = {"data": str(self.data), "split": self.splits.to_dict(),
                "checkpoint_frequency": self.space.checkpoint_frequency, "fault": self.fault, "test": test}  # fmt: skip
        if outer is not None:
            meta["inner"] = self.inner[outer]  # in the trial's parameters: readable on any node and storage
        return meta

    # ---------------------------------------------------------------- Ray pieces
    def _trainable(self):
        from ray import tune

        from avn_study.study.trainable import train_trial

        return tune.with_resources(train_trial, {"cpu": self.space.cpu, "gpu": self.gpu})

    def _run_config(self, experiment: str, label: str, total: int):
        from ray import tune

        from avn_study.study.progress import ProgressView

        callbacks = list(self.callbacks)
        if self.track:
            from avn_study.study.tracking import tracker_callbacks

            callbacks += tracker_callbacks(self.track, self.name, str(self.root), experiment)
        if self.progress:
            callbacks.append(ProgressView(label, total, self.space.metric, self.space.mode,
                                          self.max_concurrent or max(1, int(os.cpu_count() or 1))))  # fmt: skip
        return tune.RunConfig(
            name=experiment, storage_path=f"{self.storage}/{self.name}", verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=self.space.max_failures),
            # the most recent checkpoints, never "the best by metric": Ray restores a trial from its latest
            # checkpoint, which a score-ordered retention may already have deleted
            checkpoint_config=tune.CheckpointConfig(num_to_keep=self.space.num_to_keep),
        )  # fmt: skip

    def _fit(self, experiment: str, make_tuner, param_space: dict[str, Any], resume: bool) -> None:
        """Run (or restore and finish) one Ray experiment; raise :class:`StudyInterrupted` if it stopped early."""
        from ray import tune

        if self.stop_requested.is_set():
            raise StudyInterrupted(f"{experiment}: not started, the driver was asked to stop")
        path = f"{self.storage}/{self.name}/{experiment}"
        # Ray snapshots its state after trials start
        saved = self.store.saved(experiment)
        if resume and saved and tune.Tuner.can_restore(path):
            # param_space again: trials the searcher creates after the restore need its constants too
            tuner = tune.Tuner.restore(path, trainable=self._trainable(), param_space=param_space,
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)  # fmt: skip
        else:
            if self.store.exists(experiment):  # started but never saved its state (driver killed early): start over
                self.store.abandon(experiment, f"{experiment}.abandoned-{self.store.abandoned_count()}")
                self._forget_optuna_study(experiment)
            tuner = make_tuner()
        try:
            with _tune_log(self.root), _epochs_without_metric():
                tuner.fit()
        except Exception:
            self._check_writable()  # a storage that refuses writes is the cause worth naming
            raise
        finally:  # also when the driver is interrupted: the store keeps the journal, the mirror the results
            self.store.pull(experiment)
            self._push(JOURNAL)
        statuses = list(trial_statuses(self.root / experiment).values())
        unfinished = [s for s in statuses if s not in (TERMINATED, ERROR)]
        if unfinished or ERROR in statuses:
            self._check_writable()  # trials that could not write are a storage failure, not an interrupt or a bug
        if unfinished:  # Tune stops gracefully on Ctrl-C/SIGTERM and returns; the study must stop too
            raise StudyInterrupted(f"{experiment}: {len(unfinished)} trial(s) did not finish")
        if self.stop_requested.is_set():
            raise StudyInterrupted(f"{experiment}: finished, but the driver was asked to stop")

    def _check_writable(self) -> None:
        """Raise the storage error (exit 1) if the study folder no longer takes writes."""
        self.store.check_writable()

    def _forget_optuna_study(self, experiment: str) -> None:
        """Drop the Optuna studies of an abandoned stage-1 run so the restarted search starts clean."""
        import optuna

        if not (self.root / JOURNAL).is_file():
            return
        if experiment in (STAGE1_ALL, STAGES):
            names = [run.optuna_study(self.name) for run in self.stage1_runs()]
        elif experiment.startswith("stage1-"):
            names = [f"{self.name}-{experiment.removeprefix('stage1-')}"]  # Stage1.optuna_study
        else:
            return
        storage = self._optuna_storage()
        existing = set(optuna.get_all_study_names(storage))
        for name in names:
            if name in existing:
                optuna.delete_study(study_name=name, storage=storage)
        self._push(JOURNAL)

    def _optuna_storage(self):
        """The study's one Optuna journal storage (one object for every search: several JournalStorage
        objects on one file in one process can miss each other's writes, and Optuna then fails to find
        the trial it has just created)."""
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        if getattr(self, "_journal", None) is None:
            self._journal = JournalStorage(JournalFileBackend(str(self.root / JOURNAL)))
        return self._journal

    def _optuna(self, run: Stage1):
        import optuna

        from avn_study.study.search import FinalValueOptunaSearch

        distributions = {p.name: _distribution(p) for p in self.space.search}
        storage = self._optuna_storage()
        sampler = optuna.samplers.TPESampler(seed=run.replicate_seed(self.space.sampler_seed, "sampler"))
        return FinalValueOptunaSearch(distributions, metric=self.space.metric, mode=self.space.mode, sampler=sampler,
                                      study_name=run.optuna_study(self.name), storage=storage,
                                      epochs=self._epochs())  # fmt: skip

    def _epochs(self) -> int:
        from avn_study.config import TrainConfig

        return TrainConfig.from_flat(self.space.fixed).optim.epochs

    def _scheduler(self, stage: int):
        """ASHA for stage 1 (a new instance per call), or None (stage 2, or no early stopping)."""
        factory = self._scheduler_factory(stage)
        return factory() if factory is not None else None

    def _scheduler_factory(self, stage: int) -> functools.partial | None:
        s = self.space.scheduler
        if stage != 1 or s.type == "none":
            return None  # stage 2 runs every trial to the end
        # a partial of a module function: Ray pickles the scheduler, which must not hold the Study
        return functools.partial(_asha, max_t=self._epochs(), grace_period=s.grace_period,
                                 reduction_factor=s.reduction_factor)  # fmt: skip

    # ---------------------------------------------------------------- stages
    def _stage1_constants(self, run: Stage1) -> dict[str, Any]:
        """What every trial of one stage-1 search shares: the row's config on its validation fold."""
        seed = run.replicate_seed(self.space.sampler_seed, "stage1")
        if run.outer is None:
            flat = self.space.trial_config(run.row, fold=self.space.tuning_fold, seed=seed)
        else:  # nested: validate on an inner fold of the outer fold's training patients
            inner = {"inner_fold": self.space.tuning_fold, "n_inner_folds": self.space.inner_folds}
            flat = self.space.trial_config(run.row, fold=run.outer, seed=seed, **inner)
        return {**flat, "_row": run.row, "_stage": 1, "_avn": self._meta(run.outer)}

    def _tune_config(self, search: Any, scheduler: Any, num_samples: int):
        from ray import tune

        # reuse_actors: a trial's worker imports torch (and torch._dynamo, which optimizers pull in) once,
        # ~5 s per process on a laptop core; safe because trial files go through Ray's storage context
        return tune.TuneConfig(metric=self.space.metric, mode=self.space.mode, search_alg=search, scheduler=scheduler,
                               num_samples=num_samples, max_concurrent_trials=self.max_concurrent or None,
                               trial_dirname_creator=_trial_dirname, reuse_actors=True)  # fmt: skip

    def run_stage1(self, run: Stage1, resume: bool) -> None:
        from ray import tune

        param_space = self._stage1_constants(run)

        def make_tuner():  # the Optuna study is created (or loaded) only when a fresh run starts
            search = self._optuna(run) if self.space.search else None
            return tune.Tuner(self._trainable(), param_space=param_space,
                              tune_config=self._tune_config(search, self._scheduler(1), self.space.trials),
                              run_config=self._run_config(run.experiment, run.label, self.space.trials))  # fmt: skip

        self._fit(run.experiment, make_tuner, param_space, resume)

    def run_concurrent(self, resume: bool) -> None:
        """The whole study in one Ray experiment (``concurrent_rows: true``): every stage-1 search at once,
        and each search's stage-2 trials as soon as that search has chosen.

        Each search keeps its own Optuna study (:class:`~avn_study.study.search.RowSearch`) and its own ASHA
        (:class:`~avn_study.study.search.RowScheduler`), and chooses by the sequential protocol's rule, so
        the protocol is the sequential one's; only the cluster no longer idles while one row's last
        trials drain or while the last row searches. A study started before both stages shared one
        experiment (``stage1/`` and ``stage2/``) resumes in that layout.
        """
        if resume and self.store.exists(STAGE1_ALL):
            self._run_shared(STAGE1_ALL, with_stage2=False, resume=resume)
            if self.space.protocol in ABLATIONS:
                self.run_stage2(resume)
            return
        self._run_shared(STAGES, with_stage2=self.space.protocol in ABLATIONS, resume=resume)
        if self.space.protocol in ABLATIONS:  # names a row whose search chose nothing; records the plan
            self._write_plan(self.stage2_grid())

    def _run_shared(self, experiment: str, with_stage2: bool, resume: bool) -> None:
        from ray import tune

        from avn_study.study.search import FollowUp, RowScheduler, RowSearch, RowSearchRun

        runs = self.stage1_runs()
        follow_ups, ready = {}, []
        if with_stage2:
            meta = {"_avn": self._meta(test=True)}
            for run in runs:
                folds, seeds = self._replicate_of(run)
                entries = self._stage2_entries(run.row, folds, seeds=seeds, run=run)
                follow_ups[run.experiment] = FollowUp([{**e, **meta} for e in entries],
                                                      self._search_patients(run))  # fmt: skip
            for row in set(self.space.arms) - set(self.space.searched_rows):  # nnU-Net: chooses nothing
                ready += [{**e, **meta} for e in self._stage2_entries(row, self.space.folds, self._unchosen(row))]
        total = len(runs) * self.space.trials + sum(len(f.grid) for f in follow_ups.values()) + len(ready)

        def make_tuner():
            search = RowSearch({run.experiment: RowSearchRun(self._stage1_constants(run),
                                                             self._optuna(run) if self.space.search else None,
                                                             self.space.trials) for run in runs},
                               metric=self.space.metric, mode=self.space.mode, follow_ups=follow_ups,
                               ready=ready)  # fmt: skip
            factory = self._scheduler_factory(1)
            scheduler = RowScheduler(factory) if factory is not None else None
            label = "both stages, all rows" if with_stage2 else "stage 1, all rows"
            return tune.Tuner(self._trainable(), param_space={},
                              tune_config=self._tune_config(search, scheduler, total),
                              run_config=self._run_config(experiment, label, total))  # fmt: skip

        self._fit(experiment, make_tuner, {}, resume)

    def _search_patients(self, run: Stage1) -> list[str]:
        """The patients a stage-1 search validates on (its fold's validation cases), before it runs."""
        from avn_study.data.splits import splits_from_dict

        splits = self.splits if run.outer is None else splits_from_dict(self.inner[run.outer])
        return sorted({self.patients[c] for c in splits.fold(self.space.tuning_fold).val})

    def select(self, run: Stage1, read: dict[Path, list[Any]] | None = None) -> Selected:
        """The stage-1 configuration of ``run`` (the rule of :func:`~avn_study.study.results.best_trial`),
        read back from the study's folders, and the patients it rests on. ``read``: experiment folder ->
        its trials, filled on first use (a study with every search in one folder reads it once)."""
        folder = self.root / self._stage1_experiment(run)
        read = {} if read is None else read
        if folder not in read:
            read[folder] = read_trials(folder, self.space.metric)
        trials = [o for o in read[folder]
                  if o.stage == 1 and o.config.get("_run", run.experiment) == run.experiment]  # fmt: skip
        best = best_trial([(o.trial_id, o.metric, o.epochs, o.order) for o in trials if o.status == TERMINATED],
                          self.space.mode)  # fmt: skip
        if best is None:
            raise AvnError(f"stage 1 of row '{run.row}' has no finished trial with a {self.space.metric}; "
                           f"see {folder}")  # fmt: skip
        chosen = next(o for o in trials if o.trial_id == best)
        # (a damaged trial validated on the same fold; its per-case files may be what is damaged)
        patients = set().union(*(validated_patients(Path(o.path)) for o in trials if o.status != DAMAGED))
        config = {k: v for k, v in chosen.config.items() if not k.startswith("_")}
        return Selected(config, best, run.experiment, sorted(patients))

    def _stage1_experiment(self, run: Stage1) -> str:
        """The Ray experiment holding ``run``'s trials: its own, or the one shared by every search."""
        if not self.space.concurrent_rows:
            return run.experiment
        return STAGE1_ALL if (self.root / STAGE1_ALL).is_dir() else STAGES

    def best_config(self, row: str) -> dict[str, Any]:
        """The chosen configuration of ``row`` on the tuning fold (fair_ablation, sweep)."""
        return self.select(Stage1(row)).config

    def _unchosen(self, row: str) -> Selected:
        """A row that chooses nothing (nnU-Net configures itself): its one configuration, on no patient."""
        return Selected(self.space.trial_config(row), None, None, [])

    def _stage2_entries(self, row: str, folds: list[int], chosen: Selected | None = None,
                        seeds: list[int] | None = None, run: Stage1 | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Stage 2 of ``row`` on ``folds``: every seed and repeat of ``chosen`` (None: the parameters and
        the record of what they rest on are added once the row's search has chosen). ``run``: the search
        whose choice it is; with ``search_per_seed`` it seeds its runs itself (:meth:`Stage1.replicate_seed`)."""
        config = chosen.config if chosen is not None else {}
        record = {} if chosen is None else {"_selected_on": chosen.patients, "_selected_trial": chosen.trial_id,
                                            "_selected_in": chosen.experiment}  # fmt: skip
        entries = []
        for fold in folds:
            for seed in self.space.seeds if seeds is None else seeds:
                for repeat in range(self.space.repeats):
                    run_seed = seed + 10_007 * repeat  # repeats add seeds beyond the listed ones
                    if run is not None and run.seed is not None:
                        run_seed = run.replicate_seed(run_seed, "stage2")
                    entries.append({**config, "fold": fold, "inner_fold": -1, "seed": run_seed, "_row": row,
                                    "_stage": 2, "_repeat": repeat, "_replicate": seed, **record})  # fmt: skip
        return entries

    def stage2_grid(self) -> list[dict[str, Any]]:
        """Every stage-2 trial: each search's choice on its folds x seeds x repeats, row by row."""
        grid: list[dict[str, Any]] = []
        read: dict[Path, list[Any]] = {}
        runs = self.stage1_runs()
        for row in self.space.arms:
            if row not in self.space.searched_rows:
                grid += self._stage2_entries(row, self.space.folds, self._unchosen(row))
                continue
            for run in (r for r in runs if r.row == row):
                folds, seeds = self._replicate_of(run)
                grid += self._stage2_entries(row, folds, self.select(run, read), seeds=seeds, run=run)
        return grid

    def _write_plan(self, grid: list[dict[str, Any]]) -> None:
        (self.root / STAGE2_PLAN).write_text(json.dumps(grid, indent=1))
        self._push(STAGE2_PLAN)

    def run_stage2(self, resume: bool) -> None:

        grid = self.stage2_grid()
        self._write_plan(grid)
        self._run_grid(STAGE2, "stage 2", grid, resume)

    def _run_grid(self, experiment: str, label: str, grid: list[dict[str, Any]], resume: bool) -> None:
        """One Ray experiment of stage-2 trials: every entry of ``grid`` to the end (no search, no ASHA)."""
        from ray import tune

        param_space = {"grid": tune.grid_search(grid), "_avn": self._meta(test=True)}

        def make_tuner():
            return tune.Tuner(self._trainable(), param_space=param_space,
                              tune_config=self._tune_config(None, None, 1),
                              run_config=self._run_config(experiment, label, len(grid)))  # fmt: skip

        self._fit(experiment, make_tuner, param_space, resume)

    def repair_stage2(self) -> None:
        """Re-run the stage-2 trials of the plan whose folder is missing or damaged.

        Every stage-2 trial folder (``stage2/``, ``stages/``, earlier ``stage2-repair-N/``) is checked
        (:func:`~avn_study.study.check.trial_damage`); a damaged one is set aside as ``NAME.damaged-K``
        (never deleted). The plan's entries that then have no trial folder that ended (TERMINATED or
        ERROR: errored trials are not re-run, as ``--resume`` never re-runs them) run in a new Ray
        experiment ``stage2-repair-N``, which the analysis reads like stage 2. Ray's own state of the
        stage-2 experiment is not edited: a restored ``stage2/`` (or the RowSearch of ``stages/``)
        would not run a trial it saved as finished again.
        """

        from avn_study.study.check import read_plan, stage2_key, trial_damage, trial_key

        plan = read_plan(self.root)
        if plan is None:
            return
        holders = [p for p in (self.root / STAGE2, self.root / STAGES) if p.is_dir()] + repair_folders(self.root)
        ended: set[tuple[str, int, int, int]] = set()
        for experiment in holders:
            statuses = trial_statuses(experiment)
            for trial_dir in trial_folders(experiment):
                key = trial_key(trial_dir)
                damage = trial_damage(trial_dir, finished=statuses.get(trial_dir.name) == TERMINATED)
                if damage and (key is not None or experiment.name != STAGES):
                    self._set_aside(trial_dir, damage)
                elif key is not None and statuses.get(trial_dir.name) in (TERMINATED, ERROR):
                    ended.add(key)
        missing = [e for e in plan if stage2_key(e) not in ended]
        if not missing:
            return
        name = f"{STAGE2_REPAIR}-{len(repair_folders(self.root)) + 1}"
        print(f"stage 2: {len(missing)} trial(s) of {STAGE2_PLAN} missing or damaged, re-run in {name}",
              file=sys.stderr)  # fmt: skip
        self._run_grid(name, "stage 2 (repair)", missing, resume=False)

    def _set_aside(self, trial_dir: Path, why: str) -> None:
        """Move a damaged trial folder to ``NAME.damaged-K`` next to it (never deleted; in the store too, for
        an object-store ``--storage``), saying why."""
        k = 0
        while trial_dir.with_name(f"{trial_dir.name}.damaged-{k}").exists():
            k += 1
        aside = trial_dir.with_name(f"{trial_dir.name}.damaged-{k}")
        where = trial_dir.parent.name
        self.store.abandon(f"{where}/{trial_dir.name}", f"{where}/{aside.name}")  # (in an object store too)
        print(f"warning: {why}; the trial is set aside as {aside} and runs again", file=sys.stderr)

    def run(self, resume: bool = False) -> StudyResult:
        """Every stage (after :meth:`prepare`); the lock is released at the end, however it ends."""
        try:
            if self.space.concurrent_rows:
                self.run_concurrent(resume)
            else:
                for run in self.stage1_runs():
                    self.run_stage1(run, resume)
                if self.space.protocol in ABLATIONS:
                    self.run_stage2(resume)
            if self.space.protocol in ABLATIONS:
                self.repair_stage2()
            return self.result()
        finally:
            self.close()

    def result(self) -> StudyResult:
        result = StudyResult(self.root)
        for experiment in stage_folders(self.root):
            result.outcomes += read_trials(experiment, self.space.metric)
        return result


@contextlib.contextmanager
def _epochs_without_metric():
    """Let trials report epochs that carry no ``metric``: a run evaluates only every ``eval_every`` epochs
    (and always at its last), an nnU-Net trial is scored by our metrics only at its end. Ray Tune refuses
    such a result unless its strict check is off; ASHA and the searchers skip it (ASHA's rungs are
    evaluated epochs, :func:`avn_study.study.space.load_space` checks)."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@contextlib.contextmanager
def _tune_log(root: Path):
    """Ray Tune's own log records (errored trials' tracebacks, retries) go to ``ROOT/driver.log``, not
    the terminal: the live view and the errored-trial summary say what happened and where to look."""
    import logging

    class _QuietFileHandler(logging.FileHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            pass  # a full or read-only storage: the sweep names that itself, the log must not shout it

    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train", "ray.air")]
    try:
        handler: logging.Handler = _QuietFileHandler(root / DRIVER_LOG, delay=True)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = [(lg.propagate, list(lg.handlers)) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


def _asha(max_t: int, grace_period: int, reduction_factor: float):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)  # fmt: skip


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Ray's default embeds the whole config)."""
    return f"trial_{trial.trial_id}"


def _distribution(p: Any):
    """An Optuna distribution for a search-space parameter."""
    from optuna import distributions as d

    low, high = p.values[0], p.values[-1]
    if p.kind == "loguniform":
        return d.FloatDistribution(low, high, log=True)
    if p.kind == "uniform":
        return d.FloatDistribution(low, high)
    if p.kind == "int":
        return d.IntDistribution(int(low), int(high))
    return d.CategoricalDistribution(list(p.values))


CONNECT_TIMEOUT_ENV = "AVN_STUDY_CONNECT_TIMEOUT"  # seconds a sweep waits for --address (default 30)
DEFAULT_CONNECT_TIMEOUT_S = 30.0
MIN_TMP_FREE_BYTES = 100 * 2**20  # a local Ray's session folder (sockets, logs, the GCS's files) needs room
AUTH_VARIABLES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


def connect_timeout(seconds: float | None = None) -> float:
    """How long to wait for a cluster: ``seconds`` (``--connect-timeout``), else ``$AVN_STUDY_CONNECT_TIMEOUT``,
    else 30 s.

    Raises:
        UsageError: the variable is not a positive number of seconds.
    """
    if seconds is not None:
        return float(seconds)
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value < float("inf")):
        raise UsageError(f"{CONNECT_TIMEOUT_ENV}={text!r}: expected a positive number of seconds, e.g. 30")
    return value


def check_ray_tmpdir(min_free: int = MIN_TMP_FREE_BYTES) -> None:
    """The folder a local Ray puts its session in (``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``) must
    take a new folder and have ``min_free`` bytes free; Ray itself would time out after 45 s waiting for
    its GCS ("timed out waiting for gcs_server_port") and leave a traceback.

    Raises:
        UsageError: naming the folder, what is wrong, and the variable that moves it.
    """
    import tempfile

    variable = "RAY_TMPDIR" if "RAY_TMPDIR" in os.environ else "TMPDIR" if "TMPDIR" in os.environ else None
    folder = Path(os.environ[variable]) if variable else Path("/tmp")
    where = f"{variable}={folder}" if variable else f"{folder} (Ray's default temporary folder)"
    hint = "set RAY_TMPDIR (or TMPDIR) to a writable folder with at least " \
           f"{min_free // 2**20} MB free"  # fmt: skip
    if not folder.is_dir():
        raise UsageError(f"{where}: is not a folder (missing, or a file on its path); {hint}")
    try:
        Path(tempfile.mkdtemp(prefix=".avn-study-probe-", dir=folder)).rmdir()  # where Ray would make ray/
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise UsageError(f"{where}: a local Ray cannot make its session folder there ({err.strerror or err}); "
                         f"{hint}") from None  # fmt: skip
    if free < min_free:
        raise UsageError(f"{where}: only {free / 2**20:.0f} MB free, a local Ray needs at least "
                         f"{min_free // 2**20} MB for its session folder; {hint}")  # fmt: skip


def _raise_on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM while waiting for the cluster stops the wait, as Ctrl-C does


def _is_auth_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is Ray's token-authentication refusal."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = f"{type(cur).__name__}: {cur}"
        if "AuthenticationError" in text or "InvalidAuthToken" in text or "Unauthenticated" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _reach(address: str, timeout_s: float) -> str:
    """Wait (at most ``timeout_s``) until the cluster's GCS port takes a TCP connection; return the
    HOST:PORT Ray will use. ``time.sleep`` between attempts lets SIGTERM and Ctrl-C in.

    Raises:
        AvnError: no cluster found (``auto``) or none reachable in time, naming the address tried.
    """
    import socket
    import time

    from ray._private.services import canonicalize_bootstrap_address

    try:  # a Ray Client URI (ray://HOST:PORT) is probed at its HOST:PORT
        resolved = address.split("://", 1)[1] if "://" in address else canonicalize_bootstrap_address(address)
    except ValueError:
        raise UsageError(f"--address {address}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)") from None
    except ConnectionError as err:  # auto, and no cluster found
        raise AvnError(f"--address {address}: {err}") from None
    if resolved is None:
        raise AvnError(f"--address {address}: no running Ray cluster found on this machine (start one with "
                       "`ray start --head`, or give HOST:PORT)")  # fmt: skip
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    shown = address if resolved == address else f"{address} ({resolved})"
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(left, 5.0))):
                return resolved
        except OSError as err:
            last = err.strerror or str(err) or type(err).__name__
        if time.monotonic() + 0.5 > deadline:
            raise AvnError(f"--address {shown}: no Ray cluster could be reached within {timeout_s:g} s ({last}); "
                           f"check the address (`ray status` on the head prints it), or wait longer with "
                           f"--connect-timeout SECONDS or {CONNECT_TIMEOUT_ENV}")  # fmt: skip
        time.sleep(0.5)


def _probe_auth(resolved: str, timeout_s: float) -> bool:
    """Whether the GCS at ``resolved`` refuses this client's token (one RPC, in a thread that cannot hold
    the driver longer than ``timeout_s``); any other outcome is left to ``ray.init``."""
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            from ray._raylet import GcsClient

            GcsClient(address=resolved)
            outcome.append(None)
        except BaseException as err:  # classified below, never raised from the thread
            outcome.append(err)

    thread = threading.Thread(target=probe, name="avn-study-auth-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(outcome) and outcome[0] is not None and _is_auth_error(outcome[0])


def _enable_token_if_available(address: str) -> None:
    """Ray turns token authentication on by itself only for ``auto``; for an explicit HOST:PORT, use it
    when ``RAY_AUTH_MODE`` is unset and a token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``), as ``ray start`` does. ``RAY_AUTH_MODE=disabled`` keeps it off.

    Raises:
        UsageError: a token source is set but unreadable (``RAY_AUTH_TOKEN_PATH`` naming a missing file).
    """
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return
    try:
        found = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
        if found and mode is None:
            _enable_token_auth()  # what Ray does for `auto` (without its "enabled for this cluster" warning)
    except Exception as err:  # Ray's AuthenticationError: a token source that cannot be read
        if not _is_auth_error(err):
            raise
        reason = str(getattr(err, "message", err))
        raise UsageError(f"--address {address}: Ray cannot read this client's authentication token ({reason}); "
                         f"set one of {AUTH_VARIABLES} to the cluster's token (`ray get-auth-token` on the head "
                         "prints it), see docs/cluster.md") from None  # fmt: skip


def init_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
             connect_timeout_s: float | None = None) -> None:  # fmt: skip
    """Join a cluster (``auto`` or HOST:PORT) or start Ray on this machine (``num_gpus``: logical GPUs,
    for simulations such as ``bench cluster``; default: the GPUs Ray detects).

    Args:
        address: ``auto``, HOST:PORT, or None for a fresh local Ray.
        num_cpus: CPUs of a local Ray.
        num_gpus: logical GPUs of a local Ray.
        connect_timeout_s: how long to wait for ``address`` (default :func:`connect_timeout`).

    Raises:
        AvnError: the cluster cannot be reached in time (exit 1).
        UsageError: the cluster refused this client's token, or a local Ray has no writable temporary
            folder (exit 2).
    """
    # quiet drivers: our ProgressView replaces Ray's tables; snapshot warnings are noise for short epochs
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if not address:  # "local": a fresh Ray on this machine, never a cluster that `ray start` left running here
        check_ray_tmpdir()
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
        return
    import signal

    timeout_s = connect_timeout(connect_timeout_s)
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        print(f"joining the Ray cluster at {address} (waiting up to {timeout_s:g} s)", file=sys.stderr, flush=True)
        resolved = _reach(address, timeout_s)
        _enable_token_if_available(address)
        refused = UsageError(
            f"--address {address}: the Ray cluster at {resolved} refused this client's authentication token "
            f"(token authentication is on there, RAY_AUTH_MODE=token); give this machine the cluster's token in "
            f"{AUTH_VARIABLES} (`ray get-auth-token` on the head prints it), see docs/cluster.md"
        )
        # at once, where ray.init would retry for 20 s first (a Ray Client URI is left to ray.init)
        if "://" not in address and _probe_auth(resolved, timeout_s):
            raise refused
        try:
            ray.init(address=address, **kwargs)
        except Exception as err:  # Ray gives ConnectionError, RuntimeError or AuthenticationError
            if _is_auth_error(err):
                raise refused from None
            if isinstance(err, ConnectionError | RuntimeError):
                raise AvnError(f"--address {address}: could not join the Ray cluster at {resolved} ({err})") from None
            raise
    finally:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is \
                _raise_on_sigterm:  # fmt: skip
            signal.signal(signal.SIGTERM, previous)
