"""CuPL-style descriptions from a language model behind any OpenAI-compatible chat endpoint.

Each class gets every question template (``Describe what a(n) {} looks like.`` ...), each
question ``answers_per_question`` answers. Every answer set is cached on disk under a key of the
endpoint, model, prompt and sampling settings, so a rerun, or a build that crashed half way, costs
nothing for what was already answered. Requests go ``concurrency`` at a time within a rate
limit, and are retried with exponential backoff on 429, 5xx and connection errors (honouring
``Retry-After``); other HTTP errors stop at once with the server's message.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bitstorm.atomic import write_json_atomic
from bitstorm.errors import ConfigError, DataError
from embeddings.classes import display_name
from embeddings.description_types import Descriptions

# The question templates of CuPL (Pratt et al., ICCV 2023) for generic object classes.
CUPL_QUESTIONS = (
    "Describe what a(n) {} looks like.",
    "How can you identify a(n) {}?",
    "What does a(n) {} look like?",
    "Describe an image from the internet of a(n) {}.",
    "A caption of an image of a(n) {}:",
)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitstorm" / "llm"


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to ask. ``from_env`` fills what flags leave open from the environment."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    answers_per_question: int = 10
    temperature: float = 0.99
    max_tokens: int = 80
    requests_per_minute: float = 600.0
    concurrency: int = 8  # requests in flight at once (each waits for its rate slot)
    max_retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    cache_dir: Path = DEFAULT_CACHE

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"LLM base URL {self.base_url!r} must start with http:// or https://")
        if not self.model:
            raise ConfigError("no LLM model: pass --llm-model or set BITSTORM_LLM_MODEL")
        for name in ("answers_per_question", "requests_per_minute", "timeout_s", "concurrency"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LLM {name} must be positive, got {getattr(self, name)}")
        if self.max_retries < 0 or self.backoff_s < 0:
            raise ConfigError("LLM max_retries and backoff_s must be >= 0")

    @classmethod
    def from_env(cls, **given: object) -> LLMConfig:
        """Flags win; then BITSTORM_LLM_* variables; then OPENAI_BASE_URL / OPENAI_API_KEY."""
        env = os.environ
        values = {key: value for key, value in given.items() if value is not None}
        values.setdefault(
            "base_url",
            env.get("BITSTORM_LLM_BASE_URL")
            or env.get("OPENAI_BASE_URL")
            or "https://api.openai.com/v1",
        )
        values.setdefault("model", env.get("BITSTORM_LLM_MODEL", ""))
        values.setdefault("api_key", env.get("BITSTORM_LLM_API_KEY") or env.get("OPENAI_API_KEY"))
        return cls(**values)  # type: ignore[arg-type]


class ChatClient:
    """A minimal chat-completions client: throttled, retried, cached."""

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.requests_sent = 0
        self._next_slot = 0.0
        self._slots = threading.Lock()  # the rate limit holds across concurrent requests

    def answers(self, prompt: str) -> list[str]:
        """``answers_per_question`` completions of ``prompt``, from the cache when there."""
        path = self._cache_path(prompt)
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))["answers"]
        answers = self._ask(prompt)
        write_json_atomic(path, {"prompt": prompt, "model": self.config.model, "answers": answers})
        return answers

    def _cache_path(self, prompt: str) -> Path:
        c = self.config
        key = json.dumps(
            [
                c.base_url.rstrip("/"),
                c.model,
                prompt,
                c.answers_per_question,
                c.temperature,
                c.max_tokens,
            ]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()
        return c.cache_dir / digest[:2] / f"{digest}.json"

    def _ask(self, prompt: str) -> list[str]:
        c = self.config
        body = json.dumps(
            {
                "model": c.model,
                "messages": [{"role": "user", "content": prompt}],
                "n": c.answers_per_question,
                "temperature": c.temperature,
                "max_tokens": c.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if c.api_key:
            headers["Authorization"] = f"Bearer {c.api_key}"
        url = c.base_url.rstrip("/") + "/chat/completions"
        problem = "no attempt made"
        for attempt in range(c.max_retries + 1):
            self._throttle()
            wait = c.backoff_s * 2**attempt
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=c.timeout_s) as response:
                    return _parse_choices(json.loads(response.read()))
            except urllib.error.HTTPError as error:
                detail = self._redacted(error.read().decode(errors="replace")[:300])
                if 300 <= error.code < 400:
                    raise ConfigError(
                        f"LLM endpoint {url} answered {error.code}, a redirect to "
                        f"{self._redacted(str(error.headers.get('Location')))}; redirects are "
                        "not followed (the API key would go with them): set base_url to the "
                        "final address"
                    ) from None
                if error.code not in RETRYABLE_STATUS:
                    raise ConfigError(
                        f"LLM endpoint {url} answered {error.code}: {detail}. "
                        "Check the base URL, model name and API key"
                    ) from None
                problem = f"HTTP {error.code}: {detail}"
                wait = _retry_after(error.headers.get("Retry-After"), wait)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                problem = f"connection failed: {getattr(error, 'reason', error)}"
            except (ValueError, KeyError, TypeError) as error:
                problem = f"malformed response: {error}"
            if attempt < c.max_retries:
                time.sleep(wait)
        raise DataError(f"LLM endpoint {url} failed {c.max_retries + 1} times; last: {problem}")

    def _redacted(self, text: str) -> str:
        """``text`` with the API key blanked: error bodies may echo the request's headers."""
        key = self.config.api_key
        return text.replace(key, "<api key>") if key else text

    def _throttle(self) -> None:
        """Wait for this request's slot: slots are 60 / requests_per_minute seconds apart,
        handed out in order whatever the number of threads asking."""
        with self._slots:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 60.0 / self.config.requests_per_minute
            self.requests_sent += 1
        if slot > now:
            time.sleep(slot - now)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib would resend the request, Authorization header and all,
    to whatever host the answer names."""

    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def question(template: str, class_name: str) -> str:
    """Fill a question template, choosing 'a' or 'an' where it says ``a(n)``."""
    name = display_name(class_name)
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.replace("a(n)", article).format(name)


def llm_descriptions(
    class_names: Sequence[str],
    config: LLMConfig,
    questions: Sequence[str] = CUPL_QUESTIONS,
    *,
    progress: bool = True,
) -> Descriptions:
    """Ask every question for every class, ``config.concurrency`` requests at a time within
    its rate limit; raw answers in class and question order, to be cleaned by the caller."""
    client = ChatClient(config)
    prompts = [(name, question(q, name)) for name in class_names for q in questions]
    bar = tqdm(
        total=len(prompts), desc="asking the language model", unit="prompt", disable=not progress
    )
    with bar, ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        futures = [pool.submit(client.answers, prompt) for _, prompt in prompts]
        for future in as_completed(futures):
            future.result()  # the first failure stops the build (answers so far are cached)
            bar.update()
    result: Descriptions = {}
    for (name, _), future in zip(prompts, futures, strict=True):
        result.setdefault(name, []).extend(future.result())
    return result


def load_questions(path: str | Path) -> list[str]:
    """Question templates from a text file, one per line, each with one ``{}``."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ConfigError(
            f"{path}: each question needs exactly one {{}} for the class name; bad: {bad[:3]}"
        )
    return templates


def _parse_choices(payload: dict) -> list[str]:
    answers = [choice["message"]["content"] for choice in payload["choices"]]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("no text in choices")
    return answers


def _retry_after(header: str | None, default: float) -> float:
    try:
        return max(0.0, float(header)) if header else default
    except ValueError:
        return default
