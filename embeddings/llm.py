"""CuPL-style descriptions from a language model behind any OpenAI-compatible chat endpoint.

Each class gets every question template (``Describe what a(n) {} looks like.`` ...), each
question ``answers_per_question`` answers. Every answer set is cached on disk under a key of the
endpoint, model, prompt and sampling settings, so a rerun, or a build that crashed half way, costs
nothing for what was already answered. Requests go ``concurrency`` at a time within a rate
limit, and are retried with exponential backoff on 429, 5xx and connection errors (honouring
``Retry-After``); other HTTP errors stop at once with the server's message.

Two clients send them, chosen by ``client``: the openai SDK where it is installed (the
``openai`` extra: its own retries and ``OPENAI_*`` variables such as ``OPENAI_ORG_ID``), else
a built-in urllib one. Neither follows a redirect, which would carry the API key to another
host.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from tqdm.auto import tqdm

from bitstorm.atomic import write_json_atomic
from bitstorm.errors import ConfigError, DataError
from bitstorm.logs import get_logger
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
CLIENTS = ("auto", "openai", "urllib")
log = get_logger(__name__)
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
    backoff_s: float = 1.0  # urllib's first wait; the SDK backs off on its own schedule
    timeout_s: float = 60.0
    cache_dir: Path = DEFAULT_CACHE
    client: str = "auto"  # openai (the SDK), urllib (built in), auto: openai where installed

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
        if self.client not in CLIENTS:
            raise ConfigError(f"LLM client {self.client!r}: choose one of {', '.join(CLIENTS)}")
        if self.client == "openai" and not _has_openai():
            raise ConfigError("LLM client openai: pip install 'bitstorm[openai]'")

    @classmethod
    def from_env(cls, **given: object) -> LLMConfig:
        """Flags win; then BITSTORM_LLM_* variables (``_CLIENT`` too); then OPENAI_BASE_URL /
        OPENAI_API_KEY."""
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
        values.setdefault("client", env.get("BITSTORM_LLM_CLIENT", "auto"))
        return cls(**values)  # type: ignore[arg-type]


class ChatClient:
    """A chat-completions client: throttled, retried, cached, over the openai SDK or urllib."""

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.requests_sent = 0
        self._next_slot = 0.0
        self._slots = threading.Lock()  # the rate limit holds across concurrent requests
        use_sdk = config.client == "openai" or (config.client == "auto" and _has_openai())
        self.client = "openai" if use_sdk else "urllib"
        self._sdk = _openai_client(config, self._throttle) if use_sdk else None

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

    def _request(self, prompt: str) -> dict:
        c = self.config
        return {
            "model": c.model,
            "messages": [{"role": "user", "content": prompt}],
            "n": c.answers_per_question,
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
        }

    def _ask(self, prompt: str) -> list[str]:
        return self._ask_sdk(prompt) if self._sdk is not None else self._ask_urllib(prompt)

    def _ask_sdk(self, prompt: str) -> list[str]:
        """One request through the SDK, which retries 408, 409, 429, 5xx and connection errors
        itself (``max_retries``, honouring ``Retry-After``), each attempt within the rate limit;
        its errors become bitstorm's."""
        import openai

        url = self._url()
        try:
            completion = self._sdk.chat.completions.create(**self._request(prompt))
        except openai.APIStatusError as error:
            status = error.status_code
            detail = self._redacted(error.response.text[:300])
            if 300 <= status < 400:
                self._refuse_redirect(url, status, error.response.headers.get("location"))
            if status not in RETRYABLE_STATUS:
                self._refuse_status(url, status, detail)
            self._give_up(url, f"HTTP {status}: {detail}")
        except openai.APIConnectionError as error:
            self._give_up(url, f"connection failed: {error.__cause__ or error}")
        try:
            return _parse_choices(completion.model_dump())
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"LLM endpoint {url}: malformed response: {error}") from None

    def _ask_urllib(self, prompt: str) -> list[str]:
        c = self.config
        body = json.dumps(self._request(prompt)).encode()
        headers = {"Content-Type": "application/json"}
        if c.api_key:
            headers["Authorization"] = f"Bearer {c.api_key}"
        url = self._url()
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
                    self._refuse_redirect(url, error.code, error.headers.get("Location"))
                if error.code not in RETRYABLE_STATUS:
                    self._refuse_status(url, error.code, detail)
                problem = f"HTTP {error.code}: {detail}"
                wait = _retry_after(error.headers.get("Retry-After"), wait)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                problem = f"connection failed: {getattr(error, 'reason', error)}"
            except (ValueError, KeyError, TypeError) as error:
                problem = f"malformed response: {error}"
            if attempt < c.max_retries:
                time.sleep(wait)
        self._give_up(url, problem)

    def _url(self) -> str:
        return self.config.base_url.rstrip("/") + "/chat/completions"

    def _refuse_redirect(self, url: str, status: int, location: str | None) -> NoReturn:
        raise ConfigError(
            f"LLM endpoint {url} answered {status}, a redirect to "
            f"{self._redacted(str(location))}; redirects are not followed (the API key would go "
            "with them): set base_url to the final address"
        ) from None

    def _refuse_status(self, url: str, status: int, detail: str) -> NoReturn:
        raise ConfigError(
            f"LLM endpoint {url} answered {status}: {detail}. "
            "Check the base URL, model name and API key"
        ) from None

    def _give_up(self, url: str, problem: str) -> NoReturn:
        raise DataError(
            f"LLM endpoint {url} failed {self.config.max_retries + 1} times; last: {problem}"
        ) from None

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


def _has_openai() -> bool:
    return importlib.util.find_spec("openai") is not None


def _openai_client(config: LLMConfig, throttle: Callable[[], None]):
    """The SDK's client for ``config``, on an HTTP client that follows no redirect (the SDK's
    own follows them) and waits for ``throttle`` before every attempt, the SDK's retries
    included. A keyless local server (vLLM, Ollama) gets a placeholder key, which the SDK
    insists on."""
    import openai

    return openai.OpenAI(
        base_url=config.base_url,
        api_key=config.api_key or "no-key",
        max_retries=config.max_retries,
        timeout=config.timeout_s,
        http_client=openai.DefaultHttpxClient(
            follow_redirects=False, event_hooks={"request": [lambda _request: throttle()]}
        ),
    )


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
    log.info("asking %s at %s through the %s client", config.model, config.base_url, client.client)
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
