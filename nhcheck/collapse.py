"""Collapse families of names into one line, as transformers' LOAD REPORT does.

``model.layers.{1,3,…,51}.mixer.experts.{0…127}.down_proj.input_scale ×2944``: every
run of digits that forms a whole dotted component becomes a slot; names that differ
only in those slots share a template. Used by audit (grouped findings) and report.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from typing import TypeVar

_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


def template(name: str) -> tuple[str, tuple[int, ...]]:
    """(``a.{}.b.{}``, (3, 7)) for ``a.3.b.7``; literal braces are escaped so templates are unambiguous."""
    nums: list[int] = []

    def sub(m: re.Match[str]) -> str:
        nums.append(int(m.group(0)))
        return "\x00"

    t = _NUM.sub(sub, name.replace("{", "{{").replace("}", "}}"))
    return t, tuple(nums)


def render_set(values: Iterable[int]) -> str:
    vals = sorted(set(values))
    if len(vals) == 1:
        return str(vals[0])
    if vals[-1] - vals[0] + 1 == len(vals):
        return f"{{{vals[0]}…{vals[-1]}}}"
    if len(vals) <= 4:
        return "{" + ",".join(map(str, vals)) + "}"
    return f"{{{vals[0]},{vals[1]},…,{vals[-1]}}}"


def render(tmpl: str, slots: list[set[int]]) -> str:
    parts = tmpl.split("\x00")
    out = [parts[0]]
    for values, part in zip(slots, parts[1:], strict=True):
        out.append(render_set(values))
        out.append(part)
    return "".join(out).replace("{{", "{").replace("}}", "}")


def group(items: Iterable[tuple[K, str, T]]) -> list[tuple[K, str, int, list[T]]]:
    """Group ``(key, name, item)`` by (key, template of name); returns (key, collapsed name, count, items).

    Groups keep first-seen order so the report follows stream order.
    """
    groups: dict[tuple[K, str], tuple[list[set[int]], list[T]]] = {}
    for key, name, item in items:
        tmpl, nums = template(name)
        g = groups.get((key, tmpl))
        if g is None:
            g = groups[(key, tmpl)] = ([set() for _ in nums], [])
        for s, n in zip(g[0], nums, strict=True):
            s.add(n)
        g[1].append(item)
    return [(key, render(tmpl, slots), len(its), its) for (key, tmpl), (slots, its) in groups.items()]
