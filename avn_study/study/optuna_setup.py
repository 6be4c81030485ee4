"""The Optuna side of stage 1: a search-space parameter as an Optuna distribution, the study's one journal
storage, the searcher of one stage-1 search, and dropping the Optuna studies of an abandoned run.

The searcher's class (:class:`~avn_study.study.search.FinalValueOptunaSearch`) lives in ``search``: Ray
pickles it by that import path into the study folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avn_study.study.folder import Stage1


def distribution(p: Any):
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


def journal_storage(journal: Path):
    """An Optuna journal storage on the file ``journal``. Make one per study and share it: several
    JournalStorage objects on one file in one process can miss each other's writes, and Optuna then fails
    to find the trial it has just created."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(journal)))


def optuna_search(space: Any, run: Stage1, study_name: str, storage: Any, epochs: int):
    """The searcher of the stage-1 search ``run``: TPE seeded per search, its Optuna study in ``storage``.

    Args:
        space: the study's search space.
        run: the search.
        study_name: the study's name (the Optuna study is :meth:`Stage1.optuna_study` of it).
        storage: the study's journal storage (:func:`journal_storage`).
        epochs: the epochs of a trial run to the end.
    """
    import optuna

    from avn_study.study.search import FinalValueOptunaSearch

    distributions = {p.name: distribution(p) for p in space.search}
    sampler = optuna.samplers.TPESampler(seed=run.replicate_seed(space.sampler_seed, "sampler"))
    return FinalValueOptunaSearch(distributions, metric=space.metric, mode=space.mode, sampler=sampler,
                                  study_name=run.optuna_study(study_name), storage=storage,
                                  epochs=epochs)  # fmt: skip


def delete_studies(storage: Any, names: list[str]) -> None:
    """Delete the Optuna studies ``names`` that ``storage`` holds (the others are not there to delete)."""
    import optuna

    existing = set(optuna.get_all_study_names(storage))
    for name in names:
        if name in existing:
            optuna.delete_study(study_name=name, storage=storage)
