"""Continuous batching: which tokens of which sequences run in the next step. Plain Python over lists.

Every step has a token budget. Running decodes go first (one token each), then prefill chunks: the unfinished
prompts of running sequences, then waiting ones in arrival order, each cut to what the budget leaves, so a long
prompt never stalls the running decodes. Sequences join and leave between steps. When a decode needs a page and
none is free, the most recently started sequence is preempted: its pages are freed and it waits to be
recomputed from its tokens so far; nothing is dropped.

A sampled token is known on the host one step late (the engine launches step n+1 before reading step n):
such a token is `None` in `Sequence.output_ids` until it arrives, and the step that consumes it takes it from
the previous step's device output instead.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from moejax.engine.pages import PageAllocator
from moejax.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclasses.dataclass(eq=False)
class Sequence:
    """One completion being generated: the prompt, its outputs so far and where its keys live."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    budget: int  # most tokens it may generate
    output_ids: list = dataclasses.field(default_factory=list)  # None: sampled in the step in flight
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys a launched step writes
    pages: list[int] = dataclasses.field(default_factory=list)
    page_keys: list = dataclasses.field(default_factory=list)  # prefix keys of its first full pages
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    sample_row: int = -1  # its row in the last launched step's sampled tokens
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int):
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, stop: int) -> list:
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        return (self.prompt_ids[start:] if start < n else []) + self.output_ids[max(start - n, 0):stop - n]

    def num_known(self) -> int:
        """Tokens whose values the host has (a pending token and everything after it are not)."""
        for i, t in enumerate(self.output_ids):
            if t is None:
                return len(self.prompt_ids) + i
        return self.num_tokens

    @property
    def has_pending(self) -> bool:
        return None in self.output_ids[-2:]


@dataclasses.dataclass
class Chunk:
    seq: Sequence
    start: int  # first position computed
    length: int
    samples: bool  # the chunk reaches the sequence's last token: sample the next one


@dataclasses.dataclass
class ScheduledStep:
    decodes: list[Chunk]
    prefills: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)


class Scheduler:
    def __init__(self, pages: PageAllocator, *, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_block: int):
        self.pages = pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_block = prefill_block
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in order of admission
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Stop a sequence wherever it is and free its pages at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED

    def _free(self, seq: Sequence) -> None:
        self.pages.release(seq.pages)
        seq.pages, seq.page_keys, seq.num_computed = [], [], 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, end: int) -> bool:
        """Pages for positions [0, end); False (and nothing taken) when the pool is short."""
        need = -(-end // self.pages.page_size) - len(seq.pages)
        if need > self.pages.num_available():
            return False
        seq.pages.extend(self.pages.allocate() for _ in range(need))
        return True

    def register_full_pages(self, seq: Sequence) -> None:
        """Key every page that is now full of known tokens whose keys are written (or being written)."""
        ps = self.pages.page_size
        limit = min(seq.num_computed, seq.num_known())
        while (len(seq.page_keys) + 1) * ps <= limit:
            i = len(seq.page_keys)
            parent = seq.page_keys[-1] if seq.page_keys else None
            key = self.pages.page_key(parent, seq.tokens(i * ps, (i + 1) * ps))
            self.pages.register(seq.pages[i], key)
            seq.page_keys.append(key)

    def _admit(self, seq: Sequence) -> None:
        """Take the cached prefix of a waiting sequence (at least its last token is computed anew)."""
        known = seq.num_tokens
        pages, keys = self.pages.match(seq.tokens(0, known), known - 1)
        seq.pages, seq.page_keys = pages, keys
        seq.num_computed = len(pages) * self.pages.page_size

    def schedule(self) -> ScheduledStep | None:
        decodes: list[Chunk] = []
        budget = self.max_num_batched_tokens
        # 1. One token for every running sequence that has finished its prompt.
        for seq in list(self.running):
            if seq.status != Status.RUNNING or seq.num_computed < seq.num_tokens - 1:
                continue
            if len(seq.output_ids) >= seq.budget or budget == 0:
                continue  # its last token is in flight; the engine finishes it when it arrives
            while not self._grow(seq, seq.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            decodes.append(Chunk(seq, seq.num_computed, 1, True))
            budget -= 1
        # 2. Prefill chunks: running sequences' unfinished prompts, then waiting sequences in order.
        qb = self.prefill_block
        slots = (budget // qb) * qb
        prefills: list[Chunk] = []
        candidates = [s for s in self.running if s.num_computed < s.num_tokens - 1]
        for seq in candidates + list(self.waiting):
            if slots < qb:
                break
            if seq.status == Status.WAITING:
                if len(self.running) >= self.max_num_seqs or seq.has_pending:
                    break
                self._admit(seq)
            remaining = seq.num_tokens - seq.num_computed
            length = min(remaining, slots)
            if not self._grow(seq, seq.num_computed + length):
                if seq.status == Status.WAITING:
                    self._free(seq)  # give back the prefix it matched; it stays first in line
                    break
                continue
            if seq.status == Status.WAITING:
                if seq.num_cached_tokens is None:
                    seq.num_cached_tokens = seq.num_computed
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
            prefills.append(Chunk(seq, seq.num_computed, length, length == remaining))
            slots -= -(-length // qb) * qb
        if not decodes and not prefills:
            return None
        for chunk in decodes + prefills:
            chunk.seq.num_computed = chunk.start + chunk.length
            self.register_full_pages(chunk.seq)
        return ScheduledStep(decodes, prefills)


@dataclasses.dataclass
class RankedStep:
    """One step of DP attention: each attention rank's own schedule (None: that rank idles this step and runs
    an empty batch, so that the ranks' collectives line up)."""

    ranks: list[ScheduledStep | None]

    @property
    def decodes(self) -> list[Chunk]:
        return [c for s in self.ranks if s is not None for c in s.decodes]

    @property
    def prefills(self) -> list[Chunk]:
        return [c for s in self.ranks if s is not None for c in s.prefills]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.ranks if s is not None)


class RankedScheduler:
    """DP attention's scheduler (`enable_dp_attention`): one Scheduler per attention rank, each with its own
    pages (its shard of the KV pools) and its own batch budget. A new sequence goes to the rank with the fewest
    sequences and stays there: its cache lives on that rank's device."""

    def __init__(self, pages: list[PageAllocator], **kwargs):
        self.ranks = [Scheduler(p, **kwargs) for p in pages]
        self._rank_of: dict[int, int] = {}

    def add(self, seq: Sequence) -> None:
        load = [len(s.waiting) + len(s.running) for s in self.ranks]
        rank = load.index(min(load))
        self._rank_of[seq.seq_id] = rank
        self.ranks[rank].add(seq)

    def rank_of(self, seq: Sequence) -> int:
        return self._rank_of[seq.seq_id]

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.ranks)

    def finish(self, seq: Sequence) -> None:
        rank = self._rank_of.pop(seq.seq_id, None)
        if rank is not None:
            self.ranks[rank].finish(seq)

    def register_full_pages(self, seq: Sequence) -> None:
        self.ranks[self._rank_of[seq.seq_id]].register_full_pages(seq)

    @property
    def running(self) -> list[Sequence]:
        return [q for s in self.ranks for q in s.running]

    @property
    def waiting(self) -> list[Sequence]:
        return [q for s in self.ranks for q in s.waiting]

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.ranks)

    def schedule(self) -> RankedStep | None:
        steps = [s.schedule() for s in self.ranks]
        return None if all(s is None for s in steps) else RankedStep(steps)
