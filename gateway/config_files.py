"""YAML settings files, one way for all three: the gateway's config, the trainer's run configs
and the eval suite's gate policies. Read a mapping, apply `--set a.b=value` overrides, validate
against a pydantic model with every problem on its own line and a did-you-mean for typos.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)
MAX_KNOWN_LISTED = 12  # longer lists of known keys are left to the did-you-mean


class SettingsFileError(ValueError):
    """A settings file cannot be read or is invalid; the message says where and why."""


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """The YAML mapping in `path` (an empty file is an empty mapping); `what` names the file's
    role in messages (e.g. "policy")."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsFileError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsFileError(f"{path}: the {what} must be a mapping of settings")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b=value` overrides (value parsed as YAML) to the raw mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingsFileError(
                f"--set {item!r}: expected key=value, e.g. training.learning_rate=1e-4"
            )
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsFileError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def _fields_at(cls: type[BaseModel], location: tuple[str | int, ...]) -> list[str]:
    """Field names of the (nested) model at `location`, for did-you-mean suggestions."""
    for part in location:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)] or [
            a
            for c in candidates
            for a in getattr(c, "__args__", ())
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not nested:
            return []
        cls = nested[0]
    return list(cls.model_fields)


def describe_validation_error(cls: type[BaseModel], error: ValidationError) -> str:
    """One line per problem, with a did-you-mean for unknown keys."""
    lines = []
    for item in error.errors():
        location = tuple(item["loc"])
        where = ".".join(str(p) for p in location) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = _fields_at(cls, location[:-1])
            close = difflib.get_close_matches(str(location[-1]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listed = f" (known here: {', '.join(known)})" if len(known) <= MAX_KNOWN_LISTED else ""
            lines.append(f"{where}: unknown key{hint}{listed}")
        else:
            lines.append(f"{where}: {item['msg']}")
    return "\n".join(lines)


def validate(cls: type[Model], data: dict[str, Any], what: str) -> Model:
    """`data` as a `cls`, or SettingsFileError listing every problem."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation_error(cls, exc)
        raise SettingsFileError(f"invalid {what}:\n{problems}") from None
