"""How one request wants its tokens chosen and when it wants generation to stop."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
# What torch.Generator.manual_seed accepts: a seed outside raises inside the sampling step, mid-iteration.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1
MAX_STOP_STRINGS = 4
# Streaming holds back as many characters as the longest stop string: a longer one would hold back everything.
MAX_STOP_STRING_CHARS = 1024


class InvalidParameter(ValueError):
    """A sampling parameter outside its valid range; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings.

    temperature 0 means greedy (argmax); top_k 0 or -1 means no top-k cut. `logprobs` None returns no log
    probabilities; an integer n >= 0 returns the sampled token's log probability plus the n most likely ones.
    Log probabilities are those of the model's distribution before temperature, top-k and top-p.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Computed: the longest stop string, so that streaming can hold back text that may still become one.
    max_stop_chars: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # Everything a request can set is checked here, before the engine sees it: a value that fails inside
        # an iteration would fail it for every request in the batch. NaN fails every range check below.
        if self.max_tokens < 1:
            raise InvalidParameter("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidParameter("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidParameter("top_k", f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise InvalidParameter("seed", f"seed must be between {MIN_SEED} and {MAX_SEED}, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameter(
                "logprobs", f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidParameter(name, f"{name} must be in [-2, 2], got {value}")
        if any(not s for s in self.stop):
            raise InvalidParameter("stop", "stop strings must be non-empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameter(
                "stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"
            )
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidParameter(
                "stop", f"a stop string may hold at most {MAX_STOP_STRING_CHARS} characters"
            )
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidParameter("stop_token_ids", "stop_token_ids must be non-negative token ids")
        object.__setattr__(self, "max_stop_chars", max((len(s) for s in self.stop), default=0))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
