"""The official openai client against a real mull server and model."""

import openai
import pytest

MODEL = "smollm2-135m"


@pytest.fixture()
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)


def test_chat(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=16,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 16
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_chat_stream_matches_whole(client):
    request = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=16,
        seed=5,
    )
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **request
        )
    )
    text = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens >= 1
    whole = client.chat.completions.create(**request)
    assert whole.choices[0].message.content == text


def test_n_choices(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say a number."}],
        max_tokens=8,
        n=3,
        seed=1,
    )
    assert [c.index for c in response.choices] == [0, 1, 2]


def test_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = response.choices[0].logprobs.content
    assert content
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2


def test_completion(client):
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert response.choices[0].text
    assert response.usage.completion_tokens <= 5


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(
            model="missing", messages=[{"role": "user", "content": "x"}]
        )
    assert raised.value.body["param"] == "model"


def test_bad_parameter_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert raised.value.body["param"] == "temperature"


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_strategy_through_extra_body(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 3 + 4?"}],
        max_tokens=12,
        seed=2,
        extra_body={"decoding": {"strategy": "self_consistency", "samples": 3}},
    )
    decoding = response.model_extra["decoding"]
    assert decoding["strategy"] == "self_consistency"
    assert decoding["engine_tokens"]["generated"] >= response.usage.completion_tokens


def test_cautious_stream_through_extra_body(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a color."}],
            max_tokens=8,
            stream=True,
            extra_body={"decoding": {"strategy": "cautious", "max_trials": 2}},
        )
    )
    assert chunks[-1].model_extra["decoding"]["strategy"] == "cautious"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_bad_strategy_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"decoding": {"strategy": "self_consistency", "samples": 0}},
        )
    assert raised.value.body["param"] == "decoding.samples"
