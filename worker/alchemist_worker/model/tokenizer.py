"""A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library and the chat template through
jinja2, so serving needs neither `transformers` nor network access.

The template comes from `chat_template.jinja` (transformers 5) or the `chat_template` entry of
`tokenizer_config.json` (older checkpoints), and renders with the same variables HF passes (messages,
add_generation_prompt, bos_token, eos_token, raise_exception).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer directory that lacks or garbles what serving needs."""


def _special_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file} does not exist")
        self._tok = _HFTokenizer.from_file(str(tokenizer_file))
        config_file = path / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.bos_token = _special_token(config, "bos_token")
        self.eos_token = _special_token(config, "eos_token")
        self.pad_token = _special_token(config, "pad_token")
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # a list of named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(self.chat_template) if self.chat_template else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it throughout): a megabyte prompt then
        # takes seconds on a tokenizer thread without stalling the event loop and the engine's thread.
        (encoding,) = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts), as the checkpoint's template writes it."""
        if self._template is None:
            raise TokenizerError(
                "this tokenizer has no chat template (chat_template.jinja or tokenizer_config)"
            )
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )
