"""What the collectives of a compiled (post-optimization) HLO module move: each collective's result bytes,
times how often it runs (the trip counts of the while loops around it, through calls)."""

from __future__ import annotations

import collections
import re

_ELEM_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_EDGE = re.compile(r"(body|calls|to_apply|condition|branch_computations)=\{?%([\w.\-]+)")
_TRIP = re.compile(r'known_trip_count":\{"n":"(\d+)"')


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps, entry, name = {}, None, None
    for line in hlo.splitlines():
        if name is None:
            m = _HEADER.match(line)
            if m:
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    entry = name
        elif line.strip() == "}":
            name = None
        else:
            comps[name].append(line)
    return comps, entry


def _multipliers(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of the entry."""
    edges = collections.defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            trip = _TRIP.search(line)
            for kind, callee in _EDGE.findall(line):
                edges[name].append((callee, int(trip.group(1)) if kind == "body" and trip else 1))
    mult = collections.Counter({entry: 1})
    order, seen = [entry], {entry}
    while order:  # the call graph is a DAG; callers come before callees in a breadth-first walk from the entry
        name = order.pop(0)
        for callee, n in edges[name]:
            mult[callee] += mult[name] * n
            if callee not in seen:
                seen.add(callee)
                order.append(callee)
    return mult


def collective_bytes(hlo: str, op: str, dtype: str | None = None) -> tuple[int, int]:
    """(result bytes summed over every execution, executions) of collective `op` ("all-to-all", "all-reduce",
    ...) in a compiled module; dtype keeps only results of that element type."""
    comps, entry = _computations(hlo)
    mult = _multipliers(comps, entry)
    total = runs = 0
    pattern = re.compile(rf"= (.*?) {re.escape(op)}(?:-start)?\(")
    for name, lines in comps.items():
        for line in lines:
            m = pattern.search(line)
            if not m:
                continue
            shapes = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
            if dtype is not None:
                shapes = [s for s in shapes if s[0] == dtype]
            if not shapes:
                continue
            size = sum(_ELEM_BYTES[t] * _prod(dims) for t, dims in shapes)
            total += size * mult[name]
            runs += mult[name]
    return total, runs


def _prod(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n
