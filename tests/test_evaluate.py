"""Benchmark evaluation and report: endpoint and local models, the judge and math-verify paths,
exactly-once work across a SIGKILL, and the report's numbers against a NumPy reference."""

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import qed_jax
from qed_jax.config import ConfigError, dump_json, load_config
from qed_jax.evaluate import (EvalConfig, RunLog, boxed_answer, check_answer, check_model_unchanged, check_rerun,
                              check_samples_kept, evaluate, holds_an_evaluation, load_prompt_template, misread_value,
                              model_files, prepare_output,
                              read_problem_ids, read_records, read_run, request_seed, sample_seed, turn_completion)
from qed_jax.judge import extract_proof
from qed_jax.report import markdown, report, summarize, unfinished
from tests.helpers import cli_env, drew_a_sample, score_grader
from tests.judge_server import JudgeServer
from tests.model_server import ModelServer

ROOT = Path(__file__).resolve().parent.parent


def bundled_rows(benchmark: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / f"configs/data/{benchmark}_sample.jsonl").read_text().splitlines()]


IMO_ROWS, PROOFBENCH_ROWS, ANSWER_ROWS = (bundled_rows(b) for b in ("imo_proofbench", "proofbench", "answerbench"))


def problem_id(prompt: str, rows) -> str:
    return next(r["problem_id"] for r in rows if r["problem"] in prompt)


def problem_and_sample(prompt: str, seed: int, rows=IMO_ROWS) -> tuple[str, int]:
    """The (problem id, sample index k) an endpoint request asks for, in a run with seed 0: its
    seed is request_seed(sample_seed(0, k), the problem's place in the benchmark)."""
    pid = problem_id(prompt, rows)
    place = [r["problem_id"] for r in rows].index(pid)
    return pid, next(k for k in range(100) if request_seed(sample_seed(0, k), place) == seed)


def config(tmp_path, benchmark: str, model_url: str, judge_url: str, *overrides):
    return load_config(EvalConfig, ROOT / f"configs/eval/{benchmark}.yaml", [
        f"benchmark.path={ROOT}/configs/data/{benchmark}_sample.jsonl", f"model.base_url={model_url}",
        "model.name=tested", f"judge.base_url={judge_url}", f"judge.cache_path={tmp_path}/judge.sqlite",
        f"output_dir={tmp_path}/run", "sampling.max_new_tokens=64", "judge.parse_retries=0", *overrides])


# IMO-ProofBench marks (7, 6, 1, 0) for each problem's samples 0, 1, 2, by the seed they are drawn with.
MARKS = {"PB-Basic-001": [7, 6, 7], "PB-Basic-002": [1, 0, 7], "PB-Advanced-001": [0, 1, 0],
         "PB-Advanced-002": [6, 0, 1]}
TRUNCATED = ("PB-Advanced-002", 1)  # this sample never closes its reasoning: 0, no judge request
FAILING = ("PB-Basic-002", 2)  # the judge's first reply has no mark: a failed grade


def proof_reply(prompt: str, seed: int) -> str:
    pid, k = problem_and_sample(prompt, seed)
    padding = " step" * (10 * (k + 1) + len(pid))  # token counts differ between samples
    if (pid, k) == TRUNCATED:
        return "Let me think" + padding
    return (f"Let me think{padding}.</think>\nProof. [[item:{pid}-s{k}]] The claim follows.\n\n"
            "**Self-evaluation**\nI am confident this proof is complete.")


def imo_judge_scripts():
    scripts = {f"{pid}-s{k}": [("reply", f"<points>{m} out of 7</points>")] for pid, ms in MARKS.items()
               for k, m in enumerate(ms)}
    scripts["PB-Basic-002-s2"] = [("reply", "I cannot decide."), ("reply", "<points>7 out of 7</points>")]
    return scripts


def test_the_failed_grades_warning_prints_below_the_progress_bar(tmp_path, capsys):
    handler = logging.StreamHandler(sys.stderr)  # capsys's stream, as the bar's
    logging.getLogger("qed_jax").addHandler(handler)
    try:
        with ModelServer(proof_reply) as model, JudgeServer(imo_judge_scripts()) as judge:
            evaluate(config(tmp_path, "imo_proofbench", model.url, judge.url), progress=True)
    finally:
        logging.getLogger("qed_jax").removeHandler(handler)
    lines = capsys.readouterr().err.split("\n")
    warning = next(line for line in lines if "1 grade failed" in line)
    assert "eval imo_proofbench" not in warning  # the bar ended its line first
    assert any("eval imo_proofbench" in line and "11/12" in line for line in lines)


def test_endpoint_eval_report_equals_numpy_reference(tmp_path, caplog):
    with ModelServer(proof_reply) as model, JudgeServer(imo_judge_scripts()) as judge:
        cfg = config(tmp_path, "imo_proofbench", model.url, judge.url)
        counts = evaluate(cfg, progress=False)
        assert counts == {"generated": 12, "graded": 12, "failed": 1, "cached": 0, "total": 12}
        assert f"{cfg.output_dir}: 1 grade failed (parse_failure x1); the next run retries them" in caplog.text
        assert model.total == 12 and set(model.requests.values()) == {1}
        assert sorted(problem_and_sample(*request)[1] for request in model.requests) == [0] * 4 + [1] * 4 + [2] * 4
        assert len({seed for _, seed in model.requests}) == 12  # no two requests share a random stream
        assert all(b["messages"][0]["content"].startswith("Generate a rigorous proof to the following question:\n\n")
                   for b in model.bodies)
        assert judge.total == 11  # the truncated sample is never sent
        assert not any("I am confident" in b["messages"][0]["content"] for b in judge.bodies)

        config_dict, records = read_run(cfg.output_dir)
        assert read_problem_ids(cfg.output_dir) == [row["problem_id"] for row in IMO_ROWS]
        by_key = {(r["problem_id"], r["sample"]): r for r in records}
        for (pid, k), r in by_key.items():
            expected = None if (pid, k) == FAILING else 0 if (pid, k) == TRUNCATED else MARKS[pid][k]
            assert r["score"] == expected, (pid, k)
        assert by_key[TRUNCATED]["truncated"] and by_key[TRUNCATED]["decided_by"] == "truncated"
        assert by_key[FAILING]["reason"] == "parse_failure"

        _, out, plots = report([cfg.output_dir])
        summary = json.loads((out / "report.json").read_text())["run"]

        # The reference, by hand: scores [problem, sample] with the failed grade as NaN.
        pids = list(MARKS)
        scores = np.array([[by_key[(p, k)]["score"] if by_key[(p, k)]["score"] is not None else np.nan
                            for k in range(3)] for p in pids], dtype=float)
        tokens = np.array([r["completion_tokens"] for r in records], dtype=float)
        whole = ~np.isnan(scores).any(axis=0)  # sample 2 has the failed grade: each mean covers every problem
        per_sample = scores[:, whole].mean(axis=0)
        assert summary["failed"] == 1 and summary["graded"] == 11
        assert summary["mean"] == pytest.approx(np.nanmean(scores))
        assert summary["percent"] == pytest.approx(100 * np.nanmean(scores) / 7)
        assert summary["mean_failed_as_zero"] == pytest.approx(np.nan_to_num(scores).mean())
        assert summary["avg_at_k"]["k"] == 2
        assert summary["avg_at_k"]["mean"] == pytest.approx(per_sample.mean())
        assert summary["avg_at_k"]["std"] == pytest.approx(np.std(per_sample, ddof=1))
        assert summary["avg_at_k"]["percent_std"] == pytest.approx(100 * np.std(per_sample, ddof=1) / 7)
        assert summary["groups"]["Basic"]["mean"] == pytest.approx(np.nanmean(scores[:2]))
        assert summary["groups"]["Advanced"]["mean"] == pytest.approx(np.nanmean(scores[2:]))
        assert summary["tokens"] == pytest.approx({"mean": tokens.mean(), "median": np.median(tokens),
                                                   "p90": np.percentile(tokens, 90)})
        assert summary["truncated_fraction"] == pytest.approx(1 / 12)
        markdown = (out / "report.md").read_text()
        assert f"| {100 * np.nanmean(scores) / 7:.1f} |" in markdown
        assert f"Basic {100 * np.nanmean(scores[:2]) / 7:.1f}" in markdown
        assert "1 (as 0: " in markdown
        assert plots == [out / "score_histogram.png", out / "score_vs_tokens.png"]
        assert all(p.stat().st_size > 0 for p in plots)

        # A rerun regrades only the failed sample (the judge now answers), and generates nothing.
        counts = evaluate(cfg, progress=False)
        assert counts == {"generated": 0, "graded": 1, "failed": 0, "cached": 0, "total": 12}
        assert model.total == 12 and judge.total == 12
        _, records = read_run(cfg.output_dir)
        assert {(r["problem_id"], r["sample"]): r["score"] for r in records}[FAILING] == 7
        assert evaluate(cfg, progress=False)["graded"] == 0 and judge.total == 12

        # The same samples in another run directory, with the same judge cache: nothing is sent,
        # and the grades say they are the cache's (a stand-in's grades cached under a real judge's
        # name would have passed for that judge's, unseen).
        again = config(tmp_path, "imo_proofbench", model.url, judge.url, f"output_dir={tmp_path}/again")
        assert evaluate(again, progress=False) == {"generated": 12, "graded": 12, "failed": 0, "cached": 11,
                                                   "total": 12}
        assert judge.total == 12
        _, out, _ = report([again.output_dir])
        assert json.loads((out / "report.json").read_text())["again"]["decided_by"] == {"judge_cache": 11, "truncated": 1}


def test_answers_math_verify_first_judge_for_the_undecidable(tmp_path):
    answers = {"AB-001": "0.5", "AB-002": "x=3", "AB-003": "5", "AB-004": r"\text{every odd } n"}

    def reply(prompt, seed):
        pid = problem_id(prompt, ANSWER_ROWS)
        return f"Compute.</think>\nThe answer is \\boxed{{{answers[pid]}}}. [[item:{pid}]]"

    with ModelServer(reply) as model, JudgeServer({"AB-004": [("reply", "<verdict>Incorrect</verdict>")]}) as judge:
        cfg = config(tmp_path, "answerbench", model.url, judge.url, "samples=1")
        evaluate(cfg, progress=False)
        assert judge.requests == {"AB-004": 1}
        assert "Correct answer\nn = 1" in judge.bodies[0]["messages"][0]["content"]
        assert "\\boxed{" in model.bodies[0]["messages"][0]["content"]
    _, records = read_run(cfg.output_dir)
    got = {r["problem_id"]: (r["score"], r["decided_by"]) for r in records}
    assert got == {"AB-001": (7, "math_verify"), "AB-002": (7, "math_verify"), "AB-003": (0, "math_verify"),
                   "AB-004": (0, "judge")}

    # A rerun may ask for more samples (and only draws those), not for other sampling settings.
    with ModelServer(reply) as model, JudgeServer() as judge:
        more = config(tmp_path, "answerbench", model.url, judge.url, "samples=2")
        # AB-004's new sample is the same text as its first: its grade is the judge cache's.
        assert evaluate(more, progress=False) == {"generated": 4, "graded": 4, "failed": 0, "cached": 1, "total": 8}
        assert sorted(problem_and_sample(*request, ANSWER_ROWS)[1] for request in model.requests) == [1] * 4
        with pytest.raises(ConfigError, match=r"holds a run with sampling\.temperature=0\.8, not 0\.5"):
            evaluate(config(tmp_path, "answerbench", model.url, judge.url, "sampling.temperature=0.5"), progress=False)


def test_a_rerun_naming_a_model_folder_that_is_not_there_says_so_first(tmp_path):
    model = tmp_path / "model"
    model.mkdir()

    def local(path):
        return load_config(EvalConfig, ROOT / "configs/eval/imo_proofbench.yaml", [
            f"model.path={path}", f"output_dir={tmp_path}/run", "judge.base_url=http://127.0.0.1:9/v1"])

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(dump_json(local(model)))
    sample = {"type": "sample", "problem_id": "p", "sample": 0, "completion_tokens": 3, "truncated": False}
    (tmp_path / "run" / "samples.jsonl").write_text(json.dumps(sample) + "\n")  # a run with samples
    with pytest.raises(ConfigError, match=f"^model.path {re.escape(str(tmp_path / 'modle'))} does not exist$"):
        check_rerun(local(tmp_path / "modle"))  # a typo: not "holds a run with model.path=..."
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match=r"holds a run with model.path=.*, not .*other.*: its samples and grades"):
        check_rerun(local(other))


def test_a_rerun_refuses_a_benchmark_whose_drawn_problems_changed(tmp_path):
    """Problems added to the benchmark are drawn; a drawn problem whose text, reference or row
    (its seed's stream) changed, or that is gone, stops the rerun before anything is drawn."""
    rows = [json.loads(line) for line in (ROOT / "configs/data/answerbench_sample.jsonl").read_text().splitlines()]
    added = {"problem_id": "AB-new", "problem": "Compute $2 + 2$.", "answer": "4"}
    bench = tmp_path / "bench.jsonl"

    def write(some):
        bench.write_text("".join(json.dumps(r) + "\n" for r in some))

    with ModelServer(lambda prompt, seed: "Compute.</think>\nSo \\boxed{3}.") as model, JudgeServer() as judge:
        def run():
            return evaluate(config(tmp_path, "answerbench", model.url, judge.url, f"benchmark.path={bench}",
                                   "samples=1"), progress=False)

        write(rows)
        assert run()["generated"] == 4
        write([*rows, added])  # a problem added after the others: the run grows by it
        assert run()["generated"] == 1
        drawn = model.total
        for some, message in [
            ([rows[0], {**rows[1], "answer": "4"}, *rows[2:], added], "problem 'AB-002' whose answer changed"),
            ([{**rows[0], "problem": rows[0]["problem"] + " "}, *rows[1:], added], "problem 'AB-001' whose problem "),
            ([rows[1], rows[0], *rows[2:], added], "problem 'AB-001' whose row changed"),
            ([*rows[1:], added], "problem 'AB-001', which .*bench.jsonl no longer has"),
        ]:
            write(some)
            with pytest.raises(ConfigError, match=f"run holds samples of {message}"):
                run()
        assert model.total == drawn
        write([*rows, added])
        assert run()["generated"] == 0


