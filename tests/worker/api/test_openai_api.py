"""The HTTP API through the official openai client against a real server on a tiny checkpoint."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import openai
import pytest
from alchemist_worker.engine.serving_tokenizer import ServingTokenizer

from tests.worker.api.conftest import RunningWorker
from tests.worker.engine.conftest import hf_greedy

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_models(tiny_server: RunningWorker) -> None:
    client = tiny_server.client()
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_completion_equals_hf_greedy(tiny_server: RunningWorker, tiny_checkpoints: dict[str, Path]) -> None:
    prompt = [5, 17, 42, 99, 7]
    result = tiny_server.client().completions.create(model="tiny", prompt=prompt, max_tokens=9, **GREEDY)
    expected = hf_greedy(tiny_checkpoints["llama"], [prompt], 9)[0]
    tokenizer = ServingTokenizer.from_pretrained(tiny_checkpoints["llama"])
    assert result.choices[0].text == tokenizer.decode(expected)
    assert result.choices[0].finish_reason == "length"
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        5,
        9,
        14,
    )


def test_chat_streaming_matches_non_streaming(tiny_server: RunningWorker) -> None:
    client = tiny_server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)  # type: ignore[arg-type]
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and full.usage is not None
    assert chunks[-1].usage.completion_tokens == 12 == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_and_stop_string(tiny_server: RunningWorker) -> None:
    client = tiny_server.client()
    base = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, **GREEDY)
    text = base.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3].strip() or text[-2:]
    cut = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=16, stop=[stop], **GREEDY
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=16, stop=[stop], stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_logprobs(tiny_server: RunningWorker) -> None:
    client = tiny_server.client()
    result = client.completions.create(model="tiny", prompt="hello", max_tokens=4, logprobs=2, **GREEDY)
    lp = result.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(
        abs(max(top.values()) - chosen) < 1e-5
        for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_seeded_sampling_is_reproducible(tiny_server: RunningWorker) -> None:
    client = tiny_server.client()
    args = dict(model="tiny", prompt="Redis streams", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first = client.completions.create(**args)  # type: ignore[call-overload]
    second = client.completions.create(**args)  # type: ignore[call-overload]
    assert first.choices[0].text == second.choices[0].text


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(temperature=5.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(n=2), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(extra_body={"top_k": -5}), "top_k"),
        (dict(extra_body={"no_such_field": 1}), "no_such_field"),
        (dict(logprobs=50), "logprobs"),
    ],
)
def test_bad_parameters_are_400(tiny_server: RunningWorker, kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        tiny_server.client().completions.create(model="tiny", prompt="hi", **kwargs)  # type: ignore[call-overload]
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error"


def test_prompt_too_long_is_400(tiny_server: RunningWorker) -> None:
    client = tiny_server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[5] * 200, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[5] * 100, max_tokens=100)
    assert err.value.code == "context_length_exceeded"


def test_unknown_model_is_404(tiny_server: RunningWorker) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        tiny_server.client().chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.code == "model_not_found"


def test_malformed_json_and_missing_fields_are_openai_errors(tiny_server: RunningWorker) -> None:
    url = tiny_server.base_url + "/v1/chat/completions"
    response = httpx.post(
        url, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"
    response = httpx.post(url, json={"model": "tiny", "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = httpx.post(url, json={"model": "tiny"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_concurrent_requests_get_their_own_answers(tiny_server: RunningWorker) -> None:
    client = tiny_server.client()
    prompts = [[3 + i, 40 + 2 * i, 7, 90 - i] for i in range(8)]

    def ask(prompt: list[int]) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=10, **GREEDY).choices[0].text

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert len(set(alone)) > 1


def test_health_readiness_and_metrics(tiny_server: RunningWorker) -> None:
    tiny_server.client().completions.create(model="tiny", prompt="metrics", max_tokens=3)
    assert httpx.get(tiny_server.base_url + "/healthz").status_code == 200
    assert httpx.get(tiny_server.base_url + "/readyz").json() == {"status": "ready"}
    text = httpx.get(tiny_server.base_url + "/metrics").text
    for name in (
        "alchemist_time_to_first_token_seconds_count",
        "alchemist_inter_token_latency_seconds_count",
        "alchemist_queue_depth",
        "alchemist_running_batch_size",
        "alchemist_kv_blocks_used",
        "alchemist_generation_tokens_per_second",
        "alchemist_generation_tokens_total",
        "alchemist_records_evicted_total",
    ):
        assert name in text, name
    ttft = next(
        line for line in text.splitlines() if line.startswith("alchemist_time_to_first_token_seconds_count")
    )
    assert float(ttft.split()[-1]) >= 1
