"""Property: whatever JSON a client sends to /v1/completions or /v1/chat/completions, the answer is a 200 or a
4xx with an OpenAI error object, never a 5xx (nor an error inside a 200 stream).

Bodies mix plausible values with hostile ones in every field: integers far beyond 64 bits, NaN and infinities,
strings with lone surrogates, wrong types, nested junk and unknown keys. The app runs in-process over a real
engine on a tiny checkpoint with a short context, so a body that is accepted generates only a few tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alchemist_worker.api.metrics import ServingMetrics
from alchemist_worker.api.server import ServerState, build_app
from alchemist_worker.engine.engine_loop import EngineLoop
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.worker.engine.conftest import build_engine

MODEL = "tiny"
EXAMPLES = 80

surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
any_text = st.text(st.characters(exclude_categories=()) | surrogate, max_size=10)  # often a lone surrogate
scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
anything = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)


# Each field: (valid values, edge values). The edges are what broke or could break the server: out of range,
# beyond 64 bits, NaN and infinities, wrong types, lone surrogates.
token_id = st.integers(0, 255)
bad_token_id = st.sampled_from([-1, 256, 2**31, 2**63, 2**64])
nonfinite = st.sampled_from([float("nan"), float("inf"), -float("inf")])
SAMPLING: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "max_tokens": (st.integers(1, 6), st.sampled_from([0, -1, 2**63, 2**64, -(2**63)])),
    "temperature": (st.floats(0.0, 2.0), st.floats(2.0001, 1e300) | nonfinite | st.floats(max_value=-1e-9)),
    "top_p": (st.floats(0.01, 1.0), st.sampled_from([0.0, -0.5, 1.5]) | nonfinite),
    "top_k": (st.integers(-1, 256), st.sampled_from([-2, 257, 10**12, 2**63, 2**64])),
    "seed": (st.integers(-(2**63), 2**64 - 1), st.sampled_from([2**64, -(2**63) - 1, 10**30])),
    "stop": (
        st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), max_size=4),
        st.lists(any_text, min_size=5, max_size=6) | any_text.filter(lambda t: not t.isascii()) | st.just(""),
    ),
    "stop_token_ids": (st.lists(token_id, max_size=3), st.lists(bad_token_id, min_size=1, max_size=2)),
    "presence_penalty": (st.floats(-2.0, 2.0), st.floats(2.0001, 1e300) | nonfinite),
    "frequency_penalty": (st.floats(-2.0, 2.0), st.floats(-1e300, -2.0001) | nonfinite),
    "n": (st.just(1), st.integers(-1, 3).filter(lambda n: n != 1)),
    "stream": (st.booleans(), st.integers(2, 5)),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"x": 1})),
    "ignore_eos": (st.booleans(), st.just("yes please")),
    "user": (st.text(max_size=8), any_text),
    "record": (st.booleans() | st.none(), st.just([])),
    "logit_bias": (st.just({}), st.dictionaries(any_text, st.floats(), min_size=1, max_size=2)),
}
COMPLETION_FIELDS = {
    **SAMPLING,
    "prompt": (
        st.text(min_size=1, max_size=12) | st.lists(token_id, min_size=1, max_size=6),
        any_text | st.lists(bad_token_id, min_size=1) | st.lists(any_text, max_size=3) | st.just([]),
    ),
    "logprobs": (st.integers(0, 5), st.sampled_from([-1, 21, 2**64])),
    "echo": (st.just(False), st.just(True)),
    "best_of": (st.just(1), st.integers(0, 3).filter(lambda n: n != 1)),
    "suffix": (st.just(""), st.text(min_size=1, max_size=5)),
}
role = st.sampled_from(["system", "user", "assistant"])
message = st.fixed_dictionaries({"role": role, "content": st.text(max_size=12)})
bad_message = st.fixed_dictionaries(
    {},
    optional={
        "role": role | any_text,
        "content": any_text
        | st.lists(st.fixed_dictionaries({"type": any_text, "text": any_text}), max_size=2),
        "name": any_text,
    },
)
CHAT_FIELDS = {
    **SAMPLING,
    "messages": (st.lists(message, min_size=1, max_size=3), st.lists(bad_message, max_size=3)),
    "max_completion_tokens": (st.integers(1, 6), st.sampled_from([0, -5, 2**64])),
    "logprobs": (st.booleans(), st.just("true")),
    "top_logprobs": (st.integers(0, 5), st.sampled_from([-1, 21, 2**64])),
    "response_format": (st.just({"type": "text"}), st.fixed_dictionaries({"type": any_text})),
}
REQUIRED = ("model", "prompt", "messages")


def bodies(
    fields: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]],
) -> st.SearchStrategy[Any]:
    """Valid bodies; a valid body with one field at an edge value, or set to any JSON at all; a valid body with
    unknown keys; and any JSON at all."""
    required = {name: valid for name, (valid, _) in fields.items() if name in REQUIRED}
    valid = st.fixed_dictionaries(
        {"model": st.just(MODEL), **required},
        optional={name: valid for name, (valid, _) in fields.items() if name not in REQUIRED},
    )
    names = sorted(fields)
    one_edge = st.tuples(valid, st.sampled_from(names)).flatmap(
        lambda vn: fields[vn[1]][1].map(lambda edge: {**vn[0], vn[1]: edge})
    )
    one_garbled = st.tuples(valid, st.sampled_from([*names, "model"]), anything).map(
        lambda t: {**t[0], t[1]: t[2]}
    )
    unknown_keys = st.tuples(valid, st.dictionaries(any_text, anything, min_size=1, max_size=2)).map(
        lambda t: {**t[1], **t[0]}
    )
    return st.one_of(valid, one_edge, one_garbled, unknown_keys, anything)


completion_bodies = bodies(COMPLETION_FIELDS)
chat_bodies = bodies(CHAT_FIELDS)


@pytest.fixture(scope="module")
def api(tiny_checkpoints: dict[str, Path]) -> Iterator[TestClient]:
    engine = build_engine(tiny_checkpoints["llama"], served_model_name=MODEL, max_model_len=40)
    loop = EngineLoop(engine, idle_wait_s=0.01)
    loop.start()
    yield TestClient(build_app(ServerState(loop, ServingMetrics(loop))), raise_server_exceptions=False)
    loop.stop()


def check(api: TestClient, path: str, payload: Any) -> None:
    content = json.dumps(payload)  # NaN and Infinity as Python writes them; surrogates as \u escapes
    response = api.post(path, content=content, headers={"content-type": "application/json"})
    event(f"status {response.status_code}")  # --hypothesis-show-statistics: how many got through
    assert response.status_code < 500, (payload, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert '"server_error"' not in response.text, (payload, response.text)
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()["choices"], payload


PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@PROPERTY
@given(payload=completion_bodies)
@example(payload={"model": MODEL, "prompt": "a\ud800b", "max_tokens": 2})
@example(payload={"model": MODEL, "prompt": "hi", "seed": 2**64, "temperature": 1.0})
@example(payload={"model": MODEL, "prompt": "hi", "top_k": 10**12, "top_p": 0.5})
def test_completions_never_answer_5xx(api: TestClient, payload: Any) -> None:
    check(api, "/v1/completions", payload)


@PROPERTY
@given(payload=chat_bodies)
@example(payload={"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}], "seed": -(2**63) - 1})
def test_chat_completions_never_answer_5xx(api: TestClient, payload: Any) -> None:
    check(api, "/v1/chat/completions", payload)
