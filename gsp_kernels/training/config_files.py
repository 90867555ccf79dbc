"""Runs described by files: ``read_config_file(path)`` reads the settings of a YAML or TOML
file (the keys are TrainConfig's fields, with underscores or dashes, as the train flags
name them), checked key by key; ``write_run_config(config, folder)`` writes a run's resolved
settings into its folder (``config.yaml`` or ``config.toml``), so that
``gsp-kernels train --config RUN/config.yaml --output-dir NEW`` repeats the run.

The file written holds every field that makes the run, not those of one invocation
(``INVOCATION_FIELDS``: where it writes, whether it resumes or overwrites, progress bars).
TOML has no null: an unset number is written ``"none"`` (read back as unset, as the flags
take it) and an unset path or name is left out (its default, None).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

from .config import RunError, TrainConfig
from .files import atomic_path

CONFIG_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}
RUN_CONFIG_NAMES = {"yaml": "config.yaml", "toml": "config.toml"}
INVOCATION_FIELDS = ("output_dir", "resume", "overwrite", "progress")
_NONE = "none"  # an unset number, as the flags spell it
_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
             "int | None": "an integer or none", "str | None": "a string or null"}


def config_format(path: str | Path) -> str:
    """"yaml" or "toml" by the file's suffix; a RunError for any other."""
    kind = CONFIG_FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise RunError(f"{path}: a settings file ends in .yaml, .yml or .toml")
    return kind


def _parse(path: Path, text: str, kind: str):
    """The file's document (YAML by ``yaml.safe_load``, TOML by ``tomllib``); a RunError
    naming the line for a syntax error."""
    if kind == "yaml":
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise RunError(f"{path}: not valid YAML{where}: {' '.join(problem.split())}") from exc
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RunError(f"{path}: not valid TOML: {' '.join(str(exc).split())}") from exc


def _checked_value(path: Path, key: str, kind: str, value, choices: dict):
    """``value`` as field ``key`` of type ``kind`` takes it, or a RunError naming file and key."""
    given = value
    if kind in ("int", "int | None") and isinstance(value, int) and not isinstance(value, bool):
        pass
    elif kind == "int | None" and (value is None or (isinstance(value, str) and value.lower() == _NONE)):
        value = None
    elif kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise RunError(f"{path}: {key} must be {_EXPECTED[kind]}, got {given!r}") from None
    elif (kind == "bool" and isinstance(value, bool)) or (kind in ("str", "str | None") and isinstance(value, str)):
        pass
    elif not (kind == "str | None" and value is None):
        raise RunError(f"{path}: {key} must be {_EXPECTED.get(kind, kind)}, got {given!r} ({type(given).__name__})")
    if value is not None and key in choices and value not in choices[key]:
        raise RunError(f"{path}: {key} must be one of {', '.join(map(str, choices[key]))}, got {given!r}")
    return value


def read_config_file(path: str | Path, choices: dict | None = None) -> dict:
    """The settings of a YAML or TOML file: {field name: value}. Keys are TrainConfig's fields
    (dashes read as underscores); ``choices`` ({field: allowed values}) are checked too. An
    unknown key, a value of the wrong type, a key given twice, a file that is missing or does
    not parse: a RunError naming the file (and the key)."""
    path = Path(path).expanduser()
    kind = config_format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{path}: no such settings file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"cannot read the settings file {path} ({type(exc).__name__}: {exc})") from exc
    document = _parse(path, text, kind)
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise RunError(f"{path}: expected settings as keys and values (a mapping), got a {type(document).__name__}")
    fields = {field.name: field.type for field in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in document.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (the keys are the train flags' names, e.g. batch_size)"
            raise RunError(f"{path}: unknown setting {key!r}{hint}")
        if name in values:
            raise RunError(f"{path}: {name} is given twice")
        values[name] = _checked_value(path, name, fields[name], value, choices or {})
    return values


def run_settings(config: TrainConfig) -> dict:
    """The fields of ``config`` that make the run (all but ``INVOCATION_FIELDS``), in field order."""
    return {name: value for name, value in dataclasses.asdict(config).items() if name not in INVOCATION_FIELDS}


def _toml_text(settings: dict) -> str:
    """Flat TOML of scalars: an unset number as "none", an unset string left out."""
    fields = {field.name: field.type for field in dataclasses.fields(TrainConfig)}
    lines = []
    for name, value in settings.items():
        if value is None:
            if fields[name] != "int | None":
                continue
            value = _NONE
        if isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{name} = {value!r}")
        else:
            lines.append(f"{name} = {json.dumps(str(value), ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_run_config(config: TrainConfig, folder: str | Path, kind: str = "yaml") -> Path:
    """``folder/config.yaml`` (or ``config.toml``) with ``run_settings(config)``, written
    atomically; the file of the other format is removed (a run replaced with --overwrite).
    Returns its path."""
    folder = Path(folder)
    path = folder / RUN_CONFIG_NAMES[kind]
    settings = run_settings(config)
    header = f"# The settings of this run: gsp-kernels train --config {path} --output-dir NEW repeats it\n"
    if kind == "yaml":
        import yaml

        text = header + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)
    else:
        text = header + _toml_text(settings)
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
    for other in RUN_CONFIG_NAMES.values():
        if other != path.name:
            (folder / other).unlink(missing_ok=True)
    return path
