"""Synthetic policies of N rules for benchmarks and the large-policy test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = [
    "井盖",
    "垃圾",
    "占道",
    "漏水",
    "楼道",
    "噪音",
    "路灯",
    "积水",
    "广告",
    "树木",
    "油烟",
    "违建",
    "停车",
    "电线",
    "围墙",
    "污水",
    "窨井",
    "招牌",
    "摊点",
    "渣土",
]


def category_codes(n_groups: int, per_group: int) -> list[str]:
    return [f"E{g:02d}-{c:02d}" for g in range(1, n_groups + 1) for c in range(1, per_group + 1)]


def rule_list(n_rules: int, codes: list[str]) -> list[dict[str, Any]]:
    """Rule i: category code i mod C and a description keyword; no rule shadows another."""
    rules = []
    for i in range(n_rules):
        code = codes[i % len(codes)]
        word = WORDS[(i // len(codes)) % len(WORDS)] + (
            str(i // (len(codes) * len(WORDS))) if i >= len(codes) * len(WORDS) else ""
        )
        rules.append(
            {
                "id": f"r{i}",
                "when": {"category": code, "description": word},
                "then": {"lead": f"dept{i % 10}"},
            }
        )
    return rules


def write_policy(root: Path, n_rules: int) -> dict[str, Any]:
    """Write a policy directory with ``n_rules`` first-hit rules; return its shape."""
    n_groups = max(1, min(40, n_rules // 100))
    per_group = 25
    codes = category_codes(n_groups, per_group)
    root.mkdir(parents=True, exist_ok=True)
    org = {
        "policy": {"name": f"bench-{n_rules}"},
        "organisation": {
            "levels": [{"id": "district"}, {"id": "street"}, {"id": "community"}, {"id": "grid"}],
            "units": [
                {
                    "id": "d1",
                    "name": "区",
                    "level": "district",
                    "children": [
                        {
                            "id": "s1",
                            "name": "街道",
                            "level": "street",
                            "children": [
                                {
                                    "id": "c1",
                                    "name": "社区",
                                    "level": "community",
                                    "children": [
                                        {"id": f"g{i}", "name": f"网格{i}", "level": "grid"}
                                        for i in range(1, 6)
                                    ],
                                }
                            ],
                        }
                    ],
                }
            ],
        },
        "departments": [{"id": f"dept{i}", "name": f"部门{i}", "tier": "street"} for i in range(10)]
        + [{"id": "centre", "name": "指挥中心", "tier": "district"}],
        "categories": [
            {
                "code": f"E{g:02d}",
                "name": f"大类{g}",
                "time_limit": "4wh",
                "children": [
                    {"code": f"E{g:02d}-{c:02d}", "name": f"小类{g}-{c}"}
                    for c in range(1, per_group + 1)
                ],
            }
            for g in range(1, n_groups + 1)
        ],
    }
    (root / "policy.yaml").write_text(json.dumps(org, ensure_ascii=False), encoding="utf-8")
    rules = rule_list(n_rules, codes)
    routing = {
        "routing": {
            "default": {"lead": "centre"},
            "tables": [{"id": "main", "hit": "first", "rules": rules}],
        }
    }
    (root / "routing.yaml").write_text(json.dumps(routing, ensure_ascii=False), encoding="utf-8")
    return {"codes": codes, "rules": rules}


def sample_cases(shape: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Cases that hit rules (about 9 in 10) or fall to the default."""
    rules = shape["rules"]
    out = []
    for k in range(n):
        rule = rules[(k * 7919) % len(rules)]
        word = rule["when"]["description"] if k % 10 else "无关"
        out.append(
            {
                "id": f"c{k}",
                "category": rule["when"]["category"],
                "location": "g1",
                "description": f"群众反映{word}问题",
                "channel": "hotline",
            }
        )
    return out
