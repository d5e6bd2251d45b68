"""The judge against a scripted loopback OpenAI-compatible server."""

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import stat
import sqlite3
import struct
import subprocess
import sys
import threading
import time

import pytest

from qed_jax import cli
from qed_jax.config import ConfigError, load_config, load_template
from qed_jax.judge import (BadReply, Judge, JudgeConfig, JudgeUnavailable, GradeItem, extract_proof, item_from_row,
                           RuleGrader, on_this_machine, parse_score, render_marking_scheme, render_prompt,
                           text_to_grade)
from tests.helpers import REPO, score_grader
from tests.judge_server import JudgeServer

ALL = set(range(8))
# A scripted hang lasts until the client gives up, however slowly a loaded machine runs the test.
NEVER = 3600.0


def _config(server, tmp_path, **overrides):
    # The timeout is far beyond any reply the server does not hang on purpose: a loaded machine
    # must not turn a prompt reply into a timeout and an extra attempt.
    base = dict(base_url=server.url, model="judge", concurrency=8, timeout_s=60.0, max_retries=2,
                backoff_s=0.05, parse_retries=1, cache_path=str(tmp_path / "cache.sqlite"))
    return JudgeConfig(**{**base, **overrides})


def _item(i, score_hint=""):
    return GradeItem(problem=f"Problem {i}", rubric="Full marks for a proof.",
                     completion=f"thinking...</think>Proof {score_hint} [[item:i{i}]]")


def _chaos_scripts():
    """216 items: 20 % HTTP 500, 20 % 429, 5 % 400, 10 % malformed replies, 16 replies that are not
    completions; no reply is slow, so nothing here depends on how fast the machine runs. Returns
    scripts and the expected (score or None, reason, attempts) per item."""
    scripts, expected = {}, {}
    not_completions = [("application/json", '{"choices": [ this is not json'), ("text/html", "<html>502</html>"),
                       ("application/json", '{"id": "x"}'), ("application/json", '{"id": "x", "choices": []}')]
    for i in range(216):
        k = i % 8
        if i < 20:  # 500 once, then fine
            scripts[f"i{i}"], expected[i] = [("status", 500), ("score", k)], (k, "ok", 2)
        elif i < 40:  # 500 for good
            scripts[f"i{i}"], expected[i] = [("status", 500)], (None, "http_500", 3)
        elif i < 60:  # 429 twice, then fine
            scripts[f"i{i}"], expected[i] = [("status", 429), ("status", 429), ("score", k)], (k, "ok", 3)
        elif i < 70:  # 429 for good
            scripts[f"i{i}"], expected[i] = [("status", 429)], (None, "http_429", 3)
        elif i < 80:  # a malformed request is not retried
            scripts[f"i{i}"], expected[i] = [("status", 400), ("score", k)], (None, "http_400", 1)
        elif i < 88:  # malformed once, then fine
            scripts[f"i{i}"], expected[i] = [("reply", "I think it deserves a 5."), ("score", k)], (k, "ok", 2)
        elif i < 94:  # out of range for good
            scripts[f"i{i}"], expected[i] = [("reply", "<score>9</score>")], (None, "score_not_allowed", 2)
        elif i < 100:  # no tag at all, for good
            scripts[f"i{i}"], expected[i] = [("reply", "Score: seven")], (None, "parse_failure", 2)
        elif i >= 208:  # not a completion, for good: retried like a 5xx
            scripts[f"i{i}"], expected[i] = [("body", not_completions[i % 4])], (None, "bad_reply", 3)
        elif i >= 200:  # not a completion once, then fine
            scripts[f"i{i}"], expected[i] = [("body", not_completions[i % 4]), ("score", k)], (k, "ok", 2)
        else:
            scripts[f"i{i}"], expected[i] = [("score", k)], (k, "ok", 1)
    return scripts, expected


def test_chaos_batch_ends_with_scripted_scores_or_explicit_failures(tmp_path):
    scripts, expected = _chaos_scripts()
    with JudgeServer(scripts) as server:
        judge = Judge(_config(server, tmp_path))
        grades = judge.grade_batch([_item(i) for i in range(216)])
    assert len(grades) == 216
    for i, grade in enumerate(grades):
        score, reason, attempts = expected[i]
        assert (grade.score, grade.reason, grade.attempts) == (score, reason, attempts), i
        assert grade.reward == (0.0 if score is None else score / 7)
        assert server.requests[f"i{i}"] == attempts, i  # nothing lost, nothing sent twice
    assert server.peak <= 8


def test_a_failed_grade_keeps_its_last_attempts_reply_or_error(tmp_path):
    """A failed grade's raw (the judge command's judge_reply) is what its last attempt got: not an
    earlier attempt's reply, and the server's error message when that was an error."""
    scripts = {"a": [("reply", "I think it deserves five points"), ("status", 500)], "b": [("status", 500)],
               "c": [("status", 400)], "d": [("status", 500), ("reply", "Score: seven")]}
    with JudgeServer(scripts) as server:
        grades = Judge(_config(server, tmp_path, max_retries=1, parse_retries=1)).grade_batch(
            [GradeItem(problem="P", proof=f"Proof [[item:{name}]]") for name in scripts])
    assert [(g.reason, g.attempts) for g in grades] == [("http_500", 3), ("http_500", 2), ("http_400", 1),
                                                        ("parse_failure", 3)]
    assert [g.raw for g in grades] == ["Error code: 500 - scripted 500"] * 2 + ["Error code: 400 - scripted 400",
                                                                                "Score: seven"]


def test_hung_requests_time_out_and_are_retried(tmp_path):
    # The server holds a hung request until the client drops it, so each hang is a timeout
    # whatever the load; only the prompt reply after it must beat the (small) client timeout.
    scripts = {"once": [("hang", NEVER), ("score", 5)], "always": [("hang", NEVER)]}
    items = [GradeItem(problem=f"Problem {name}", completion=f"x</think>Proof [[item:{name}]]")
             for name in ("once", "always")]
    with JudgeServer(scripts) as server:
        grades = Judge(_config(server, tmp_path, timeout_s=2.0)).grade_batch(items)
    assert [(g.score, g.reason, g.attempts) for g in grades] == [(5, "ok", 2), (None, "timeout", 3)]
    assert server.requests == {"once": 2, "always": 3}
    assert server.peak >= 2  # both hung at once: the items were graded concurrently


@pytest.mark.parametrize("cached", [True, False])
def test_identical_proofs_in_a_batch_are_graded_once(tmp_path, cached):
    # A second request for a proof would get the second scripted score.
    scripts = {name: [("score", first), ("score", 0)] for name, first in (("a", 3), ("b", 5), ("c", 7))}
    names = ["a", "b", "a", "c", "a", "b", "c", "c", "a", "b"]
    items = [GradeItem(problem="Problem", completion=f"x</think>Proof [[item:{name}]]") for name in names]
    seen = []
    with JudgeServer(scripts) as server:
        config = _config(server, tmp_path, cache_path=str(tmp_path / "cache.sqlite") if cached else None)
        grades = Judge(config).grade_batch(items, on_grade=lambda i, grade: seen.append((i, grade)))
    assert server.requests == {"a": 1, "b": 1, "c": 1}
    assert [g.score for g in grades] == [{"a": 3, "b": 5, "c": 7}[name] for name in names]
    assert len({id(g) for g in grades}) == len(names) and sorted(seen, key=lambda x: x[0]) == list(enumerate(grades))


def test_a_change_in_how_replies_are_read_or_prompts_rendered_asks_again(tmp_path, monkeypatch):
    """A cached grade stands for its prompt as sent and its reply as read: grades cached before a
    fix to either (a mark quoted in the judge's thinking read as its grade) are not reused."""
    from qed_jax import judge

    scripts = {"p": [("score", 7), ("score", 1), ("score", 2)]}
    item = GradeItem(problem="P", completion="x</think>Proof [[item:p]]", rubric="Two checkpoints")
    with JudgeServer(scripts) as server:
        config = _config(server, tmp_path)
        assert [g.score for g in Judge(config).grade_batch([item] * 2)] == [7, 7] and server.requests == {"p": 1}
        monkeypatch.setattr(judge, "GRADE_READING", judge.GRADE_READING + 1)
        assert Judge(config).grade_batch([item])[0].score == 1 and server.requests == {"p": 2}
        monkeypatch.setattr(judge, "render_marking_scheme", lambda scheme: f"Scheme: {scheme}")
        assert Judge(config).grade_batch([item])[0].score == 2 and server.requests == {"p": 3}


