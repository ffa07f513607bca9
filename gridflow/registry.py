"""Resolved, read-only lookups over a policy's organisation, departments and categories.

Built once by the loader from validated rule files; routing, workflow and scoring
read it instead of walking YAML-shaped models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CategoryInfo", "DepartmentInfo", "Registry", "UnitInfo"]

DEFAULT_CHANNELS = ("patrol", "hotline", "app", "video", "wechat", "media", "other")


@dataclass(frozen=True)
class UnitInfo:
    id: str
    name: str
    level: str
    parent: str | None
    ancestry: Mapping[str, str]  # level → unit id, this unit included
    children: tuple[str, ...] = ()


@dataclass(frozen=True)
class DepartmentInfo:
    id: str
    name: str
    tier: str
    unit: str | None
    pools: tuple[str, ...]
    name_en: str | None = None
    handlers: tuple[str, ...] = ()


@dataclass(frozen=True)
class CategoryInfo:
    code: str
    name: str
    parent: str | None
    group: str  # the top-level code it belongs to
    urgency: str
    time_limit: Any  # str | Mapping[str, str] | None, inherited
    kind: str | None = None


@dataclass(frozen=True)
class Registry:
    levels: tuple[str, ...]
    level_names: Mapping[str, str]
    tiers: tuple[str, ...]
    units: Mapping[str, UnitInfo]
    departments: Mapping[str, DepartmentInfo]
    categories: Mapping[str, CategoryInfo]
    attributes: Mapping[str, str]  # name → type
    attribute_values: Mapping[str, tuple[Any, ...] | None]
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    timezone: str = "Asia/Shanghai"
    name: str = "policy"
    _by_level: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def units_at(self, level: str) -> tuple[str, ...]:
        if level not in self._by_level:
            self._by_level[level] = tuple(u.id for u in self.units.values() if u.level == level)
        return self._by_level[level]

    def descendants_at(self, unit_id: str, level: str) -> tuple[str, ...]:
        """Units at ``level`` inside ``unit_id`` (document order)."""
        return tuple(
            u
            for u in self.units_at(level)
            if self.units[u].ancestry.get(self.units[unit_id].level) == unit_id
        )

    def tier_rank(self, tier: str) -> int:
        return self.tiers.index(tier)

    def unit_for_tier(self, unit_id: str, tier: str) -> str | None:
        """The case location's ancestor at the tier's level (None if the tier is no level)."""
        return self.units[unit_id].ancestry.get(tier)
