"""Running a search-space file on Ray Tune: sweeps, the fair-ablation protocol, resume.

A study lives in ``STORAGE/NAME/``, in the format :mod:`avn_study.study.folder` owns (its docstring draws the
tree): the study's own files beside one Ray Tune experiment per stage (or, with ``concurrent_rows``, one for
the whole study).

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
reported, always by models tuned without them. Every stage-2 trial records the search its
configuration was selected in (:func:`~avn_study.study.protocol.selection_record`). Each stage folder is Ray Tune's
own format (``ExperimentAnalysis``, ``Tuner.restore``). ``--resume`` restores unfinished stages with
``Tuner.restore``, which unpickles Ray's state files: resume only experiments whose storage you trust.

:class:`Study` runs what :mod:`avn_study.study.protocol` decides (which searches, what each chooses on, the
stage-2 grid), after the checks of :mod:`avn_study.study.preflight`, on the Ray session of
:mod:`avn_study.study.ray_session` and the searchers of :mod:`avn_study.study.optuna_setup`. ``_asha`` and
``_trial_dirname`` stay here: Ray pickles them by this import path into every study folder.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from avn_study.errors import UsageError
from avn_study.study import preflight, protocol
from avn_study.study.folder import (
    DAMAGED,
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
    TRIAL_PREFIX,
    Stage1,
    StudyLock,
    check_name,
    repair_folders,
    stage_folders,
    storage_error,
    trial_folders,
    trial_statuses,
)
from avn_study.study.ray_session import (
    AUTH_VARIABLES,
    CONNECT_TIMEOUT_ENV,
    DEFAULT_CONNECT_TIMEOUT_S,
    MIN_TMP_FREE_BYTES,
    check_ray_tmpdir,
    connect_timeout,
    epochs_without_metric,
    init_ray,
    tune_log,
)
from avn_study.study.results import Selected, StudyResult, read_trials
from avn_study.study.space import ABLATIONS, SearchSpace, group_rows
from avn_study.study.trial_split import split_reference

__all__ = [  # (the Ray session's names too: cli/, bench/ and old code import them from here)
    "AUTH_VARIABLES",
    "CONNECT_TIMEOUT_ENV",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "MIN_TMP_FREE_BYTES",
    "Study",
    "StudyInterrupted",
    "check_ray_tmpdir",
    "connect_timeout",
    "init_ray",
]


class StudyInterrupted(KeyboardInterrupt):
    """The driver was interrupted; the study's state is saved and ``--resume`` continues it."""


