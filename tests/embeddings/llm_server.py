"""A small OpenAI-compatible chat-completions server on loopback, for real HTTP round trips."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Behaviour:
    """What the server does: fail the first ``failures`` requests with ``fail_status``."""

    failures: int = 0
    fail_status: int = 503
    retry_after: str | None = None
    redirect_to: str | None = None  # answer every request with a 302 to this URL
    echo_headers: bool = False  # failing answers carry the request's headers in their body
    delay_s: float = 0.0  # how long each answer takes
    in_flight: int = 0
    most_in_flight: int = 0  # the most requests it held at once
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)


def answer(prompt: str, i: int) -> str:
    """Deterministic, messy answers: stray spaces, a lone "." and a duplicate, like real output."""
    if i == 1:
        return "."
    if i == 2:
        return f"  {prompt} -> answer 0  "
    return f"{prompt} -> answer {i}"


@contextmanager
def chat_server(behaviour: Behaviour) -> Iterator[str]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            behaviour.requests.append(body)
            # lower-cased: urllib sends "Authorization", httpx (the openai SDK) "authorization"
            behaviour.headers.append({k.lower(): v for k, v in self.headers.items()})
            if behaviour.redirect_to:
                return self._send(302, {}, {"Location": behaviour.redirect_to})
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": "no such route"})
            if len(behaviour.requests) <= behaviour.failures:
                extra = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
                error = {"error": "busy"}
                if behaviour.echo_headers:
                    error["your_headers"] = dict(self.headers)
                return self._send(behaviour.fail_status, error, extra)
            with lock:
                behaviour.in_flight += 1
                behaviour.most_in_flight = max(behaviour.most_in_flight, behaviour.in_flight)
            time.sleep(behaviour.delay_s)
            with lock:
                behaviour.in_flight -= 1
            prompt = body["messages"][0]["content"]
            choices = [
                {"index": i, "message": {"role": "assistant", "content": answer(prompt, i)}}
                for i in range(body.get("n", 1))
            ]
            return self._send(200, {"object": "chat.completion", "choices": choices})

        def _send(self, status, payload, headers=None):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
