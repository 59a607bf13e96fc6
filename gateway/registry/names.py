"""Adapter and alias names: what a registration or an alias move may be called, checked before
any work is done."""

from __future__ import annotations

import re

from gateway.contract import PRODUCTION
from gateway.errors import InvalidRequest

ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
VERSION_REF = re.compile(r"^v(\d+)$")


def check_adapter_name(name: str, field_name: str = "name") -> None:
    if not ADAPTER_NAME.match(name):
        raise InvalidRequest(
            field_name, f"{name!r} is not a valid adapter name ([a-z0-9][a-z0-9._-]*, <= 64 chars)"
        )


def check_alias_name(alias: str, field_name: str = "alias") -> None:
    if not ALIAS_NAME.match(alias) or VERSION_REF.match(alias):
        raise InvalidRequest(
            field_name,
            f"{alias!r} is not a valid alias ([a-z][a-z0-9_-]*, <= 64 chars, not of the form vN)",
        )


def check_registration(name: str, alias: str) -> None:
    """The names of a registration, checked before any work is done."""
    check_adapter_name(name)
    if alias:
        check_alias_name(alias)
        if alias == PRODUCTION:
            raise InvalidRequest(
                "alias", "a new version cannot go to production at registration; promote it"
            )


def check_alias_move(alias: str, force: bool, reason: str) -> None:
    """The arguments of an alias move, checked before any work is done."""
    check_alias_name(alias)
    if force and not reason.strip():
        raise InvalidRequest("reason", "a forced move needs a reason")
