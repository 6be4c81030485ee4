"""Checks of every file the toolkit reads back from a study folder (standard library only).

A study folder outlives its driver: a full disk, a killed copy, a sync tool or a person can truncate a
file or remove a folder. What the sweep and the analysis read back is checked here before it is used,
so damage is named (the file and what was expected) instead of silently changing a table or a search:

- trial results (``result.json``): every line a JSON object; a truncated last line is damage;
- epoch records (``epochs/epoch_NNN.json``): each a JSON object (the trial's full record of an epoch);
- per-case files (``per_case/[test_]epoch_NNN.json``): a list of case records with ``case`` and
  ``patient``; a finished trial must have the one of its last evaluated epoch;
- the stage-2 plan (``stage2_plan.json``): a list of stage-2 entries (``_row``, ``fold``, ``seed``,
  ``_repeat``), against which a study's stage-2 trials are checked for completeness;
- the searchers' state (Ray's ``searcher-state-*.pkl``): a complete pickle stream (checked opcode by
  opcode with :mod:`pickletools`, which runs nothing), or :class:`avn_study.study.search.RowSearch`'s JSON;
- Optuna's journal (``optuna.journal``): every line a JSON operation, and a study for every stage-1
  search that has trials.

What a damaged study gets is in ``docs/safety.md`` ("What is checked on read").
"""

from __future__ import annotations

import json
import pickletools
from pathlib import Path
from typing import Any

from avn_study.errors import DataError
from avn_study.study.folder import (
    JOURNAL,
    PARAMS,
    RESULTS,
    STAGE2_PLAN,
    epoch_file,
    epoch_files,
    epoch_history,
    merge_grid,
    per_case_file,
    per_case_files,
    reports_to_tune_in_brief,
)

CASE_KEYS = ("case", "patient")  # what every per-case record holds (metrics.py adds the metrics)
PLAN_KEYS = ("_row", "fold", "seed", "_repeat")  # what identifies a stage-2 entry (see stage2_key)


class DamagedFile(DataError):
    """A file of a study folder that is not what the sweep wrote (exit 2, naming the file)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


def read_results(path: Path) -> list[dict[str, Any]]:
    """A trial's ``result.json``: one JSON object per line.

    Raises:
        DamagedFile: a line that is not a JSON object (a truncated last line included).
    """
    try:
        lines = Path(path).read_text().splitlines()
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text; expected Ray Tune's results, one JSON object per line") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "the last line is truncated" if number == len(lines) else f"line {number} is not valid JSON"
            raise DamagedFile(path, f"{where}; expected Ray Tune's results, one JSON object per line") from None
        if not isinstance(record, dict):
            raise DamagedFile(path, f"line {number} is a {type(record).__name__}, expected a JSON object")
        records.append(record)
    return records


def read_epochs(trial_dir: Path, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A trial's reports by completed epoch (:func:`~avn_study.study.folder.epoch_history` of ``result.json``),
    each with the trial's full record of that epoch (:func:`~avn_study.study.folder.epoch_file`) laid over
    Ray's line. ``result.json`` says which epochs completed: a record the driver never got (a trial killed
    between writing it and reporting) is not an epoch. A study from before the records has full lines.

    Args:
        trial_dir: the trial's folder.
        params: its ``params.json``; a trial that told Tune only its metric (``_avn.metric``) must have
            the record of every epoch it reported. None: read from the folder.

    Raises:
        DamagedFile: a line or a record that is not a JSON object, or a reported epoch's missing record.
    """
    trial_dir = Path(trial_dir)
    if params is None:
        params = read_json(trial_dir / PARAMS, "the trial's parameters (a JSON object)")
    results = epoch_history(read_results(trial_dir / RESULTS)) if (trial_dir / RESULTS).is_file() else []
    files = epoch_files(trial_dir)
    expected = bool(files) or reports_to_tune_in_brief(params)
    merged = []
    for line in results:
        epoch = line.get("epoch")
        path = files.get(epoch) if isinstance(epoch, int) else None
        if path is None and expected and isinstance(epoch, int):
            raise DamagedFile(trial_dir / epoch_file(epoch), f"missing; expected the trial's record of epoch {epoch}, "
                                                             "written before the epoch was reported")  # fmt: skip
        record = read_json(path, "the trial's record of one epoch (a JSON object)") if path else {}
        if not isinstance(record, dict):
            raise DamagedFile(path, f"a JSON {type(record).__name__}, expected the trial's record of one epoch")
        merged.append({**line, **record})
    return merged


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or :class:`DamagedFile` naming ``what`` was expected."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFile(path, f"not valid JSON ({error}); expected {what}") from None


