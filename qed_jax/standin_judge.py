"""An offline stand-in for the judge, NOT a judge: a loopback OpenAI-compatible server (chat
completions) that marks by a fixed rule without reading the proof, so that `qed-jax pipeline`
runs end to end on a laptop with no judge model. Its numbers say nothing about proof quality.

The rule is the tiny GRPO task's (`closes_thinking`): full marks for every proof it is sent. The
judge client sends no completion without `</think>` or with nothing after it (those score 0
unsent), so a proof benchmark's score becomes 7 x the fraction of samples that closed their
reasoning and wrote an answer. A final answer it always calls Incorrect: math-verify has decided
every answer it could before the judge is asked, and the stand-in cannot decide the rest.

It replies in the format the grading prompt asks for: the last of `<points>`, `<score>`,
`<verdict>` that the prompt names (every judge template ends with its answer format).

It serves one model name, STANDIN_MODEL, and refuses any other (HTTP 404), so that its grades are
always recorded and cached under that name, never as a real judge's (whose grade cache a later
run may share). To try `qed-jax eval` or `qed-jax grpo` offline, serve it on its own until Ctrl-C:

    python -m qed_jax.standin_judge --port 8000
    # then judge.base_url=http://127.0.0.1:8000/v1 judge.model=qed-jax-standin-judge
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qed_jax.judge import MAX_SCORE

# The only model name it answers to.
STANDIN_MODEL = "qed-jax-standin-judge"
REPLIES = {
    "points": f"Offline stand-in judge (not a real judge). <points>{MAX_SCORE} out of 7</points>",
    "score": f"<assessment>offline stand-in judge, not a real judge</assessment><errors>not checked</errors>"
             f"<score>{MAX_SCORE}</score>",
    "verdict": "Offline stand-in judge (not a real judge). <verdict>Incorrect</verdict>",
}
_FORMAT_TAG = re.compile(r"<(points|score|verdict)>")


def reply_for(prompt: str) -> str:
    """The stand-in's reply to a grading prompt: the mark of its rule, in the asked format."""
    formats = _FORMAT_TAG.findall(prompt)
    return REPLIES[formats[-1] if formats else "score"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the judge client opens up to judge.concurrency connections at once

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client that stopped (its run failed) mid-reply
            return
        super().handle_error(request, client_address)


class StandinJudge:
    """`with StandinJudge() as judge:` serves at `judge.url` (an OpenAI base URL on 127.0.0.1, a
    free port) until the block ends; `judge.requests` counts the grading requests it answered."""

    def __init__(self, port: int = 0):
        self.requests = 0
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.endswith("/models"):
                    self._json(200, {"object": "list", "data": [
                        {"id": STANDIN_MODEL, "object": "model", "created": 0, "owned_by": "qed-jax"}]})
                else:
                    self._json(404, {"error": {"message": f"no such path {self.path}"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if len(raw) < length:  # the client left mid-request (its run stopped): no one to answer
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._json(400, {"error": {"message": "the request body is not JSON"}})
                    return
                if not self.path.endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "the stand-in judge serves chat completions only "
                                                          "(judge.api: chat)"}})
                    return
                if body.get("model") != STANDIN_MODEL:
                    self._json(404, {"error": {"message": f"the stand-in judge serves model {STANDIN_MODEL} only, so "
                                                          "that its grades are never cached as a real judge's; set "
                                                          f"judge.model={STANDIN_MODEL}"}})
                    return
                with standin.lock:
                    standin.requests += 1
                message = {"role": "assistant", "content": reply_for(body["messages"][-1]["content"])}
                self._json(200, {"id": "standin", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": message}]})

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "StandinJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qed_jax.standin_judge",
                                     description="Serve the offline stand-in judge (NOT a judge: full marks for every "
                                                 "proof it is sent) on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--port", type=int, default=8000, help="the port to serve on (default 8000; 0: a free one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        judge = StandinJudge(args.port)
    except OSError as e:
        print(f"stand-in judge: cannot serve on 127.0.0.1:{args.port}: {e.strerror or e}; choose another --port",
              file=sys.stderr)
        return 2
    # Ctrl-C stops it even where it was started with SIGINT ignored (a background job of a
    # script, a test runner's worker): Python then leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with judge:
        print(f"stand-in judge (not a real judge) at {judge.url}: set judge.base_url={judge.url} "
              f"judge.model={STANDIN_MODEL}; Ctrl-C stops it", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print(f"stand-in judge: stopped after {judge.requests} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
