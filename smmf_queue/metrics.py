"""Prometheus metrics of workers and the gateway, all in one place so names stay consistent.

Workers serve theirs on `--metrics-port`; the gateway on `GET /metrics`, where queue depth and
live workers per model are read from Redis at scrape time. Time in queue is measured against
the producer's clock (`submitted_at` in the request), so hosts should keep their clocks in sync.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

JOBS = Counter("smmf_jobs_total", "Jobs a worker ended, by model and outcome.",
               ["model", "kind", "outcome"])
IN_FLIGHT = Gauge("smmf_jobs_in_flight", "Jobs a worker is running.", ["model", "kind"])
QUEUE_WAIT = Histogram("smmf_queue_wait_seconds", "From submission to a worker starting the job.",
                       ["model", "kind"], buckets=_LATENCY_BUCKETS_S)
WORKER_TTFT = Histogram("smmf_worker_time_to_first_token_seconds",
                        "From a worker starting a chat job to its first delta.", ["model"],
                        buckets=_LATENCY_BUCKETS_S)
TOKENS = Counter("smmf_generated_tokens_total", "Completion tokens generated (rate = tokens/s).",
                 ["model"])
EMBEDDED = Counter("smmf_embedding_inputs_total", "Texts embedded (rate = inputs/s).", ["model"])
EMBED_PASSES = Counter("smmf_embedding_passes_total",
                       "Embedding calls into the engine; fewer than jobs when dynamic batching merges "
                       "concurrent jobs.", ["model"])

REQUESTS = Counter("smmf_gateway_requests_total", "Gateway requests, by endpoint, model and status.",
                   ["endpoint", "model", "status"])
GATEWAY_TTFT = Histogram("smmf_gateway_time_to_first_token_seconds",
                         "From a streaming request's arrival to its first token.", ["model"],
                         buckets=_LATENCY_BUCKETS_S)
QUEUE_DEPTH = Gauge("smmf_queue_depth", "Jobs waiting in a model's queue (Redis broker only).",
                    ["model", "kind"])
LIVE_WORKERS = Gauge("smmf_live_workers", "Workers with a current heartbeat per model.",
                     ["model", "kind"])
KEY_TOKENS = Counter("smmf_gateway_key_tokens_total",
                     "Tokens used through the gateway by virtual key (its alias; 'none' for a key "
                     "without one) and model, prompt and completion apart.",
                     ["key_alias", "model", "kind"])
