"""The native serving engine: continuous batching over a paged KV cache, with recording at prefill.

Callers (the HTTP API, the recording hooks, the trainer's runtime loop) reach it only through the
`ServingEngine` protocol in `serving_engine.py`, so another engine can stand in without changing them.
Only `model_runner.py`, `paged_attention.py`, `kv_cache.py` and `sampler.py` touch torch; the bookkeeping
modules (sequence, block manager, scheduler, detokenizer, recording decisions) run anywhere in microseconds.
"""
