"""A device cache of the most used offloaded experts (`LLM(offload_experts=True, offload_cache_experts=S)`).

Each MoE layer keeps S of its experts in device memory as well as in host memory. Inside the step a routed
expert with a slot is read from the device and only the misses cross PCIe (kernels/host_experts.py). Between
steps this policy, plain Python over numpy, keeps the slots on the experts the router has used most: the step
counts each layer's routed tokens per expert (the counters the server's metrics read), the counts decay by half
at every refresh, and every `refresh_steps` steps each layer's top S experts by decayed count take the slots;
an expert that stays in the top S keeps its slot, so a refresh copies only the experts that came in.
"""

from __future__ import annotations

import numpy as np

from moejax.kernels import host_experts
from moejax.models.stacked import run_experts

REFRESH_STEPS = 16  # steps between refreshes (the first refresh fills the empty cache)
DECAY = 0.5  # weight of the counts before a refresh at the next one


class ExpertCachePolicy:
    def __init__(self, runner, slots: int, refresh_steps: int = REFRESH_STEPS):
        config = runner.config
        self.runner = runner
        self.slots = slots
        self.refresh_steps = refresh_steps
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.steps = 0
        # Per run with experts: (run index, rows of the step's [MoE layers, E] counts, host ExpertWeights)
        self.runs = []
        caches = []
        row = 0
        for r, (run, params) in enumerate(zip(runner.model.runs, runner.params["runs"])):
            experts = run_experts(params)
            if experts is None:
                caches.append(None)
                continue
            n = run.stop - run.start
            self.runs.append((r, slice(row, row + n), experts))
            row += n
            caches.append(host_experts.empty_cache(experts, slots))
        self.moe_layers = row
        self.score = np.zeros((row, self.num_experts), np.float64)
        self.expert_in_slot = -np.ones((row, slots), np.int64)  # [MoE layers, S]
        self.routed = 0  # (token, expert) assignments counted so far
        self.hits = 0  # of them, to an expert that had a slot at the time
        runner.params = dict(runner.params, caches=caches)
        runner.count_experts = True  # the step counts each layer's routed tokens per expert: observe() reads them

    def observe(self, counts, step_tokens: int | None = None) -> None:
        """One step's counts int [MoE layers, E] (a step of `step_tokens` token slots: one that copied its experts
        without reading the cache, host_experts.reads_cache, counts no hits); refreshes the cache every
        refresh_steps steps."""
        counts = np.asarray(counts, np.int64)
        if step_tokens is None or host_experts.reads_cache(step_tokens, self.top_k, self.num_experts):
            held = np.take_along_axis(counts, np.maximum(self.expert_in_slot, 0), axis=1)
            self.hits += int(held[self.expert_in_slot >= 0].sum())
        self.routed += int(counts.sum())
        self.score += counts
        self.steps += 1
        if self.steps % self.refresh_steps == 0:
            self.refresh()

    def refresh(self) -> int:
        """Move each layer's top experts into its slots; returns how many experts were copied in."""
        copied = 0
        caches = list(self.runner.params["caches"])
        for r, rows, experts in self.runs:
            updates = []
            for local, layer in enumerate(range(rows.start, rows.stop)):
                updates += [(local, slot, expert) for slot, expert in self._assign(layer)]
            if not updates:
                continue
            slot_of = -np.ones((rows.stop - rows.start, self.num_experts), np.int32)
            for local, layer in enumerate(range(rows.start, rows.stop)):
                held = self.expert_in_slot[layer]
                slot_of[local, held[held >= 0]] = np.nonzero(held >= 0)[0]
            caches[r] = host_experts.fill(caches[r], experts, updates, slot_of)
            copied += len(updates)
        self.runner.params = dict(self.runner.params, caches=caches)
        self.score *= DECAY
        return copied

    def _assign(self, layer: int) -> list[tuple[int, int]]:
        """(slot, expert) for the experts entering layer's slots; updates expert_in_slot."""
        score = self.score[layer]
        used = np.nonzero(score > 0)[0]
        top = used[np.argsort(-score[used], kind="stable")][: self.slots]
        held = self.expert_in_slot[layer]
        keep = set(int(e) for e in held if e >= 0 and e in set(top.tolist()))
        incoming = [int(e) for e in top if int(e) not in keep]
        free = [s for s in range(self.slots) if held[s] < 0 or int(held[s]) not in keep]
        moves = list(zip(free, incoming))
        for slot, expert in moves:
            held[slot] = expert
        return moves

    def hit_share(self) -> float | None:
        """The share of routed (token, expert) assignments that the device cache served."""
        return self.hits / self.routed if self.routed else None

    def cached(self) -> dict[int, list[int]]:
        """{MoE layer row: the experts in its slots} (for tests and metrics)."""
        return {layer: sorted(int(e) for e in held if e >= 0) for layer, held in enumerate(self.expert_in_slot)}
