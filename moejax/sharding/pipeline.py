"""Pipeline stages: which layers each stage holds, and the stage-major slots the engine stores them in.

The step is one SPMD program, so every array a stage holds must have the same shape on every stage. The engine
stacks each run of identically built layers (models/stacked.py) as [pp * slots, ...] split over the `pipeline`
mesh axis: stage s's shard holds its own layers of that run in its first slots and zeros in the rest. Where
runs differ (DeepSeek's dense first layers, then MoE layers) a stage can hold fewer layers of a run than its
slots: the split is chosen to waste the fewest bytes (DeepSeek-V3 at pp2: 3 dense + 29 MoE layers, then 29 MoE
layers and 3 empty dense slots). The planner counts the same slots (plan/memory.py), so its bytes per device
are what the engine allocates.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Hashable, Sequence

MAX_CANDIDATES = 20_000  # slot assignments tried before falling back to the even split


@dataclasses.dataclass(frozen=True)
class StageSplit:
    """Layers of each stage and slots of each run (runs: maximal stretches of layers of the same kind)."""

    stages: tuple[range, ...]
    runs: tuple[range, ...]
    slots: tuple[int, ...]  # per run: layers of that run each stage has room for

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def slots_per_stage(self) -> int:
        return sum(self.slots)

    def count(self, run: int, stage: int) -> int:
        """How many layers of `run` stage `stage` holds (the rest of its slots are empty)."""
        r, s = self.runs[run], self.stages[stage]
        return max(0, min(r.stop, s.stop) - max(r.start, s.start))

    def first_layer(self, run: int, stage: int) -> int:
        """The global index of the layer in slot 0 of `run` on `stage` (valid when count > 0)."""
        return max(self.runs[run].start, self.stages[stage].start)

    def slot_layers(self, run: int) -> list[list[int]]:
        """[stage][slot] -> global layer index, or -1 for an empty slot."""
        out = []
        for s in range(self.pp):
            n, first = self.count(run, s), self.first_layer(run, s)
            out.append([first + j if j < n else -1 for j in range(self.slots[run])])
        return out

    def pool_slot(self, layer: int) -> int:
        """The index of a layer in its stage's local KV pool (its slot among all runs' slots)."""
        run = next(r for r, rng in enumerate(self.runs) if layer in rng)
        stage = next(s for s, rng in enumerate(self.stages) if layer in rng)
        return sum(self.slots[:run]) + layer - self.first_layer(run, stage)


def layer_runs(kinds: Sequence[Hashable]) -> tuple[range, ...]:
    runs, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            runs.append(range(start, i))
            start = i
    return tuple(runs)


def even_stages(num_layers: int, pp: int) -> tuple[range, ...]:
    """Contiguous stages as even as the division allows (the first stages take the remainder)."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return tuple(out)


def _pack(runs: tuple[range, ...], slots: Sequence[int], pp: int) -> tuple[range, ...] | None:
    """Stages filled in layer order, each taking layers while its slots of their run last; None if more than
    pp stages are needed. Trailing stages may be left empty."""
    stages, start, used = [], 0, [0] * len(runs)
    run_of = [r for r, rng in enumerate(runs) for _ in rng]
    for layer in range(len(run_of)):
        r = run_of[layer]
        if used[r] == slots[r]:
            stages.append(range(start, layer))
            start, used = layer, [0] * len(runs)
        used[r] += 1
    stages.append(range(start, len(run_of)))
    if len(stages) > pp:
        return None
    end = len(run_of)
    return tuple(stages) + tuple(range(end, end) for _ in range(pp - len(stages)))


def split_stages(kinds: Sequence[Hashable], pp: int, layer_bytes: Sequence[int] | None = None) -> StageSplit:
    """The split of layers (kinds[i]: what layer i is built as) into pp contiguous stages that needs the fewest
    bytes per device (layer_bytes[i]: what layer i weighs; equal by default), every stage holding a layer."""
    n = len(kinds)
    if not 1 <= pp <= n:
        raise ValueError(f"pipeline_parallel_size={pp} must be between 1 and num_hidden_layers={n}")
    runs = layer_runs(kinds)
    weight = [layer_bytes[r.start] if layer_bytes is not None else 1 for r in runs]

    def split_of(stages):
        slots = tuple(max(max(0, min(r.stop, s.stop) - max(r.start, s.start)) for s in stages) for r in runs)
        return StageSplit(tuple(stages), runs, slots)

    def cost(split):
        return sum(w * k for w, k in zip(weight, split.slots)), max(len(s) for s in split.stages)

    best = split_of(even_stages(n, pp))
    ranges = [range(math.ceil(len(r) / pp), len(r) + 1) for r in runs]
    if math.prod(len(r) for r in ranges) <= MAX_CANDIDATES:
        for slots in itertools.product(*ranges):
            stages = _pack(runs, slots, pp)
            if stages is None or any(len(s) == 0 for s in stages):
                continue
            candidate = split_of(stages)
            if cost(candidate) < cost(best):
                best = candidate
    return best


__all__ = ["StageSplit", "even_stages", "layer_runs", "split_stages"]