class Study:
    """One study folder and the Ray runs that fill it."""

    def __init__(self, space: SearchSpace, data: Path, storage: str, name: str | None = None,
                 max_concurrent: int | None = None, gpus_per_trial: float | None = None,
                 progress: bool = True, fault: dict[str, Any] | None = None,
                 callbacks: list[Any] | None = None, force_unlock: bool = False,
                 track: list[str] | None = None, allow_no_verdict: bool = False,
                 trainable: Callable[[dict[str, Any]], None] | None = None,
                 trial_meta: dict[str, Any] | None = None) -> None:  # fmt: skip
        """``trainable``: the function every trial runs (default
        :func:`~avn_study.study.trainable.train_trial`; ``bench cluster`` gives a stand-in that sleeps), and
        ``trial_meta``: constants added to what every trial is given (``_avn`` in its parameters)."""
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
        self.trainable = trainable  # None: avn_study.study.trainable.train_trial
        self.trial_meta = dict(trial_meta or {})
        # set by the driver's SIGTERM handler: a stop Ray Tune may not see (all trials of a run had just
        # finished, or it was still setting up) must still end the study instead of starting the next run
        self.stop_requested = threading.Event()
        self.split_hash = ""
        self.splits: Any = None  # the study's split (frozen in STUDY/splits.json), set by prepare

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
        from avn_study.training.fold import cohort_split

        self._check_exists(resume)  # the common mistakes fail at once, before the cohort is read
        self._check_not_running(resume)  # a live driver too (read only: the lock is taken once Ray is up)
        searched = self.space.searched_rows
        config = TrainConfig.from_flat(self.space.trial_config(searched[0]) if searched else self.space.fixed)
        frozen = self.root / SPLITS_COPY
        cases, splits = cohort_split(self.data, config, frozen=read_json(frozen, "the study's frozen split")
                                     if resume and frozen.is_file() else None)  # fmt: skip
        self.splits = splits
        preflight.check_head_labels(self.space, cases)
        preflight.check_nnunet_rows(self.space, cases)
        preflight.check_unlabelled(self.space, self.data, cases)
        warning = crop_warning(cases, config.data.slice_size, config.data.inplane_spacing_mm)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        self.split_hash = splits.hash
        if not resume:
            protocol.check_tuning_sets(self.space, splits, cases)
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
        preflight.check_manifest(self.root, self.space, self.split_hash)
        self._freeze_inner(splits, cases, resume=True)
        self._check_search_files()

    def _check_search_files(self) -> None:
        """Before a resume: the searchers' saved states and Optuna's journal are whole
        (:func:`~avn_study.study.preflight.check_search_files`)."""
        searches = [(run, self.root / self._stage1_experiment(run)) for run in self.stage1_runs()]
        preflight.check_search_files(self.space, self.name, self.root / JOURNAL, searches, pickles=not self.remote)

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
        """The stage-1 searches in the order they run (:func:`~avn_study.study.protocol.stage1_runs`)."""
        return protocol.stage1_runs(self.space)

    def _freeze_inner(self, splits: Any, cases: list[Any], resume: bool) -> None:
        """nested_ablation: freeze (or, resuming, check) the inner folds of every outer fold, which the trials
        read from the study folder."""
        from avn_study.data.splits import read_nested, write_nested

        if self.space.protocol != "nested_ablation":
            return
        path = self.root / NESTED_SPLITS
        if resume:
            for k in self.space.folds:
                read_nested(path, splits, k)
        else:
            write_nested(splits, protocol.inner_folds(self.space, splits, cases), path)

    @property
    def location(self) -> str:
        """Where the study lives: its folder, or ``URI/NAME`` on an object store."""
        return self.store.uri

    def _push(self, *names: str) -> None:
        self.store.push(*names)

    def _meta(self, outer: int | None = None, test: bool = False) -> dict[str, Any]:
        """What every trial of a stage needs to find its data (the same for all its trials): the cohort, and
        its split by hash (and outer fold), read from the study folder (:mod:`avn_study.study.trial_split`):
        the same size whatever the cohort, never a file in DATA; and the one metric its trials tell Tune
        (their full epoch records stay in their folders: ``study.trainable.driver_view``)."""
        meta = {"data": str(self.data), **split_reference(self.split_hash, outer), "metric": self.space.metric,
                "checkpoint_frequency": self.space.checkpoint_frequency, "fault": self.fault, "test": test}  # fmt: skip
        return {**meta, **self.trial_meta}

    # ---------------------------------------------------------------- Ray pieces
    def _trainable(self):
        from ray import tune

        from avn_study.study.trainable import train_trial

        return tune.with_resources(self.trainable or train_trial, {"cpu": self.space.cpu, "gpu": self.gpu})

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
            with tune_log(self.root), epochs_without_metric():
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
        from avn_study.study.optuna_setup import delete_studies

        if not (self.root / JOURNAL).is_file():
            return
        if experiment in (STAGE1_ALL, STAGES):
            names = [run.optuna_study(self.name) for run in self.stage1_runs()]
        elif experiment.startswith("stage1-"):
            names = [f"{self.name}-{experiment.removeprefix('stage1-')}"]  # Stage1.optuna_study
        else:
            return
        delete_studies(self._optuna_storage(), names)
        self._push(JOURNAL)

    def _optuna_storage(self):
        """The study's one Optuna journal storage (:func:`~avn_study.study.optuna_setup.journal_storage`)."""
        from avn_study.study.optuna_setup import journal_storage

        if getattr(self, "_journal", None) is None:
            self._journal = journal_storage(self.root / JOURNAL)
        return self._journal

    def _optuna(self, run: Stage1):
        from avn_study.study.optuna_setup import optuna_search

        return optuna_search(self.space, run, self.name, self._optuna_storage(), self._epochs())

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
        return {**protocol.stage1_config(self.space, run), "_avn": self._meta(run.outer)}

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

        total = self._shared_plan(with_stage2)[3]

        def make_tuner():  # the Optuna studies are created (or loaded) only when a fresh run starts
            search, scheduler, _ = self.shared_search(with_stage2)
            label = "both stages, all rows" if with_stage2 else "stage 1, all rows"
            return tune.Tuner(self._trainable(), param_space={},
                              tune_config=self._tune_config(search, scheduler, total),
                              run_config=self._run_config(experiment, label, total))  # fmt: skip

        self._fit(experiment, make_tuner, {}, resume)

    def _shared_plan(self, with_stage2: bool) -> tuple[list[Stage1], dict[str, Any], list[dict[str, Any]], int]:
        """(the searches, each search's stage-2 trials waiting for its choice, the stage-2 trials that wait for
        nothing, how many trials in all) of the study in one experiment."""
        from avn_study.study.search import FollowUp

        runs = self.stage1_runs()
        follow_ups, ready = {}, []
        if with_stage2:
            meta = {"_avn": self._meta(test=True)}
            for run in runs:
                entries = protocol.run_entries(self.space, run)
                follow_ups[run.experiment] = FollowUp([{**e, **meta} for e in entries])
            for row in (r for r in self.space.arms if r not in self.space.searched_rows):  # nnU-Net: chooses nothing
                entries = protocol.stage2_entries(self.space, row, self.space.folds, protocol.unchosen(self.space, row))
                ready += [{**e, **meta} for e in entries]
        total = len(runs) * self.space.trials + sum(len(f.grid) for f in follow_ups.values()) + len(ready)
        return runs, follow_ups, ready, total

    def shared_search(self, with_stage2: bool = True) -> tuple[Any, Any, int]:
        """(searcher, trial scheduler, trials in all) of the study in one experiment (``concurrent_rows``):
        what Ray Tune is handed, and what ``bench cluster --driver-only`` drives without Ray's workers."""
        from avn_study.study.search import RowScheduler, RowSearch, RowSearchRun

        runs, follow_ups, ready, total = self._shared_plan(with_stage2)
        search = RowSearch({run.experiment: RowSearchRun(self._stage1_constants(run),
                                                         self._optuna(run) if self.space.search else None,
                                                         self.space.trials) for run in runs},
                           metric=self.space.metric, mode=self.space.mode, follow_ups=follow_ups,
                           ready=ready)  # fmt: skip
        factory = self._scheduler_factory(1)
        return search, RowScheduler(factory) if factory is not None else None, total

    def select(self, run: Stage1, read: dict[Path, list[Any]] | None = None) -> Selected:
        """The stage-1 configuration of ``run`` (:func:`~avn_study.study.protocol.select`), read back from
        the study's folders, and the patients it rests on. ``read``: experiment folder -> its trials, filled
        on first use (a study with every search in one folder reads it once)."""
        folder = self.root / self._stage1_experiment(run)
        read = {} if read is None else read
        if folder not in read:
            read[folder] = read_trials(folder, self.space.metric)
        return protocol.select(run, read[folder], self.space.mode, self.space.metric, folder)

    def _stage1_experiment(self, run: Stage1) -> str:
        """The Ray experiment holding ``run``'s trials: its own, or the one shared by every search."""
        if not self.space.concurrent_rows:
            return run.experiment
        return STAGE1_ALL if (self.root / STAGE1_ALL).is_dir() else STAGES

    def best_config(self, row: str) -> dict[str, Any]:
        """The chosen configuration of ``row`` on the tuning fold (fair_ablation, sweep)."""
        return self.select(Stage1(row)).config

    def stage2_grid(self) -> list[dict[str, Any]]:
        """Every stage-2 trial (:func:`~avn_study.study.protocol.stage2_grid`), each search's choice read
        back from the study's folders."""
        read: dict[Path, list[Any]] = {}
        return protocol.stage2_grid(self.space, lambda run: self.select(run, read))

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
        while trial_dir.with_name(f"{trial_dir.name}{DAMAGED}{k}").exists():
            k += 1
        aside = trial_dir.with_name(f"{trial_dir.name}{DAMAGED}{k}")
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


def _asha(max_t: int, grace_period: int, reduction_factor: float):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)  # fmt: skip


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Ray's default embeds the whole config)."""
    return f"{TRIAL_PREFIX}{trial.trial_id}"
