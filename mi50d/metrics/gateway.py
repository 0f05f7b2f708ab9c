"""`GatewayMetrics`: the gateway's observer (`mi50d.gateway.observer.Observer`, met structurally,
without importing the gateway), holding the per-model request, latency, token, queue and swap
series. The gateway calls it as things happen; nothing here reads the gateway's state.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SWAP_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("mi50d_gateway_requests", "Requests answered by the gateway, by "
                                "model and HTTP status code", ["model", "code"], registry=registry)
        self.duration = Histogram(
            "mi50d_gateway_request_duration_seconds", "Time from a request's arrival to the end "
            "of its answer (streams included)", ["model"], buckets=DURATION_BUCKETS,
            registry=registry)
        self.ttft = Histogram(
            "mi50d_gateway_time_to_first_token_seconds", "Time from a request's arrival to the "
            "first byte of the upstream's answer body", ["model"], buckets=TTFT_BUCKETS,
            registry=registry)
        self.prompt_tokens = Counter("mi50d_gateway_prompt_tokens", "Prompt tokens of answered "
                                     "requests, where the answer reported them", ["model"],
                                     registry=registry)
        self.generated_tokens = Counter("mi50d_gateway_generated_tokens", "Generated tokens of "
                                        "answered requests, where the answer reported them",
                                        ["model"], registry=registry)
        self.in_flight = Gauge("mi50d_gateway_in_flight", "Requests being answered by the "
                               "model's instance now", ["model"], registry=registry)
        self.queue = Gauge("mi50d_gateway_queue_depth", "Requests waiting for the model (for "
                           "a swap or a free slot)", ["model"], registry=registry)
        self.swaps = Counter("mi50d_gateway_swaps", "Swaps that brought the model up, other "
                             "models stopped to make room", ["model"], registry=registry)
        self.swap_duration = Histogram(
            "mi50d_gateway_swap_duration_seconds", "Time a swap to the model took, until its "
            "instance was running", ["model"], buckets=SWAP_BUCKETS, registry=registry)
        self._seen: set[str] = set()

    def request_started(self, model: str) -> None:
        # The model's series exist from its first request on, so a rate() starts at 0.
        if model in self._seen:  # labels() costs microseconds: once per model, not per request
            return
        self._seen.add(model)
        for family in (self.duration, self.ttft, self.prompt_tokens, self.generated_tokens):
            family.labels(model)

    def request_finished(self, model: str, code: int, duration_s: float, ttft_s: float | None,
                         prompt_tokens: int | None, generated_tokens: int | None) -> None:
        self.requests.labels(model, str(code)).inc()
        self.duration.labels(model).observe(duration_s)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        if prompt_tokens is not None:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if generated_tokens is not None:
            self.generated_tokens.labels(model).inc(generated_tokens)

    def queue_changed(self, model: str, depth: int) -> None:
        self.queue.labels(model).set(depth)

    def in_flight_changed(self, model: str, n: int) -> None:
        self.in_flight.labels(model).set(n)

    def swap_finished(self, model: str, duration_s: float) -> None:
        self.swaps.labels(model).inc()
        self.swap_duration.labels(model).observe(duration_s)

