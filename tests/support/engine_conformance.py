"""Both engines are Engines: checked by the type checker (`make lint`), not at run time.

Assigning an instance to a variable annotated with the protocol makes mypy compare every
method's signature with `gateway.domain.Engine`'s; a drifted signature fails `make lint`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.domain import Engine
    from gateway.engine import VllmEngine
    from tests.support.fakes import FakeEngine

    def _conforms(real: VllmEngine, fake: FakeEngine) -> tuple[Engine, Engine]:
        return real, fake