def test_a_cache_path_at_a_url_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^judge.cache_path must be a local file \(SQLite\), got gs://b/j.sqlite; "):
        JudgeConfig(cache_path="gs://b/j.sqlite")
    assert not (tmp_path / "gs:").exists()


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_max_failed_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ConfigError, match="judge.max_failed_fraction must be between 0 and 1"):
        JudgeConfig(max_failed_fraction=fraction)


def test_rerun_sends_no_request_and_returns_identical_grades(tmp_path):
    scripts = {f"i{i}": [("score", i % 8)] for i in range(100)}
    with JudgeServer(scripts) as server:
        first = Judge(_config(server, tmp_path)).grade_batch([_item(i) for i in range(100)])
        sent = server.total
        second = Judge(_config(server, tmp_path)).grade_batch([_item(i) for i in range(100)])
        assert server.total == sent == 100
        assert server.peak <= 8  # judge.concurrency
    assert [(g.score, g.reason, g.raw) for g in first] == [(g.score, g.reason, g.raw) for g in second]
    assert all(g.cached for g in second) and not any(g.cached for g in first)


def test_completion_without_think_end_is_not_sent(tmp_path):
    with JudgeServer() as server:
        grades = Judge(_config(server, tmp_path)).grade_batch(
            [GradeItem(problem="P", completion="I ran out of tokens while thinking [[item:x]]")])
        assert server.total == 0
    assert (grades[0].score, grades[0].reward, grades[0].reason) == (0, 0.0, "no_think_end")


@pytest.mark.parametrize("reply,fmt,allowed,expected", [
    ("<score>5</score>", "score", ALL, 5),
    ("  <score> 6 </score>\n", "score", ALL, 6),
    ("Assessment... <SCORE>3</SCORE> trailing words", "score", ALL, 3),
    ("<score>2</score> on reflection <score>4</score>", "score", ALL, 4),  # the last tag wins
    ("<score>8</score>", "score", ALL, None),  # out of range
    ("<score>-1</score>", "score", ALL, None),
    ("<score>5", "score", ALL, None),  # not well-formed
    ("<score>five</score>", "score", ALL, None),
    ("<score>3</score> then <score>12</score>", "score", ALL, None),  # last tag rejected, not skipped
    ("<think>A full proof would get <score>7</score>; step 3 fails.</think>\n<score>1</score>", "score", ALL, 1),
    ("<think>Complete, so <points>7 out of 7</points>? No: a gap.</think> I mark it 1.", "points", ALL, None),
    ("<score>" + "9" * 5000 + "</score>", "score", ALL, None),  # no crash on a number int() will not read
    ("<score>**6**</score>", "score", ALL, 6),  # Markdown around the mark
    ("<score> *5* </score>", "score", ALL, 5),
    ("<score>7/7</score>", "score", ALL, 7),  # out of 7
    ("<score>**3 / 7**</score>", "score", ALL, 3),
    ("<score>3.5</score>", "score", ALL, None),  # off the integer scale
    ("<score>5/10</score>", "score", ALL, None),  # another scale
    # The last tag is the judge's last word even when it holds no mark: not an earlier one it weighed.
    ("A complete proof would earn <score>7</score>; Lemma 2 has a gap.\n<score>3.5</score>", "score", ALL, None),
    ("Had Lemma 2 been proved, <score>7</score>. It was not: <score>two</score>", "score", ALL, None),
    ("<score>**2**/7</score>", "score", ALL, 2),  # Markdown around the mark, then out of 7
    ("<points>**6** out of 7</points>", "points", {0, 1, 6, 7}, 6),
    ("<score>**6** out of 10</score>", "score", ALL, None),
    ("<score>6" + "*" * 50_000 + "x</score>", "score", ALL, None),  # read in linear time
    ("<points>7 out of 7</points> needs case 2; <points>1 out of 7 (partial)</points>", "points", ALL, None),
    ("<verdict>Correct</verdict> only with the sign; so <verdict>Partially correct</verdict>", "verdict", ALL, None),
    ("<score><score>5</score>", "score", ALL, 5),  # an unclosed tag is no tag
    ("<score>\n**6**\n</score>", "score", ALL, 6),
    ("<score>" * 20_000, "score", ALL, None),  # read in linear time
    ("<score>" + " " * 50_000 + "x</score>", "score", ALL, None),  # read in linear time
    ("<points>**6/7**</points>", "points", {0, 1, 6, 7}, 6),
    ("", "score", ALL, None),
    ("<points>6 out of 7</points>", "points", {0, 1, 6, 7}, 6),
    ("<points>3 out of 7</points>", "points", {0, 1, 6, 7}, None),  # not an allowed IMO mark
    ("<points> 7 OUT OF 7 </points>", "points", {0, 1, 6, 7}, 7),
    ("<verdict>Correct</verdict>", "verdict", ALL, 7),
    ("<verdict> incorrect </verdict>", "verdict", ALL, 0),
    ("The answer is correct.", "verdict", ALL, None),
])
def test_parse_score_table(reply, fmt, allowed, expected):
    assert parse_score(reply, fmt, allowed) == expected


def test_proof_extraction():
    assert extract_proof("a</think>b</think>  the proof ") == "the proof"
    assert extract_proof("no end of thinking") is None
    text = "x</think>Proof. Done.\n\n## Self-evaluation\nI am confident this is right."
    assert extract_proof(text) == text.split("</think>")[1].strip()


def test_a_proof_row_is_stripped_of_its_self_evaluation_as_a_completion_is(tmp_path):
    """`qed-jax judge` on rows of extracted proofs sends the judge what `eval` sends for the same
    proof: one prompt, one cached grade."""
    tail = "\n\n## Self-evaluation\nI am confident this is right."
    items = [GradeItem(problem="P", rubric="R", proof=f"Proof [[item:a]]. Done.{tail}"),
             GradeItem(problem="P", rubric="R", completion=f"x</think>Proof [[item:a]]. Done.{tail}")]
    with JudgeServer({"a": [("score", 5), ("score", 0)]}) as server:
        grades = Judge(_config(server, tmp_path, strip_self_evaluation=True)).grade_batch(items)
    assert [g.score for g in grades] == [5, 5] and server.requests == {"a": 1}
    assert "Self-evaluation" not in server.bodies[0]["messages"][-1]["content"]
    rule = RuleGrader("closes_thinking", strip_self_evaluation=True)
    assert [g.score for g in rule.grade_batch([GradeItem(problem="P", proof=tail)])] == [0]  # nothing left


def test_a_completion_graded_whole_is_stripped_of_its_self_evaluation_too():
    """With require_think_end false (a server that splits the reasoning off), a completion without
    </think> is graded whole: as a proof, its self-evaluation stripped as the config says."""
    tail = "\n\n## Self-evaluation\nI am confident: 7/7."
    config = JudgeConfig(cache_path=None, require_think_end=False, strip_self_evaluation=True)
    assert text_to_grade(f"Proof. Done.{tail}", config) == ("Proof. Done.", None)
    assert text_to_grade(f"x</think>Proof. Done.{tail}", config) == ("Proof. Done.", None)
    assert text_to_grade(tail, config) == ("", "empty_proof")
    kept = JudgeConfig(cache_path=None, require_think_end=False, strip_self_evaluation=False)
    assert text_to_grade(f"Proof. Done.{tail}", kept) == (f"Proof. Done.{tail}".strip(), None)


@pytest.mark.parametrize("tail", [
    "\n\n## Self-evaluation\nI am confident this is right.",
    "\n\n### 3. Self Evaluation (confidence 6/7)\nThe induction is sound.",
    "\n\n**Self-Assessment**\nAll cases are covered.\n",
    "\n\n**Self-verification:** every step checked.\nScore: 7",
    "\n\nSelf-evaluation: I am confident the proof is correct, score 7.",  # the last line, no newline
    "\n\nConfidence: 7/7",
    "\n\n_Confidence level_: high",
    "\n\n## Self-check\nEvery case is covered.",
    "\n\n**Self-check:** all steps verified.",
    "\n\n## Self-Evaluation and Confidence\nHigh.",
    "\r\n\r\n## Self-evaluation\r\nI am confident.",  # Windows line ends
])
def test_self_evaluation_section_is_cut_at_its_heading(tail):
    assert extract_proof(f"x</think>Proof. Done.{tail}", strip_self_evaluation=True) == "Proof. Done."


@pytest.mark.parametrize("proof", [
    "Proof. Step 1.\nConfidence bounds are not needed here; by Lemma 2,\nx = 1, which completes the proof.",
    "Proof.\nSelf-check of the base case: n = 1 gives 2, which is even.\nInductive step: done.\nQED",
    "Proof.\n## Confidence intervals\nThe estimate holds.",
    "Proof.\nSelf-evaluating maps are continuous here, so f is.",
])
def test_proof_lines_that_begin_like_a_self_evaluation_are_kept(proof):
    assert extract_proof(f"x</think>{proof}", strip_self_evaluation=True) == proof