def test_a_stripped_self_evaluation_is_not_read_as_the_final_answer(tmp_path):
    def reply(prompt, seed):  # the right answer, then a self-evaluation whose box holds the score
        if "divisors" not in prompt:  # AB-001, AB-002: a self-evaluation and nothing else
            return "Compute.</think>\nConfidence: \\boxed{7} of 7"
        return "Compute.</think>\nSo the answer is \\boxed{6}.\n\nConfidence: \\boxed{7} of 7"

    runs = {}
    for strip in (True, False):
        with ModelServer(reply) as model, JudgeServer() as judge:
            cfg = config(tmp_path / str(strip), "answerbench", model.url, judge.url, "samples=1", "benchmark.limit=3",
                         f"judge.strip_self_evaluation={str(strip).lower()}")
            evaluate(cfg, progress=False)
        _, records = read_run(cfg.output_dir)
        runs[strip] = {r["problem_id"]: (r["score"], r["decided_by"], r["truncated"]) for r in records}
    # Kept, the self-evaluation's box disagrees with the answer's: the judge decides.
    assert runs[True]["AB-003"] == (7, "math_verify", False) and runs[False]["AB-003"][1:] == ("judge", False)
    # Nothing left once the self-evaluation goes: counted truncated, as it is graded.
    assert runs[True]["AB-001"] == (0, "truncated", True) and runs[False]["AB-001"] == (0, "math_verify", False)


def test_reasoning_split_off_by_the_server_is_joined_back(tmp_path):
    def reply(prompt, seed):
        return "Working it out.</think>\nSo the answer is \\boxed{6}." if "divisors" in prompt else "Still thinking"

    with ModelServer(reply, split_reasoning=True) as model, JudgeServer() as judge:
        cfg = config(tmp_path, "answerbench", model.url, judge.url, "samples=1")
        evaluate(cfg, progress=False)
        assert judge.total == 0
    _, records = read_run(cfg.output_dir)
    got = {r["problem_id"]: (r["completion"], r["score"], r["decided_by"]) for r in records}
    assert got["AB-003"] == ("Working it out.</think>\nSo the answer is \\boxed{6}.", 7, "math_verify")
    assert got["AB-001"] == ("Still thinking", 0, "truncated")


