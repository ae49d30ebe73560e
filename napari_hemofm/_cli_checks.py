"""Checks of the ``hemofm`` command's output paths, made before any work starts.

:func:`check_outputs` runs in :func:`napari_hemofm.cli.main` right after the arguments
are parsed, for every subcommand: an output may not overwrite what the command reads,
may not be a folder or a special file, and its folder must be writable. Every other
argument holding a path (``inputs``, ``project``, ``--weights``, ``--probe-file``, ...)
counts as something the command reads, so a new subcommand is covered without being
listed here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OUTPUT_FILE_ARGS", "OUTPUT_FOLDER_ARGS", "OutputCheckError", "check_outputs"]

OUTPUT_FILE_ARGS = ("out", "screenshot", "html")
"""Argument names (``argparse`` dests) that name a file a command writes."""

OUTPUT_FOLDER_ARGS = ("out_dir",)
"""Argument names that name a folder a command writes files into."""

#: files beside a project that belong to it (its label journal, rejected lines, lock)
_PROJECT_SIDE_FILES = (".labels.jsonl", ".labels.rejected.jsonl", ".lock")


class OutputCheckError(Exception):
    """An output path was refused; ``exit_code`` is 2 (usage) or 1 (not writable)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _read_paths(args: argparse.Namespace) -> list[Path]:
    """Every path argument that is not an output: what the command reads."""
    outputs = {*OUTPUT_FILE_ARGS, *OUTPUT_FOLDER_ARGS}
    found: list[Path] = []
    for name, value in vars(args).items():
        if name in outputs:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        found.extend(v for v in values if isinstance(v, Path))
    return found


def _project_side_files(path: Path) -> list[Path]:
    if path.suffix != ".h5ad":
        return []
    stem = path.with_suffix("")
    return [stem.with_name(stem.name + side) for side in _PROJECT_SIDE_FILES]


def _is_within(child: Path, folder: Path) -> bool:
    try:
        child.relative_to(folder)
    except ValueError:
        return False
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also catches hard links
    except OSError:
        return Path(os.path.realpath(a)) == Path(os.path.realpath(b))


def _check_not_an_input(option: str, out: Path, target: Path, reads: Iterable[Path]) -> None:
    from napari_hemofm.core.io import is_image_file

    for read in reads:
        real = Path(os.path.realpath(read))
        if real.is_dir():
            if target == real:
                raise OutputCheckError(f"{option} {out} is the input folder {read}")
            if _is_within(target, real) and is_image_file(target):
                raise OutputCheckError(
                    f"{option} {out} is an image inside the input folder {read}: it would "
                    "be overwritten, or read as an input next time; write it elsewhere"
                )
            continue
        for name in (read, *_project_side_files(read)):
            if Path(os.path.realpath(name)) == target or (
                target.exists() and Path(name).exists() and _same_file(name, target)
            ):
                what = f"the input {read}" if name == read else f"{name}, part of {read}"
                raise OutputCheckError(
                    f"{option} {out} is {what}: the command reads it; write the output to "
                    "another file"
                )


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_writable(option: str, out: Path, folder: Path) -> None:
    """The folder that will hold the output (or its nearest existing parent) is writable."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        where = "" if existing == folder else f"cannot create folder {folder}, "
        raise OutputCheckError(f"{option} {out}: {where}{existing} is not a folder", 1)
    try:  # os.access is not enough (root, read-only mounts, ACLs): try for real
        fd, probe = tempfile.mkstemp(prefix=".hemofm-write-test-", dir=existing)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputCheckError(
            f"{option} {out}: cannot write to folder {existing} ({reason})", 1
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that would destroy an input or cannot be written.

    Rules, for every output file argument (``--out``, ``--screenshot``):

    - it may not be what the command reads: an input file (compared after resolving
      links, hard links included), an input folder, an image file inside an input
      folder, a project the command reads or one of that project's side files (label
      journal, lock);
    - it may not be a folder, a FIFO, a device or a socket (after following links);
    - a symbolic link is fine: the file it points to is replaced, the link stays (the
      writers call :func:`napari_hemofm.core.io.resolve_output`);
    - the folder it goes into (or the nearest existing parent, since missing folders are
      created) must be writable.

    For an output folder argument (``OUT_DIR``): it may not be an existing file, may not
    be an input, and must be writable.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments of one subcommand.

    Raises
    ------
    OutputCheckError
        With a one-line message; ``exit_code`` 2 for a refused argument, 1 for a folder
        that cannot be written.
    """
    from napari_hemofm.core.io import OutputPathError, resolve_output

    reads = _read_paths(args)
    for name in OUTPUT_FILE_ARGS:
        out = getattr(args, name, None)
        if out is None:
            continue
        option = "--" + name.replace("_", "-")
        try:
            target, _ = resolve_output(out)
        except OutputPathError as exc:
            raise OutputCheckError(f"{option}: {exc}") from None
        _check_not_an_input(option, Path(out), target, reads)
        _check_writable(option, Path(out), target.parent)
    for name in OUTPUT_FOLDER_ARGS:
        out = getattr(args, name, None)
        if out is None:
            continue
        option = name.upper()
        real = Path(os.path.realpath(out))
        if real.exists() and not real.is_dir():
            raise OutputCheckError(f"{option} {out} exists and is not a folder")
        for read in reads:
            if real == Path(os.path.realpath(read)):
                raise OutputCheckError(f"{option} {out} is the input {read}")
        _check_writable(option, Path(out), real)
