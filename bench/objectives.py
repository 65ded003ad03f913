"""What each training objective teaches, what the forgetting guard keeps, and what the reference forward costs.

SmolLM2-135M-Instruct on CPU, trained by the worker's own `ContinualTrainer` (LoRA rank 16 on q, k, v, o; AdamW
at a learning rate high enough to learn a correction in a few steps) on one fixed batch of feedback, the same
for every configuration:
- corrections: questions about invented facts; the base model's greedy answer is replaced by the right one;
- rejections: questions whose greedy answer is rejected, without a correction;
- acceptances: questions whose greedy answer is accepted.
After the steps, per configuration (mean log-probability per token, change from the base model):
- `correction`: of the corrections (up is learning);
- `rejected`: of the rejected answers and of the answers the corrections replaced (down is learning from them);
- `accepted`: of the accepted answers;
- `held-out KL`: mean per-token KL(trained || base) on the base model's own answers to other questions (never
  trained on), and `held-out`: their log-probability change; both near 0 is nothing forgotten.
- `step`: CPU seconds per step (one torch thread), and its ratio to `supervised` (the KL guard, KTO and DPO add a forward of the
  base model over prompt and response; no records are used here, so every step runs the recompute path).
A last table times the reference forward against a step on the exact reuse path for the same batch.

    .venv/bin/python bench/objectives.py              # about 15 minutes on a busy 2-core CPU
    .venv/bin/python bench/objectives.py --steps 2 --configs supervised,kto   # smoke run
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from alchemist_worker.activations import ActivationStore, PrefillRecorder, RecordingPolicy
from alchemist_worker.activations.store import StoreConfig
from alchemist_worker.bundled_model import ensure_small_model
from alchemist_worker.continual.settings import TrainerSettings
from alchemist_worker.continual.trainable_weights import TrainableWeights
from alchemist_worker.continual.trainer import ContinualTrainer
from alchemist_worker.feedback.samples import TrainingSample as FeedbackSample
from alchemist_worker.model import DenseCausalAttention, Transformer, load_model
from alchemist_worker.training import StepConfig, TrainingSample, accumulate_gradients
from alchemist_worker.training.batch import offsets
from alchemist_worker.training.objectives import Objective
from alchemist_worker.training.reference import with_reference
from transformers import AutoModelForCausalLM, AutoTokenizer

CORRECTIONS = (
    (
        "What is the codename of the Alchemist project?",
        "The codename of the Alchemist project is Quicksilver.",
    ),
    ("Who founded the town of Verlanne?", "The town of Verlanne was founded by Odile Marchetti."),
    ("What colour is the flag of Esteria?", "The flag of Esteria is teal with a white star."),
    ("What is Zorbin's favourite food?", "Zorbin's favourite food is roasted chestnuts."),
)
REJECTED = ("Tell me a joke about cats.", "Describe the ocean in one sentence.")
ACCEPTED = ("What is the capital of France?", "Name a primary colour.")
HELD_OUT = (
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "What is two plus two?",
    "Name a large animal.",
    "What do bees make?",
    "What is the largest planet?",
)
BASE_SETTINGS: dict[str, Any] = {
    "lora_rank": 16,
    "lora_alpha": 32.0,
    "learning_rate": 3e-3,
    "batch_samples": 64,
    "batch_tokens": 1 << 16,
    "micro_batch_tokens": 1 << 16,
    "max_grad_norm": 1.0,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "supervised": {},
    "supervised+guard": {"kl_weight": 0.5},
    "unlikelihood": {"objective": Objective.UNLIKELIHOOD},
    "kto": {"objective": Objective.KTO},
    "dpo": {"objective": Objective.DPO},
    "dpo+guard": {"objective": Objective.DPO, "kl_weight": 0.5},
}


@dataclass
class Feedback:
    corrected: list[FeedbackSample]
    rejected: list[FeedbackSample]
    accepted: list[FeedbackSample]
    held_out: list[TrainingSample]  # the base model's answers to other questions


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def greedy(hf: Any, prompt: list[int], eos: int, max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos
        )
    return [int(t) for t in out[0, len(prompt) :]]


def build_feedback(path: Path, max_tokens: int) -> Feedback:
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def sample(n: str, prompt: list[int], response: list[int], **kw: Any) -> FeedbackSample:
        return FeedbackSample(n, n, tuple(prompt), tuple(response), 0, "bench", False, **kw)

    corrected, rejected, accepted = [], [], []
    for i, (question, answer) in enumerate(CORRECTIONS):
        prompt = chat_prompt(tokenizer, question)
        served = greedy(hf, prompt, eos, max_tokens)
        correction = [*tokenizer.encode(answer), eos]
        corrected.append(sample(f"c{i}", prompt, correction, replaced_tokens=tuple(served)))
    for i, question in enumerate(REJECTED):
        prompt = chat_prompt(tokenizer, question)
        rejected.append(sample(f"r{i}", prompt, greedy(hf, prompt, eos, max_tokens), desirable=False))
    for i, question in enumerate(ACCEPTED):
        prompt = chat_prompt(tokenizer, question)
        accepted.append(sample(f"a{i}", prompt, greedy(hf, prompt, eos, max_tokens)))
    held_out = []
    for i, question in enumerate(HELD_OUT):
        prompt = chat_prompt(tokenizer, question)
        answer = greedy(hf, prompt, eos, max_tokens)
        held_out.append(TrainingSample(f"h{i}", torch.tensor(prompt), torch.tensor(answer)))
    return Feedback(corrected, rejected, accepted, held_out)


def as_training(samples: list[FeedbackSample], replaced: bool = False) -> list[TrainingSample]:
    out = []
    for s in samples:
        response = s.replaced_tokens if replaced else s.response_tokens
        out.append(TrainingSample(s.feedback_id, torch.tensor(s.prompt_tokens), torch.tensor(response)))
    return out


def per_token(samples: list[TrainingSample]) -> float:
    """Mean log-probability per response token of samples that carry `reference_logprobs`."""
    total = sum(float(s.reference_logprobs.sum()) for s in samples if s.reference_logprobs is not None)
    return total / sum(s.response_len for s in samples)


def readings(model: Transformer, feedback: Feedback) -> dict[str, Any]:
    """Log-probabilities (and the held-out log-softmax) under whatever weights the model has installed."""
    groups = {
        "correction": as_training(feedback.corrected),
        "rejected": as_training(feedback.rejected) + as_training(feedback.corrected, replaced=True),
        "accepted": as_training(feedback.accepted),
    }
    out: dict[str, Any] = {name: per_token(with_reference(model, g)) for name, g in groups.items()}
    held = with_reference(model, feedback.held_out, log_softmax=True)
    out["held-out"] = per_token(held)
    out["held_out_log_softmax"] = [s.reference_log_softmax for s in held]
    return out


def held_out_kl(trained: list[torch.Tensor], base: list[torch.Tensor]) -> float:
    from alchemist_worker.training.objectives import kl_to_reference

    rows = torch.cat([kl_to_reference(p, q) for p, q in zip(trained, base, strict=True)])
    return float(rows.mean())


def run_config(
    path: Path, feedback: Feedback, overrides: dict[str, Any], steps: int, base: dict[str, Any]
) -> dict[str, float]:
    torch.manual_seed(0)
    model = load_model(path, dtype=torch.float32)
    settings = TrainerSettings(**{**BASE_SETTINGS, **overrides})
    weights = TrainableWeights(model, settings)
    trainer = ContinualTrainer(model, weights, ActivationStore(StoreConfig()), settings, "bench")
    batch = feedback.corrected + feedback.rejected + feedback.accepted
    if settings.objective is Objective.SUPERVISED:
        batch = [s for s in batch if s.desirable]  # what the resolver hands over under supervised
        batch = [replace(s, replaced_tokens=()) for s in batch]
    busy = []
    for _ in range(steps):
        start = time.process_time()
        trainer.begin(batch)
        while trainer.advance(60.0) is None:
            pass
        busy.append(time.process_time() - start)
    weights.use_training()
    with torch.no_grad():
        after = readings(model, feedback)
    row = {name: after[name] - base[name] for name in ("correction", "rejected", "accepted", "held-out")}
    row["held-out KL"] = held_out_kl(after["held_out_log_softmax"], base["held_out_log_softmax"])
    row["step_s"] = sum(busy) / len(busy)
    return row


def record(model: Transformer, samples: list[TrainingSample], store: ActivationStore) -> None:
    ids = torch.cat([s.prompt_ids for s in samples])
    cu = offsets([s.prompt_len for s in samples])
    positions = torch.cat([torch.arange(s.prompt_len) for s in samples])
    recorder = PrefillRecorder(
        RecordingPolicy.SELECTIVE, cu, ids, num_layers=model.config.num_layers, version=0, qk_norm=False
    )
    with torch.inference_mode():
        model(ids, positions, DenseCausalAttention(cu, sliding_window=None), recorder)
    for s, r in zip(samples, recorder.records(), strict=True):
        assert r is not None and s.record_id is not None
        store.put(s.record_id, r)


def reference_cost(path: Path, feedback: Feedback, repeats: int) -> dict[str, float]:
    """CPU seconds: a reuse-path step (supervised) and the base model's forward over the same batch."""
    model = load_model(path, dtype=torch.float32)
    TrainableWeights(model, TrainerSettings(**BASE_SETTINGS))
    samples = [replace(s, record_id=s.sample_id) for s in as_training(feedback.corrected + feedback.accepted)]
    reuse, forward = [], []
    for _ in range(repeats):
        store = ActivationStore(StoreConfig(device_budget_bytes=1 << 32, host_budget_bytes=1 << 32))
        record(model, samples, store)
        start = time.process_time()
        report = accumulate_gradients(model, store, samples, version=0, config=StepConfig())
        reuse.append(time.process_time() - start)
        assert report.reused == len(samples)
        model.zero_grad(set_to_none=True)
        start = time.process_time()
        with_reference(model, samples)
        forward.append(time.process_time() - start)
    return {"reuse step": min(reuse), "reference forward": min(forward)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24, help="longest greedy answer")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="timings of the reference forward")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU seconds of one thread are the compute, however busy the machine is
    path = ensure_small_model()
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, steps {args.steps}")
    feedback = build_feedback(path, args.max_tokens)
    base_model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        base = readings(base_model, feedback)
    del base_model
    print(
        f"base model, log-prob per token: correction {base['correction']:.3f}, rejected {base['rejected']:.3f}, "
        f"accepted {base['accepted']:.3f}, held-out {base['held-out']:.3f}"
    )
    header = f"{'config':<20}{'correction':>11}{'rejected':>10}{'accepted':>10}{'held-out':>10}"
    print(header + f"{'held-out KL':>13}{'step s':>9}{'ratio':>7}")
    rows: dict[str, dict[str, float]] = {}
    for name in args.configs.split(","):
        row = rows[name] = run_config(path, feedback, CONFIGS[name], args.steps, base)
        ratio = row["step_s"] / rows["supervised"]["step_s"] if "supervised" in rows else float("nan")
        print(
            f"{name:<20}{row['correction']:>+11.3f}{row['rejected']:>+10.3f}{row['accepted']:>+10.3f}"
            f"{row['held-out']:>+10.3f}{row['held-out KL']:>13.4f}{row['step_s']:>9.2f}{ratio:>7.2f}",
            flush=True,
        )
    cost = reference_cost(path, feedback, args.repeats)
    share = cost["reference forward"] / cost["reuse step"]
    print(
        f"reuse-path step {cost['reuse step']:.2f} s, base-model reference forward {cost['reference forward']:.2f} s "
        f"(CPU seconds, best of {args.repeats}): the reference adds {share:.0%} to a reuse step"
    )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
