"""What gridflow reads of a case event: one protocol for projection, scoring and replay."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

__all__ = ["EventLike"]


class EventLike(Protocol):
    """An event as stored or about to be stored (``NewEvent`` and ``EventRecord`` both fit)."""

    @property
    def type(self) -> str: ...
    @property
    def actor_id(self) -> str: ...
    @property
    def actor_role(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def payload(self) -> Mapping[str, Any]: ...