def test_marking_scheme_renders_string_and_checkpoints_consistently():
    scheme = [{"title": "Reduce to n even", "points": 2, "desc": "Shows WLOG n even."},
              {"title": "Finish", "points": 5, "desc": "Completes the induction."}]
    rendered = render_marking_scheme(scheme)
    assert rendered == ("Checkpoint 1: Reduce to n even (2 points)\nShows WLOG n even.\n\n"
                        "Checkpoint 2: Finish (5 points)\nCompletes the induction.")
    assert render_marking_scheme("  plain text scheme ") == "plain text scheme"
    # A table's struct column fills a missing field with null: left out, not written as "None".
    assert render_marking_scheme([{"title": None, "points": 7, "desc": None}]) == "Checkpoint 1: (7 points)"
    assert render_marking_scheme([{"title": "Half", "points": 0.5}]) == "Checkpoint 1: Half (0.5 points)"
    # "description" (MathArena's spelling) is read as "desc"; text under another key is refused, not dropped.
    assert render_marking_scheme([{"title": "Setup", "points": 2, "description": "p is even."}]) == (
        "Checkpoint 1: Setup (2 points)\np is even.")
    with pytest.raises(ValueError, match="^marking scheme item 2 has its text under text, which is not read: name it "
                                         "'title', 'desc' or 'description'$"):
        render_marking_scheme([{"title": "T", "points": 2}, {"points": 5, "text": "Finishes.", "id": 7}])
    for points in ("two", True, -3, 8, float("nan")):  # would reach the judge as written
        with pytest.raises(ValueError, match=rf"^marking scheme item 1: points must be a number from 0 to 7, "
                                             rf"got {re.escape(repr(points))}$"):
            render_marking_scheme([{"title": "T", "points": points}])
    prompt = render_prompt(load_template("rl_grader"), GradeItem(problem="P {x}", rubric=scheme, proof="Q"), "Q")
    assert "Checkpoint 2: Finish (5 points)" in prompt and "P {x}" in prompt and "{{" not in prompt


def test_responses_and_chat_paths_send_the_configured_parameters(tmp_path):
    with JudgeServer({"i1": [("score", 4)], "i2": [("score", 6)]}) as server:
        chat = Judge(_config(server, tmp_path, api="chat", cache_path=None, max_tokens=123,
                             reasoning_effort="high")).grade_batch([_item(1)])
        responses = Judge(_config(server, tmp_path, api="responses", cache_path=None, max_tokens=321,
                                  reasoning_effort="low")).grade_batch([_item(2)])
    assert chat[0].score == 4 and responses[0].score == 6
    chat_body, responses_body = server.bodies
    assert chat_body["max_tokens"] == 123 and chat_body["reasoning_effort"] == "high"
    assert responses_body["max_output_tokens"] == 321 and responses_body["reasoning"] == {"effort": "low"}
    assert "[[item:i2]]" in responses_body["input"]


def test_unreachable_endpoint_aborts_clearly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    config = JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", cache_path=None, backoff_s=0.01)
    judge, clients = Judge(config), []
    make_client = judge._client
    judge._client = lambda: clients.append(make_client()) or clients[-1]
    with pytest.raises(JudgeUnavailable, match=f"cannot reach the judge at http://127.0.0.1:{port}/v1"):
        judge.grade_batch([_item(0)])
    assert len(clients) == 1 and clients[0].is_closed()  # found unreachable before the batch: closed all the same


def test_the_judge_is_checked_when_a_request_is_to_be_sent_and_only_then(tmp_path, monkeypatch, capsys):
    """A rerun whose grades are all cached needs no judge; a completion without </think> that
    require_think_end=false sends is checked for at once, not after every retry's backoff."""
    from qed_jax import judge

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # nothing listens here once closed
    rows, out = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl"
    _write_rows(rows, 2)
    args = ["judge", "--input", str(rows), "--output", str(out), f"cache_path={tmp_path / 'cache.sqlite'}"]
    with JudgeServer({}) as server:
        assert cli.main([*args, f"base_url={server.url}"]) == 0
    first = out.read_text()
    assert cli.main([*args, f"base_url={down}"]) == 0  # all cached: the judge being down does not matter
    assert [json.loads(line)["cached"] for line in out.read_text().splitlines()] == [True, True]
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [
        json.loads(line)["score"] for line in first.splitlines()]
    slept, real_sleep = [], asyncio.sleep
    monkeypatch.setattr(judge.asyncio, "sleep", lambda delay: slept.append(delay) or real_sleep(0))
    config = JudgeConfig(base_url=down, cache_path=None, require_think_end=False, backoff_s=15)
    with pytest.raises(JudgeUnavailable, match=f"^cannot reach the judge at {re.escape(down)}"):
        Judge(config).grade_batch([GradeItem(problem="P", completion="A proof that never closed its thinking.")])
    assert slept == []  # no backoff waited out before finding the judge gone


def test_a_judge_that_accepts_but_never_answers_is_named_with_its_timeout():
    with socket.socket() as listening:  # the kernel accepts connections; nothing ever replies
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        url = f"http://127.0.0.1:{listening.getsockname()[1]}/v1"
        with pytest.raises(JudgeUnavailable, match=rf"^the judge at {re.escape(url)} did not answer GET /models within "
                                                   r"0\.2 s \(judge\.timeout_s, at most 30 s for this check\)"):
            Judge(JudgeConfig(base_url=url, cache_path=None, timeout_s=0.2)).check_reachable()


def test_a_judge_model_the_judge_does_not_list_is_warned_of_once_before_anything_is_graded(tmp_path, caplog):
    def listing(*names):
        return "application/json", json.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in names]})

    with JudgeServer({}) as server, caplog.at_level(logging.WARNING, logger="qed_jax.judge"):
        Judge(_config(server, tmp_path)).check_reachable()  # the server lists "judge"
        assert caplog.records == []
        misspelt = Judge(_config(server, tmp_path, model="jduge"))
        misspelt.check_reachable()
        misspelt.check_reachable()  # said once
        assert [r.getMessage() for r in caplog.records] == [
            f"judge.model 'jduge' is not among the models the judge at {server.url} lists ('judge'): if grading "
            "stops with HTTP 404, set judge.model to one of them"]
        assert server.total == 0
    caplog.clear()
    with JudgeServer({}, models_body=listing(*(f"m{i}" for i in range(7)))) as server, \
            caplog.at_level(logging.WARNING, logger="qed_jax.judge"):
        Judge(_config(server, tmp_path, model="m")).check_reachable()
        assert "lists ('m0', 'm1', 'm2', 'm3', 'm4' and 2 more)" in caplog.records[0].getMessage()
    caplog.clear()
    for body in (listing(), ("application/json", "{}"), ("application/json", '{"data": null}'),
                 ("application/json", '{"data": [1, {"id": 2}]}')):  # nothing to compare with: the judge answered
        with JudgeServer({}, models_body=body) as server, caplog.at_level(logging.WARNING, logger="qed_jax.judge"):
            Judge(_config(server, tmp_path, model="m")).check_reachable()
            assert caplog.records == [], body


@pytest.mark.parametrize("body", [("text/html", "<html>Sign in</html>"), ("application/json", '{"data": ['),
                                  ("application/json", "[1, 2]")])
def test_a_url_that_answers_but_not_as_the_api_is_named_before_grading(body):
    # Else openai's parser raised an AttributeError or a JSONDecodeError that named no URL.
    with JudgeServer({}, models_body=body) as server:
        config = JudgeConfig(base_url=server.url, cache_path=None)
        with pytest.raises(JudgeUnavailable, match=rf"^the judge at {re.escape(server.url)} answered GET /models with "
                                                   r"something that is not an OpenAI-compatible API's reply .*: is "
                                                   r"judge.base_url the API's root, e.g. http://localhost:8000/v1\?$"):
            Judge(config).grade_batch([_item(0)])
        assert server.total == 0

        # After a reply broke off, such an answer still counts as the judge being there: the item
        # fails, the run goes on.
        async def answers():
            client = Judge(config)._client()
            try:
                return await Judge(config)._answers(client)
            finally:
                await client.close()

        assert asyncio.run(answers()) is True


