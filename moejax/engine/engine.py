"""`LLMEngine`: requests in, one step at a time, RequestOutputs out (vLLM's LLMEngine shape).

`step()` schedules and launches step n+1 before it reads the results of step n, so the device never waits for
the host: stop checks, detokenization and the next schedule happen while the device computes. A sequence that
stops at step n has had one more token computed in step n+1; that token is dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from moejax.engine.detokenizer import IncrementalText
from moejax.engine.outputs import CompletionOutput, RequestOutput
from moejax.engine.pages import PageAllocator
from moejax.engine.runner import MAX_LOGPROBS, InFlight, ModelRunner
from moejax.engine.sampling import SamplingParams
from moejax.engine.scheduler import RankedScheduler, Scheduler, Sequence, Status


@dataclasses.dataclass
class _Request:
    output: RequestOutput
    seqs: list[Sequence]
    texts: list[IncrementalText]
    arrival: float
    first_token_time: float | None = None


class LLMEngine:
    def __init__(self, runner: ModelRunner, *, max_model_len: int, vocab_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_prefix_caching: bool, tokenizer=None, eos_token_ids: set[int] | None = None,
                 seed: int = 0, expert_cache=None):
        self.runner = runner
        # The device cache of offloaded experts (expert_cache.ExpertCachePolicy): fed every step's expert counts
        self.expert_cache = expert_cache
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.eos_token_ids = set() if eos_token_ids is None else eos_token_ids  # shared with LLM.eos_token_ids, which callers may extend
        self.seed = seed
        limits = dict(max_num_batched_tokens=max_num_batched_tokens, prefill_block=runner.prefill_block)
        if runner.attention_ranks > 1:  # DP attention: each rank its own pages, requests and batch
            self.rank_pages = [PageAllocator(runner.num_pages, runner.page_size, enable_prefix_caching)
                               for _ in range(runner.attention_ranks)]
            self.scheduler = RankedScheduler(
                self.rank_pages, max_num_seqs=-(-max_num_seqs // runner.attention_ranks), **limits)
        else:
            self.rank_pages = [PageAllocator(runner.num_pages, runner.page_size, enable_prefix_caching)]
            self.scheduler = Scheduler(self.rank_pages[0], max_num_seqs=max_num_seqs, **limits)
        self.pages = self.rank_pages[0]
        self.requests: dict[str, _Request] = {}
        self._in_flight: InFlight | None = None
        self._ready: list[RequestOutput] = []  # finished without a step (max_tokens=0): reported by the next
        self._seq_ids = itertools.count()
        self._request_number = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        self._expert_counts = None  # summed per-step expert counts, when the runner counts them

    # -- vLLM's API ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids, sampling_params: SamplingParams | None = None,
                    prompt: str | None = None) -> None:
        """Queue a request; it joins the running batch at the next step that has room."""
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.check_prompt(prompt_token_ids, f"request {request_id!r}")
        p = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params of request {request_id!r} must be a SamplingParams")
        number = next(self._request_number)
        # Unseeded requests draw from the engine's seed and the request's number: reproducible across runs.
        base_seed = p.seed if p.seed is not None else (self.seed * 1_000_003 + number) & 0x7FFFFFFF
        room = self.max_model_len - len(ids)
        budget = room if p.max_tokens is None else min(p.max_tokens, room)
        out = RequestOutput(request_id, prompt, list(ids), [], finished=False)
        req = _Request(out, [], [], time.perf_counter())
        for j in range(p.n):
            out.outputs.append(CompletionOutput(j, "", [], 0.0, [] if p.logprobs is not None else None))
            seq = Sequence(next(self._seq_ids), request_id, j, list(ids), p, base_seed + j, budget)
            req.seqs.append(seq)
            req.texts.append(IncrementalText(self.tokenizer, p.stop))
        self.requests[request_id] = req
        self.stats["prompt_tokens"] += len(ids)
        for seq in req.seqs:
            if budget <= 0:
                self._finish(req, seq, "length", None)
            else:
                self.scheduler.add(seq)
        if budget <= 0:
            self._ready.append(self._snapshot(req))
            del self.requests[request_id]

    def abort_request(self, request_id) -> None:
        """Stop a request wherever it is; its pages are freed at once."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return
        for seq in req.seqs:
            if seq.status != Status.FINISHED:
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._ready) or self._in_flight is not None

    def kv_cache_usage(self) -> float:
        return sum(p.usage() for p in self.rank_pages) / len(self.rank_pages)

    def step(self) -> list[RequestOutput]:
        """Launch the next step, then process the previous one; returns the requests that changed."""
        scheduled = self.scheduler.schedule()
        launched = None
        if scheduled is not None:
            wants_logprobs = any(c.seq.params.logprobs is not None for c in scheduled.decodes + scheduled.prefills)
            launched = self.runner.launch(scheduled, MAX_LOGPROBS if wants_logprobs else 0)
            self.stats["steps"] += 1
        previous, self._in_flight = self._in_flight, launched
        changed = self._process(previous) if previous is not None else []
        if self._ready:
            changed, self._ready = self._ready + changed, []
        # Finished requests leave the engine once reported.
        for out in changed:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return changed

    # -- internals -----------------------------------------------------------------------------------------
    def check_prompt(self, ids, name: str = "prompt") -> list[int]:
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ValueError(f"{name}: prompt_token_ids must be a list of integers") from None
        if not ids:
            raise ValueError(f"{name} is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{name} has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{name} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def count_experts(self, enabled: bool = True) -> None:
        """Count the tokens each MoE layer routes to each expert, on the device inside every step (read back
        with the step's tokens); `take_expert_counts` collects them. New step variants compile (warm up again)."""
        self.runner.count_experts = enabled or self.expert_cache is not None
        self.runner.warmed_up = False
        self._expert_counts = None

    def take_expert_counts(self):
        """(counts int64 [MoE layers, experts] since the last call, their layer indices), or None if nothing
        was counted."""
        counts, self._expert_counts = self._expert_counts, None
        if counts is None:
            return None
        layers = [i for i, moe in enumerate(self.runner.config.moe_layers) if moe]
        return counts, layers

    def _process(self, flight: InFlight) -> list[RequestOutput]:
        tokens, logprobs, top = flight.fetch()
        if flight.expert_counts is not None:
            counts = np.asarray(flight.expert_counts, np.int64)
            self._expert_counts = counts if self._expert_counts is None else self._expert_counts + counts
            if self.expert_cache is not None:
                self.expert_cache.observe(counts, step_tokens=flight.num_tokens)
        now = time.perf_counter()
        changed = {}
        for row, seq, index in flight.rows:
            if seq.status == Status.FINISHED or index >= len(seq.output_ids):
                continue  # finished (or aborted) while this step ran: its token is dropped
            token = int(tokens[row])
            seq.output_ids[index] = token
            req = self.requests[seq.request_id]
            if req.first_token_time is None:
                req.first_token_time = now
            self.stats["generation_tokens"] += 1
            self._append(req, seq, index, token, float(logprobs[row]),
                         None if top is None else (top[0][row], top[1][row]))
            if seq.status != Status.FINISHED:
                self.scheduler.register_full_pages(seq)
            changed[seq.request_id] = req
        return [self._snapshot(req) for req in changed.values()]

    def _append(self, req: _Request, seq: Sequence, index: int, token: int, logprob: float, top) -> None:
        p = seq.params
        completion = req.output.outputs[seq.index]
        completion.token_ids.append(token)
        completion.cumulative_logprob += logprob
        if p.logprobs is not None:
            entry = {token: logprob}
            if top is not None:
                entry.update({int(i): float(v) for v, i in zip(top[0][: p.logprobs], top[1][: p.logprobs])})
            completion.logprobs.append(entry)
        if token in p.stop_token_ids:
            return self._finish(req, seq, "stop", token, drop_last=True)
        if not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(req, seq, "stop", None, drop_last=True)
        stop = req.texts[seq.index].append(completion.token_ids)
        if stop is not None:
            return self._finish(req, seq, "stop", stop)
        completion.text = req.texts[seq.index].text
        if index + 1 >= seq.budget:
            return self._finish(req, seq, "length", None)

    def _finish(self, req: _Request, seq: Sequence, reason: str, stop_reason, drop_last: bool = False) -> None:
        completion = req.output.outputs[seq.index]
        completion.finish_reason, completion.stop_reason = reason, stop_reason
        if self.tokenizer is not None:
            text = self.tokenizer.decode(completion.token_ids[:-1] if drop_last else completion.token_ids)
            if isinstance(stop_reason, str):  # cut before the first stop string (the full decode may differ
                found = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]  # from the incremental)
                text = text[: min(found)] if found else req.texts[seq.index].text
            completion.text = text
        del seq.output_ids[len(completion.token_ids):]
        if seq.status != Status.FINISHED:
            self.scheduler.finish(seq)
        req.output.finished = all(o.finish_reason is not None for o in req.output.outputs)
        req.output.num_cached_tokens = min((s.num_cached_tokens or 0) for s in req.seqs)

    def _snapshot(self, req: _Request) -> RequestOutput:
        out = req.output
        out.num_cached_tokens = min((s.num_cached_tokens or 0) for s in req.seqs)
        return dataclasses.replace(out, outputs=[dataclasses.replace(
            o, token_ids=list(o.token_ids), logprobs=None if o.logprobs is None else list(o.logprobs))
            for o in out.outputs])