def read_per_case(path: Path) -> list[dict[str, Any]]:
    """A per-case file: a list of case records, each with :data:`CASE_KEYS`.

    Raises:
        DamagedFile: anything else.
    """
    cases = read_json(path, "a list of per-case records")
    if not isinstance(cases, list):
        raise DamagedFile(path, f"a JSON {type(cases).__name__}, expected a list of per-case records")
    for i, case in enumerate(cases):
        missing = [k for k in CASE_KEYS if not isinstance(case, dict) or k not in case]
        if missing:
            raise DamagedFile(path, f"record {i} lacks {', '.join(missing)}; expected per-case records with "
                                    f"{', '.join(CASE_KEYS)}")  # fmt: skip
    return cases


def trial_damage(trial_dir: Path, finished: bool) -> str:
    """What is wrong with one trial folder ("" if nothing): its parameters, results and per-case files.

    ``finished``: the trial ended (Ray says TERMINATED); it must then have the per-case file of its
    last evaluated epoch.
    """
    trial_dir = Path(trial_dir)
    try:
        params = read_json(trial_dir / PARAMS, "the trial's parameters (a JSON object)")
        if not isinstance(params, dict):
            raise DamagedFile(trial_dir / PARAMS, "expected the trial's parameters (a JSON object)")
        results = read_epochs(trial_dir, params)
        if finished and not results:
            return f"{trial_dir / RESULTS}: missing or empty, expected the finished trial's epochs"
        evaluated = [r for r in results if "val_dice" in r and "epoch" in r]
        if finished and evaluated:
            last = trial_dir / per_case_file(int(evaluated[-1]["epoch"]))
            if not last.is_file():
                return f"{last}: missing, expected the per-case metrics of the trial's last evaluated epoch"
        for path in per_case_files(trial_dir) + per_case_files(trial_dir, test=True):
            read_per_case(path)
    except DamagedFile as error:
        return str(error)
    return ""


def stage2_key(entry: dict[str, Any]) -> tuple[str, int, int, int]:
    """What identifies a stage-2 trial: row, fold, (run) seed and repeat, from a plan entry or a trial's
    merged parameters."""
    return (str(entry.get("_row")), int(entry.get("fold", -1)), int(entry.get("seed", -1)),
            int(entry.get("_repeat", 0)))  # fmt: skip


def describe_entry(entry: dict[str, Any]) -> str:
    """A stage-2 entry in words: its row, fold, listed seed (and run seed, when derived) and repeat."""
    seed = entry.get("_replicate", entry.get("seed"))
    run_seed = f" (run seed {entry.get('seed')})" if entry.get("seed") != seed else ""
    return f"row {entry.get('_row')} fold {entry.get('fold')} seed {seed}{run_seed} repeat {entry.get('_repeat', 0)}"