@pytest.mark.parametrize("url,problem", [
    ("http://[::1", r"is not a valid URL \(Invalid IPv6 URL\)"),
    ("http://256.1.1.1:80/v1", r"is not a valid URL \(256\.1\.1\.1 is not an IPv4 address\)"),
    ("http://127.0.0.1 /v1", r"is not a valid URL \(it holds a space\)"),
    ("http://127.0.0.1:99999/v1", r"is not a valid URL \(Port out of range 0-65535\)"),
    ("localhost:8000/v1", r"is not an http:// or https:// URL with a host, e.g. http://localhost:8000/v1"),
])
def test_an_endpoint_url_no_request_could_reach_is_refused_when_the_config_loads(url, problem):
    from qed_jax.evaluate import EvalConfig
    from qed_jax.pipeline import PipelineConfig

    for cls, key in [(JudgeConfig, "base_url"), (EvalConfig, "model.base_url"), (PipelineConfig, "judge")]:
        shown = "judge.base_url" if cls is JudgeConfig else key
        with pytest.raises(ConfigError, match=f"^{re.escape(shown)}: {re.escape(repr(url))} {problem}"):
            load_config(cls, None, [f"{key}={url}", "model.name=m"] if cls is EvalConfig else [f"{key}={url}"])
    with pytest.raises(ConfigError, match=r" \(judge is standin, the offline stand-in, or an OpenAI-compatible "):
        load_config(PipelineConfig, None, [f"judge={url}"])  # which may also be the stand-in, and says so
    # Valid forms, some of them short: IPv6 with a port, 0 for 0.0.0.0, 127.1, a host with digits.
    for valid in ("http://[::1]:8000/v1", "http://0:8000/v1", "http://127.1:8000/v1", "https://judge-2.local/v1"):
        JudgeConfig(base_url=valid)


def _write_rows(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"problem": f"Problem {i}", "rubric": "7 for a proof",
                                "completion": f"hmm</think>Proof [[item:i{i}]]"}) + "\n")


def _cli(args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "qed_jax.cli", *args], env=env, **kwargs)


def _graded_rows(cache) -> int:
    """Rows in the grade cache; 0 until the CLI has created the file and its table."""
    if not cache.exists():
        return 0
    with contextlib.closing(sqlite3.connect(cache)) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM grades").fetchone()[0]
        except sqlite3.OperationalError:  # the file is there, the table not yet
            return 0


def test_cli_killed_mid_run_resumes_without_regrading(tmp_path):
    rows, out, cache = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl", tmp_path / "cache.sqlite"
    _write_rows(rows, 60)
    # Rows from 10 on hang until the client goes away, so the kill finds exactly rows 0-9 graded
    # however slowly the machine runs; the rerun gets prompt replies for all of them.
    with JudgeServer({f"i{i}": [("hang", NEVER)] for i in range(10, 60)}) as server:
        args = ["judge", "--input", str(rows), "--output", str(out), f"base_url={server.url}",
                "concurrency=2", f"cache_path={cache}", "timeout_s=600"]
        proc = _cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600  # only ends a run that is broken
        while _graded_rows(cache) < 10 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _graded_rows(cache) == 10 and not out.exists()
        assert server.total <= 10 + 2  # at most `concurrency` hung requests were in flight
        sent_before = server.total
        server.scripts.clear()
        assert _cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
    graded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["problem"] for r in graded] == [f"Problem {i}" for i in range(60)]
    assert all(r["score"] == 7 for r in graded)
    assert [r["cached"] for r in graded] == [True] * 10 + [False] * 50
    assert server.total - sent_before == 50  # only the rows not yet graded were sent again


