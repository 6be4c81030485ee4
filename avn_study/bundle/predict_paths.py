"""Where ``avn-study predict`` reads and writes: input and output names, paired and checked before any work.

A file goes to a file (``OUT.nii.gz``, its record ``OUT.json``), a folder to a folder (nnU-Net names:
``{case}_0000.nii.gz`` -> ``{case}.nii.gz``, the record ``volumes.json``). Predict never replaces what it did
not write: only its own JSON records, and with ``--overwrite`` only the label maps such a record lists.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from avn_study.data.layout import FILE_ENDINGS
from avn_study.errors import UsageError

_CHANNEL = re.compile(r"_(\d{4})$")  # nnU-Net channel suffix of an image file name
WRITTEN_BY = "avn-study predict"  # the mark of predict's own JSON files (what it may replace)


def _nifti_ending(name: str) -> str | None:
    """The NIfTI ending of ``name`` (``.nii.gz`` or ``.nii``), or None for another file or a bare ending."""
    return next((e for e in FILE_ENDINGS if name.endswith(e) and len(name) > len(e)), None)


def output_name(name: str) -> str:
    """nnU-Net naming: ``{case}_0000.nii.gz`` -> ``{case}.nii.gz``; other NIfTI names are kept."""
    ending = _nifti_ending(name)
    assert ending is not None, name
    return name[: -len(ending)].removesuffix("_0000") + ending


def json_path(output: Path) -> Path:
    """``OUT.nii.gz`` / ``OUT.nii`` -> ``OUT.json`` (the volumes of a single-file prediction)."""
    ending = _nifti_ending(output.name) or ""
    return output.with_name(output.name[: -len(ending)] + ".json")


def written_by_predict(path: Path) -> bool:
    """Whether ``path`` is a JSON record that predict wrote (the only JSON it replaces)."""
    from avn_study.outputs import json_marker

    return json_marker(path, "written_by", WRITTEN_BY)


def predicted_outputs(record: Path) -> set[str]:
    """Output names a predict record lists (the label maps that predict may replace)."""
    if not written_by_predict(record):
        return set()
    data = json.loads(record.read_text())
    cases = data.get("cases", [data])
    planned = data.get("planned", [])  # an interrupted predict's record lists what it was writing
    names = {Path(str(c.get("output", ""))).name for c in cases if isinstance(c, dict)}
    return names | {Path(str(n)).name for n in planned if isinstance(planned, list) and isinstance(n, str)}


def _check_outputs(pairs: list[tuple[Path, Path]], record: Path, overwrite: bool) -> None:
    """Predict never replaces what it did not write: its JSON record only over its own record, a label
    map only with ``--overwrite`` and only one that record lists."""
    if record.exists() and not written_by_predict(record):
        raise UsageError(f"{record}: exists and was not written by avn-study predict; it is never replaced: "
                         "choose another OUTPUT")  # fmt: skip
    ours = predicted_outputs(record)
    for _, out in pairs:
        if not out.exists():
            continue
        if not overwrite:
            raise UsageError(f"{out}: already exists; pass --overwrite to replace earlier predictions")
        if out.name not in ours:
            raise UsageError(f"{out}: exists and {record.name} does not list it as a prediction; it is not "
                             "replaced: choose another OUTPUT")  # fmt: skip


def _channel_files(first: Path, channels: list[str]) -> tuple[Path, ...]:
    """``{case}_0000.nii.gz`` and its sibling channels ``_0001``, ... (a multi-channel bundle's input).

    Raises:
        UsageError: ``first`` is not a ``_0000`` file, or a channel's file is missing.
    """
    ending = _nifti_ending(first.name) or ""
    stem = first.name[: -len(ending)]
    if not stem.endswith("_0000"):
        raise UsageError(
            f"{first}: the bundle reads {len(channels)} channels ({', '.join(channels)}), so inputs are named like "
            f"nnU-Net's: case_0000{ending} ({channels[0]}), case_0001{ending} ({channels[1]}), ..."
        )
    case = stem[: -len("_0000")]
    files = tuple(first.with_name(f"{case}_{i:04d}{ending}") for i in range(len(channels)))
    for i, path in enumerate(files):
        if not path.is_file():
            raise UsageError(f"{path}: missing channel _{i:04d} ({channels[i]}) of case '{case}'; the bundle reads "
                             f"{', '.join(channels)}")  # fmt: skip
    return files


def plan(
    source: Path, target: Path, overwrite: bool = False, channels: list[str] | None = None
) -> tuple[list[tuple[Path | tuple[Path, ...], Path]], bool]:
    """(input, output) pairs and whether this is folder mode; checks names before any work.

    With a multi-channel bundle (``channels``), an input is the tuple of a case's channel files.

    Raises:
        UsageError: a missing input, a non-NIfTI file, an empty folder, outputs that collide with each
            other or overwrite an input, a folder input with a file output, an existing output that
            predict did not write (or any existing output without ``overwrite``), a missing channel.
    """
    channels = channels or ["T1"]
    if not source.exists():
        raise UsageError(f"{source}: {_broken_link(source) or 'no such file or folder'}")
    if source.is_file():
        return _plan_file(source, target, overwrite, channels), False
    return _plan_folder(source, target, overwrite, channels), True


def _plan_file(
    source: Path, target: Path, overwrite: bool, channels: list[str]
) -> list[tuple[Path | tuple[Path, ...], Path]]:
    """:func:`plan` of a single input file: its one (input, output) pair."""
    n = len(channels)
    if _nifti_ending(source.name) is None:
        raise UsageError(f"{source}: not a NIfTI file (expected a .nii or .nii.gz name)")
    inputs = _channel_files(source, channels) if n > 1 else (source,)
    if target.is_dir():
        target = target / output_name(source.name)
    elif _nifti_ending(target.name) is None:
        raise UsageError(f"{target}: the output of a single file must be a .nii or .nii.gz file name (or a folder)")
    resolved = {p.resolve() for p in inputs}
    if target.resolve() in resolved:
        raise UsageError(f"{target}: the output would overwrite the input")
    if json_path(target).resolve() in resolved:
        raise UsageError(f"{json_path(target)}: the output's JSON record would overwrite the input")
    pairs: list[tuple[Path | tuple[Path, ...], Path]] = [(inputs if n > 1 else source, target)]
    _check_outputs(pairs, json_path(target), overwrite)
    return pairs


def _plan_folder(
    source: Path, target: Path, overwrite: bool, channels: list[str]
) -> list[tuple[Path | tuple[Path, ...], Path]]:
    """:func:`plan` of an input folder: a pair per case (a multi-channel case's files read together)."""
    n = len(channels)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: INPUT is a folder, so OUTPUT must be a folder too")
    broken = [(p, _broken_link(p)) for p in sorted(source.iterdir()) if not p.name.startswith(".")
              and _nifti_ending(p.name) and p.is_symlink() and not p.exists()]  # fmt: skip
    if broken:
        raise UsageError(f"{len(broken)} input(s) of {source} cannot be read: "
                         + "; ".join(f"{p}: {why}" for p, why in broken[:5]) + "; fix or remove them")  # fmt: skip
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".") and _nifti_ending(p.name))
    if not files:
        raise UsageError(f"{source}: no .nii or .nii.gz files in this folder")
    stems = {p.name[: -len(_nifti_ending(p.name) or "")] for p in files}
    pairs, seen = [], {}
    for path in files:
        stem = path.name[: -len(_nifti_ending(path.name) or "")]
        channel = _CHANNEL.search(stem)
        inputs: Path | tuple[Path, ...] = path
        if channel and channel.group(1) != "0000" and f"{stem[: channel.start()]}_0000" in stems:
            if int(channel.group(1)) < n:
                continue  # read with its case's _0000 file
            raise UsageError(f"{path}: an extra input channel of case '{stem[: channel.start()]}'; the bundle reads "
                             f"{n} ({', '.join(f'_{i:04d} {c}' for i, c in enumerate(channels))})")  # fmt: skip
        if n > 1:
            inputs = _channel_files(path, channels)
        out = target / output_name(path.name)
        if out.name in seen:
            raise UsageError(f"{path} and {seen[out.name]} would both be written to {out}; rename one")
        if out.resolve() in {p.resolve() for p in files}:
            raise UsageError(f"{out}: the output would overwrite an input; choose another OUTPUT folder")
        seen[out.name] = path
        pairs.append((inputs, out))
    _check_outputs(pairs, target / "volumes.json", overwrite)
    return pairs


def _broken_link(path: Path) -> str:
    """Why a symbolic link cannot be followed ("" for a path that is no link)."""
    if not path.is_symlink():
        return ""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13
        return "a symbolic link loop"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return ""
