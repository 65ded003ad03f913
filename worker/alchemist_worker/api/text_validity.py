"""Request text must be Unicode that UTF-8 can encode, checked before anything reads it.

JSON allows an escaped lone surrogate ("\\ud800"), and Python decodes it into a `str` that no UTF-8 codec
accepts: the tokenizer raises a TypeError, the chat template's output cannot be tokenized, and a response that
quotes it cannot be encoded. So every string of a request body (prompt, messages, stop strings, even field
names) is checked up front, and one that fails is a 400 naming where it is, never a 500 from deep inside.
"""

from __future__ import annotations

from alchemist_worker.api.errors import bad_request
from pydantic import BaseModel


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def invalid_text_at(value: object, path: str = "") -> str | None:
    """The dotted path of the first string in `value` (nested dicts and lists) UTF-8 cannot encode, or None.

    A bad dict key is reported at the dict's own path, since the key itself cannot be quoted."""
    if isinstance(value, str):
        return None if _encodable(value) else path or "body"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _encodable(key):
                return path or "body"
            found = invalid_text_at(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = invalid_text_at(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


def reject_invalid_text(body: BaseModel) -> None:
    """Raises a 400 `APIError` (code invalid_text) naming the first field of `body` that holds invalid text."""
    path = invalid_text_at(body.model_dump())
    if path is not None:
        raise bad_request(
            f"{path} is not valid Unicode text: it holds a lone surrogate (such as \\ud800), which UTF-8 cannot "
            "encode; send well-formed text",
            param=path,
            code="invalid_text",
        )
