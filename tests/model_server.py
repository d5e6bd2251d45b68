"""A loopback OpenAI-compatible model server (chat completions) whose completions tests script.

`reply(prompt, seed)` returns the completion text; it may block (a test holding a request open).
The reply's whitespace-separated words are its completion tokens; a reply without </think>
finishes with "length" (the model ran out of budget while reasoning), else with "stop".
With `split_reasoning`, the reply is served as vLLM's reasoning parser serves it: the text before
</think> in `reasoning_content`, the rest in `content`. Counts requests per (prompt, seed).
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


class ModelServer:
    def __init__(self, reply, split_reasoning: bool = False):
        self.reply, self.split_reasoning = reply, split_reasoning
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt, seed = body["messages"][-1]["content"], body.get("seed")
                with server.lock:
                    server.bodies.append(body)
                    server.requests[(prompt, seed)] = server.requests.get((prompt, seed), 0) + 1
                text = server.reply(prompt, seed)
                message = {"role": "assistant", "content": text}
                if server.split_reasoning and "</think>" in text:
                    reasoning, content = text.split("</think>", 1)
                    message = {"role": "assistant", "reasoning_content": reasoning, "content": content}
                payload = {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop" if "</think>" in text else "length",
                                 "message": message}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                              "total_tokens": len(prompt.split()) + len(text.split())},
                }
                data = json.dumps(payload).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client is gone (a test killed it)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
