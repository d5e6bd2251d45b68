"""A loopback OpenAI-compatible server whose replies tests script, item by item.

A prompt names its item with a marker `[[item:ID]]` (put in the proof). `scripts[ID]` is a list
of actions, one per attempt (the last repeats): ("score", N) replies `<score>N</score>`;
("reply", text) replies with that text; ("status", code) fails with that HTTP status;
("status", (code, headers)) adds headers to it (Retry-After);
("hash", seconds) scores the prompt by its hash (0-7), after waiting that long;
("hang", seconds) waits before a valid reply (and drops the request if the client disconnects
first, as vLLM aborts abandoned requests); ("body", (content_type, text)) answers 200 with that
raw body, text or bytes (a reply that is not a completion: broken JSON, an HTML page, Latin-1);
("cut", text) replies with text that ran out of tokens (finish_reason "length", status
"incomplete"); ("reset", n) sends the first n bytes of a reply, then resets the connection;
("drip", seconds) sends a valid reply one byte every that many seconds. `models_body` replaces
GET /models's list with a raw body (content type, text). Counts requests per
item and peak concurrency. `hold_after` stops answering at a point the test chooses, so that a
test can act mid-batch (kill the client) without racing the client's progress; `switch_after`
changes every reply from such a point (a judge that starts failing mid-run).

Nothing here may make a prompt reply slow by accident, or a test's client timeout would fire on it:
connections are accepted from a deep backlog (a full one drops the client's SYN, which it resends
only after a second), and a hanging request blocks on its socket rather than polling it.
"""

import hashlib
import json
import re
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 fills up while many requests connect at once
    daemon_threads = True


