"""Load and validate the constitution: the principles used for critique and revision."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import UsageError

CATEGORIES: tuple[str, ...] = ("helpfulness", "harmlessness", "honesty")
PRINCIPLE_FIELDS: tuple[str, ...] = ("name", "category", "critique_request", "revision_request")
TOP_LEVEL_KEYS: tuple[str, ...] = ("version", "principles")
MIN_PRINCIPLES = 2  # stage 6 draws two distinct principles per critique
_SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")


@dataclass(frozen=True)
class Principle:
    """One constitutional principle with its critique and revision prompts."""

    name: str
    category: str
    critique_request: str
    revision_request: str


@dataclass(frozen=True)
class Constitution:
    """A validated constitution; ``sha256`` is the hash of the source file's bytes."""

    version: int
    principles: tuple[Principle, ...]
    sha256: str

    def by_name(self, name: str) -> Principle:
        """Return the principle called ``name``; raise KeyError listing known names if absent."""
        for principle in self.principles:
            if principle.name == name:
                return principle
        known = ", ".join(p.name for p in self.principles)
        raise KeyError(f"no principle named {name!r}; known principles: {known}")

    def sample(self, rng: random.Random, count: int = 2) -> list[Principle]:
        """Draw ``count`` distinct principles using ``rng`` (deterministic for a seeded rng)."""
        if not 1 <= count <= len(self.principles):
            raise ValueError(
                f"count must be between 1 and {len(self.principles)} "
                f"(the number of principles), got {count}"
            )
        return rng.sample(self.principles, count)


class ConstitutionError(UsageError):
    """Raised when a constitution file is invalid; lists every problem found."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.path} is invalid ({count} {noun}):\n{lines}\nFix the file and run again."


def load_constitution(path: str | Path) -> Constitution:
    """Read, validate and return the constitution at ``path``.

    Raises ConstitutionError listing every problem found (with its location) at once.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConstitutionError(path, ["(file): not found; create it or pass the correct path"]) from None
    except OSError as exc:
        raise ConstitutionError(path, [f"(file): cannot be read ({exc.strerror or exc})"]) from None
    data, problems = _parse_yaml(raw)
    if not problems:
        problems = _validate_document(data)
    if problems:
        raise ConstitutionError(path, problems)
    return Constitution(
        version=data["version"],
        principles=tuple(Principle(**{f: p[f] for f in PRINCIPLE_FIELDS}) for p in data["principles"]),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _parse_yaml(raw: bytes) -> tuple[Any, list[str]]:
    """Parse YAML bytes, returning (data, problems)."""
    try:
        return yaml.safe_load(raw), []
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        reason = exc.problem or exc.context or "syntax error"
        return None, [f"{where}: not valid YAML ({reason}); fix the syntax at that position"]
    except yaml.YAMLError as exc:
        return None, [f"(file): not valid YAML ({exc}); fix the syntax"]


def _validate_document(data: Any) -> list[str]:
    """Check the top-level structure and every principle; return all problems."""
    if data is None:
        return ["(top level): file is empty; add 'version: 1' and a 'principles:' list"]
    if not isinstance(data, dict):
        return [
            f"(top level): expected a mapping with keys 'version' and 'principles', "
            f"got {_type_name(data)}"
        ]
    problems = [
        f"{key}: unknown top-level key; allowed keys are {', '.join(TOP_LEVEL_KEYS)}"
        for key in data
        if key not in TOP_LEVEL_KEYS
    ]
    problems += _validate_version(data)
    problems += _validate_principles(data)
    return problems


def _validate_version(data: dict[str, Any]) -> list[str]:
    """Check that ``version`` is present and a positive integer."""
    if "version" not in data:
        return ["version: missing; add 'version: 1' at the top level"]
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        return [f"version: {version!r} is not an integer; use a whole number such as 1"]
    if version <= 0:
        return [f"version: {version} is not positive; use a whole number >= 1"]
    return []


def _validate_principles(data: dict[str, Any]) -> list[str]:
    """Check the ``principles`` list and each entry, including duplicate names."""
    if "principles" not in data:
        return ["principles: missing; add a 'principles:' list of principle mappings"]
    principles = data["principles"]
    if not isinstance(principles, list) or not principles:
        got = "an empty list" if principles == [] else _type_name(principles)
        return [f"principles: expected a non-empty list of principle mappings, got {got}"]
    problems: list[str] = []
    if len(principles) < MIN_PRINCIPLES:
        problems.append(f"principles: {len(principles)} given; at least {MIN_PRINCIPLES} are "
                        f"needed (stage 6 critiques every answer against two principles drawn "
                        f"from the constitution); add another principle")
    first_seen: dict[str, int] = {}
    for index, entry in enumerate(principles):
        problems += _validate_principle(index, entry)
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name.strip():
            if name in first_seen:
                problems.append(
                    f"principles[{index}]: duplicate name {name!r} (first used at "
                    f"principles[{first_seen[name]}]); give each principle a unique name"
                )
            else:
                first_seen[name] = index
    return problems


def _validate_principle(index: int, entry: Any) -> list[str]:
    """Check one principle mapping; return its problems."""
    where = f"principles[{index}]"
    if not isinstance(entry, dict):
        return [
            f"{where}: expected a mapping with fields {', '.join(PRINCIPLE_FIELDS)}, "
            f"got {_type_name(entry)}"
        ]
    problems = [
        f"{where}: unknown field {key!r}; allowed fields are {', '.join(PRINCIPLE_FIELDS)}"
        for key in entry
        if key not in PRINCIPLE_FIELDS
    ]
    for field in PRINCIPLE_FIELDS:
        problems += _validate_field(f"{where}.{field}", field, entry)
    return problems


def _validate_field(where: str, field: str, entry: dict[str, Any]) -> list[str]:
    """Check that one principle field is a non-empty string with a valid value."""
    if field not in entry:
        return [f"{where}: missing; add a non-empty '{field}' string"]
    value = entry[field]
    if not isinstance(value, str):
        return [f"{where}: expected a string, got {_type_name(value)}"]
    if not value.strip():
        return [f"{where}: is empty; write a non-empty '{field}'"]
    if field == "name" and not _SNAKE_CASE.match(value):
        return [
            f"{where}: {value!r} is not a snake_case identifier; "
            "use lowercase letters, digits and single underscores, starting with a letter"
        ]
    if field == "category" and value not in CATEGORIES:
        return [f"{where}: {value!r} is not one of {', '.join(CATEGORIES)}"]
    return []


def _type_name(value: Any) -> str:
    """Describe a YAML value's type in plain words for error messages."""
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__)
