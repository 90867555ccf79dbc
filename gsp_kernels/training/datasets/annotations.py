"""What the benchmark readers share: finding an archive's files under the dataset root,
reading annotation files line by line, and the checks every line passes.

- ``AnnotationError``: a LayoutError naming the file, the line (number and text), what is
  wrong and what to change, in one line.
- ``read_lines(path)``: the lines of a UTF-8 text file as Python's text files iterate them
  (``\\n``, ``\\r\\n`` or ``\\r`` ends a line), without their ends.
- ``integer(...)``: a field that must be a decimal integer, optionally in a range.
- ``Containment(folder)``: every image path an annotation file gives must resolve, symbolic
  links followed, inside the benchmark's folder (the one holding its annotation files):
  an absolute path, a ``..`` that climbs out, or a link that points out is an AnnotationError.
- ``locate``, ``check_root``, ``pml_folder``: where the archive's files are.
- ``from_pml(...)``: a split parsed by pytorch-metric-learning, held to the lines checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from .images import ImageListDataset, LayoutError

_SHOWN = 120  # characters of a line quoted in an error


class AnnotationError(LayoutError):
    """One line (or entry) of an annotation file is wrong. Attributes ``path``, ``line``
    (1-based; for a .mat file the entry's number) and ``text``; the message, one line,
    says what is wrong and what to change."""

    def __init__(self, path, line: int, text: str, problem: str, fix: str, *, unit: str = "line"):
        self.path, self.line, self.text = str(path), line, text
        shown = text if len(text) <= _SHOWN else text[:_SHOWN] + "..."
        super().__init__(f"{path}, {unit} {line}: {problem} ({unit} {line} reads {shown!r}); {fix}")


def read_lines(path: Path) -> list[str]:
    """The lines of the UTF-8 text file ``path``, split as Python's text files iterate them
    (universal newlines), without their line ends; no final empty line for a trailing end.
    A byte sequence that is not UTF-8 raises AnnotationError naming its line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
        raw = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")[line - 1]
        raise AnnotationError(path, line, raw.decode("utf-8", "replace"), f"byte {data[error.start]:#04x} is not UTF-8 text",
                              "the file should be the archive's plain-text file: re-extract it") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def integer(field: str, path, number: int, line: str, what: str, low: int = 1, high: int | None = None) -> int:
    """``field`` as an int: decimal digits only (surrounding spaces allowed), in
    ``[low, high]``; AnnotationError naming ``what`` otherwise."""
    digits = field.strip()
    allowed = f"{low}-{high}" if high is not None else f">= {low}"
    if not (digits.isascii() and digits.isdigit()):
        raise AnnotationError(path, number, line, f"{what} {digits!r} is not a whole number",
                              f"correct the line: it should be a number {allowed}")
    value = int(digits)
    if value < low or (high is not None and value > high):
        raise AnnotationError(path, number, line, f"{what} {value} is out of range",
                              f"correct the line: the format allows {allowed}")
    return value


def fields(line: str, path, number: int, names: tuple[str, ...], separator: str | None = None) -> list[str]:
    """``line`` split on ``separator`` (whitespace by default) into exactly ``len(names)``
    fields; a blank line or another count raises AnnotationError."""
    parts = line.split(separator)
    layout = (" " if separator is None else separator).join(names)
    if not line.strip():
        raise AnnotationError(path, number, line, "the line is blank", f"remove it: every line should read '{layout}'")
    if len(parts) != len(names):
        raise AnnotationError(path, number, line, f"expected {len(names)} fields '{layout}', got {len(parts)}",
                              "correct the line (a path may not hold spaces)" if separator is None else "correct the line")
    return parts


def first_seen(key, seen: dict, path, number: int, line: str, what: str, where: str | None = None, *,
               unit: str = "line") -> None:
    """Record that ``key`` (an id or a path) appears on line ``number`` (``where``, e.g.
    'file line N', when ``seen`` spans files); AnnotationError when an earlier line already gave it."""
    if key in seen:
        earlier = seen[key]
        where_first = f"{unit} {earlier}" if isinstance(earlier, int) else earlier
        raise AnnotationError(path, number, line, f"{what} {key} appears twice (first on {where_first})",
                              "each may appear once: remove or correct one of the two", unit=unit)
    seen[key] = number if where is None else where


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Containment:
    """The benchmark's folder, resolved (``boundary``): ``check`` accepts a path an annotation
    file gives only when it resolves, symbolic links followed, inside it. The folder itself
    may be reached through a link (link the whole folder); links inside it that point out of
    it are refused, as are absolute paths and '..' that climb out."""

    def __init__(self, folder):
        self.folder = os.path.abspath(str(folder))
        self.boundary = os.path.realpath(self.folder)
        self._real_dirs: dict[str, str] = {}

    def _real(self, joined: str) -> str:
        directory, leaf = os.path.split(joined)
        if leaf in ("", ".", "..") or os.path.islink(joined):
            return os.path.realpath(joined)
        if directory not in self._real_dirs:
            self._real_dirs[directory] = os.path.realpath(directory)
        return os.path.join(self._real_dirs[directory], leaf)

    def check(self, joined: str, relative: str, path, number: int, line: str, *, unit: str = "line") -> str:
        """``joined`` (the path the reader opens for the annotation ``relative`` of line
        ``number``) when it resolves inside the folder; AnnotationError saying why not."""
        real = self._real(joined)
        if _inside(real, self.boundary):
            return joined
        if os.path.isabs(relative):
            problem = f"the image path {relative!r} is absolute"
            fix = f"image paths are relative, as in the archive: correct the {unit}, or extract the archive again"
        elif not _inside(os.path.normpath(os.path.abspath(joined)), self.folder):
            problem = f"the image path {relative!r} climbs out of {self.folder} through '..'"
            fix = f"image paths stay inside the dataset folder, as in the archive: correct the {unit}, or extract it again"
        else:
            problem = f"the image path {relative!r} leads through a symbolic link to {real}, outside {self.boundary}"
            fix = (f"links out of the dataset folder are refused: copy the files into it, "
                   f"or link the whole folder {self.folder} instead")
        raise AnnotationError(path, number, line, problem, fix, unit=unit)

    def check_file(self, annotation: Path) -> Path:
        """The annotation file ``annotation`` itself, when it resolves inside the folder."""
        real = os.path.realpath(annotation)
        if not _inside(real, self.boundary):
            raise LayoutError(f"{annotation} is a symbolic link to {real}, outside {self.boundary}: links out of the "
                              f"dataset folder are refused; copy the file into it, or link the whole folder instead")
        return annotation


def locate(root: Path, required: tuple[str, ...], folders: list[Path], layout: str) -> Path:
    """The first of ``folders`` holding every ``required`` file; FileNotFoundError naming the
    files expected and every folder searched otherwise."""
    for folder in folders:
        if all((folder / name).is_file() for name in required):
            return folder
    searched = "\n  ".join(str(folder) for folder in dict.fromkeys(folders))
    raise FileNotFoundError(f"{layout}: expected {', '.join(required)} in one of:\n  {searched}\n"
                            f"(the dataset root, {root}, should be the folder the archive was extracted into, "
                            f"or the archive's top folder)")


def check_root(root) -> Path:
    """``root`` with ``~`` expanded; FileNotFoundError when it is not a directory."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} is not a directory")
    return root


def pml_folder(root: Path, top_folder: str, required: tuple[str, ...], layout: str) -> Path:
    """The parent of ``top_folder`` for pytorch-metric-learning's readers, which join
    ``root/top_folder/...`` themselves: accepts the parent or the top folder itself."""
    folder = locate(root, required, [root / top_folder, root], layout)
    if folder.name != top_folder:
        raise FileNotFoundError(f"{layout}: found {required[0]} in {folder}, but the folder must keep the archive's name "
                                f"{top_folder!r} (pytorch-metric-learning reads <root>/{top_folder}/)")
    return folder.parent


def no_images(source: str, split: str, classes: str) -> LayoutError:
    """The error for a split that the annotation files leave empty."""
    return LayoutError(f"{source} lists no images of the {split} split ({classes}): "
                       f"the archive's annotation files should be complete; extract it again")


def from_pml(reader, pml_root: Path, split: str, transform, source: str, expected: list[tuple[str, int]]):
    """An ImageListDataset from one of pytorch-metric-learning's dataset classes, used only as
    a parser (paths and 1-based class ids): their __getitem__ neither converts greyscale images
    to RGB nor names the file it failed to read. ``expected`` is what the lines checked before
    give, ``(path, class id)`` in order: the reader must return exactly that (its paths are
    thus the checked ones, inside the dataset folder)."""
    parsed = reader(root=str(pml_root), split=split, download=False)
    found = list(zip(parsed.paths, parsed.labels))
    if found != expected:
        index = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
        got = found[index] if index < len(found) else "nothing"
        wanted = expected[index] if index < len(expected) else "nothing"
        raise LayoutError(f"pytorch-metric-learning's {reader.__name__} read {source} ({split}) differently from the "
                          f"lines checked: entry {index + 1} is {got}, expected {wanted}; a bug to report, with "
                          f"the pytorch-metric-learning version")
    return ImageListDataset(parsed.paths, parsed.labels, transform, source=source)
