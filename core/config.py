"""Typed settings sections, `--set` overrides, and the check that a resumed run keeps its settings.

A run's settings are sections of frozen dataclasses: `run` (RunSettings), `profile`
(core.profile.ModelProfile) and one `stageN` section per stage (its StageSettings). All of them
are saved whole in config.yaml. `--set SECTION.FIELD=VALUE` changes one field for a run; values
are parsed as YAML and checked against the field's type, and every problem is reported at once.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

import yaml

from core.errors import UsageError


class SettingsError(UsageError):
    """A `--set` override or a settings section is invalid."""


@dataclass(frozen=True)
class RunSettings:
    """Settings every stage of a run shares."""

    near_duplicate: float = field(default=0.7, metadata={
        "help": "ROUGE-L F above which two generated texts (instructions, questions, topics, "
                "held-out vs training) count as the same one (Self-Instruct's 0.7)"})


def field_help(cls: type) -> dict[str, str]:
    """{field name: help} for a settings dataclass (empty help where none is given)."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def as_section(value: Any) -> dict:
    """A settings dataclass as plain YAML-ready values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()}


def apply_overrides(sections: dict[str, Any], items: list[str] | tuple[str, ...],
                    locked: frozenset[str] = frozenset()) -> dict[str, Any]:
    """New settings sections with `items` ("stage1.max_judged_samples=4", ...) applied. Values
    are read as YAML and checked against the field's type; a malformed item, an unknown section
    or field, a `locked` one ("profile.name") or a wrongly typed value: every problem is
    reported in one SettingsError."""
    problems = []
    changes: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            problems.append(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. "
                            f"stage1.max_judged_samples=4")
        elif section not in sections:
            problems.append(f"unknown settings section {section!r} (known: "
                            f"{', '.join(sections)})")
        elif f"{section}.{name}" in locked:
            problems.append(f"{section}.{name} cannot be set with --set")
        elif name not in {f.name for f in fields(sections[section])}:
            known = ", ".join(f.name for f in fields(sections[section]))
            problems.append(f"{section} has no setting {name!r} (known: {known})")
        else:
            problem, value = coerce(read_value(raw), field_type(type(sections[section]), name))
            if problem:
                problems.append(f"{section}.{name}: {problem}")
            else:
                changes.setdefault(section, {})[name] = value
    if problems:
        raise SettingsError("invalid settings:\n  - " + "\n  - ".join(problems))
    return {name: replace(value, **changes.get(name, {})) for name, value in sections.items()}


def read_value(raw: str) -> Any:
    """A --set value as YAML (8 -> 8, 1e-5 -> 1e-05, [0.2, 0.8] -> list, true -> True); text
    that is not valid YAML stays text."""
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def coerce(value: Any, kind: Any) -> tuple[str | None, Any]:
    """(problem, value) for `value` read as type `kind` (int, float, bool, str, tuples, Optional)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0]) if len(inner) == 1 else (None, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {value!r}", None
        item = args[0] if args else Any
        out = []
        for v in value:
            problem, c = coerce(v, item)
            if problem:
                return problem, None
            out.append(c)
        return None, tuple(out)
    if kind is bool:
        return (None, value) if isinstance(value, bool) else (f"expected true or false, got {value!r}", None)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (None, value) if ok else (f"expected an integer, got {value!r}", None)
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as text
            try:
                return None, float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (None, float(value)) if ok else (f"expected a number, got {value!r}", None)
    if kind is str:
        return (None, value) if isinstance(value, str) else (f"expected text, got {value!r}", None)
    return None, value


def changed_settings(saved: dict[str, dict], current: dict[str, dict],
                     defaults: dict[str, dict] | None = None) -> list[str]:
    """'section.field: the run has X, now Y' for every setting that differs (sections the saved
    config does not hold are not compared: runs made before they were recorded; a field it does
    not hold, added since, counts as its value in `defaults`)."""
    changes = []
    for section, values in current.items():
        if section not in saved:
            continue
        for name, value in values.items():
            unrecorded = (defaults or {}).get(section, {}).get(name, "<not recorded>")
            old = saved[section].get(name, unrecorded)
            if old != value:
                changes.append(f"{section}.{name}: the run has {old!r}, this command gives "
                               f"{value!r}")
    return changes