def read_plan(root: Path) -> list[dict[str, Any]] | None:
    """A study's ``stage2_plan.json`` (None when the study has none yet).

    Raises:
        DamagedFile: not a list of stage-2 entries with :data:`PLAN_KEYS`.
    """
    path = Path(root) / STAGE2_PLAN
    if not path.is_file():
        return None
    plan = read_json(path, "the stage-2 grid (a list of trial entries)")
    if not isinstance(plan, list):
        raise DamagedFile(path, f"a JSON {type(plan).__name__}, expected the stage-2 grid (a list of trial entries)")
    for i, entry in enumerate(plan):
        bad = not isinstance(entry, dict) or entry.get("_stage", 2) != 2
        missing = [k for k in PLAN_KEYS if not isinstance(entry, dict) or k not in entry]
        if bad or missing or not all(isinstance(entry[k], int) for k in PLAN_KEYS[1:]):
            raise DamagedFile(path, f"entry {i} is not a stage-2 trial; expected {', '.join(PLAN_KEYS)} "
                                    "(integers but the row) in every entry")  # fmt: skip
    return plan


def trial_key(trial_dir: Path) -> tuple[str, int, int, int] | None:
    """:func:`stage2_key` of a stage-2 trial folder (None: not a stage-2 trial, or unreadable parameters)."""
    try:
        merged = merge_grid(json.loads((Path(trial_dir) / PARAMS).read_text()))
        return stage2_key(merged) if merged.get("_stage") == 2 else None
    except (OSError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------------------- search state
def check_searcher_state(path: Path) -> None:
    """Ray's ``searcher-state-*.pkl`` (or ``search_gen_state-*.json``, also a pickle) of an experiment:
    complete. A pickle is walked opcode by opcode (nothing is run); RowSearch's JSON state must parse and
    hold its keys.

    Raises:
        DamagedFile: a truncated or garbage state, with the way out.
    """
    path = Path(path)
    data = path.read_bytes()
    way_out = ("Restore it from a copy (an object store's study, a backup), or start the study again under "
               "another --name; --resume would otherwise silently restart the search past its budget")  # fmt: skip
    if data[:1] == b"\x80":  # a pickle (protocol 2 on): walked, never loaded
        try:
            ops = list(pickletools.genops(data))
        except Exception:  # pickletools raises ValueError, IndexError, struct.error, ... on garbage
            ops = []
        if not ops or ops[-1][0].name != "STOP" or ops[-1][2] + 1 != len(data):
            raise DamagedFile(path, f"not a complete pickle; expected Ray's saved searcher state. {way_out}")
        return
    try:  # RowSearch saves its state as JSON (under Ray's searcher-state-*.pkl name)
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not {"started", "owner", "subs"} <= set(state):
        raise DamagedFile(path, f"neither a pickle nor RowSearch's JSON state; expected Ray's saved searcher "
                                f"state. {way_out}")  # fmt: skip


def check_journal(path: Path, expected: list[str]) -> None:
    """Optuna's journal: every line a JSON object with an ``op_code``, and a study for each of ``expected``
    (the Optuna studies of stage-1 searches that have trials).

    Raises:
        DamagedFile: a garbage line, or a search whose Optuna study is missing, with the way out.
    """
    path = Path(path)
    way_out = (f"Restore {JOURNAL} from a copy (an object store's study, a backup), or start the study "
               "again under another --name; --resume never restarts a search silently")  # fmt: skip
    if not path.is_file():
        if expected:
            raise DamagedFile(path, f"missing; expected Optuna's journal of {len(expected)} search(es). {way_out}")
        return
    studies = set()
    try:
        lines = path.read_bytes().decode().splitlines()
    except UnicodeDecodeError:
        raise DamagedFile(path, f"not UTF-8 text; expected Optuna's journal (JSON lines). {way_out}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except ValueError:
            op = None
        if not isinstance(op, dict) or "op_code" not in op:
            raise DamagedFile(path, f"line {number} is not an Optuna journal operation (a JSON object with "
                                    f"op_code). {way_out}")  # fmt: skip
        if op["op_code"] == 0 and "study_name" in op:  # CREATE_STUDY
            studies.add(str(op["study_name"]))
    missing = [s for s in expected if s not in studies]
    if missing:
        raise DamagedFile(path, f"has no Optuna study {', '.join(missing)}, whose search has trials; "
                                f"expected one per stage-1 search. {way_out}")  # fmt: skip