class JudgeServer:
    def __init__(self, scripts=None, default=("score", 7), models_body=None):
        self.scripts = dict(scripts or {})
        self.default = default
        self.models_body = models_body  # (content type, text) GET /models answers with, 200; default: the API's list
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.by_prompt: dict[str, int] = {}  # requests per distinct prompt (by its sha256 digest)
        self.total = 0
        self.active = 0
        self.peak = 0
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.held: list[str] = []  # the prompts of the requests held (see `hold_after`)
        self._hold = None
        self._switch = None
        self.switched: list[str] = []  # the prompts answered by `switch_after`'s action (digests)
        self._released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.endswith("/models") and server.models_body:
                    self._json(200, server.models_body[1], server.models_body[0])
                elif self.path.endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": "judge", "object": "model",
                                                                  "created": 0, "owned_by": "test"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.active += 1
                    server.peak = max(server.peak, server.active)
                    server.auth.append(self.headers.get("Authorization"))
                    server.bodies.append(body)
                try:
                    prompt = self._prompt(body)
                    server._wait_if_held(prompt)
                    reply = self._reply(body, prompt)
                finally:
                    # Counted out before the reply leaves: once the client has it, its next request
                    # may arrive at once and must not find this one still counted.
                    with server.lock:
                        server.active -= 1
                if reply is not None:
                    self._json(*reply[:3], **reply[3] if len(reply) > 3 else {})

            def _prompt(self, body) -> str:
                if self.path.endswith("/chat/completions"):
                    return body["messages"][-1]["content"]
                return body["input"] if isinstance(body["input"], str) else json.dumps(body["input"])

            def _reply(self, body, prompt: str):
                """(status, payload[, content type]), or None when the client gave up while the request hung."""
                match = re.search(r"\[\[item:([\w-]+)\]\]", prompt)
                item = match.group(1) if match else "_"
                digest = _digest(prompt)
                with server.lock:
                    attempt = server.requests.get(item, 0)
                    server.requests[item] = attempt + 1
                    server.by_prompt[digest] = server.by_prompt.get(digest, 0) + 1
                    server.total += 1
                script = server.scripts.get(item, [server.default])
                kind, value = server._switched(digest) or script[min(attempt, len(script) - 1)]
                if kind == "status":
                    code, headers = value if isinstance(value, tuple) else (value, {})
                    return code, {"error": {"message": f"scripted {code}", "type": "server_error"}}, \
                        "application/json", {"headers": headers}
                if kind == "body":
                    content_type, text = value
                    return 200, text, content_type
                if kind in ("hang", "hash") and not self._wait_unless_abandoned(value):
                    return None  # the client gave up, as a real server notices and aborts
                if kind == "hang":
                    text = "<score>7</score>"
                elif kind == "hash":
                    text = f"<score>{int(digest, 16) % 8}</score>"
                elif kind == "score":
                    text = f"<assessment>fine</assessment><errors>none</errors><score>{value}</score>"
                elif kind in ("reset", "drip"):
                    text = "<score>7</score>"
                else:
                    text = value
                send = {"reset_after": value} if kind == "reset" else {"drip_s": value} if kind == "drip" else {}
                cut = kind == "cut"
                if self.path.endswith("/chat/completions"):
                    return 200, {
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "length" if cut else "stop",
                                     "message": {"role": "assistant", "content": text}}],
                    }, "application/json", send
                return 200, {
                    "id": "resp-1", "object": "response", "created_at": 0, "model": body["model"],
                    "status": "incomplete" if cut else "completed", "parallel_tool_calls": False,
                    "tool_choice": "auto", "tools": [],
                    **({"incomplete_details": {"reason": "max_output_tokens"}} if cut else {}),
                    "output": [{"type": "message", "id": "msg-1", "role": "assistant", "status": "completed",
                                "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                }, "application/json", send

            def _wait_unless_abandoned(self, seconds):
                """Waits `seconds`; False as soon as the client closes its end (it sends nothing more)."""
                end = time.monotonic() + seconds
                while (left := end - time.monotonic()) > 0:
                    readable, _, _ = select.select([self.connection], [], [], left)
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):
                        return False
                return True

            def _json(self, status, payload, content_type="application/json", headers=(), reset_after=None,
                      drip_s=None):
                data = payload if isinstance(payload, bytes) else (
                    payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for name in headers:
                        self.send_header(name, headers[name])
                    self.end_headers()
                    if reset_after is not None:  # part of the body, then a reset (RST, not a clean close)
                        self.wfile.write(data[:reset_after])
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        return
                    for i in range(len(data)) if drip_s is not None else ():
                        self.wfile.write(data[i:i + 1])
                        time.sleep(drip_s)
                    self.wfile.write(data if drip_s is None else b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a scripted hang past its timeout)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def hold_after(self, ready, answers: int) -> None:
        """From the first request that finds `ready()` true, let `answers` requests through, then
        hold every later one until `release`; `held` lists their prompts' digests, as `by_prompt`
        keys them, which count them (and `total`) once released. Once per server: `ready` runs
        under the server's lock, so it must not take it."""
        self._hold = {"ready": ready, "answers": answers, "let_through": None}

    def switch_after(self, ready, action) -> None:
        """From the first request that finds `ready()` true, answer every request with `action`
        (one of the scripts' actions) whatever its script says; `switched` lists their prompts'
        digests. `switch_after(None, None)` ends it. `ready` runs under the server's lock."""
        with self.lock:
            self._switch = None if ready is None else {"ready": ready, "action": action, "on": False}

    def _switched(self, digest: str):
        with self.lock:
            switch = self._switch
            if switch is None or not (switch["on"] or switch["ready"]()):
                return None
            switch["on"] = True
            self.switched.append(digest)
            return switch["action"]

    def release(self) -> None:
        """Answer the held requests (their client may be gone) and hold no more."""
        with self.lock:
            self._hold = None
        self._released.set()

    def _wait_if_held(self, prompt: str) -> None:
        with self.lock:
            hold = self._hold
            if hold is None:
                return
            if hold["let_through"] is None:
                if not hold["ready"]():
                    return
                hold["let_through"] = 0
            if hold["let_through"] < hold["answers"]:
                hold["let_through"] += 1
                return
            self.held.append(_digest(prompt))
        self._released.wait()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()