def test_cli_interrupted_says_where_its_grades_are_kept(tmp_path):
    rows, out, cache = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl", tmp_path / "cache.sqlite"
    _write_rows(rows, 12)
    with JudgeServer({f"i{i}": [("hang", NEVER)] for i in range(4, 12)}) as server:
        proc = _cli(["judge", "--input", str(rows), "--output", str(out), f"base_url={server.url}", "concurrency=2",
                     f"cache_path={cache}", "timeout_s=600"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    text=True)
        deadline = time.time() + 600  # only ends a run that is broken
        while _graded_rows(cache) < 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and not out.exists(), err[-3000:]
    assert err.strip().splitlines()[-1] == (f"qed-jax judge: interrupted; the grades received are kept in the judge's "
                                            f"cache {cache}: rerun the same command to continue from them")


def test_api_key_appears_in_no_log_output_or_cache(tmp_path):
    secret = "sk-qedjax-test-5f3a9c1e77"
    rows, out, cache = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl", tmp_path / "cache.sqlite"
    _write_rows(rows, 5)
    env = {**os.environ, "JUDGE_API_KEY": secret, "OPENAI_LOG": "debug"}
    with JudgeServer({"i0": [("status", 500), ("score", 3)], "i1": [("reply", "bad"), ("score", 2)]}) as server:
        with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
            rc = _cli(["-v", "judge", "--input", str(rows), "--output", str(out), f"base_url={server.url}",
                       f"cache_path={cache}", "backoff_s=0.01"], env=env, stdout=so, stderr=se).wait()
        assert rc == 0
        assert server.auth and all(a == f"Bearer {secret}" for a in server.auth)  # it was used
    assert "DEBUG" in (tmp_path / "stderr").read_text()  # the logs were verbose, yet hold no key
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path.name


def test_judge_cli_refuses_rows_without_the_field_its_template_reads(tmp_path, capsys):
    rows, out = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl"
    base = {"problem": "P", "completion": "x</think>proof"}

    def judge(row, *config):
        rows.write_text(json.dumps(row) + "\n")
        rc = cli.main(["judge", "--input", str(rows), "--output", str(out), *config, "base_url=http://127.0.0.1:9"])
        return rc, capsys.readouterr().err.strip()

    rc, err = judge({**base, "grading_guidelines": "7 if complete"})  # the default template reads a rubric
    assert rc == 2 and err == (
        f"qed-jax judge: error: {rows}:1: the judge's template grades against the field 'rubric' (rubric or "
        "rubrics), which this row does not give; its marking scheme is 'grading_guidelines': choose the judge "
        "config that reads it (configs/judge/rl_grader.yaml reads 'rubric'; configs/judge/imo_proofbench.yaml or "
        "proofbench.yaml reads 'guidelines'; configs/judge/answer.yaml reads 'answer')")
    rc, err = judge({**base, "rubric": "7 if complete"}, "--config", str(REPO / "configs/judge/imo_proofbench.yaml"))
    assert rc == 2 and "grades against the field 'guidelines'" in err and "its marking scheme is 'rubric'" in err
    rc, err = judge({**base, "answer": "  "}, "--config", str(REPO / "configs/judge/answer.yaml"))
    assert rc == 2 and err.endswith("grades against the field 'answer' (answer), which this row does not give")
    rc, err = judge({**base, "rubric": {"points": 7}})
    assert rc == 2 and err.endswith(":1: field 'rubric': marking scheme must be a string or a list of checkpoints, "
                                    "got dict")
    rc, err = judge({**base, "problem": 5, "rubric": "r"})
    assert rc == 2 and err.endswith(":1: field 'problem' must be a non-empty string")
    rows.write_text("\n")
    assert cli.main(["judge", "--input", str(rows), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"qed-jax judge: error: {rows}: holds no rows to grade"
    assert not out.exists()


def test_a_judge_template_must_show_the_proof_and_fill_every_placeholder(tmp_path, capsys):
    # Such a template was sent as written: the judge graded "{proof}" and its grade counted.
    rows, template = tmp_path / "rows.jsonl", tmp_path / "grader.txt"
    rows.write_text(json.dumps({"problem": "P", "completion": "x</think>proof"}) + "\n")
    known = "the placeholders are {{problem}}, {{marking_scheme}}, {{reference}}, {{guidelines}}, {{answer}}, {{proof}}"
    for text, error in (("Problem: {{problem}}\nProof: {proof}", "no {{proof}} placeholder, so the judge would never "
                                                                 f"see the proof; {known}"),
                        ("{{problem}} {{ proof }}", "write {{ proof }} as {{proof}}, without spaces"),
                        ("{{marking_sheme}} {{proof}}", f"unknown placeholder {{{{marking_sheme}}}}; {known}")):
        template.write_text(text)
        assert cli.main(["judge", "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                         f"template={template}", "base_url=http://127.0.0.1:9", "cache_path=null"]) == 2
        assert capsys.readouterr().err.strip() == f"qed-jax judge: error: judge template {template}: {error}"
        with pytest.raises(ConfigError, match=re.escape(error)):
            Judge(JudgeConfig(template=str(template), cache_path=None))
    # LaTeX's double braces are no placeholder.
    template.write_text("Reply <score>N</score>. Grade $x^{{2}}$: {{problem}} / {{proof}}")
    assert Judge(JudgeConfig(template=str(template), cache_path=None)).template.endswith("{{proof}}")
    # A name that is neither a file nor a bundled template: the bundled judge templates are listed, not the others.
    with pytest.raises(ConfigError, match=re.escape("judge template 'nope' is neither a file nor one of ['answer_judge', "
                                                    "'imo_proofbench_grader', 'proofbench_grader', 'rl_grader']")):
        Judge(JudgeConfig(template="nope", cache_path=None))


def test_a_judge_template_that_never_asks_for_the_answer_format_tag_is_refused(tmp_path, capsys):
    """Its judge's every reply would have no tag judge.answer_format reads: no grade, each after retries."""
    from qed_jax.evaluate import EvalConfig, check_judge_template
    from qed_jax.grpo import GRPOConfig, check_judge_template as check_grpo_template

    asks_points = ("^judge.template imo_proofbench_grader never asks for the <score> tag that judge.answer_format score "
                   "reads its grades from; it asks for <points>: set judge.answer_format=points$")
    with pytest.raises(ConfigError, match=asks_points):
        Judge(JudgeConfig(template="imo_proofbench_grader", answer_format="score", cache_path=None))
    with pytest.raises(ConfigError, match=asks_points):
        check_judge_template(load_config(EvalConfig, REPO / "configs/eval/imo_proofbench.yaml",
                                         ["model.path=m", "judge.answer_format=score"]))
    with pytest.raises(ConfigError, match=r"^judge.template rl_grader never asks for the <verdict> tag .*; it asks for "
                                          r"<score>: set judge.answer_format=score$"):
        check_grpo_template(load_config(GRPOConfig, REPO / "configs/rl/tiny.yaml",
                                        ["reward_rule=null", "judge.answer_format=verdict", "judge.allowed_scores=[0, 7]"]))
    rows, template = tmp_path / "rows.jsonl", tmp_path / "grader.txt"
    rows.write_text(json.dumps({"problem": "P", "completion": "x</think>proof"}) + "\n")
    template.write_text("Grade the proof of {{problem}} from 0 to 7:\n{{proof}}")
    assert cli.main(["judge", "--input", str(rows), "--output", str(tmp_path / "out.jsonl"), f"template={template}",
                     "base_url=http://127.0.0.1:9", "cache_path=null"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qed-jax judge: error: judge.template {template} never asks for the <score> tag that judge.answer_format "
        "score reads its grades from; ask for <score> in it, as the bundled templates do")
    for name, answer_format in (("rl_grader", "score"), ("proofbench_grader", "points"), ("answer_judge", "verdict")):
        Judge(JudgeConfig(template=name, answer_format=answer_format, cache_path=None))  # the bundled pairs


def test_a_row_may_lack_a_marking_scheme_and_give_a_numeric_answer():
    row = {"problem": "P", "completion": "x</think>proof"}
    assert item_from_row(row, "w", ["rubric"]).rubric is None  # graded without one, as GRPO does
    assert item_from_row({**row, "rubrics": "r"}, "w", ["rubric"]).rubric == "r"  # the alias
    # A table (Parquet, a Hub dataset) has every column, null where a row lacks it: a null
    # column does not hide the value under the other key.
    item = item_from_row({**row, "rubric": None, "rubrics": "r", "reference": None, "solution": "S"}, "w", ["rubric"])
    assert (item.rubric, item.reference) == ("r", "S")
    item = item_from_row({**row, "rubric": "q", "rubrics": None, "reference": "R", "solution": None}, "w", ["rubric"])
    assert (item.rubric, item.reference) == ("q", "R")
    assert item_from_row({**row, "answer": 42}, "w", ["answer"]).answer == "42"
    assert item_from_row({**row, "answer": 1e-05}, "w", ["answer"]).answer == "0.00001"  # not "1e-05": e - 5
    with pytest.raises(ConfigError, match="^w: field 'answer' must be a string or a number, got list$"):
        item_from_row({**row, "answer": [1]}, "w", ["answer"])
    assert item_from_row({**row, "proof": None}, "w").completion == row["completion"]  # a table's null column
    for odd in ({**row, "proof": 123}, {"problem": "P", "completion": 123}):  # one not a string
        with pytest.raises(ConfigError, match=r"^w: give exactly one of the fields 'proof' and 'completion'"):
            item_from_row(odd, "w")


def test_an_empty_judge_section_is_the_judge_defaults_as_in_the_trainers(tmp_path):
    from qed_jax.config import load_config

    trainer = tmp_path / "grpo.yaml"
    trainer.write_text("judge:\n  # base_url: http://localhost:8000/v1\n")
    assert load_config(JudgeConfig, trainer, [], section="judge") == load_config(JudgeConfig, None, [])


def test_judge_cli_makes_the_output_folder(tmp_path):
    rows, out = tmp_path / "rows.jsonl", tmp_path / "new" / "sub" / "graded.jsonl"
    _write_rows(rows, 2)
    with JudgeServer({}) as server:  # keys as a judge: section names them work too
        assert cli.main(["judge", "--input", str(rows), "--output", str(out), f"judge.base_url={server.url}",
                         f"cache_path={tmp_path / 'cache.sqlite'}"]) == 0
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [7, 7]


def test_judge_cli_warns_of_rows_graded_without_the_scheme_its_template_shows(tmp_path, capsys):
    """A misspelt guidelines field is graded without guidelines, as rows without any are: said so."""
    rows, out = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in [
        {"problem": "P", "completion": "x</think>Proof [[item:a]]", "grading_guidelines": "7 if whole"},
        {"problem": "P", "completion": "x</think>Proof [[item:b]]", "guideline": "7 if whole"}]))
    with JudgeServer({}) as server:
        assert cli.main(["judge", "--config", str(REPO / "configs/judge/imo_proofbench.yaml"), "--input", str(rows),
                         "--output", str(out), f"base_url={server.url}", "cache_path=null",
                         f"template={score_grader(tmp_path)}", "answer_format=score",
                         "allowed_scores=null"]) == 0  # as the test server replies
    assert [line.split(" ", 2)[2] for line in capsys.readouterr().err.splitlines() if "rows give no" in line] == [
        f"WARNING qed_jax.judge: 1 of 2 rows give no guidelines (guidelines or grading_guidelines or grading_scheme), "
        f"so the judge grades them without it; the first, {rows}:2, has the fields 'problem', 'completion', "
        "'guideline'"]


def test_judge_cli_counts_the_rows_scored_0_without_a_request(tmp_path, capsys):
    """Completions without </think> (a reasoning parser's content) score 0 unsent: the summary
    says so, rather than that they were graded."""
    rows, out = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl"
    rows.write_text("".join(json.dumps({"problem": "P", "completion": text}) + "\n" for text in
                            ["Proof without the thinking's end.", "x</think>Proof [[item:a]]", "x</think>  "]))
    with JudgeServer({}) as server:
        assert cli.main(["judge", "--input", str(rows), "--output", str(out), f"base_url={server.url}",
                         "cache_path=null"]) == 0
        assert server.total == 1
    captured = capsys.readouterr()
    assert ("graded 3 rows (0 from cache, 2 scored 0 unsent (no_think_end x1, empty_proof x1), 0 failed); "
            "mean score 2.33/7") in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("1 completions have no </think>, so they scored 0 "
                                                              "without a request (require_think_end)")


def test_judge_cli_exits_1_naming_the_reasons_when_grades_fail(tmp_path, capsys):
    rows, out, cache = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl", tmp_path / "cache.sqlite"
    _write_rows(rows, 3)
    scripts = {"i0": [("status", 500)], "i1": [("body", ("text/html", "<html>502 Bad Gateway</html>"))]}
    args = ["judge", "--input", str(rows), "--output", str(out), f"cache_path={cache}", "backoff_s=0.01",
            "max_retries=1"]
    with JudgeServer(scripts) as server:
        assert cli.main([*args, f"base_url={server.url}"]) == 1
        captured = capsys.readouterr()
        assert "graded 3 rows (0 from cache, 2 failed); mean score 7.00/7" in captured.out
        assert captured.err.strip().splitlines()[-1] == (
            "2 grades failed (http_500 x1, bad_reply x1; a row's judge_reply holds the judge's last reply or the error, "
            "where there was one); rerun the same command to retry them, the others come from the cache")
        assert [json.loads(line)["reason"] for line in out.read_text().splitlines()] == ["http_500", "bad_reply", "ok"]
        # A failed grade has no reward either: averaging the column must not count it as a 0.
        assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [None, None, 1.0]
        server.scripts = {"i0": [("status", 500)], "i1": [("status", 500)], "i2": [("status", 500)]}
        assert cli.main([*args, f"base_url={server.url}", "cache_path=null"]) == 1
        assert "3 failed); no score;" in capsys.readouterr().out  # not "nan/7"
        # A request the judge rejects (a 4xx not retried) fails alike on a rerun: what it said, and what to change.
        server.scripts = {"i0": [("status", 500)], "i1": [("status", 422)], "i2": [("status", 400)]}
        assert cli.main([*args, f"base_url={server.url}", "cache_path=null"]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            "rerun the same command to retry them; 2 failed because the judge rejected their request (the last: "
            "Error code: 400 - scripted 400), and will again unless the request changes: check judge.model, "
            "judge.api, judge.max_tokens, judge.temperature and judge.reasoning_effort")


def test_a_judge_on_this_machine_is_reached_past_a_proxy_set_for_the_cluster(tmp_path, monkeypatch):
    """HTTP(S)_PROXY / ALL_PROXY are for the outside world: a judge (or the pipeline's stand-in)
    on 127.0.0.1 is asked directly, as NO_PROXY would say if it listed it."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with JudgeServer() as server:
        grades = Judge(_config(server, tmp_path, cache_path=None)).grade_batch([_item(0)])
        # vLLM prints its URL as 0.0.0.0, which users paste.
        everywhere = server.url.replace("127.0.0.1", "0.0.0.0")
        grades += Judge(_config(server, tmp_path, cache_path=None, base_url=everywhere)).grade_batch([_item(1)])
    assert [g.score for g in grades] == [7, 7]
    here = ["http://localhost:8000/v1", "http://LOCALHOST./v1", "http://judge.localhost/v1", "http://[::1]:8000/v1",
            "http://[::ffff:127.0.0.1]/v1", "https://127.0.0.2/v1", "http://0.0.0.0:8000/v1"]
    elsewhere = ["http://judge:8000/v1", "https://api.example.com/v1", "http://10.0.0.5/v1", "http://localhost.com/v1"]
    assert [on_this_machine(u) for u in here + elsewhere] == [True] * len(here) + [False] * len(elsewhere)


def test_a_judge_that_refuses_the_key_stops_the_batch(tmp_path):
    # 401/403: a missing or wrong key, which every other request would meet too.
    for status in (401, 403):
        with JudgeServer({"i1": [("status", status)]}) as server:
            with pytest.raises(JudgeUnavailable, match=rf"^the judge at {server.url} refused the request "
                                                       rf"\(HTTP {status}: .*\); check its key \(read from "
                                                       r"\$JUDGE_API_KEY, judge.api_key_env names the variable\)$"):
                Judge(_config(server, tmp_path, cache_path=None)).grade_batch([_item(i) for i in range(3)])
            assert server.requests["i1"] == 1
    # 404: no such model (a misspelt judge.model) or no such path, which every request meets too.
    with JudgeServer({"i1": [("status", 404)]}) as server:
        with pytest.raises(JudgeUnavailable, match=rf"^the judge at {server.url} answered HTTP 404 \(Error code: 404 - "
                                                   r"scripted 404\) for judge.model 'judge': check judge.model, "
                                                   r"judge.base_url and judge.api$"):
            Judge(_config(server, tmp_path, cache_path=None)).grade_batch([_item(i) for i in range(3)])
        assert server.requests["i1"] == 1


def test_a_judge_counts_the_requests_it_rejected_and_those_it_completed(tmp_path):
    # A rejection (400, 422: a request the judge will not take) fails its item alone; the counts
    # tell a caller whether the judge takes any request at all (evaluate.check_judge_accepts).
    scripts = {"i0": [("score", 4)], "i1": [("status", 500), ("score", 2)],
               **{f"i{i}": [("status", 400 if i % 2 else 422)] for i in range(2, 8)}}
    with JudgeServer(scripts) as server:
        judge = Judge(_config(server, tmp_path, cache_path=None))
        grades = judge.grade_batch([_item(i) for i in range(8)])
    assert [(g.score, g.reason) for g in grades] == [(4, "ok"), (2, "ok")] + [(None, "http_422"), (None, "http_400")] * 3
    assert (judge.rejected, judge.completed) == (6, 2)
    assert judge.last_rejection in ("HTTP 400: Error code: 400 - scripted 400", "HTTP 422: Error code: 422 - scripted 422")


def test_judge_cli_that_loses_its_judge_mid_run_says_the_grades_received_are_kept(tmp_path, capsys):
    rows, out, cache = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl", tmp_path / "cache.sqlite"
    _write_rows(rows, 3)
    args = ["judge", "--input", str(rows), "--output", str(out), f"cache_path={cache}", "concurrency=1"]
    with JudgeServer({"i0": [("score", 5)], "i1": [("status", 404)]}) as server:  # 404: no such judge.model now
        assert cli.main([*args, f"base_url={server.url}"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f"(1 grade was received before that, kept in the judge's cache {cache}: rerun the same command to "
            "continue from them)")
        assert not out.exists()
        server.scripts = {}  # the judge is back: the rerun asks for the two rows it has no grade for
        assert cli.main([*args, f"base_url={server.url}"]) == 0
        assert server.requests == {"i0": 1, "i1": 2, "i2": 1}
    assert [json.loads(line)["cached"] for line in out.read_text().splitlines()] == [True, False, False]


def test_judge_cli_that_loses_its_judge_counts_no_unsent_zero_as_a_grade_received(tmp_path, capsys):
    rows, out, cache = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl", tmp_path / "cache.sqlite"
    _write_rows(rows, 2)
    lines = rows.read_text().splitlines()
    rows.write_text(lines[0].replace("</think>", "") + "\n" + lines[1] + "\n")  # row 0 scores 0 unsent
    with JudgeServer({"i1": [("status", 404)]}) as server:
        assert cli.main(["judge", "--input", str(rows), "--output", str(out), f"cache_path={cache}",
                         "concurrency=1", f"base_url={server.url}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "HTTP 404" in last and "received" not in last


def test_judge_cli_checks_its_output_before_sending_anything(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    _write_rows(rows, 2)
    with JudgeServer() as server:
        assert cli.main(["judge", "--input", str(rows), "--output", str(tmp_path), f"base_url={server.url}",
                         "cache_path=null"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"qed-jax judge: error: --output {tmp_path} is a directory; give a file path, e.g. "
            f"{tmp_path / 'graded.jsonl'}")
        assert server.total == 0


def test_judge_cli_reads_what_eval_reads_and_names_a_bad_row(tmp_path, capsys):
    rows, out = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl"
    rows.write_bytes(json.dumps({"problem": "P", "proof": "x"}).encode() + b'\n{"problem": "P\xff", "proof": "y"}\n')
    assert cli.main(["judge", "--input", str(rows), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qed-jax judge: error: {rows}:2: not UTF-8 text (byte 0xff at column 15)")
    rows.write_text("\n" + json.dumps({"problem": "P", "proof": "x", "reference": 5}) + "\n")
    assert cli.main(["judge", "--input", str(rows), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (  # a JSON line is named by its line, blank lines counted
        f"qed-jax judge: error: {rows}:2: field 'reference' must be a string (the reference solution)")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"problem": "P", "proof": "Q.E.D. [[item:a]]"}, {"problem": "P"}]))
    assert cli.main(["judge", "--input", str(array), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qed-jax judge: error: {array}: row 2: give exactly one of the fields 'proof' and 'completion' (a string)")
    array.write_text(json.dumps([{"problem": "P", "proof": "Q.E.D. [[item:a]]"}]))
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"problem": ["P"], "proof": ["Q.E.D. [[item:b]]"],
                             "when": [datetime.datetime(2024, 1, 1)]}), parquet)
    text = tmp_path / "rows.txt"  # JSON lines under another name
    text.write_text(json.dumps({"problem": "P", "proof": "Q.E.D. [[item:c]]"}) + "\n")
    with JudgeServer({"a": [("score", 6)], "b": [("score", 5)], "c": [("score", 4)]}) as server:
        for source, score in ((array, 6), (parquet, 5), (text, 4)):
            assert cli.main(["judge", "--input", str(source), "--output", str(out), f"base_url={server.url}",
                             "cache_path=null"]) == 0
            assert json.loads(out.read_text())["score"] == score, source
        assert json.loads(out.read_text())["problem"] == "P"
        piped = subprocess.run(
            [sys.executable, "-m", "qed_jax.cli", "judge", "--input", "/dev/stdin", "--output", str(out),
             f"base_url={server.url}", "cache_path=null"], input=text.read_text(), text=True, capture_output=True,
            cwd=REPO)
        assert piped.returncode == 0, piped.stderr[-2000:]
        assert json.loads(out.read_text())["score"] == 4


def test_judge_cli_config_errors_are_one_line(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    _write_rows(rows, 1)

    def error(*args):
        assert cli.main(["judge", "--input", str(rows), "--output", str(tmp_path / "o.jsonl"), *args]) == 2
        return capsys.readouterr().err.strip().removeprefix("qed-jax judge: error: ")

    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert error("--config", str(listed)) == f"{listed}: the top level must be a mapping"
    listed.write_text("[]\n")  # an empty list is no mapping either (not an empty file's defaults)
    assert error("--config", str(listed)) == f"{listed}: the top level must be a mapping"
    trainer = REPO / "configs/sft/tiny.yaml"  # a config with no judge: section
    message = error("--config", str(trainer))
    assert message.startswith(f"{trainer}: ") and message.endswith(
        "is this file for another command? (a config for another command works here only with a judge: section, "
        "which this one does not have)")
    assert error("allowed_scores=[0,9]").startswith("judge.allowed_scores must be a non-empty list of integers from 0 to 7")
    assert error("allowed_scores=[]").startswith("judge.allowed_scores must be")
    assert error("answer_format=verdict", "allowed_scores=[0,6]") == (
        "judge.allowed_scores [0, 6] leaves out 0 or 7, the scores of the verdicts Incorrect and Correct "
        "(answer_format verdict): every grade would fail")
    assert error("timeout_s=-1") == "judge.timeout_s must be above 0, got -1.0"
    assert error("timeout_s=.inf") == "judge.timeout_s must be a finite number, got inf"
    assert error("max_retries=-1") == "judge.max_retries must be at least 0, got -1"
    assert error("backoff_s=.nan") == "judge.backoff_s must be at least 0, got nan"
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_text("not a database")
    assert error(f"cache_path={corrupt}", "base_url=http://127.0.0.1:9") == (
        f"judge cache {corrupt}: file is not a database; judge.cache_path must name an SQLite file (or a new file) "
        "in a writable directory, or be null for no cache (a damaged one: move it aside)")
    assert error(f"cache_path={tmp_path}", "base_url=http://127.0.0.1:9").startswith(f"judge cache {tmp_path}: ")


def test_a_new_cache_another_process_is_making_too_is_waited_for(tmp_path, monkeypatch):
    """Two processes making one new cache at once: the switch to WAL can find the file locked
    without SQLite waiting (5 of 300 simultaneous opens failed, as a "damaged" cache)."""
    import sqlite3

    from qed_jax import judge

    connect, refusals = sqlite3.connect, [3]

    class Contended:
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode") and refusals[0]:
                refusals[0] -= 1
                raise sqlite3.OperationalError("database is locked")
            return self.db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.db, name)

    monkeypatch.setattr(judge.sqlite3, "connect", lambda *args, **kwargs: Contended(connect(*args, **kwargs)))
    cache = judge.GradeCache(tmp_path / "new.sqlite")
    assert refusals == [0] and cache.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    cache.close()


def test_a_cache_that_cannot_be_written_or_is_damaged_is_one_config_error(tmp_path, monkeypatch):
    import sqlite3

    from qed_jax.judge import Grade, GradeCache

    path = tmp_path / "cache.sqlite"
    cache = GradeCache(path)
    for i in range(300):
        cache.put(f"k{i}", Grade(score=7, reward=1.0, reason="ok", raw="a judge's reply " * 20))
    cache.close()
    # Opened read-only (as a file the user cannot write): found when the cache opens, not at the
    # first new grade, after its request was paid for.
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda p, **kw: connect(f"file:{p}?mode=ro", uri=True, **kw))
    with pytest.raises(ConfigError, match=rf"^judge cache {path}: attempt to write a readonly database; "):
        GradeCache(path)
    monkeypatch.undo()
    data = bytearray(path.read_bytes())  # a page in the middle overwritten
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=rf"^judge cache {path}: .*; judge.cache_path must name an SQLite file"):
        cache = GradeCache(path)
        for i in range(300):
            cache.get(f"k{i}")
    # Under a file, where no folder can be made: named as the setting it is.
    with pytest.raises(ConfigError, match=rf"^judge.cache_path: {path} is a file where a folder is needed; "):
        GradeCache(path / "cache.sqlite")


def test_a_cache_kept_locked_by_another_process_says_so(tmp_path, monkeypatch):
    """A write to a cache another process keeps locked past the busy timeout names the lock, not a
    file that is not SQLite."""
    from qed_jax.judge import Grade, GradeCache

    path = tmp_path / "cache.sqlite"
    monkeypatch.setattr(GradeCache, "BUSY_TIMEOUT_S", 0.2)
    cache = GradeCache(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process's write, still open
    try:
        with pytest.raises(ConfigError, match=rf"^judge cache {path}: database is locked: another process held it "
                                              r"for over 0.2 s; rerun \(grades already made are kept\), or give "
                                              "each job its own judge.cache_path$"):
            cache.put("k", Grade(score=7, reward=1.0, reason="ok"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    cache.put("k", Grade(score=7, reward=1.0, reason="ok"))  # once it is free, it is written
    assert cache.get("k").score == 7
    cache.close()


def test_responses_api_reply_that_is_not_one_fails_as_bad_reply(tmp_path):
    scripts = {"i0": [("body", ("text/html", "<html>oops</html>"))],
               "i1": [("body", ("application/json", '{"id": "x"}')), ("score", 4)],
               "i2": [("body", ("application/json", '{"id": "x", "output": ["<score>5</score>"]}'))]}
    with JudgeServer(scripts) as server:
        grades = Judge(_config(server, tmp_path, api="responses", cache_path=None)).grade_batch(
            [_item(0), _item(1), _item(2)])
    assert [(g.score, g.reason, g.attempts) for g in grades] == [(None, "bad_reply", 3), (4, "ok", 2),
                                                                  (None, "bad_reply", 3)]
    assert "not a Responses API reply" in grades[0].raw
    assert "output is not a list of messages" in grades[2].raw


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_replies_that_broke_off_fail_their_item_alone_and_are_not_cached(tmp_path, api):
    # A reply cut off at max_tokens may end on a tag it quotes before refuting it; a reply whose
    # connection reset mid-body, or whose bytes are not UTF-8, is no reply at all. Each is asked
    # again and, failing for good, fails its item alone, uncached; the rest of the batch is graded.
    cut = "a lenient grader might write <score>7</score>, but step 2 divides by zero, so the score must be"
    latin1 = ("body", ("application/json", json.dumps({
        "id": "c", "object": "chat.completion", "created": 0, "model": "judge", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Tr\u00e8s bien "
                                                                                             "<score>5</score>"}}]},
        ensure_ascii=False).encode("latin-1")))
    scripts = {"i0": [("cut", cut)], "i1": [("cut", cut), ("score", 4)], "i2": [latin1], "i3": [latin1, ("score", 5)],
               "i4": [("reset", 40)], "i5": [("reset", 40), ("score", 6)], "i6": [("reply", "<score>7</score> \ud800")]}
    with JudgeServer(scripts) as server:
        grades = Judge(_config(server, tmp_path, api=api)).grade_batch([_item(i) for i in range(8)])
    assert [(g.score, g.reason, g.attempts) for g in grades] == [
        (None, "cut_off", 2), (4, "ok", 2), (None, "bad_reply", 3), (5, "ok", 2), (None, "connection_error", 3),
        (6, "ok", 2), (None, "bad_reply", 3), (7, "ok", 1)]
    assert grades[6].raw.endswith("holds a lone surrogate \\ud800")
    if api == "chat":
        assert "not UTF-8 text (byte 0xe8" in grades[2].raw
    with JudgeServer(default=("score", 1)) as server:  # a rerun asks again for the failed items only
        again = Judge(_config(server, tmp_path, api=api)).grade_batch([_item(i) for i in range(8)])
    assert [g.score for g in again] == [1, 4, 1, 5, 1, 6, 1, 7] and server.requests == {"i0": 1, "i2": 1, "i4": 1,
                                                                                        "i6": 1}


def test_a_judge_that_dies_mid_run_stops_the_batch_where_one_broken_reply_fails_its_item(tmp_path):
    # It answers the batch's first GET /models, then resets every connection: its replies broke
    # off, and GET /models no longer answers either.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)

        def answer_once_then_reset():
            first = True
            while True:
                try:
                    connection, _ = listening.accept()
                except OSError:  # closed: the test is over
                    return
                connection.recv(65536)
                if first:
                    body = b'{"object": "list", "data": []}'
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    first = False
                else:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()

        threading.Thread(target=answer_once_then_reset, daemon=True).start()
        url = f"http://127.0.0.1:{listening.getsockname()[1]}/v1"
        with pytest.raises(JudgeUnavailable, match=f"^cannot reach the judge at {re.escape(url)}: "):
            Judge(JudgeConfig(base_url=url, cache_path=None, backoff_s=0.01, max_retries=1)).grade_batch([_item(0)])


@pytest.fixture
def judge_waits(monkeypatch):
    """The waits the judge sleeps between tries (seconds), recorded instead of slept."""
    import asyncio

    waits, sleep = [], asyncio.sleep

    async def recorded(delay, *args, **kwargs):
        if delay >= 1:  # the judge's waits; none of the client's own
            waits.append(delay)
        await sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    return waits


def test_a_busy_judge_is_asked_again_when_its_retry_after_says(tmp_path, judge_waits):
    import email.utils

    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    scripts = {"i0": [("status", (429, {"Retry-After": "7"})), ("score", 6)],
               "i1": [("status", (503, {"Retry-After": in_30_s})), ("score", 5)],
               "i2": [("status", (429, {"Retry-After": "100000"})), ("score", 4)],
               "i3": [("status", (429, {"Retry-After": "soon"})), ("score", 3)]}
    with JudgeServer(scripts) as server:
        grades = Judge(_config(server, tmp_path, backoff_s=5000.0)).grade_batch([_item(i) for i in range(4)])
    assert [(g.score, g.attempts) for g in grades] == [(6, 2), (5, 2), (4, 2), (3, 2)]
    seven, thirty, capped, backoff = sorted(judge_waits)
    assert 7 <= seven <= 8.4 and 25 <= thirty <= 36 and capped == 600 and backoff == 600  # capped as Retry-After is


def test_the_backoff_doubles_up_to_the_longest_wait(tmp_path, monkeypatch, judge_waits):
    import types

    from qed_jax import judge

    monkeypatch.setattr(judge, "random", types.SimpleNamespace(uniform=lambda low, high: high))  # the longest jitter
    with JudgeServer({"i0": [("status", 503)] * 4 + [("score", 5)]}) as server:
        (grade,) = Judge(_config(server, tmp_path, backoff_s=100.0, max_retries=4)).grade_batch([_item(0)])
    assert (grade.score, grade.attempts) == (5, 5)
    assert judge_waits == [150, 300, 600, judge.MAX_RETRY_AFTER_S]  # 1200 capped


def test_timeout_s_bounds_the_whole_request_not_each_read(tmp_path):
    # A reply sent a byte at a time never leaves the client waiting timeout_s for its next read.
    with JudgeServer({"i0": [("drip", 0.05)]}) as server:
        (grade,) = Judge(_config(server, tmp_path, timeout_s=3.0, max_retries=0)).grade_batch([_item(0)])
    assert (grade.score, grade.reason, grade.attempts) == (None, "timeout", 1)


def _completion(content=None, choices=None) -> tuple[str, tuple[str, str]]:
    """A scripted 200 reply: a chat completion whose message content (or whose choices) is given."""
    choices = choices if choices is not None else [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]
    return "body", ("application/json", json.dumps({"id": "c", "object": "chat.completion", "created": 0,
                                                    "model": "judge", "choices": choices}))


def test_replies_with_content_that_is_not_text_fail_alone(tmp_path):
    # Content as a list of text parts (some servers send it) is joined; content of any other kind
    # is a bad reply for that item, retried like a 5xx, and the rest of the batch is graded.
    # 408 (a proxy's timeout) and 409 are retried too; 422 (this request is wrong) is not.
    parts = [{"type": "text", "text": "<score>"}, {"type": "text", "text": "5</score>"}]
    scripts = {"i0": [_completion(parts)], "i1": [_completion(6)], "i2": [_completion([{"type": "image"}])],
               "i3": [_completion(choices={"0": {"message": {"content": "<score>7</score>"}}})],
               "i4": [("status", 408), ("score", 3)], "i5": [("status", 409)], "i6": [("status", 422)]}
    with JudgeServer(scripts) as server:
        grades = Judge(_config(server, tmp_path, cache_path=None)).grade_batch([_item(i) for i in range(8)])
    assert [(g.score, g.reason, g.attempts) for g in grades] == [
        (5, "ok", 1), (None, "bad_reply", 3), (None, "bad_reply", 3), (None, "bad_reply", 3),
        (3, "ok", 2), (None, "http_409", 3), (None, "http_422", 1), (7, "ok", 1)]
    assert "choices[0].message.content is not text: 6" in grades[1].raw


def test_endpoint_reasoning_that_is_not_text_is_a_clear_error():
    from types import SimpleNamespace as NS
    from qed_jax.evaluate import EndpointGenerator

    usage = NS(completion_tokens=3)
    message = NS(content="proof", reasoning_content="steps")
    sample = EndpointGenerator._sample(NS(usage=usage), NS(message=message, finish_reason="stop"), "proof")
    assert sample.text == "steps</think>proof"
    message = NS(content="proof", reasoning_content={"steps": 1})
    with pytest.raises(BadReply, match="the reply's reasoning is not text"):
        EndpointGenerator._sample(NS(usage=usage), NS(message=message, finish_reason="stop"), "proof")


@pytest.mark.slow  # four judge runs, two of them child processes: 12-18 s on 2 cores
def test_judge_cli_writes_into_a_pipe_a_device_or_a_link_without_replacing_it(tmp_path):
    """--output that is not a plain file is written, never renamed over: a FIFO's reader gets the
    rows, a device (/dev/null, /dev/stdout) stays one, and a link keeps pointing at its file, which
    gets the rows."""
    import threading

    rows = tmp_path / "rows.jsonl"
    _write_rows(rows, 2)
    fifo, link, real = tmp_path / "fifo", tmp_path / "link.jsonl", tmp_path / "real.jsonl"
    os.mkfifo(fifo)
    real.write_text("old\n")
    link.symlink_to(real.name)
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()), daemon=True)
    reader.start()
    with JudgeServer({}) as server:
        for out in (fifo, link):
            assert cli.main(["judge", "--input", str(rows), "--output", str(out), f"base_url={server.url}",
                             "cache_path=null"]) == 0
    reader.join(10)
    assert [json.loads(line)["score"] for line in read[0].splitlines()] == [7, 7]
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()
    assert [json.loads(line)["score"] for line in real.read_text().splitlines()] == [7, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.jsonl", "real.jsonl", "rows.jsonl"]
    # --output /dev/stdout: the rows alone on stdout (a pipe or a file), the summary on stderr.
    with JudgeServer({}) as server:
        for into_file in (False, True):
            caught = tmp_path / "stdout.jsonl"
            with open(caught, "w") if into_file else contextlib.nullcontext(subprocess.PIPE) as stdout:
                done = subprocess.run([sys.executable, "-m", "qed_jax.cli", "judge", "--input", str(rows), "--output",
                                       "/dev/stdout", f"base_url={server.url}", "cache_path=null"], stdout=stdout,
                                      stderr=subprocess.PIPE, text=True, cwd=REPO)
            assert done.returncode == 0, done.stderr[-2000:]
            text = caught.read_text() if into_file else done.stdout
            assert [json.loads(line)["score"] for line in text.splitlines()] == [7, 7]
            assert "graded 2 rows" in done.stderr


def test_judge_cli_writes_a_parquet_rows_nan_as_null(tmp_path):
    """JSON has no NaN: a Parquet float column's missing value is null in the output (json.dumps
    would write NaN, which JSON parsers other than Python's refuse)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet, out = tmp_path / "rows.parquet", tmp_path / "graded.jsonl"
    pq.write_table(pa.table({"problem": ["P"], "proof": ["Q.E.D."], "difficulty": [float("nan")],
                             "weight": [float("inf")]}), parquet)
    with JudgeServer({}) as server:
        assert cli.main(["judge", "--input", str(parquet), "--output", str(out), f"base_url={server.url}",
                         "cache_path=null"]) == 0
    row = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the output"))
    assert row["difficulty"] is None and row["weight"] is None and row["score"] == 7


def test_judge_cli_with_stdout_closed_replaces_its_output(tmp_path, monkeypatch):
    """A command started with stdout closed (`>&-`, a daemon) has sys.stdout None: its second run
    into the same --output is no AttributeError."""
    rows, out = tmp_path / "rows.jsonl", tmp_path / "graded.jsonl"
    _write_rows(rows, 1)
    out.write_text("old\n")
    monkeypatch.setattr(sys, "stdout", None)
    with JudgeServer({}) as server:
        assert cli.main(["judge", "--input", str(rows), "--output", str(out), f"base_url={server.url}",
                         "cache_path=null"]) == 0
    assert json.loads(out.read_text())["score"] == 7
