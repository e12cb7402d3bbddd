"""The server's Prometheus metrics (the names docs/http.md lists), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moejax_requests", "Requests finished", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("moejax_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("moejax_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("moejax_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("moejax_num_requests_waiting", "Sequences waiting for room", registry=r)
        self.kv_usage = Gauge("moejax_kv_cache_usage_ratio", "Fraction of KV pages in use", registry=r)
        self.prefix_hit = Gauge("moejax_prefix_cache_hit_ratio",
                                "Prompt tokens served from the prefix cache over prompt tokens", registry=r)
        self.ttft = Histogram("moejax_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("moejax_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_LATENCY, registry=r)
        self.e2e = Histogram("moejax_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=_LATENCY, registry=r)
        self.expert_tokens = Counter("moejax_moe_expert_tokens", "Token assignments routed to each expert",
                                     ["layer", "expert"], registry=r)
        self.imbalance = Gauge("moejax_moe_token_imbalance",
                               "Max over mean tokens per expert in the last window", ["layer"], registry=r)
        self._cached = 0
        self._queried = 0

    def prefix_cache(self, cached: int, prompt: int) -> None:
        self._cached += cached
        self._queried += prompt
        self.prefix_hit.set(self._cached / self._queried if self._queried else 0.0)

    def experts(self, counts_LE, layers: list[int]) -> None:
        """Add one window of per-layer expert counts [moe layers, experts] (numpy)."""
        for row, layer in zip(counts_LE, layers):
            total = float(row.sum())
            for e in row.nonzero()[0]:
                self.expert_tokens.labels(layer=str(layer), expert=str(int(e))).inc(float(row[e]))
            if total:
                self.imbalance.labels(layer=str(layer)).set(float(row.max()) / (total / len(row)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
