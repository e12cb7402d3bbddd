"""Device-only time of a piece of host code, read back from a jax.profiler trace: the union of the intervals in
which the device ran kernels or copies. Against the wall time of the same code it gives the host's share.

Only accelerators are read (a CPU backend has no device plane; the caller gets None and says so).
"""

from __future__ import annotations

import glob
import os
import tempfile

import jax


def _merged_ns(intervals) -> float:
    total, end = 0.0, None
    start = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        total += end - start
    return total


def busy_ns(profile) -> float | None:
    """Union of busy intervals over every device plane of a jax.profiler.ProfileData; None with no device plane.

    GPU planes hold one line per stream (kernels, memcpys) plus summary lines ("XLA Modules", "XLA Ops") that
    span the same work; the stream lines are used when present, else every line.
    """
    intervals, found = [], False
    for plane in profile.planes:
        if not plane.name.startswith("/device:") or "CPU" in plane.name:
            continue
        found = True
        lines = list(plane.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")]
        for line in streams or lines:
            for ev in line.events:
                if ev.duration_ns > 0:
                    intervals.append((ev.start_ns, ev.start_ns + ev.duration_ns))
    return _merged_ns(intervals) if found else None


def device_seconds(fn, workdir: str | None = None) -> float | None:
    """Run fn under the profiler; seconds the device was busy meanwhile (None without a device plane). The trace
    lives in a temporary directory that is removed at once."""
    with tempfile.TemporaryDirectory(prefix="moejax-trace-", dir=workdir) as d:
        with jax.profiler.trace(d):
            fn()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return None
        ns = busy_ns(jax.profiler.ProfileData.from_file(files[0]))
    return None if ns is None else ns * 1e-9


# Parts of a step, by the named scopes the model and runner put on their ops (first match wins).
PARTS = ("attention", "router", "experts", "dense_mlp", "kv_write", "lm_head", "sampling")


def breakdown_ns(profile) -> dict[str, float]:
    """Device time per part of the step (PARTS, plus "copies" for device-to-device copies and "other") summed
    over the stream lines of every GPU plane."""
    out = dict.fromkeys((*PARTS, "copies", "other"), 0.0)
    for plane in profile.planes:
        if not plane.name.startswith("/device:") or "CPU" in plane.name:
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                if ev.name.startswith("Memcpy"):
                    part = "copies"
                else:
                    scope = dict(ev.stats).get("name", "") if hasattr(ev, "stats") else ""
                    part = next((p for p in PARTS if f"/{p}" in str(scope)), "other")
                out[part] += ev.duration_ns
    return out
