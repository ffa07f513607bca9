"""Scoring of closed cases on the four criteria of BRIEF §8 (timeliness, resolution,
quality, satisfaction), with weights and curves from the policy's ``scoring`` section."""

from __future__ import annotations

from gridflow.schema import CurvePoint, ScoringSpec

__all__ = ["validate_spec"]

Path = tuple[str | int, ...]


def _non_increasing(points: list[CurvePoint], name: str) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    for i in range(1, len(points)):
        if points[i].x <= points[i - 1].x:
            out.append(((name, i, "x"), f"{name} points must have increasing x"))
        elif points[i].score > points[i - 1].score:
            out.append(((name, i, "score"),
                        f"{name} must not increase (a worse case never scores higher)"))
    if not points:
        out.append(((name,), f"{name} needs at least one point"))
    return out


def validate_spec(spec: ScoringSpec) -> list[tuple[Path, str]]:
    """Problems of a scoring section as (path inside the section, message)."""
    problems: list[tuple[Path, str]] = []
    total = sum(spec.weights.values())
    if abs(total - 100) > 1e-9:
        problems.append((("weights",), f"weights must sum to 100 (they sum to {total:g})"))
    for name, w in spec.weights.items():
        if w < 0:
            problems.append((("weights", name), "a weight cannot be negative"))
    problems += _non_increasing(spec.timeliness_curve, "timeliness_curve")
    problems += _non_increasing(spec.rework_curve, "rework_curve")
    for table in ("resolution", "satisfaction"):
        for key, value in getattr(spec, table).items():
            if not 0 <= value <= 1:
                problems.append(((table, key), f"{table} scores are between 0 and 1"))
    for name, ranking in spec.rankings.items():
        period = ranking.get("period", "month")
        if period not in ("day", "week", "month", "quarter", "year"):
            problems.append((("rankings", name, "period"),
                             f"unknown period '{period}' (day, week, month, quarter, year)"))
        top = ranking.get("top", 0)
        if not isinstance(top, int) or top < 0:
            problems.append((("rankings", name, "top"), "top must be a whole number ≥ 0"))
    return problems