def test_a_benchmark_without_a_judge_fails_before_sampling(tmp_path):
    import socket

    from qed_jax.errors import JudgeUnavailable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    # Final answers too: the judge settles what math-verify cannot, and a changed judge.model
    # would then be refused for the samples already drawn.
    for benchmark in ("imo_proofbench", "answerbench"):
        with ModelServer(lambda prompt, seed: "A proof.</think>Done.") as model:
            cfg = config(tmp_path, benchmark, model.url, f"http://127.0.0.1:{port}/v1")
            with pytest.raises(JudgeUnavailable, match=f"cannot reach the judge at http://127.0.0.1:{port}/v1"):
                evaluate(cfg, progress=False)
            assert model.total == 0  # not one completion was asked for
        assert not (tmp_path / "run").exists()  # nor a run directory made that holds nothing
    # A local model that is not there is named before the judge is tried.
    missing = load_config(EvalConfig, ROOT / "configs/eval/imo_proofbench.yaml", [
        f"benchmark.path={ROOT}/configs/data/imo_proofbench_sample.jsonl", f"model.path={tmp_path}/no-model",
        f"judge.base_url=http://127.0.0.1:{port}/v1", f"output_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=f"^model.path {tmp_path}/no-model does not exist$"):
        evaluate(missing, progress=False)
    assert not (tmp_path / "run").exists()
    # ... and before the benchmark is read (the shipped configs read it from the Hub, which an
    # offline machine retries for half a minute before it fails).
    missing = load_config(EvalConfig, None, [f"benchmark.path={tmp_path}/no-benchmark.jsonl",
                                             f"model.path={tmp_path}/no-model", f"output_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=f"^model.path {tmp_path}/no-model does not exist$"):
        evaluate(missing, progress=False)


def test_grades_are_kept_as_they_come_when_the_judge_stops_the_run(tmp_path):
    """A judge that refuses the key part-way stops the run; the grades that came back before are
    in samples.jsonl (with no cache to fall back on), so a rerun does not ask for them again."""
    from qed_jax.errors import JudgeUnavailable

    refused = f"{IMO_ROWS[2]['problem_id']}-s0"  # the third problem: one request at a time, in order
    with ModelServer(proof_reply) as model, JudgeServer({refused: [("status", 401)]}) as judge:
        cfg = config(tmp_path, "imo_proofbench", model.url, judge.url, "samples=1", "judge.cache_path=null",
                     "judge.concurrency=1", f"judge.template={score_grader(tmp_path)}", "judge.answer_format=score",
                     "judge.allowed_scores=null")
        with pytest.raises(JudgeUnavailable, match="refused the request"):
            evaluate(cfg, progress=False)
    answered = {item for item in judge.requests if item != refused}
    assert len(answered) == 2 and refused in judge.requests
    graded = {f"{r['problem_id']}-s{r['sample']}" for r in read_run(tmp_path / "run")[1] if r["graded"]}
    assert graded == answered


@pytest.mark.parametrize("body", [("text/html", "<html>\n<body>\n502 Bad Gateway\n</body></html>"),
                                  ("application/json", '{"choices": [ cut off'), ("application/json", '{"id": "x"}')])
def test_a_model_endpoint_reply_that_is_not_a_completion_is_one_line(tmp_path, body):
    """A proxy's error page or a half-up server answering 200 stops the run with one line naming
    the endpoint, not a traceback (the run keeps what it had); the page's own lines are joined."""
    with JudgeServer(default=("body", body)) as model, JudgeServer() as judge:
        cfg = config(tmp_path, "imo_proofbench", model.url, judge.url)
        with pytest.raises(ConfigError, match=f"^the model endpoint {model.url} failed: the reply is not ") as e:
            evaluate(cfg, progress=False)
    assert "\n" not in str(e.value)


def test_a_model_endpoint_that_never_finishes_a_reply_stops_the_run(tmp_path, monkeypatch):
    """The client's timeout bounds each read, which a reply trickling in byte by byte renews;
    the whole request, its retries included, is bounded too."""
    from qed_jax import evaluate as evaluate_module

    async def trickling(client, **kwargs):
        await asyncio.sleep(3600)

    monkeypatch.setattr(evaluate_module, "chat_choice", trickling)
    with JudgeServer() as model, JudgeServer() as judge:
        cfg = config(tmp_path, "imo_proofbench", model.url, judge.url, "model.timeout_s=0.01")
        with pytest.raises(ConfigError, match=rf"^the model endpoint {model.url} did not finish a reply within 4 x "
                                              r"model.timeout_s \(0.01 s\), its retries included$"):
            evaluate(cfg, progress=False)


def test_an_endpoint_reply_cut_off_in_its_reasoning_gets_no_think_end():
    """vLLM's reasoning parser returns a reply out of tokens mid-reasoning as reasoning and no
    content: the model never wrote </think>, so the sample does not hold one."""
    from types import SimpleNamespace

    from qed_jax.evaluate import EndpointGenerator

    def sample(content, finish_reason, **reasoning):
        message = SimpleNamespace(**(reasoning or {"reasoning_content": "Let me"}), content=content)
        choice = SimpleNamespace(message=message, finish_reason=finish_reason)
        response = SimpleNamespace(usage=SimpleNamespace(completion_tokens=3))
        return EndpointGenerator._sample(response, choice, content or "").text

    assert sample(None, "length") == "Let me"
    assert sample(None, "stop") == "Let me</think>"  # closed its reasoning, then wrote nothing
    assert sample("Proof.", "length") == "Let me</think>Proof."
    # A model that closed its thinking at once: the parser's reasoning is "", and </think> was written.
    assert sample("So 3.", "stop", reasoning_content="") == "</think>So 3."
    assert sample("So 3.", "stop", reasoning="") == "</think>So 3."
    assert sample("<think>R</think>So 3.", "stop", other=None) == "<think>R</think>So 3."  # no parser: as it is


@pytest.mark.parametrize("tokens", ["many", -3, 2.5])
def test_a_model_endpoint_reply_with_a_token_count_that_is_not_one_stops_the_run(tmp_path, tokens):
    completion = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "tested",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "</think>Proof."}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": 1}})
    with JudgeServer(default=("body", ("application/json", completion))) as model, JudgeServer() as judge:
        cfg = config(tmp_path, "imo_proofbench", model.url, judge.url)
        with pytest.raises(ConfigError, match=f"usage.completion_tokens {re.escape(repr(tokens))}, not a count of "
                                              "tokens$"):
            evaluate(cfg, progress=False)


def test_a_rerun_that_only_grades_needs_no_model(tmp_path):
    from qed_jax.config import dump_json

    with JudgeServer() as judge:  # scores 7
        cfg = load_config(EvalConfig, ROOT / "configs/eval/imo_proofbench.yaml", [
            f"benchmark.path={ROOT}/configs/data/imo_proofbench_sample.jsonl", "benchmark.limit=1", "samples=1",
            f"model.path={tmp_path}/model-since-deleted", f"judge.base_url={judge.url}",
            f"judge.cache_path={tmp_path}/judge.sqlite", f"output_dir={tmp_path}/run",
            f"judge.template={score_grader(tmp_path)}", "judge.answer_format=score", "judge.allowed_scores=null"])
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.json").write_text(dump_json(cfg))
        sample = {"type": "sample", "problem_id": IMO_ROWS[0]["problem_id"], "sample": 0,
                  "seed": sample_seed(cfg.seed, 0), "group": None,
                  "completion": "Let me think.</think>\nProof. It holds.", "completion_tokens": 9,
                  "finish_reason": "stop", "truncated": False}
        (run / "samples.jsonl").write_text(json.dumps(sample) + "\n")  # generated, its grade lost
        assert evaluate(cfg, progress=False) == {"generated": 0, "graded": 1, "failed": 0, "cached": 0, "total": 1}
    assert judge.total == 1
    assert [r["score"] for r in read_run(run)[1]] == [7]
    # Finished, its model back at that path but retrained since: its results are not this model's.
    model = tmp_path / "model-since-deleted"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"the weights sampled from")
    (run / "model_files.json").write_text(json.dumps(model_files(cfg.model.path)))
    assert evaluate(cfg, progress=False) == {"generated": 0, "graded": 0, "failed": 0, "cached": 0, "total": 1}
    (model / "model.safetensors").write_bytes(b"weights trained again")
    with pytest.raises(ConfigError, match=r"holds samples of the model at .* \(they differ now: re-exported, "
                                          r"retrained or replaced\), so its results are not this model's"):
        evaluate(cfg, progress=False)
    shutil.rmtree(model)
    # A run whose samples an earlier version drew with seed + k is not extended with new ones.
    (run / "samples.jsonl").write_text(json.dumps({**sample, "seed": cfg.seed}) + "\n")
    with pytest.raises(ConfigError, match=f"holds sample 0 of problem '{IMO_ROWS[0]['problem_id']}' drawn with "
                                          f"seed 0, where this version draws it with {sample_seed(0, 0)}"):
        evaluate(cfg, progress=False)

def test_a_record_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "samples.jsonl"
    whole = json.dumps({"type": "sample", "problem_id": "a", "sample": 0, "completion_tokens": 3,
                        "truncated": False}) + "\n"
    path.write_text(whole + '{"type": "grade", "problem_id": "a", "sam')
    assert read_records(path) == [json.loads(whole)]
    assert path.read_text().endswith('"sam')  # reading alone (the report) leaves the file as it is
    runlog = RunLog.open(path)
    runlog.append({"type": "grade", "problem_id": "a", "sample": 0, "score": 7})
    runlog.close()
    assert [r["type"] for r in read_records(path)] == ["sample", "grade"]
    assert runlog.graded(("a", 0))


def test_a_full_disk_while_appending_a_record_is_one_line_that_names_the_log():
    runlog = RunLog(Path("/dev/full")).start_appending()  # every write to it fails as on a full disk
    with pytest.raises(ConfigError, match=r"^/dev/full: No space left on device; free space on that disk, or "
                                          r"choose a path on another; the samples and grades written before it "
                                          r"are kept: rerun the same command to continue$"):
        runlog.append({"type": "grade", "problem_id": "a", "sample": 0, "score": 7})
    runlog.close()  # the unwritten record fails no second time (which would replace the line above)
    assert not runlog.graded(("a", 0))


def test_runs_with_nearby_seeds_share_no_samples():
    seeds = {seed: [sample_seed(seed, k) for k in range(8)] for seed in range(4)}
    assert len({s for per_run in seeds.values() for s in per_run}) == 32
    assert all(0 <= s < 2 ** 31 for per_run in seeds.values() for s in per_run)


def test_answer_checks():
    assert check_answer(r"\frac{1}{2}", "0.5") is True
    assert check_answer("x=3", "3") is True
    assert check_answer("4", "3") is False
    assert check_answer("all odd n", "n = 1") is None  # letters: only the judge can tell
    assert check_answer(None, "3") is None
    assert check_answer("-5", "5") is False and check_answer("1000000", "1000001") is False
    # math-verify's "not equal" also covers what it cannot prove: only numbers that differ are
    # decided, the rest goes to the judge. The sum of cosines is 1/2 (to 30 digits, by sympy).
    assert check_answer(r"\frac{1}{2}", r"\cos\frac{\pi}{7}-\cos\frac{2\pi}{7}+\cos\frac{3\pi}{7}") is None
    assert check_answer(r"\{1,2\}", r"\{1,3\}") is None and check_answer("(1,2)", "(2,1)") is None
    # math-verify reads a bare list as a set: it is one for a set or list of as many items, in any
    # order; a tuple, or a list with an item more or fewer, goes to the judge.
    assert check_answer("2, 3", "3, 2") is True and check_answer(r"\{3, 2\}", "2, 3") is True
    for predicted, reference in [("(3,4,5)", "5,4,3"), ("2", "2, 2"), ("2, 2", "2"), ("1, 2, 2", "1, 2"),
                                 ("3, 3, 4", "3, 4, 4"), ("(1,2), (1,2), (3,4)", "(1,2), (3,4), (3,4)")]:
        assert check_answer(predicted, reference) is None, (predicted, reference)
    assert check_answer("1,000", "1000") is True  # digit groups: one number
    assert check_answer("1,000, 2,000", "2000, 1000") is True
    assert check_answer("3", "3.0000000001") is None  # equal to 9 digits: not decided unequal
    # Past any float's range (both inf as floats, whose difference is nan), compared as numbers.
    assert check_answer("2^{2025}", "2^{2024}") is False and check_answer("2^{2024}", "2^{2024}") is True
    assert check_answer("2^{2024}+1", "2^{2024}") is None  # equal to 30 digits: not decided unequal
    # sympy's cube root of a negative number is the complex principal root: only real values are
    # decided unequal. Nor is an angle in degrees against one in radians.
    assert check_answer("-3", r"\sqrt[3]{-27}") is None and check_answer("2", r"\sqrt[3]{-1}+3") is None
    assert check_answer("1", r"\sqrt[3]{2+\sqrt{5}}+\sqrt[3]{2-\sqrt{5}}") is None
    assert check_answer(r"\frac{\pi}{3}", r"60^\circ") is None and check_answer("61", r"60^{\circ}") is None
    assert check_answer("3", r"\sqrt[3]{27}") is True and check_answer("4", r"\sqrt[3]{27}") is False
    # Digits grouped by thin spaces are one number (math-verify reads 1\,000 as 1 times 000).
    assert check_answer(r"1\,000", "1000") is True and check_answer("1000", r"1\,000") is True
    assert check_answer(r"12\,345", "12345") is True and check_answer(r"2\;024", "2024") is True
    assert check_answer(r"1\,001", "1000") is False and check_answer("\u22125", "5") is False  # a Unicode minus
    # A number math-verify picks out of more than a number (a congruence's modulus, a remark in
    # words) decides nothing: the judge does.
    assert check_answer(r"x \equiv 3 \pmod 5", "3") is None and check_answer(r"n \equiv 3 \pmod{4}", "3") is not False
    assert check_answer(r"4 \text{ (achieved at } x=2)", "4") is not False
    assert check_answer("x = 4", "3") is None and check_answer("1 000", "1000") is not False
    # ... nor does its "equal" there: the modulus, a number in a remark, or one of words.
    assert check_answer(r"n \equiv 1 \pmod 4", r"n \equiv 3 \pmod 4") is None
    assert check_answer(r"n \equiv 1 \pmod{4}", r"n \equiv 1 \pmod{8}") is None
    assert check_answer("4", r"n \equiv 1 \pmod 4") is None and check_answer(r"1 \bmod 3", "3") is None
    assert check_answer(r"4 \text{ (attained at } x=2)", "2") is None and check_answer("5 for n = 3", "3") is None
    # Two answers joined by a connective, or a relation, are read as their last number: the judge decides.
    for hedge in (r"x = 3 \lor x = 4", r"n=3 \vee n=4", r"3 \cup 4", "3 | 4", r"3 \to 4", r"3 \\ 4", "1 = 4",
                  r"\geq 4", r"\neq 4", r"4 \%", "a+b=4", r"x \approx 4"):
        assert check_answer(hedge, "4") is None, hedge
    # One value, or one equation that gives a variable its value, is math-verify's to decide.
    assert check_answer("x=4", "4") is True and check_answer(r"a_n = 2^n", "2^n") is True
    assert check_answer(r"\alpha = \frac{\pi}{2}", r"\frac{\pi}{2}") is True and check_answer(r"\{1,2\}", "2, 1") is True
    assert check_answer(r"\binom{5}{2}", "10") is True and check_answer(r"\lfloor 2.5 \rfloor", "2") is True
    assert check_answer(r"(-\infty, 2)", r"(-\infty,2)") is True and check_answer(r"\ln 2", r"\ln(2)") is True
    # latex2sympy reads a number then a bracketed number as a mixed number (2(3) as 5): undecided.
    assert check_answer("2(3)", "6") is None and check_answer("5(2)", "7") is None
    assert check_answer("(4)(3)", "7") is None and check_answer(r"2\left(3\right)", "5") is None
    assert check_answer("2(3)+x", "5+x") is None and check_answer(r"2\left(\frac12\right)", "1") is None
    assert check_answer("{2}(3)", "6") is None and check_answer(r"2\,(3)", "5") is None
    assert check_answer("3(2^{10}+1)", "3075") is True  # more than a number in the bracket: a product
    # Numbers side by side with only space between: math-verify reads 2 3 as 5, 1 000 as 0.
    for juxtaposed, read_as in [("3 4", "7"), (r"2\,3", "5"), (r"2\ 3", "5"), ("7 8 9", "24"), ("2 2", "4"),
                                ("{2} 3", "5"), ("1 000", "0"), (r"\frac{1}{2} 3", r"\frac{3}{2}"), ("2~3", "5")]:
        assert check_answer(juxtaposed, read_as) is None, juxtaposed
        assert check_answer(read_as, juxtaposed) is None, juxtaposed
    assert check_answer("2 + 3", "5") is True and check_answer(r"2 \cdot 3", "6") is True
    assert check_answer("2(n+1)", "2n+2") is True and check_answer("(n+1)(n+2)", "n^2+3n+2") is True
    assert check_answer(r"2(\sqrt{2}+1)", r"2\sqrt{2}+2") is True  # more than a number in the bracket: a product
    # Equal to 12 digits, not math-verify's default 6: a decimal approximation is not exact.
    assert check_answer("1.414214", r"\sqrt{2}") is False and check_answer("0.333333", r"\frac{1}{3}") is False
    assert check_answer("3.141593", r"\pi") is False and check_answer("0.25", r"\frac{1}{4}") is True


def test_answers_that_differ_below_math_verifys_rounding_are_not_equal():
    # math-verify chops a difference below 1e-15 (and rounds floats to 12 decimals): 2^{-100} and
    # 2^{-99} were equal to it, a wrong probability graded 7. Values that differ go to the judge.
    for predicted, reference in [(r"\frac{1}{2^{100}}", r"\frac{1}{2^{99}}"), ("2^{-2025}", "2^{-2024}"),
                                 (r"3\cdot10^{-20}", "10^{-20}"), (r"\frac{1}{2^{100}}", "0.0"),
                                 (r"p = \frac{1}{2^{60}}", r"\frac{1}{2^{61}}")]:
        assert check_answer(predicted, reference) is None, (predicted, reference)
        assert check_answer(reference, predicted) is None, (reference, predicted)
    assert check_answer(r"\frac{1}{2^{100}}", "2^{-100}") is True and check_answer("p = 2^{-100}", "2^{-100}") is True
    assert check_answer(r"\frac{1}{3}", "0.333333333333") is True  # equal to 12 digits, as before


def test_boxed_answer():
    assert boxed_answer(r"so \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert boxed_answer("no box") is None
    # Every box must hold the same answer: the judge decides a hedge between two.
    assert boxed_answer(r"Either \boxed{3} or \boxed{4}.") is None
    assert boxed_answer(r"\boxed{4}, as checked: \boxed{ 4 }") == "4"
    # Boxes whose braces close: one cut off by the token budget leaves the one before.
    assert boxed_answer(r"\boxed{1} then \boxed{\frac{1}{2} and on") == "1"
    assert boxed_answer(r"} \fbox {a{b}c} \boxed{a{b}c}}") == "a{b}c" and boxed_answer(r"\boxed{\boxed{y}") == "y"
    assert boxed_answer(r"\boxed{\boxed{y}}") == "y"  # a box holding a box is that box
    assert boxed_answer(r"\boxed{\boxed{3} and \boxed{4}}") is None
    # A degenerate repetition to the end of the budget (no box closes) is read in one pass: each
    # box scanning to the end of the text would take minutes here.
    assert boxed_answer(r"The answer is \boxed{x = " * 20_000) is None
    assert boxed_answer(r"\boxed{7}" + r"\boxed{" * 50_000) == "7"


def test_benchmark_columns_are_checked_where_they_are_read():
    from qed_jax.evaluate import BenchmarkConfig, problems_from_rows

    def problems(rows, **config):
        return problems_from_rows([(f"line {n}", r) for n, r in enumerate(rows, 1)], BenchmarkConfig(path="b", **config))

    # A number is written out in full: Python's "1e-05" is e - 5 to math-verify.
    answers = [p.answer for p in problems([{"problem": "P", "answer": 1e-05}, {"problem": "Q", "answer": 1e20},
                                           {"problem": "R", "answer": 12}], kind="answer")]
    assert answers == ["0.00001", "100000000000000000000", "12"] and check_answer("10^{-5}", answers[0]) is True
    with pytest.raises(ConfigError, match=r"^b: line 1: column 'answer' \(the reference answer\) must be a string or a "
                                          "number, got list$"):
        problems([{"problem": "P", "answer": [1, 2]}], kind="answer")
    for missing in (float("nan"), float("inf")):  # JSON's NaN (Python writes a table's missing value so): no answer
        with pytest.raises(ConfigError, match=r"^b: line 1: column 'answer' \(the reference answer\) must be a string "
                                              rf"or a finite number, got {missing}$"):
            problems([{"problem": "P", "answer": missing}], kind="answer")
    with pytest.raises(ConfigError, match=r"^b: line 2: column 'solution' \(the reference solution\) must be text, "
                                          "got list; map another with benchmark.fields.solution=COLUMN$"):
        problems([{"problem": "P"}, {"problem": "Q", "solution": ["One way.", "Another."]}])
    with pytest.raises(ConfigError, match=r"^b: line 1: column 'problem' \(the problem\) must be text, got int; map "
                                          "another with benchmark.fields.problem=COLUMN$"):
        problems([{"problem": 42}])
    with pytest.raises(ConfigError, match=r"^b: line 1: column 'problem' \(the problem\) is missing or empty"):
        problems([{"problem": " "}])
    groups = {"recent": "2025", "earlier": ".*"}
    # An empty file says so (not that no row has the group column).
    with pytest.raises(ConfigError, match=r"^b: no problems to evaluate \(it holds no rows\)$"):
        problems([], group_field="competition", groups=groups)
    with pytest.raises(ConfigError, match=r"^b: no row has the column 'competition' \(benchmark.group_field\)"):
        problems([{"problem": "P", "contest": "IMO 2025"}], group_field="competition", groups=groups)
    # A run that goes on was drawn under it (and may not change it): warned, grouped as before.
    old_run = problems_from_rows([("line 1", {"problem": "P"})], BenchmarkConfig(
        path="b", group_field="competition", groups=groups), new_run=False)
    assert [p.group for p in old_run] == ["earlier"]
    rows = [{"problem": "P", "competition": "IMO 2025"}, {"problem": "Q", "competition": None}, {"problem": "R"}]
    assert [p.group for p in problems(rows, group_field="competition", groups={"recent": "2025", "none": "^$"})] == [
        "recent", "none", "none"]  # null, like a missing column, is "" (not the text "None")
    # A null id, like a missing one, is the row's index (not the text "None", which two rows share).
    assert [p.id for p in problems([{"problem": "P", "problem_id": None}, {"problem": "Q", "problem_id": None},
                                    {"problem": "R", "problem_id": 7}])] == ["0", "1", "7"]
    # Such an id taken by another row: the message says which row has none.
    for rows, without in (([{"problem": "P", "problem_id": 1}, {"problem": "Q"}], "line 2"),
                          ([{"problem": "P"}, {"problem": "Q", "problem_id": "0"}], "line 1")):
        pid = rows[0].get("problem_id", 0)
        with pytest.raises(ConfigError, match=rf"^b: line 2: problem id '{pid}' is also line 1's: {without} has no "
                                              r"column 'problem_id', so its id is its row index; give every row an id"):
            problems(rows)
    with pytest.raises(ConfigError, match=r"^b: line 3: problem id '3' is also line 1's; ids key the samples, so "
                                          r"they must be unique$"):  # both rows named
        problems([{"problem": "P", "problem_id": 3}, {"problem": "Q", "problem_id": 4},
                  {"problem": "R", "problem_id": "3"}])
    for bad in ([1, 2], "", " ", True, float("nan"), {"n": 1}):  # an id that cannot key samples, or by chance
        with pytest.raises(ConfigError, match=r"^b: line 2: column 'problem_id' \(the problem's id\) must be a "
                                              r"non-empty text or a number, got .*; ids key the samples$"):
            problems([{"problem": "P", "problem_id": 0}, {"problem": "Q", "problem_id": bad}])
    # Floats key as written (a Parquet column of integer ids with nulls reads as floats).
    assert [p.id for p in problems([{"problem": "P", "problem_id": 3.0}, {"problem": "Q", "problem_id": 4}])] == [
        "3.0", "4"]


def test_proof_benchmark_warns_of_a_reference_column_that_no_row_has(caplog):
    """A solution or guidelines column that no row has is most likely mapped to the wrong name:
    the judge would grade every proof without it. Warned, naming the column and the setting."""
    from qed_jax.evaluate import BenchmarkConfig, problems_from_rows

    rows = [("line 1", {"problem": "P", "reference_solution": "S", "grading_guidelines": "G", "problem_id": "a"}),
            ("line 2", {"problem": "Q", "reference_solution": "T", "problem_id": "b"})]
    with caplog.at_level(logging.WARNING, logger="qed_jax.evaluate"):
        problems_from_rows(rows, BenchmarkConfig(path="b"))
    assert caplog.messages == [
        "b: no row has the column 'solution' (benchmark.fields.solution), so the judge grades every proof without "
        "a reference solution; map it with benchmark.fields.solution=COLUMN",
        "b: 1 of 2 rows have no column 'grading_guidelines' (benchmark.fields.guidelines), so their proofs are "
        "graded without grading guidelines: line 2"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qed_jax.evaluate"):
        problems_from_rows(rows, BenchmarkConfig(path="b", fields={"solution": "reference_solution"}))
        problems_from_rows([("line 1", {"problem": "P", "answer": "1", "problem_id": 7})],
                           BenchmarkConfig(path="b", kind="answer"))
    # The rows that lack a column the others have are named (an answer benchmark reads neither).
    assert caplog.messages == [
        "b: 1 of 2 rows have no column 'grading_guidelines' (benchmark.fields.guidelines), so their proofs are "
        "graded without grading guidelines: line 2"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qed_jax.evaluate"):
        problems_from_rows([*rows, *((f"line {n}", {"problem": f"P{n}", "reference_solution": "S"})
                                     for n in range(3, 10))], BenchmarkConfig(path="b", fields={
                                         "solution": "reference_solution"}))
    assert caplog.messages == [
        "b: 7 of 9 rows have no column 'problem_id' (benchmark.fields.id), so their ids are their row indexes: "
        "line 3, line 4, line 5, line 6, line 7 and 2 more",
        "b: 8 of 9 rows have no column 'grading_guidelines' (benchmark.fields.guidelines), so their proofs are "
        "graded without grading guidelines: line 2, line 3, line 4, line 5, line 6 and 3 more"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qed_jax.evaluate"):
        problems_from_rows(rows, BenchmarkConfig(path="b", fields={"solution": "reference_solution",
                                                                   "guidelines": "rubric"}))
    assert caplog.messages == [
        "b: no row has the column 'rubric' (benchmark.fields.guidelines), so the judge grades every proof without "
        "grading guidelines; map it with benchmark.fields.guidelines=COLUMN"]
    caplog.clear()
    # Nor an id column (a file with ids under another name): the row index keys the samples.
    with caplog.at_level(logging.WARNING, logger="qed_jax.evaluate"):
        found = problems_from_rows([("line 1", {"problem": "P", "answer": "1", "id": "x"})],
                                   BenchmarkConfig(path="b", kind="answer"))
    assert [p.id for p in found] == ["0"]
    assert caplog.messages == [
        "b: no row has the column 'problem_id' (benchmark.fields.id), so each problem's id is its row index, and a "
        "run's samples stay with their problems only while the file keeps its rows in order; map it with "
        "benchmark.fields.id=COLUMN"]


def test_a_blank_solution_or_guidelines_is_none_given(caplog):
    """A blank or empty value (a table's column of empty cells) is no reference: the judge is
    told none is given, not shown an empty section, and the rows are warned of as rows without."""
    from qed_jax.evaluate import BenchmarkConfig, judge_item, problems_from_rows
    from qed_jax.judge import prompt_fields

    rows = [("line 1", {"problem": "P", "solution": "S", "grading_guidelines": "G", "problem_id": "a"}),
            ("line 2", {"problem": "Q", "solution": "  ", "grading_guidelines": " \n", "problem_id": "b"}),
            ("line 3", {"problem": "R", "solution": "", "grading_guidelines": [], "problem_id": "c"})]
    with caplog.at_level(logging.WARNING, logger="qed_jax.evaluate"):
        problems = problems_from_rows(rows, BenchmarkConfig(path="b"))
    assert [(p.solution, p.guidelines) for p in problems[1:]] == [(None, None)] * 2
    fields = prompt_fields(judge_item(problems[1], "Proof.", "proof"), "Proof.")
    assert (fields["reference"], fields["guidelines"]) == ("(none given)", "(none given)")
    assert caplog.messages == [
        "b: 2 of 3 rows have no column 'solution' (benchmark.fields.solution), so their proofs are graded without "
        "a reference solution: line 2, line 3",
        "b: 2 of 3 rows have no column 'grading_guidelines' (benchmark.fields.guidelines), so their proofs are "
        "graded without grading guidelines: line 2, line 3"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qed_jax.evaluate"):
        problems_from_rows(rows[1:], BenchmarkConfig(path="b"))
    assert caplog.messages[1] == (
        "b: no row has the column 'grading_guidelines' (benchmark.fields.guidelines), so the judge grades every "
        "proof without grading guidelines; map it with benchmark.fields.guidelines=COLUMN")


def served_eval(tmp_path, model, judge) -> tuple[list[str], dict]:
    """The `qed-jax eval` command (and its environment) of the bundled IMO-ProofBench rows against
    a served model and judge on loopback, in rounds of 4 samples sent together, writing to
    tmp_path / "run"."""
    args = [f"benchmark.path={ROOT}/configs/data/imo_proofbench_sample.jsonl", f"model.base_url={model.url}",
            "model.name=tested", f"judge.base_url={judge.url}", f"judge.cache_path={tmp_path}/judge.sqlite",
            f"output_dir={tmp_path}/run", f"judge.template={score_grader(tmp_path)}", "judge.answer_format=score",
            "judge.allowed_scores=null", "batch_size=4", "model.concurrency=4"]
    command = [sys.executable, "-m", "qed_jax.cli", "eval", "--config", "configs/eval/imo_proofbench.yaml", *args]
    return command, {**os.environ, "PYTHONPATH": str(ROOT)}


def test_sigkill_mid_run_then_rerun_does_nothing_twice(tmp_path):
    release = threading.Event()
    held = ("PB-Advanced-001", 1)  # in the second round of 4: the first one is graded by then

    def reply(prompt, seed):
        if problem_and_sample(prompt, seed) == held:
            release.wait(30)
        return proof_reply(prompt, seed)

    with ModelServer(reply) as model, JudgeServer() as judge:
        command, env = served_eval(tmp_path, model, judge)
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        samples = tmp_path / "run" / "samples.jsonl"
        deadline = time.time() + 60
        # Round 1 (4 samples) generated and graded, round 2's other 3 samples generated.
        while time.time() < deadline:
            lines = samples.read_text().splitlines() if samples.exists() else []
            if sum('"type": "sample"' in line for line in lines) == 7 and model.total == 8:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert sum('"type": "grade"' in line for line in lines) == 4
        assert judge.total == 4
        release.set()

        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "generated 5 and graded 8" in done.stdout
        # Every sample was requested once, but the held one, whose first request the kill abandoned.
        counts = {problem_and_sample(*request): n for request, n in model.requests.items()}
        assert counts.pop(held) == 2 and set(counts.values()) == {1} and len(counts) == 11
        assert judge.total == 11 and set(judge.requests.values()) == {1}  # 12 less the truncated sample
    _, records = read_run(tmp_path / "run")
    assert len(records) == 12
    assert all(r["score"] == (0 if (r["problem_id"], r["sample"]) == TRUNCATED else 7) for r in records)


# Ctrl-C shortly after XLA starts compiling the sampler's decode loop: the command's cleanup runs,
# but the interpreter's teardown crashed (SIGSEGV) in 6 of 6 tries on the tiny model. The
# subprocess compiles afresh (no persistent cache), so the hook always sees the compilation.
CTRL_C_WHILE_COMPILING = """
import os, signal, sys, threading
from jax._src import compiler
from qed_jax import cli

compile_and_load = compiler.backend_compile_and_load

def hooked(backend, module, *args, **kwargs):
    if "decode_loop" in str(module.operation.attributes["sym_name"]):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
    return compile_and_load(backend, module, *args, **kwargs)

compiler.backend_compile_and_load = hooked
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_while_the_sampler_compiles_exits_130(tmp_path):
    import qed_jax
    from flax import nnx

    folder = tmp_path / "model"
    qed_jax.save_pretrained(qed_jax.Qwen3(qed_jax.preset("tiny"), rngs=nnx.Rngs(0)), folder, dtype="float32",
                            assets_from=ROOT / "configs/tiny/tokenizer")
    with JudgeServer() as judge:
        proc = subprocess.run(
            [sys.executable, "-c", CTRL_C_WHILE_COMPILING, "eval", "--config", "configs/eval/imo_proofbench.yaml",
             f"benchmark.path={ROOT}/configs/data/imo_proofbench_sample.jsonl", f"model.path={folder}",
             f"judge.base_url={judge.url}", f"output_dir={tmp_path}/run", "sampling.max_new_tokens=8"],
            cwd=ROOT, env={**cli_env(1), "PYTHONFAULTHANDLER": "1", "JAX_ENABLE_COMPILATION_CACHE": "false"},
            capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "qed-jax eval: interrupted; what finished is kept: rerun the same command to continue")
    assert judge.total == 0

def test_local_checkpoint_samples_with_its_own_seed_each(tmp_path):
    import jax
    from flax import nnx

    import qed_jax
    from qed_jax.sampling import Sampler, SamplingParams
    from qed_jax.tokenizer import chat_prompt, load_tokenizer, stop_ids

    folder = tmp_path / "model"
    tokenizer = load_tokenizer(ROOT / "configs/tiny/tokenizer")
    qed_jax.save_pretrained(qed_jax.Qwen3(qed_jax.preset("tiny"), rngs=nnx.Rngs(0)), folder, dtype="float32",
                            assets_from=ROOT / "configs/tiny/tokenizer")
    with JudgeServer() as judge:
        cfg = load_config(EvalConfig, ROOT / "configs/eval/imo_proofbench.yaml", [
            f"benchmark.path={ROOT}/configs/data/imo_proofbench_sample.jsonl",
            f"model.path={folder}", f"judge.base_url={judge.url}", f"judge.cache_path={tmp_path}/judge.sqlite",
            f"output_dir={tmp_path}/run", "sampling.max_new_tokens=6", "sampling.temperature=1.0",
            "samples=2", "seed=5", "batch_size=3"])
        evaluate(cfg, progress=False)
    _, records = read_run(cfg.output_dir)
    assert len(records) == 8
    # The same draws, directly from the sampler in one call: sample k of every problem uses
    # sample_seed(5, k), and problem p is row p, though rounds of 3 samples split the problems differently.
    model = qed_jax.from_pretrained(folder)
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content":
                                        f"Generate a rigorous proof to the following question:\n\n{r['problem']}"}])
               for r in IMO_ROWS]
    for k in range(2):
        direct = Sampler(model, progress=False).generate_ids(prompts, SamplingParams(max_new_tokens=6, temperature=1.0),
                                                             jax.random.key(sample_seed(5, k)), stop_ids(tokenizer))
        for row, c in zip(IMO_ROWS, direct):
            r = next(r for r in records if r["problem_id"] == row["problem_id"] and r["sample"] == k)
            assert r["completion"] == tokenizer.decode(c.text_tokens, skip_special_tokens=False)
            assert r["completion_tokens"] == len(c.tokens) and r["finish_reason"] == c.finish_reason
            # A random model does not close its reasoning in 6 tokens: 0 without the judge.
            assert r["truncated"] and r["score"] == 0 and r["decided_by"] == "truncated"
    assert judge.total == 0


def thinking_model(folder: Path) -> None:
    """Save a tiny random Qwen3 (NumPy weights, std 0.1) whose </think> embedding is a slightly
    scaled copy of token 135's, one it writes often: on the IMO-ProofBench rows at temperature 0.5
    some reasoning-cache turns close their reasoning and others never do (found by trying tokens)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import qed_jax
    from qed_jax.tokenizer import load_tokenizer

    graphdef, state = nnx.split(nnx.eval_shape(lambda: qed_jax.Qwen3(qed_jax.preset("tiny"), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(1)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return 1 + 0.1 * noise if any("norm" in str(p) for p in path) else 0.1 * noise

    values = jax.tree_util.tree_map_with_path(draw, state)
    embed = values["embed"][...]
    embed[load_tokenizer(ROOT / "configs/tiny/tokenizer").get_vocab()["</think>"]] = 1.05 * embed[135]
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, values))
    qed_jax.save_pretrained(model, folder, dtype="float32", assets_from=ROOT / "configs/tiny/tokenizer")


def test_reasoning_cache_mode_records_turns_and_the_report_scores_each_turn(tmp_path):
    import jax

    from qed_jax.reasoning_cache import RCParams, ReasoningCache
    from qed_jax.tokenizer import load_tokenizer

    thinking_model(tmp_path / "model")
    with JudgeServer(default=("hash", 0)) as judge:  # marks 0-7 by the prompt's hash
        cfg = load_config(EvalConfig, ROOT / "configs/eval/imo_proofbench.yaml", [
            f"benchmark.path={ROOT}/configs/data/imo_proofbench_sample.jsonl", f"model.path={tmp_path}/model",
            f"judge.base_url={judge.url}", f"judge.cache_path={tmp_path}/judge.sqlite",
            f"judge.template={score_grader(tmp_path)}", "judge.answer_format=score", "judge.allowed_scores=null", f"output_dir={tmp_path}/run", "mode=rc", "samples=2", "seed=0",
            "sampling.max_new_tokens=16", "sampling.temperature=0.5", "rc.summary_tokens=16",
            "rc.summarizer_tokens=12", "rc.grade_turns=true", "batch_size=3"])
        # Each sample's grade, and each of its first two turns' (the third turn's answer is the sample's).
        assert evaluate(cfg, progress=False) == {"generated": 8, "graded": 24, "failed": 0, "cached": 0, "total": 8}
        requests = judge.total
        assert evaluate(cfg, progress=False) == {"generated": 0, "graded": 0, "failed": 0, "cached": 0, "total": 8}
        assert judge.total == requests

    records = read_records(tmp_path / "run/samples.jsonl")
    samples = {(r["problem_id"], r["sample"]): r for r in records if r["type"] == "sample"}
    # Sample k of every problem is one reasoning-cache run drawn with sample_seed(0, k), on the benchmark's prompt,
    # problem p as row p (in rounds of 3 samples the last problem's sample 0 is drawn in a round of its own).
    tokenizer = load_tokenizer(ROOT / "configs/tiny/tokenizer")
    cache = ReasoningCache(qed_jax.from_pretrained(str(tmp_path / "model")), tokenizer, RCParams(
        turns=3, reasoning_tokens=16, summary_tokens=16, summarizer_tokens=12, temperature=0.5, max_turns=3))
    prompts = [f"Generate a rigorous proof to the following question:\n\n{r['problem']}" for r in IMO_ROWS]
    graded = set()
    for k in range(2):
        for row, result in zip(IMO_ROWS, cache.run(prompts, key=jax.random.key(sample_seed(0, k)))):
            record = samples[(row["problem_id"], k)]
            assert [(t["reasoning"], t["answer"], t["summary"], t["tokens"]) for t in record["turns"]] == [
                (t.reasoning, t.answer, t.summary, t.num_tokens) for t in result.turns]
            assert record["turns"][0]["summary"] is not None and record["turns"][2]["summary"] is None
            assert record["completion"] == turn_completion(record["turns"][2])
            assert record["completion_tokens"] == sum(t.num_tokens for t in result.turns)
            proofs = [extract_proof(turn_completion(t), True) for t in record["turns"] if t["answer"] is not None]
            graded |= {(row["problem_id"], proof) for proof in proofs if proof}
    # Turns without </think> or with nothing after it score 0 unsent; each distinct proof is graded once.
    assert 0 < len(graded) < 24 and judge.total == len(graded) and set(judge.by_prompt.values()) == {1}

    text, out, plots = report([cfg.output_dir])
    turns = json.loads((out / "report.json").read_text())["run"]["turns"]
    scores = np.full((len(samples), 3), np.nan)  # [sample, turn], from the recorded grades
    index = {key: i for i, key in enumerate(samples)}
    for r in records:
        if r["type"] in ("grade", "turn_grade"):
            scores[index[(r["problem_id"], r["sample"])], r.get("turn", 2)] = r["score"]
    assert not np.isnan(scores).any()
    assert turns["mean"] == pytest.approx(scores.mean(axis=0).tolist())
    assert turns["graded"] == [8, 8, 8]
    written = [t["summary_tokens"] for r in samples.values() for t in r["turns"][:2]]
    assert turns["summaries"] == 16 and turns["empty_summaries"] == written.count(0)
    assert (f"({written.count(0)} of 16 summaries empty)" in text) == (written.count(0) > 0)
    assert " · ".join(f"t{t + 1} {100 * m / 7:.1f}" for t, m in enumerate(scores.mean(axis=0))) in text
    assert out / "score_per_turn.png" in plots and (out / "score_per_turn.png").stat().st_size > 0
    assert turns["failed_grades"] == turns["pending_grades"] == 0 and not unfinished(json.loads(
        (out / "report.json").read_text())["run"])

    # A turn's grade that failed, and one not written (killed between the sample's grade and its turns'):
    # counted, and the run is unfinished, as its rerun does both.
    turn_grades = [n for n, r in enumerate(records) if r["type"] == "turn_grade"]
    graded = [8, 8, 8]
    for n in turn_grades[:2]:
        graded[records[n]["turn"]] -= 1
    records[turn_grades[0]] = {**records[turn_grades[0]], "score": None, "reason": "http_500"}
    del records[turn_grades[1]]
    (tmp_path / "damaged").mkdir()
    shutil.copy(tmp_path / "run/config.json", tmp_path / "damaged/config.json")
    (tmp_path / "damaged/samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize(*read_run(tmp_path / "damaged"))
    assert summary["turns"]["failed_grades"] == summary["turns"]["pending_grades"] == 1 and unfinished(summary)
    assert summary["turns"]["graded"] == graded
    assert "| 0; earlier turns: 1 failed, 1 ungraded |" in markdown({"damaged": summary})


def test_a_run_stopped_part_way_reports_avg_at_k_over_whole_samples_only():
    from qed_jax.report import summarize, table_row

    config = {"samples": 3, "mode": "single", "model": {"path": "m"},
              "benchmark": {"name": "b", "kind": "proof", "groups": None}}
    # Sample 0 of all 4 problems (scores 0, 0, 7, 7), then sample 1 of one problem before the stop.
    records = [{"problem_id": f"p{i}", "sample": 0, "score": [0, 0, 7, 7][i], "graded": True, "group": None,
                "completion_tokens": 5, "truncated": False, "decided_by": "judge"} for i in range(4)]
    records.append({**records[0], "sample": 1, "score": 7})
    s = summarize(config, records)
    assert s["avg_at_k"]["k"] == 1 and s["avg_at_k"]["mean"] == pytest.approx(3.5)
    assert s["undrawn"] == 7 and s["mean"] == pytest.approx(21 / 5)  # the mean of all samples drawn
    assert "| avg@1 50.0 ± – |" in "| " + " | ".join(table_row("r", s)) + " |"
    assert "; 7 not drawn" in table_row("r", s)[9]
    # Killed in its first round: sample 0 is whole only over the problems drawn so far, so with the
    # benchmark's problem ids (the run directory's problems.json) it is not one of the k.
    s = summarize(config, records, [f"p{i}" for i in range(6)])
    assert (s["problems"], s["avg_at_k"]["k"], s["undrawn"]) == (6, 0, 13)
    assert "| avg@0 – ± – |" in "| " + " | ".join(table_row("r", s)) + " |"
    # Stopped while grading: sample 1 drawn for every problem but graded for p0 only. Its 7 is not
    # sample 1's mean, so sample 1 is not one of the k. Nor while its failed grades wait for the
    # next run's retry: a mean over the problems graded would cover other problems than sample 0's.
    pending = [{**r, "sample": 1, "score": 7 if r["problem_id"] == "p0" else None,
                "graded": r["problem_id"] == "p0"} for r in records[:4]]
    s = summarize(config, records[:4] + pending)
    assert (s["avg_at_k"]["k"], s["avg_at_k"]["per_sample"], s["pending"]) == (1, [3.5], 3)
    failed = [{**r, "graded": True} for r in pending]
    s = summarize(config, records[:4] + failed)
    assert (s["avg_at_k"]["k"], s["avg_at_k"]["per_sample"], s["failed"]) == (1, [3.5], 3)
    assert s["mean"] == pytest.approx((0 + 0 + 7 + 7 + 7) / 5)  # the failed grades left out


def test_the_by_model_table_marks_a_run_not_finished():
    from qed_jax.report import markdown, summarize

    def run(model, scores):
        config = {"samples": 1, "mode": "single", "model": {"path": model},
                  "benchmark": {"name": "b", "kind": "proof", "groups": None}}
        records = [{"problem_id": f"p{i}", "sample": 0, "score": score, "graded": score is not None, "group": None,
                    "completion_tokens": 5, "truncated": False, "decided_by": "judge"}
                   for i, score in enumerate(scores)]
        return summarize(config, records)

    text = markdown({"a": run("m1", [7, 0]), "b": run("m2", [7, None])})  # m2's second sample not graded yet
    assert "| m1 | 50.0 |" in text and "| m2 | 100.0\\* |" in text  # the star escaped, as any in a cell
    assert "\\* not finished: samples not drawn, not graded yet, or whose grading failed" in text
    assert "not finished" not in markdown({"a": run("m1", [7, 0]), "b": run("m2", [7, 7])})
    # A failed grade, which the next run retries, is as unfinished as one not graded yet.
    failed = run("m2", [7, 7])
    failed["failed"] = 1
    assert "| m2 | 100.0\\* |" in markdown({"a": run("m1", [7, 0]), "b": failed})


def test_the_by_model_table_keeps_two_benchmarks_of_one_name_apart(monkeypatch, tmp_path):
    from qed_jax.report import by_model, summarize
    from tests.helpers import REPO

    def run(model, path, score, recorded_in=None):
        config = {"samples": 1, "mode": "single", "model": {"path": model},
                  "benchmark": {"name": "benchmark", "kind": "proof", "groups": None, "path": path}}
        return summarize(config, [{"problem_id": "p0", "sample": 0, "score": score, "graded": True, "group": None,
                                   "completion_tokens": 5, "truncated": False, "decided_by": "judge"}],
                         recorded_in=recorded_in)

    # Two benchmark files left at the default name: two columns, each labelled with its file.
    header, rows = by_model({"a": run("m1", "x.jsonl", 7), "b": run("m1", "y.jsonl", 0), "c": run("m2", "x.jsonl", 0)})
    assert header == ["model", "benchmark (x.jsonl) single", "benchmark (y.jsonl) single"]
    assert rows == [["m1", "100.0", "0.0"], ["m2", "0.0", "–"]]
    header, _ = by_model({"a": run("m1", "x.jsonl", 7), "c": run("m2", "x.jsonl", 0)})
    assert header == ["model", "benchmark single"]  # one file: the name alone
    # One file under several spellings is one benchmark.
    monkeypatch.chdir(REPO)
    data = "configs/data/imo_proofbench_sample.jsonl"
    header, rows = by_model({"a": run("m1", data, 7), "b": run("m2", f"./{data}", 0),
                             "c": run("m3", str(REPO / data), 0)})
    assert header == ["model", "benchmark single"] and [row[1] for row in rows] == ["100.0", "0.0", "0.0"]
    # A relative path is the file it named in the eval's working directory, not in the report's.
    for project in ("a", "b"):
        (tmp_path / project / "data").mkdir(parents=True)
        (tmp_path / project / "data/bench.jsonl").write_text(f"the problems of {project}\n")
    (tmp_path / "a/sub").mkdir()
    monkeypatch.chdir(tmp_path)
    header, _ = by_model({"a": run("m1", "data/bench.jsonl", 7, f"{tmp_path}/a"),
                          "b": run("m2", "data/bench.jsonl", 0, f"{tmp_path}/b")})
    assert header == ["model", "benchmark (a/data/bench.jsonl) single", "benchmark (b/data/bench.jsonl) single"]
    header, _ = by_model({"a": run("m1", "data/bench.jsonl", 7, f"{tmp_path}/a"),
                          "b": run("m2", "../data/bench.jsonl", 0, f"{tmp_path}/a/sub")})
    assert header == ["model", "benchmark single"]
    # So is a model's: two projects' hf/ folders are two models, one folder under two spellings one.
    for project in ("a", "b"):
        (tmp_path / project / "hf").mkdir()
    _, rows = by_model({"a": run("hf", "x.jsonl", 7, f"{tmp_path}/a"), "b": run("hf", "x.jsonl", 0, f"{tmp_path}/b"),
                        "c": run("../hf", "x.jsonl", 7, f"{tmp_path}/a/sub"), "d": run("Qwen/Qwen3-4B", "x.jsonl", 0)})
    assert rows == [["a/hf", "100.0"], ["b/hf", "0.0"], ["Qwen/Qwen3-4B", "0.0"]]


def test_report_tables_and_plots_take_any_run_name(tmp_path):
    from qed_jax.report import markdown, plot, summarize

    config = {"samples": 1, "mode": "single", "model": {"path": "m|1"},
              "benchmark": {"name": "IMO|Bench\nv2", "kind": "proof", "groups": None}}
    records = [{"problem_id": f"p{i}", "sample": 0, "score": 7 * (i % 2), "graded": True, "group": None,
                "completion_tokens": 5 + i, "truncated": False, "decided_by": "judge"} for i in range(4)]
    names = ["run $\\frac$ a|b\nc *x* _y_ <b>", "other_run $x^2$"]
    summaries = {name: summarize({**config, "model": {"path": name}}, records) for name in names}
    rows = [line for line in markdown(summaries).splitlines() if line.startswith("|")]
    # Header, rule and one row per run in each table; every row has as many cells as its header.
    def cells(row):
        return len(re.split(r"(?<!\\)\|", row))

    assert len(rows) == 2 * 4 and all(cells(row) == cells(rows[n // 4 * 4]) for n, row in enumerate(rows))
    # Markdown's markup in a name is text (an "_" inside a word is already).
    assert r"| run $\\frac$ a\|b c \*x\* \_y\_ \<b\> | IMO\|Bench v2 |" in markdown(summaries)
    assert "| other_run $x^2$ |" in markdown(summaries)
    assert [p.name for p in plot(summaries, {name: records for name in names}, tmp_path)] == [
        "score_histogram.png", "score_vs_tokens.png"]


def test_histogram_of_no_graded_samples_counts_from_zero():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qed_jax.report import _histogram

    fig, ax = plt.subplots()
    _histogram(ax, [])
    assert ax.get_ylim()[0] == 0
    plt.close(fig)


def test_report_compares_runs_side_by_side(tmp_path):
    def reply(prompt, seed):
        return f"Thinking.</think>\nProof. [[item:{problem_id(prompt, PROOFBENCH_ROWS)}]]"

    with ModelServer(reply) as model, JudgeServer({"imo-2024-2": [("reply", "<points>3 out of 7</points>")]},
                                                  default=("reply", "<points>5 out of 7</points>")) as judge:
        runs = []
        for name in ("a", "b"):
            cfg = config(tmp_path / name, "proofbench", model.url, judge.url, "samples=1")
            evaluate(cfg, progress=False)
            runs.append(cfg.output_dir)
    text, out, _ = report([str(r) for r in runs], output=str(tmp_path / "cmp"), plots=False)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # the header and one row per run
    assert rows[1].startswith(f"| {tmp_path}/a/run |") and rows[2].startswith(f"| {tmp_path}/b/run |")
    summaries = json.loads((out / "report.json").read_text())
    for s in summaries.values():
        assert s["groups"]["2024-2025"]["mean"] == pytest.approx(4.0)  # marks 5 and 3
        assert s["groups"]["earlier"]["mean"] == pytest.approx(5.0)
        assert s["avg_at_k"]["k"] == 1 and s["avg_at_k"]["std"] is None
    with pytest.raises(ConfigError, match="need --output"):
        report([str(r) for r in runs])
    # Not into the folder of another run, whose own report it would replace.
    with pytest.raises(ConfigError, match=f"^--output {re.escape(str(runs[1]))} is the folder of another run "
                                          r"\(it holds a config.json\), not of those reported; write the "
                                          r"report to a folder of its own$"):
        report([str(runs[0])], output=str(runs[1]), plots=False)
    assert not (Path(runs[1]) / "report.md").exists()
    # Nor into a folder of other runs (a pipeline's, whose eval/ holds its runs), whose report it would replace.
    pipeline = tmp_path / "another_pipeline"
    shutil.copytree(Path(runs[1]), pipeline / "eval" / "sft-proofbench-single")
    with pytest.raises(ConfigError, match=f"^--output {re.escape(str(pipeline))} is the folder of other evaluation "
                                          r"runs \(eval/sft-proofbench-single\), not of those reported; write the "
                                          r"report to a folder of its own$"):
        report([str(runs[0])], output=str(pipeline), plots=False)
    assert report([str(pipeline)], plots=False)[1] == pipeline  # its own runs' report goes there
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}/typo: no such directory$"):
        report([str(runs[0]), str(tmp_path / "typo")])  # the path is what is wrong, not a missing --output
    # One run named twice needs no --output: the report goes in the run directory.
    assert report([str(runs[0]), f"{runs[0]}/"], plots=False)[1] == Path(runs[0])
    # A run named twice (with a trailing slash, or inside a folder also given) is reported once.
    text = report([str(runs[0]), f"{runs[0]}/", str(tmp_path / "a"), str(runs[1])], output=str(tmp_path / "cmp"),
                  plots=False)[0]
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 3
    # No reasoning-cache run: an earlier report's per-turn plot (of runs this one lacks) goes.
    (tmp_path / "cmp" / "score_per_turn.png").write_bytes(b"an earlier report's plot")
    plots = report([str(r) for r in runs], output=str(tmp_path / "cmp"))[2]
    assert [p.name for p in plots] == ["score_histogram.png", "score_vs_tokens.png"]
    assert not (tmp_path / "cmp" / "score_per_turn.png").exists()
    # Without plots, the earlier report's plots go too: they would show other data than report.md.
    report([str(r) for r in runs], output=str(tmp_path / "cmp"), plots=False)
    assert not list((tmp_path / "cmp").glob("*.png"))
    # A report that cannot be written: one line, and where the folder was not chosen, how to choose one.
    blocked = Path(runs[0]) / "report.md"
    blocked.unlink()
    blocked.mkdir()
    with pytest.raises(ConfigError, match=f"^{re.escape(str(blocked))}: Is a directory; or write the report "
                       "elsewhere with --output$"):
        report([str(runs[0])], plots=False)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(blocked))}: Is a directory$"):
        report([str(runs[0])], output=str(runs[0]), plots=False)
    blocked.rmdir()

    # Damaged or wrong run directories: one line naming the file (and line), or the runs inside.
    root = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=f"^{root}/nope: no such directory$"):
        report([str(tmp_path / "nope")])
    # A folder of runs stands for them: here the one run inside.
    assert report([str(tmp_path / "a")], plots=False)[0] == report(runs[:1], output=str(tmp_path / "a"), plots=False)[0]
    # A pipeline's output_dir: its runs one level further down (eval/MODEL-BENCHMARK-MODE).
    shutil.copytree(runs[0], tmp_path / "pipeline" / "eval" / "base-proofbench-single")
    text, out, _ = report([str(tmp_path / "pipeline")], plots=False)
    assert out == tmp_path / "pipeline" and "| base-proofbench-single | proofbench |" in text
    # Written again over the same runs, a report keeps their order: a pipeline's (its stages), not the names'.
    shutil.copytree(runs[1], tmp_path / "pipeline" / "eval" / "abc-proofbench-single")
    staged = [str(tmp_path / "pipeline" / "eval" / n) for n in ("base-proofbench-single", "abc-proofbench-single")]
    by_stage = report(staged, output=str(tmp_path / "pipeline"), plots=False)[0]
    assert by_stage.index("| base-proofbench-single |") < by_stage.index("| abc-proofbench-single |")
    assert report([str(tmp_path / "pipeline")], plots=False)[0] == by_stage
    assert report([str(tmp_path / "pipeline" / "eval")], plots=False)[0] == by_stage  # its eval/ folder too
    # A run still in its first round (no samples yet) is left out of a comparison, with a warning;
    # alone, it is an error.
    started = tmp_path / "pipeline" / "eval" / "grpo-proofbench-single"
    shutil.copytree(runs[1], started)
    (started / "samples.jsonl").write_text("")
    assert report([str(tmp_path / "pipeline")], plots=False)[0] == by_stage
    with pytest.raises(ConfigError, match=f"^{re.escape(str(started))}: the run has no samples yet$"):
        report([str(started)])
    shutil.rmtree(started)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"^{root}/empty: not an eval run directory"):
        report([str(tmp_path / "empty")])
    shutil.copytree(runs[0], tmp_path / "damaged")
    samples = tmp_path / "damaged" / "samples.jsonl"
    advice = "the run log is damaged: mend that line, or move the run folder aside and run again"
    lines = samples.read_text().splitlines()
    record = json.loads(lines[1])
    del record["problem_id"]
    samples.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    damaged = f"{samples}:2: not a record (each has type, problem_id, sample); {advice}"
    with pytest.raises(ConfigError, match=f"^{re.escape(damaged)}$"):
        report([str(tmp_path / "damaged")])
    samples.write_bytes(("\n".join(lines[:2]) + "\n").encode() + b'{"type": "\xe9"}\n')
    damaged = f"{samples}:3: not UTF-8 text (byte 0xe9 at column 11); {advice}"
    with pytest.raises(ConfigError, match=f"^{re.escape(damaged)}$"):
        report([str(tmp_path / "damaged")])
    # Values the report would do arithmetic on: a hand edit, another program's log.
    for kind, key, value, expected in [("sample", "completion_tokens", "many", "a token count"),
                                       ("sample", "completion_tokens", -3, "a token count"),
                                       ("sample", "truncated", None, "true or false"),
                                       ("grade", "score", "zero", "a score from 0 to 7 or null"),
                                       ("grade", "score", 8, "a score from 0 to 7 or null"),
                                       ("grade", "sample", True, "a sample index")]:
        n = next(n for n, line in enumerate(lines) if json.loads(line)["type"] == kind)
        samples.write_text("\n".join([*lines[:n], json.dumps({**json.loads(lines[n]), key: value}), *lines[n + 1:]])
                           + "\n")
        damaged = f"{samples}:{n + 1}: {key} is {value!r}, not {expected}; {advice}"
        with pytest.raises(ConfigError, match=f"^{re.escape(damaged)}$"):
            report([str(tmp_path / "damaged")])
    # And mode rc's: a turn grade's turn, a sample's turns.
    turn_grade = {"type": "turn_grade", "problem_id": "p", "sample": 0, "score": 3}
    assert misread_value(turn_grade) == "turn is None, not a turn index"
    assert misread_value({**turn_grade, "turn": "0"}) == "turn is '0', not a turn index"
    assert misread_value({**turn_grade, "turn": 1}) is None
    sample = {"type": "sample", "problem_id": "p", "sample": 0, "completion_tokens": 3, "truncated": False}
    assert misread_value({**sample, "turns": None}) == "turns is None, not a list of turns"
    assert misread_value({**sample, "turns": [{"answer": "a"}]}) is None
    samples.write_text("\n".join(lines) + "\n")
    saved = tmp_path / "damaged" / "config.json"
    for text, message in (("{", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
                          ("[]", "not a JSON object; the run's config is damaged"),
                          ('{"samples": 3}', "no benchmark, model: not an eval run's config, or a damaged one")):
        saved.write_text(text)
        with pytest.raises(ConfigError, match=f"^{re.escape(str(saved))}: {re.escape(message)}"):
            report([str(tmp_path / "damaged")])
    saved.write_bytes(b"\xff{}")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(saved))}: not valid JSON"):
        report([str(tmp_path / "damaged")])


def test_config_errors_say_what_to_do(tmp_path):
    path = ROOT / "configs/eval/imo_proofbench.yaml"
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        load_config(EvalConfig, path)
    with pytest.raises(ConfigError, match="exactly one of model.path"):  # first, not "model.name is not set"
        load_config(EvalConfig, path, ["model.path=x", "model.base_url=http://x/v1"])
    # An empty model.path is no model (it was read as none where the generator is made: an endpoint at no URL).
    for empty in ('""', '" "'):
        with pytest.raises(ConfigError, match=r"^model.path is empty \('\s*'\); name a checkpoint, or set "
                                              r"model.base_url \(with model.name\) instead$"):
            load_config(EvalConfig, path, [f"model.path={empty}"])
    with pytest.raises(ConfigError, match="mode rc runs the reasoning cache on a local model"):
        load_config(EvalConfig, path, ["model.base_url=http://x/v1", "model.name=m", "mode=rc"])
    with pytest.raises(ConfigError, match="rc.summarizer_thinking is for a separate summarizer"):
        load_config(EvalConfig, path, ["model.path=x", "mode=rc", "rc.summarizer_thinking=true"])
    with pytest.raises(ConfigError, match="rc.summarizer_thinking is for a separate summarizer"):
        load_config(EvalConfig, path, ["model.path=x", "mode=rc", 'rc.summarizer=""', "rc.summarizer_thinking=true"])
    # A blank name names nothing: a served model, or the benchmark the report and a pipeline's folders go by.
    for blank in ('""', '" "'):
        with pytest.raises(ConfigError, match=r"^model.name is blank \('\s*'\); name the served model, or leave "
                                              r"model.name out$"):
            load_config(EvalConfig, path, ["model.base_url=http://x/v1", f"model.name={blank}"])
        with pytest.raises(ConfigError, match=r"^benchmark.name is blank \('\s*'\); name the benchmark, or leave it "
                                              r"out for its default$"):
            load_config(EvalConfig, path, ["model.path=x", f"benchmark.name={blank}"])
    # A single-shot run reads no rc.* setting: one given is refused, not ignored (its default is no setting).
    for given in ("rc.turns=5", "rc.no_summary=null", "rc.grade_turns=true"):
        key = given.split("=")[0]
        with pytest.raises(ConfigError, match=f"^{re.escape(key)} is for mode rc \\(the reasoning cache\\), and mode is "
                                              f"single: set mode=rc or drop {re.escape(key)}$"):
            load_config(EvalConfig, path, ["model.path=x", given])
    assert load_config(EvalConfig, path, ["model.path=x", "rc.turns=3"]).rc.turns == 3
    assert load_config(EvalConfig, path, ["model.path=x", "mode=rc", "rc.turns=5"]).rc.turns == 5
    with pytest.raises(ConfigError, match="^mode rc decodes rc.batch_size rows per compiled call; "
                                          "model.kv_cache_gib sizes the single-shot sampler's waves"):
        load_config(EvalConfig, path, ["model.path=x", "mode=rc", "model.kv_cache_gib=8"])
    with pytest.raises(ConfigError, match="benchmark.fields: unknown name"):
        load_config(EvalConfig, path, ["model.path=x", "benchmark.fields.question=q"])
    # No label to sort into: every problem's split would be "other".
    with pytest.raises(ConfigError, match=r"^benchmark.groups is empty: give at least one label: regex, or set "
                                          r"benchmark.group_field and benchmark.groups to null$"):
        load_config(EvalConfig, path, ["model.path=x", "benchmark.groups={}"])
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"problem_id": "a", "question": "?"}) + "\n")
    with ModelServer(lambda p, s: "x") as model:
        cfg = config(tmp_path, "imo_proofbench", model.url, "http://127.0.0.1:9/v1", f"benchmark.path={bad}")
        with pytest.raises(ConfigError, match="line 1: column 'problem'"):
            evaluate(cfg, progress=False)
        bad.write_text("\n" + json.dumps({"problem_id": "a", "problem": "?", "grading_guidelines": 7}) + "\n")
        with pytest.raises(ConfigError, match=r"line 2: column 'grading_guidelines' \(the grading guidelines\): "
                                              "marking scheme must be a string or a list of checkpoints, got int"):
            evaluate(cfg, progress=False)
        bad.write_text(json.dumps({"problem": "?"}) + "\n" + '{"problem": "cut off' + "\n")
        with pytest.raises(ConfigError, match=f"^{re.escape(str(bad))}: line 2: not valid JSON \\(Unterminated string starting at column 13\\)"):
            evaluate(cfg, progress=False)
        bad.write_text(json.dumps(["a", "list"]) + "\n")
        with pytest.raises(ConfigError, match=r'line 1 is not a JSON object of named columns: \["a", "list"\]$'):
            evaluate(cfg, progress=False)


@pytest.mark.parametrize("benchmark,template,error", [
    ("imo_proofbench", "rl_grader", "grades against the field 'rubric', which proof benchmark imo_proofbench does not "
                                    "pass to the judge (it passes 'guidelines'): use configs/judge/imo_proofbench.yaml "
                                    "or proofbench.yaml or a template with {{guidelines}}"),
    ("answerbench", "proofbench_grader", "grades against the field 'guidelines', which answer benchmark answerbench "
                                         "does not pass to the judge (it passes 'answer'): use "
                                         "configs/judge/answer.yaml or a template with {{answer}}"),
    ("answerbench", "NO_SCHEME", "never shows the judge the reference answer that answer benchmark answerbench "
                                 "passes: use configs/judge/answer.yaml or a template with {{answer}}"),
])
def test_a_judge_template_that_does_not_fit_the_benchmark_is_refused(tmp_path, benchmark, template, error):
    """The judge would read "(none given)" for the marking scheme or the reference answer the
    benchmark gives (on an answer benchmark, a proof grader marked a wrong answer 7)."""
    if template == "NO_SCHEME":  # a grader that reads neither a scheme nor an answer
        template = str(tmp_path / "no_scheme.txt")
        Path(template).write_text("Grade this proof of {{problem}}:\n{{proof}}\nReply <verdict>Correct</verdict>.")
    with ModelServer(lambda p, s: "x</think>The answer is three.") as model:
        cfg = config(tmp_path, benchmark, model.url, "http://127.0.0.1:9/v1", f"judge.template={template}")
        with pytest.raises(ConfigError, match=f"^judge.template {re.escape(template)} {re.escape(error)}$"):
            evaluate(cfg, progress=False)
        assert model.total == 0
    assert not (tmp_path / "run").exists()


def test_a_judge_that_rejected_every_request_may_be_set_right_on_the_rerun(tmp_path):
    """A judge that rejects every request (HTTP 400: a parameter this model refuses) stops the run
    with its samples kept; until the judge has graded one, its request settings and template may
    change on the rerun, which grades those samples without drawing them again."""
    from qed_jax.errors import JudgeUnavailable

    grader = tmp_path / "grader.txt"
    grader.write_text((ROOT / "configs/prompts/imo_proofbench_grader.txt").read_text())
    with ModelServer(proof_reply) as model:
        with JudgeServer(default=("status", 400)) as judge:
            cfg = config(tmp_path, "imo_proofbench", model.url, judge.url, "samples=2", f"judge.template={grader}")
            with pytest.raises(JudgeUnavailable, match=rf"^the judge at {judge.url} rejected 7 requests \(the last: HTTP "
                                                       r"400: Error code: 400 - scripted 400\) and completed none: "
                                                       r"the requests do not suit it; check judge.model, .* then rerun "
                                                       r"\(what was drawn and graded is kept for the rerun\)$"):
                evaluate(cfg, progress=False)
        assert model.total == 8
        grader.write_text(grader.read_text() + "Be strict.\n")
        with JudgeServer(imo_judge_scripts()) as judge:
            fixed = config(tmp_path, "imo_proofbench", model.url, judge.url, "samples=2", f"judge.template={grader}",
                           "judge.temperature=0.7", "judge.max_tokens=1000")
            counts = evaluate(fixed, progress=False)
        assert (counts["generated"], counts["failed"]) == (0, 0) and model.total == 8
    out = tmp_path / "run"
    assert [r["graded"] for r in read_run(out)[1]] == [True] * 8
    assert json.loads((out / "config.json").read_text())["judge"]["temperature"] == 0.7
    assert json.loads((out / "templates.json").read_text())["judge.template"].endswith("Be strict.\n")
    # Now that the judge has graded, its settings are the run's.
    with pytest.raises(ConfigError, match=r"holds a run with judge.temperature=0.7, not 0.5: "):
        check_rerun(config(tmp_path, "imo_proofbench", model.url, judge.url, "samples=2", f"judge.template={grader}",
                           "judge.temperature=0.5", "judge.max_tokens=1000"))


def test_a_request_the_judge_rejects_is_named_with_what_it_said(tmp_path, caplog):
    """Fewer rejections than stop a run still say what the judge said: the next run meets the same
    unless the request changes."""
    rejected = f"{IMO_ROWS[0]['problem_id']}-s0"
    with ModelServer(proof_reply) as model, JudgeServer({**imo_judge_scripts(), rejected: [("status", 400)]}) as judge:
        counts = evaluate(config(tmp_path, "imo_proofbench", model.url, judge.url, "samples=1"), progress=False)
    assert counts["failed"] == 1
    assert any(r.getMessage().endswith(
        "1 grade failed (http_400 x1); the next run retries them; 1 failed because the judge rejected its request "
        "(the last: Error code: 400 - scripted 400), and will again unless the request changes: check "
        "judge.model, judge.api, judge.max_tokens, judge.temperature and judge.reasoning_effort")
        for r in caplog.records), caplog.text


def test_rejections_stop_a_run_only_where_the_judge_never_graded(tmp_path):
    """A judge that completed a request, or graded one of the run's samples before (a rerun that
    retries the proofs too long for its context), takes requests: its rejections fail their
    items alone."""
    from types import SimpleNamespace

    from qed_jax.errors import JudgeUnavailable
    from qed_jax.evaluate import REJECTED_TO_STOP, check_judge_accepts

    sample = {"type": "sample", "problem_id": "P", "sample": 0}
    graded = {"type": "grade", "problem_id": "P", "sample": 1, "score": 3, "decided_by": "judge_cache"}
    unsent = {**graded, "sample": 2, "score": 0, "decided_by": "truncated"}

    def judge(rejected, completed):
        return SimpleNamespace(rejected=rejected, completed=completed, last_rejection="HTTP 413: too large",
                               config=SimpleNamespace(base_url="http://judge/v1"))

    never_graded = RunLog(tmp_path / "samples.jsonl", [sample, unsent])
    with pytest.raises(JudgeUnavailable, match=r"rejected 5 requests \(the last: HTTP 413: too large\)"):
        check_judge_accepts(judge(REJECTED_TO_STOP, 0), never_graded)
    check_judge_accepts(judge(REJECTED_TO_STOP - 1, 0), never_graded)
    check_judge_accepts(judge(40, 1), never_graded)
    check_judge_accepts(judge(40, 0), RunLog(tmp_path / "samples.jsonl", [sample, unsent, graded]))


def test_a_rerun_may_extend_a_run_but_not_change_or_shrink_it(tmp_path):
    def rerun(*overrides):
        c = config(tmp_path, "imo_proofbench", "http://model/v1", "http://judge/v1", *overrides)
        check_rerun(c)
        return prepare_output(c, [])

    out = rerun("samples=2", "benchmark.limit=2")
    drew_a_sample(out)  # a run that drew nothing may begin anew under any config
    rerun("samples=3", "benchmark.limit=null", "judge.base_url=http://elsewhere/v1")  # more samples, every problem
    assert json.loads((out / "config.json").read_text())["samples"] == 3
    with pytest.raises(ConfigError, match=r"holds a run with sampling.temperature=0.8, not 0.5: "):  # the setting
        rerun("sampling.temperature=0.5")
    assert json.loads((out / "config.json").read_text())["samples"] == 3  # refused reruns change nothing
    # The benchmark file under another spelling of its path is the same benchmark.
    data = Path(json.loads((out / "config.json").read_text())["benchmark"]["path"])
    rerun("samples=3", f"benchmark.path={Path(os.path.relpath(data.parent))}/./{data.name}")


def test_a_rerun_limit_must_reach_the_furthest_problem_the_run_holds(tmp_path):
    """A stopped round may hold row 3's sample without rows 1 and 2's (a round's requests run side
    by side): a limit of 2 covers the count of problems held, not the rows, and must be refused
    as a shrink (not later, as a benchmark that lost row 3)."""
    runlog = RunLog(tmp_path / "samples.jsonl", [{"type": "sample", "problem_id": pid, "sample": 0, "row": row}
                                                 for pid, row in (("PB-Basic-001", 0), ("PB-Advanced-002", 3))])
    with pytest.raises(ConfigError, match=r"run holds a run with samples of 2 problems, up to row 3 of the benchmark "
                                          r"\(benchmark.limit=4\): a rerun may extend it, not shrink it to 2 "):
        check_samples_kept(config(tmp_path, "imo_proofbench", "http://m/v1", "http://j/v1", "benchmark.limit=2"), runlog)
    for limit in ("4", "null"):
        check_samples_kept(config(tmp_path, "imo_proofbench", "http://m/v1", "http://j/v1", f"benchmark.limit={limit}"),
                           runlog)


def test_a_rerun_may_not_keep_fewer_samples_than_the_run_holds(tmp_path):
    """Fewer samples or problems than are drawn is refused; an extension stopped before it drew
    (its config already says more) is no lock on the run."""
    with ModelServer(proof_reply) as model, JudgeServer(imo_judge_scripts()) as judge:
        def run(samples, *overrides):
            return evaluate(config(tmp_path, "imo_proofbench", model.url, judge.url, f"samples={samples}", *overrides),
                            progress=False)

        assert run(2)["generated"] == 8
        with pytest.raises(ConfigError, match=r"run holds a run with samples drawn up to index 1 \(samples=2\): a "
                                              r"rerun may extend it, not shrink it to 1 \(its report counts every "
                                              r"sample it holds\); give samples=2 or more \(in a pipeline: "
                                              r"eval.overrides.samples=2\), or choose another output_dir$"):
            run(1)
        with pytest.raises(ConfigError, match=r"run holds a run with samples of 4 problems \(benchmark.limit=4\): a "
                                              "rerun may extend it, not shrink it to 3"):
            run(2, "benchmark.limit=3")
        extension = config(tmp_path, "imo_proofbench", model.url, judge.url, "samples=5", "benchmark.limit=9")
        check_rerun(extension)
        prepare_output(extension, [])  # as an extension killed before its first sample leaves the run
        assert run(2, "benchmark.limit=4")["generated"] == 0
        assert json.loads((tmp_path / "run" / "config.json").read_text())["samples"] == 2
        assert json.loads((tmp_path / "run" / "config.json").read_text())["benchmark"]["limit"] == 4


def test_a_typo_in_samples_is_refused_before_anything_is_listed(tmp_path):
    """samples=100000000 (for 10) listed every (problem, sample) pair until the memory ran out."""
    from qed_jax.evaluate import MAX_SAMPLES_PER_RUN

    huge = config(tmp_path, "imo_proofbench", "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1",
                  f"samples={MAX_SAMPLES_PER_RUN}")
    with pytest.raises(ConfigError, match=r"^samples=1000000 of each of 4 problems is 4,000,000 samples to draw "
                                          r"and grade, more than a run takes \(1,000,000\): lower samples, or split "
                                          r"the benchmark$"):
        evaluate(huge, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_before_its_first_sample_may_begin_anew_with_another_config(tmp_path):
    """A wrong model name (or too long a max_new_tokens) stops a run before it draws anything:
    the corrected command is a new run, not a change to one."""
    with ModelServer(lambda prompt, seed: "Compute.</think> So \\boxed{3}.") as model, JudgeServer() as judge:
        typo = config(tmp_path, "answerbench", "http://127.0.0.1:9/v1", judge.url, "samples=1",
                      "model.name=typo", "sampling.max_new_tokens=49152")
        with pytest.raises(ConfigError, match=r"^cannot reach the model endpoint http://127.0.0.1:9/v1: .*; start it, or "
                                              r"point model.base_url at one that answers$"):
            evaluate(typo, progress=False)
        assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "templates.json").exists()
        assert not holds_an_evaluation(tmp_path / "run")  # nor does the pipeline count it as one
        fixed = config(tmp_path, "answerbench", model.url, judge.url, "samples=1",
                       f"benchmark.prompt_template={ROOT / 'configs/prompts/proof_generation.txt'}")
        assert evaluate(fixed, progress=False)["generated"] == 4
    assert holds_an_evaluation(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["name"] == "tested"
    assert "Generate a rigorous proof" in json.loads((tmp_path / "run" / "templates.json").read_text())[
        "benchmark.prompt_template"]
    with pytest.raises(ConfigError, match="holds a run with model.name='tested', not 'typo'"):  # now it holds samples
        check_rerun(config(tmp_path, "answerbench", model.url, judge.url, "samples=1", "model.name=typo",
                           f"benchmark.prompt_template={ROOT / 'configs/prompts/proof_generation.txt'}"))
    # Only an eval run's folder begins anew: another's config.json (a mistyped output_dir) is not replaced.
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "qwen3"}')
    for folder in (export, tmp_path / "pipeline" / "sft"):
        folder.mkdir(parents=True, exist_ok=True)
        if folder != export:  # a trainer's run directory
            (folder / "config.json").write_text('{"optim": {"lr": 0.001}, "batch_size": 16}')
        with pytest.raises(ConfigError, match=rf"^{folder} holds another command's run \({folder}/config.json is not "
                                              r"an evaluation's config: a trainer's, a pipeline's or a model's\); use "
                                              r"another output_dir$"):
            check_rerun(config(tmp_path, "answerbench", model.url, judge.url, f"output_dir={folder}"))
    # Nor is a pipeline's own folder (no config.json of its own): its report would count the run as the pipeline's.
    (tmp_path / "pipeline" / "base" / "hf").mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/pipeline is a pipeline's folder \(it holds base/hf\)"):
        evaluate(config(tmp_path, "answerbench", model.url, judge.url, f"output_dir={tmp_path}/pipeline"),
                 progress=False)
    assert sorted(p.name for p in (tmp_path / "pipeline").iterdir()) == [".lock", "base", "sft"]
    # Nor a folder of evaluation runs (a pipeline's eval/): a report of the folder would stand for this run alone.
    finished = Path(config(tmp_path, "answerbench", model.url, judge.url).output_dir)
    evals = tmp_path / "pipeline" / "eval"
    shutil.copytree(finished, evals / "base-answerbench-single")
    with pytest.raises(ConfigError, match=rf"^{evals} is a folder of evaluation runs \(base-answerbench-single\): "
                                          r"each run is a folder of its own; use another output_dir"):
        evaluate(config(tmp_path, "answerbench", model.url, judge.url, f"output_dir={evals}"), progress=False)
    assert sorted(p.name for p in evals.iterdir()) == [".lock", "base-answerbench-single"]


def test_a_second_eval_on_a_run_directory_in_use_fails_at_once(tmp_path):
    from qed_jax.rundir import run_lock

    cfg = config(tmp_path, "imo_proofbench", "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")
    with run_lock(Path(cfg.output_dir)):  # as a first job holds it
        with pytest.raises(ConfigError, match=rf"^{tmp_path}/run is in use by another run \(pid {os.getpid()} on "):
            evaluate(cfg, progress=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing read or written


def test_a_rerun_refuses_a_local_model_whose_files_changed_under_the_same_path(tmp_path, monkeypatch):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights of the first model")
    (model / "sub" / "tokenizer.json").write_text("{}")

    def rerun(*overrides):
        c = config(tmp_path, "imo_proofbench", "http://model/v1", "http://judge/v1", "model.base_url=null",
                   "model.name=null", f"model.path={model}", *overrides)
        check_rerun(c)
        check_model_unchanged(c)
        return prepare_output(c, [])

    out = rerun("samples=1")
    rerun("samples=2")  # the same files: a rerun may extend the run
    assert sorted(json.loads((out / "model_files.json").read_text())) == ["model.safetensors", "sub/tokenizer.json"]
    # The same bytes written again (an export made again from the same checkpoint, its folder
    # deleted by hand): the same model, remembered with its new time.
    (model / "model.safetensors").write_bytes(b"weights of the first model")
    os.utime(model / "model.safetensors", ns=(5, 5))
    rerun("samples=2")
    recorded = json.loads((out / "model_files.json").read_text())
    assert recorded["model.safetensors"][:2] == [26, 5]
    (model / "model.safetensors").write_bytes(b"weights of another model!!")  # a re-export: same size, new time
    os.utime(model / "model.safetensors", ns=(1, 1))
    with pytest.raises(ConfigError, match=r"holds samples of the model at .*/model as its files were then .* more "
                                          r"samples would mix two models: choose another output_dir, or delete"):
        rerun("samples=3")
    assert json.loads((out / "model_files.json").read_text()) == recorded
    (model / ".cache").mkdir()  # a download's cache, or a save in progress, is not the model
    (model / ".cache" / "lock").write_text("")
    (model / "3.orbax-checkpoint-tmp-1").mkdir()
    (model / "3.orbax-checkpoint-tmp-1" / "x").write_text("")
    assert set(model_files(str(model))) == set(recorded)
    # A model card added (or recorded by an earlier version) is not the model.
    (out / "model_files.json").write_text(json.dumps({**recorded, "README.md": [4, 1]}))
    (model / "README.md").write_text("card")
    (model / "model.safetensors").write_bytes(b"weights of the first model")
    os.utime(model / "model.safetensors", ns=(recorded["model.safetensors"][1],) * 2)
    rerun("samples=3")
    # A model no longer there, named relative to the working directory: nothing to compare.
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(model)
    check_model_unchanged(config(tmp_path, "imo_proofbench", "http://model/v1", "http://judge/v1",
                                 "model.base_url=null", "model.name=null", "model.path=model"))


def test_mode_rc_errors_name_the_eval_configs_keys(tmp_path):
    """The reasoning cache's own errors name its RCParams fields, which an eval config does not
    have: eval names its rc keys instead."""
    from qed_jax.evaluate import RCGenerator

    thinking_model(tmp_path / "model")
    cfg = load_config(EvalConfig, ROOT / "configs/eval/imo_proofbench.yaml", [
        f"benchmark.path={ROOT}/configs/data/imo_proofbench_sample.jsonl", f"model.path={tmp_path}/model",
        f"output_dir={tmp_path}/run", "mode=rc", "rc.summary_tokens=3"])
    with pytest.raises(ConfigError, match=r"^the no-summary marker takes (\d+) tokens, more than rc.summary_tokens "
                                          r"\(3\): raise rc.summary_tokens to at least \1 or shorten rc.no_summary$"):
        RCGenerator(cfg)


def test_a_rerun_refuses_a_summarizer_replaced_under_the_same_path(tmp_path):
    model, summarizer = tmp_path / "model", tmp_path / "summarizer"
    for folder in (model, summarizer):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(f"the weights of {folder.name}".encode())

    def rerun(*overrides):
        c = config(tmp_path, "imo_proofbench", "http://model/v1", "http://judge/v1", "model.base_url=null",
                   "model.name=null", f"model.path={model}", "mode=rc", f"rc.summarizer={summarizer}", *overrides)
        check_rerun(c)
        check_model_unchanged(c)
        return prepare_output(c, [])

    out = rerun("samples=1")
    rerun("samples=2")
    assert list(json.loads((out / "summarizer_files.json").read_text())) == ["model.safetensors"]
    (summarizer / "model.safetensors").write_bytes(b"another summarizer's weights")
    with pytest.raises(ConfigError, match=r"holds samples of the summarizer at .*/summarizer as its files were then"):
        rerun("samples=3")

def test_a_rerun_refuses_a_prompt_template_edited_since_the_run_began(tmp_path):
    grader = tmp_path / "grader.txt"
    grader.write_text((ROOT / "configs/prompts/imo_proofbench_grader.txt").read_text())

    def rerun(*overrides):
        c = config(tmp_path, "imo_proofbench", "http://model/v1", "http://judge/v1", f"judge.template={grader}",
                   *overrides)
        check_rerun(c)
        return prepare_output(c, [])

    out = rerun("samples=1")
    assert (out / "working_dir.txt").read_text() == f"{os.getcwd()}\n"  # where its relative paths were read
    drew_a_sample(out, judged=True)
    rerun("samples=2")  # the same texts: a rerun may extend the run
    recorded = json.loads((out / "templates.json").read_text())
    assert recorded == {"benchmark.prompt_template": (ROOT / "configs/prompts/proof_generation.txt").read_text(),
                        "judge.template": grader.read_text()}
    grader.write_text(grader.read_text() + "Be lenient.\n")  # edited under the same name
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/run holds a run made with another text of judge.template "
                                          rf"\({grader}\): the template was edited since"):
        rerun("samples=3")
    assert json.loads((out / "templates.json").read_text()) == recorded  # a refused rerun changes nothing
    (out / "templates.json").write_text("{")
    with pytest.raises(ConfigError, match=r"templates.json: not valid JSON .*; move the folder aside"):
        rerun("samples=3")


def test_a_rerun_from_another_directory_reads_relative_paths_where_the_run_began(tmp_path, monkeypatch):
    (tmp_path / "project/data").mkdir(parents=True)
    (tmp_path / "project/data/bench.jsonl").write_text((ROOT / "configs/data/imo_proofbench_sample.jsonl").read_text())
    (tmp_path / "elsewhere/data").mkdir(parents=True)
    (tmp_path / "elsewhere/data/bench.jsonl").write_text("another benchmark\n")

    def rerun(where, path):
        monkeypatch.chdir(tmp_path / where)
        c = config(tmp_path, "imo_proofbench", "http://model/v1", "http://judge/v1", f"benchmark.path={path}")
        check_rerun(c)
        return prepare_output(c, [])

    drew_a_sample(rerun("project", "data/bench.jsonl"))
    rerun("elsewhere", "../project/data/bench.jsonl")  # the same file, spelt from here
    # Recorded now as ../project/data/bench.jsonl read in elsewhere/: another file is refused,
    # the recorded one named as it reads from where it was recorded.
    with pytest.raises(ConfigError, match=rf"holds a run with benchmark.path='{tmp_path}/elsewhere/\.\./project/data/"
                                          r"bench.jsonl', not '\.\./elsewhere/data/bench.jsonl'"):
        rerun("project", "../elsewhere/data/bench.jsonl")


def test_cli_help_does_not_import_jax():
    code = ("import sys, qed_jax.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('jax', 'matplotlib', 'openai', 'math_verify') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stderr


def test_a_home_relative_model_path_is_guarded_against_a_changed_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    home, absolute = (load_config(EvalConfig, ROOT / "configs/eval/imo_proofbench.yaml", [f"model.path={p}"]).model.path
                      for p in ("~/m", tmp_path / "m"))
    assert model_files(home) == model_files(absolute) and "config.json" in model_files(home)


def test_sigterm_mid_run_says_so_and_a_rerun_finishes(tmp_path):
    """SIGTERM (a TPU VM's preemption) stops an evaluation as Ctrl-C does: what finished is kept,
    the last line says how it stopped and how to go on, the exit status is 128 + SIGTERM."""
    release, asked = threading.Event(), threading.Event()
    held = ("PB-Advanced-001", 1)

    def reply(prompt, seed):
        if problem_and_sample(prompt, seed) == held:
            asked.set()
            release.wait(30)
        return proof_reply(prompt, seed)

    with ModelServer(reply) as model, JudgeServer() as judge:
        command, env = served_eval(tmp_path, model, judge)
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert asked.wait(60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        release.set()
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            "qed-jax eval: stopped by SIGTERM; what finished is kept: rerun the same command to continue")
        graded = judge.total
        assert graded >= 4  # the first round of four

        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert judge.total == 11  # 12 less the truncated sample: none graded twice
    _, records = read_run(tmp_path / "run")
    assert len(records) == 12


def test_a_misspelt_template_name_lists_the_bundled_templates_of_its_kind(tmp_path):
    from qed_jax.reasoning_cache import load_rc_template

    cfg = config(tmp_path, "imo_proofbench", "http://model/v1", "http://judge/v1",
                 "benchmark.prompt_template=proof_generaton")
    with pytest.raises(ConfigError, match=re.escape("benchmark.prompt_template 'proof_generaton' is neither a file nor "
                                                    "one of ['answer_generation', 'proof_generation']")):
        load_prompt_template(cfg.benchmark)
    with pytest.raises(ConfigError, match=re.escape("RC prompt template 'rc_reasonng' is neither a file nor one of "
                                                    "['rc_reasoning', 'rc_summarize']")):
        load_rc_template("rc_reasonng")
    # In a run, before a model loads: named by its key, as a misspelt benchmark file is.
    (tmp_path / "model").mkdir()  # there, but never loaded

    def run(*overrides):
        evaluate(load_config(EvalConfig, ROOT / "configs/eval/imo_proofbench.yaml", [
            f"benchmark.path={ROOT}/configs/data/imo_proofbench_sample.jsonl", f"model.path={tmp_path}/model",
            "judge.base_url=http://127.0.0.1:9/v1", f"output_dir={tmp_path}/run", *overrides]), progress=False)

    with pytest.raises(ConfigError, match=re.escape("rc.reasoning_template 'rc_reasonin' is neither a file nor one of "
                                                    "['rc_reasoning', 'rc_summarize']")):
        run("mode=rc", "rc.reasoning_template=rc_reasonin")
    with pytest.raises(ConfigError, match=f"^benchmark.path {tmp_path}/smple.jsonl does not exist$"):
        run(f"benchmark.path={tmp_path}/smple.jsonl")
    assert not (tmp_path / "run").exists()
