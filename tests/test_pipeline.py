"""`qed-jax pipeline` end to end on the tiny config, shortened: Ctrl-C mid-way exits 130 and loses
nothing, a rerun finishes every stage, and another rerun does nothing (no sample generated, no
grading request); the report holds the base, SFT and GRPO models' rows in both modes, and plots."""

import datetime
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qed_jax.config import ConfigError, load_config
from qed_jax.evaluate import EvalRCConfig
from qed_jax.pipeline import PipelineConfig, as_overrides, eval_configs, stage_config, stages, with_judge
from qed_jax.sft import SFTConfig
from tests.helpers import cli_env, drew_a_sample

ROOT = Path(__file__).resolve().parent.parent
TINY = "configs/pipeline/tiny.yaml"
# A few steps of each trainer, one benchmark on two problems, tiny budgets. Every completion goes
# to the judge (require_think_end false), so that the stand-in's request count means something.
SHORT = ["sft.overrides.steps=3", "sft.overrides.checkpoint_every=3", "grpo.overrides.steps=2",
         "grpo.overrides.prompts_per_step=2", "grpo.overrides.samples_per_prompt=4",
         "eval.benchmarks=[{config: configs/eval/imo_proofbench.yaml, rows: configs/data/imo_proofbench_sample.jsonl}]",
         "eval.overrides.samples=2", "eval.overrides.benchmark.limit=2", "eval.overrides.sampling.max_new_tokens=8",
         "eval.overrides.rc.summary_tokens=16", "eval.overrides.judge.require_think_end=false"]
RUNS = [f"{model}-imo_proofbench-{mode}" for model in ("base", "sft", "grpo") for mode in ("single", "rc")]


def pipeline(out: Path, *overrides, **kwargs):
    # Started with SIGINT ignored, as a shell starts background jobs (CI's runner may too): Ctrl-C
    # must stop it all the same.
    return subprocess.Popen(["bash", "-c", 'trap "" INT; exec "$@"', "pipeline", sys.executable, "-m", "qed_jax.cli",
                             "pipeline", "--config", TINY, f"output_dir={out}", *SHORT, *overrides],
                            cwd=ROOT, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def eval_logs(out: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in (out / "eval").glob("*/samples.jsonl")}


def test_pipeline_interrupted_finished_then_skipped(tmp_path):
    out = tmp_path / "run"
    # Ctrl-C as soon as the pipeline reports its first evaluation done (five more are to come):
    # exit 130, everything written is kept.
    proc = pipeline(out)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[4/5 eval] 1/6 "):
            proc.send_signal(signal.SIGINT)
            break
    output = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "[3/5 grpo] done at step 2" in output and "[5/5 report]" not in output
    before = eval_logs(out)
    assert any(before.values())

    # A rerun finishes: the trainers are complete, the evaluations continue where they stopped.
    proc = pipeline(out)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    assert "[1/5 base] using" in output
    assert "[2/5 sft] already complete at step 3" in output and "[3/5 grpo] already complete at step 2" in output
    after = eval_logs(out)
    assert sorted(after) == sorted(RUNS)
    assert all(after[name].startswith(text) for name, text in before.items())
    for name, text in after.items():  # each sample drawn once, across the stop
        drawn = [(r["problem_id"], r["sample"]) for r in map(json.loads, text.splitlines()) if r["type"] == "sample"]
        assert len(drawn) == len(set(drawn)) == 4, (name, drawn)
    requests = int(output.split("stand-in judge answered ")[1].split()[0])
    assert requests > 0

    report = (out / "report.md").read_text()
    pivot = report.split("Every run:")[0]
    for model in ("base", "sft", "grpo"):
        assert f"| {out}/{model}/hf |" in pivot
    assert "imo_proofbench single | imo_proofbench rc" in pivot
    summaries = json.loads((out / "report.json").read_text())
    assert sorted(summaries) == sorted(RUNS)
    assert all(s["samples"] == 4 and s["pending"] == 0 for s in summaries.values())
    assert all(len(s["turns"]["mean"]) == 3 for name, s in summaries.items() if name.endswith("-rc"))
    for plot in ("score_histogram.png", "score_vs_tokens.png", "score_per_turn.png"):
        assert (out / plot).stat().st_size > 0

    # Another rerun does nothing: no sample drawn, no grade requested. A deleted export is made
    # again from the finished run, the same model, so its evaluations stand.
    shutil.rmtree(out / "grpo" / "hf")
    proc = pipeline(out)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    assert "[3/5 grpo] already trained; exported again at step 2" in output
    assert eval_logs(out) == after
    assert len(re.findall(r": already complete \(\d+ samples graded\)", output)) == len(RUNS)
    assert "stand-in judge answered 0 requests" in output

    # A rerun of fewer evaluations reports every one the run directory holds, its own first.
    proc = pipeline(out, "eval.models=[sft]", "eval.modes=[single]")
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    assert "[4/5 eval] 1 evaluations" in output and "[5/5 report] 6 runs" in output
    assert sorted(json.loads((out / "report.json").read_text())) == sorted(RUNS)


def test_stage_configs_chain_the_stages(tmp_path):
    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}"])
    evals = eval_configs(config, {m: str(tmp_path / m / "hf") for m in ("base", "sft", "grpo")}, "http://x/v1", tmp_path)
    assert len(evals) == 18 and len({c.output_dir for c in evals}) == 18
    c = evals[1]
    assert (c.mode, c.model.path, c.benchmark.path) == ("rc", str(tmp_path / "base/hf"),
                                                        "configs/data/imo_proofbench_sample.jsonl")
    assert c.output_dir == str(tmp_path / "eval/base-imo_proofbench-rc")
    assert (c.judge.base_url, c.judge.model) == ("http://x/v1", "qed-jax-standin-judge")
    assert c.rc.grade_turns and c.sampling.max_new_tokens == 48 and c.samples == 3
    # eval.overrides' rc section is for the rc evaluations: a single-shot one keeps the defaults.
    assert evals[0].mode == "single" and evals[0].rc == EvalRCConfig() and evals[0].sampling.max_new_tokens == 48
    assert as_overrides({"a": {"b": 1, "c": [1, 2]}, "d": None}) == ['a={"b": 1, "c": [1, 2]}', "d=null"]
    # Values read back as they were: a date YAML read as its text, any character (not broken surrogates).
    odd = {"name": datetime.date(2024, 1, 2), "t": "Beweise 😀", "c": "a\x85b\x7f", "n": {"t": "😀"}}
    assert [yaml.safe_load(o.split("=", 1)[1]) for o in as_overrides(odd)] == [
        "2024-01-02", "Beweise 😀", "a\x85b\x7f", {"t": "😀"}]
    # A mapping field in eval.overrides replaces the benchmark's (as on eval's command line); a
    # section's mapping merges (the benchmark keeps its path).
    grouped = load_config(PipelineConfig, ROOT / TINY, [
        f"output_dir={tmp_path}",
        'eval.overrides={benchmark: {group_field: problem_id, groups: {easy: "(?i)basic", hard: ".*"}}}'])
    c = eval_configs(grouped, {m: m for m in ("base", "sft", "grpo")}, "http://x/v1", tmp_path)[0]
    assert (c.benchmark.groups, c.benchmark.path) == ({"easy": "(?i)basic", "hard": ".*"},
                                                      "configs/data/imo_proofbench_sample.jsonl")
    # ... and so does one given on the command line for the pipeline's own eval.overrides.
    regrouped = load_config(PipelineConfig, ROOT / TINY, [
        f"output_dir={tmp_path}", 'eval.overrides={benchmark: {groups: {easy: "(?i)basic", hard: ".*"}}}',
        'eval.overrides.benchmark.groups={all: ".*"}', "eval.overrides.benchmark.group_field=problem_id"])
    assert regrouped.eval.overrides["benchmark"] == {"groups": {"all": ".*"}, "group_field": "problem_id"}
    mapped = load_config(PipelineConfig, ROOT / TINY,
                         [f"output_dir={tmp_path}", "eval.overrides.benchmark.fields.solution=ref"])
    proofbench = [c for c in eval_configs(mapped, {m: m for m in ("base", "sft", "grpo")}, "http://x/v1", tmp_path)
                  if c.benchmark.name == "proofbench"][0]
    assert proofbench.benchmark.field_map["solution"] == "ref"  # merged: its marking scheme's column kept
    assert proofbench.benchmark.field_map["guidelines"] == "grading_scheme"
    named = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", "eval.overrides.benchmark.name=mine"])
    with pytest.raises(ConfigError, match="^eval.overrides sets benchmark.name, which gives every benchmark the same "
                                          "name, so their runs would share a folder; leave it out"):
        eval_configs(named, {m: m for m in ("base", "sft", "grpo")}, "http://x/v1", tmp_path)
    with pytest.raises(ConfigError, match="^eval.modes lists 'single' twice$"):
        load_config(PipelineConfig, ROOT / TINY, ["eval.modes=[single, single]"])

    from qed_jax.grpo import GRPOConfig

    judged = load_config(GRPOConfig, ROOT / "configs/rl/tiny.yaml", ["reward_rule=null"])
    with pytest.raises(ConfigError, match="stand-in, which is for evaluation only"):
        with_judge(config, judged, tmp_path / "cache.sqlite")
    real = load_config(PipelineConfig, ROOT / TINY, ["judge=http://judge:8000/v1"])
    assert with_judge(real, judged, tmp_path / "cache.sqlite").judge.base_url == "http://judge:8000/v1"

    # An error in a stage's config names the stage: sft and grpo share many keys (steps, optim.lr).
    typo = load_config(PipelineConfig, ROOT / TINY, ["sft.overrides.steps_typo=3"])
    with pytest.raises(ConfigError, match=r"^sft stage \(configs/sft/tiny.yaml, with the pipeline config's "
                                          r"sft.overrides\): unknown "
                                          r"config key steps_typo"):
        stage_config(SFTConfig, typo.sft, "sft")
    with pytest.raises(ConfigError, match="set judge"):
        load_config(PipelineConfig, ROOT / TINY, ["judge=null"])
    with pytest.raises(ConfigError, match="unknown model 'rl'"):
        load_config(PipelineConfig, ROOT / TINY, ["eval.models=[base, rl]"])
    with pytest.raises(ConfigError, match=r"^eval\.modes: unknown mode 'singel'; choose from single, rc$"):
        load_config(PipelineConfig, ROOT / TINY, ["eval.modes=[singel]"])


def test_paths_chaining_the_stages_are_passed_as_they_are(tmp_path):
    out = tmp_path / "exp #2: a/b"  # a YAML comment and a mapping, were the path written bare
    s = stages(load_config(PipelineConfig, ROOT / TINY, [f"output_dir={json.dumps(str(out))}"]), "http://x/v1")
    assert (s.sft.output_dir, s.grpo.output_dir, s.grpo.model.path) == (
        str(out / "sft"), str(out / "grpo"), str(out / "sft" / "hf"))
    assert {c.judge.cache_path for c in s.evals} == {str(out / "judge_cache.sqlite")}
    assert {c.model.path for c in s.evals} == {s.base, str(out / "sft" / "hf"), str(out / "grpo" / "hf")}


def test_a_judge_that_does_not_answer_is_found_before_training(tmp_path):
    from qed_jax.errors import JudgeUnavailable
    from qed_jax.pipeline import run

    with pytest.raises(ConfigError, match=r"^judge: 'standinn' is not an http:// or https:// URL with a host, .* "
                                          r"\(judge is standin, the offline stand-in, or an OpenAI-compatible "):
        load_config(PipelineConfig, ROOT / TINY, ["judge=standinn"])
    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", "judge=http://127.0.0.1:9/v1"])
    with pytest.raises(JudgeUnavailable, match=r"cannot reach the judge at http://127.0.0.1:9/v1: .* \(eval's judge: "
                                               r"a pipeline sets judge.base_url from its judge setting; set the other "
                                               r"judge settings in eval.overrides, e.g. "
                                               r"eval.overrides.judge.model=NAME\)$"):
        run(config)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no stage ran


def test_a_judge_that_does_not_serve_the_model_a_stage_grades_with_is_found_before_training(tmp_path):
    """A judge that answers but has no such model (its model list may not show which it takes):
    found with one short request per model before training, not at the evaluations hours later."""
    from qed_jax.errors import JudgeUnavailable
    from qed_jax.pipeline import run
    from qed_jax.standin_judge import STANDIN_MODEL, StandinJudge

    grpo_judges = ["grpo.overrides.reward_rule=null", "grpo.overrides.judge.model"]
    with StandinJudge() as judge:  # serves STANDIN_MODEL only; 404 for any other name
        for overrides, stage, model in [
                ([], "eval", "openai/gpt-oss-20b"),
                ([grpo_judges[0], f"{grpo_judges[1]}=grader", f"eval.overrides.judge.model={STANDIN_MODEL}"], "grpo",
                 "grader"),
                ([grpo_judges[0], f"{grpo_judges[1]}={STANDIN_MODEL}"], "eval", "openai/gpt-oss-20b")]:
            config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", f"judge={judge.url}",
                                                                *overrides])
            with pytest.raises(JudgeUnavailable, match=rf"^the judge at {judge.url} answered HTTP 404 \(.*\) for "
                                                       rf"judge.model '{model}': check judge.model, .* \({stage}'s judge: "
                                                       rf"a pipeline sets .*, e.g. {stage}.overrides.judge.model=NAME\)$"):
                run(config)
            assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no stage ran
    assert judge.requests == 1  # the one probe to the model it serves (the last run's GRPO)


def test_a_hub_benchmark_that_cannot_be_read_is_found_before_training(tmp_path, monkeypatch):
    """Offline, a benchmark read from the Hub failed only at the evaluations, after SFT and GRPO
    had trained."""
    import datasets

    from qed_jax import sft
    from qed_jax.pipeline import run

    asked = []

    def offline(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(sft, "train", lambda c: pytest.fail("SFT trained"))
    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}",
                                                       "eval.benchmarks=[{config: configs/eval/imo_proofbench.yaml}]"])
    with pytest.raises(ConfigError, match=r"^eval benchmark\.path 'lm-provers/IMOProofBench' \(name None, split "
                                          r"'train'\): not a local .* failed: Couldn't reach "
                                          r"'lm-provers/IMOProofBench' on the Hub"):
        run(config)
    assert asked == [("lm-provers/IMOProofBench", None, "train")]  # the bundled GRPO prompts are local: not asked
    assert not (tmp_path / "sft").exists() and not (tmp_path / "base").exists()


def test_print_config_refuses_what_the_run_would(capsys, monkeypatch, tmp_path):
    import dataclasses

    from qed_jax import cli, sft
    from qed_jax.config import dump_json

    monkeypatch.chdir(ROOT)  # the configs name their stages' configs relative to the repository
    assert cli.main(["pipeline", "--config", TINY, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["judge"] == "standin"
    assert cli.main(["pipeline", "--config", TINY, "--print-config", "eval.overrides.samples=-1"]) == 2
    assert ("eval stage (configs/eval/imo_proofbench.yaml, with the pipeline config's eval.overrides): samples must "
            "be at least 1") in capsys.readouterr().err
    assert cli.main(["pipeline", "--config", TINY, "--print-config", "sft.overrides=5"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: sft.overrides: expected a mapping, got 5")
    empty = tmp_path / "empty.yaml"  # no model to train: the SFT stage would find out only as it starts
    empty.write_text("")
    assert cli.main(["pipeline", "--config", TINY, "--print-config", f"sft.config={empty}"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: sft stage ({empty}, with the pipeline config's sft.overrides): model: set model.path (a checkpoint "
        "to load) or model.preset (a random init)")
    # An override of what the pipeline sets itself would be replaced in silence.
    for override, key in (("grpo.overrides.model.path=/some/model", "grpo.overrides sets model.path"),
                          ("sft.overrides={output_dir: /elsewhere}", "sft.overrides sets output_dir"),
                          ("eval.overrides.mode=single", "eval.overrides sets mode"),
                          ("eval.overrides.judge.model=j", "eval.overrides sets judge.model"),
                          ("eval.overrides.output_dir=/tmp/e", "eval.overrides sets output_dir")):
        assert cli.main(["pipeline", "--config", TINY, "--print-config", override]) == 2
        chained = key.split(" sets ")[1]
        assert f"error: {key}, but the pipeline sets {chained} itself" in capsys.readouterr().err
    real_judge = ["judge=http://127.0.0.1:9/v1", "grpo.overrides.reward_rule=null"]  # GRPO grades with it
    assert cli.main(["pipeline", "--config", TINY, "--print-config", *real_judge,
                     "grpo.overrides.judge.base_url=http://other/v1"]) == 2
    assert "error: grpo.overrides sets judge.base_url, but the pipeline sets" in capsys.readouterr().err
    # A later stage's input that is not there: found now, not after the trainers' hours.
    for override, message in (
            ("eval.benchmarks=[{config: configs/eval/imo_proofbench.yaml, rows: configs/data/imo_sampel.jsonl}]",
             "eval base-imo_proofbench-single: benchmark.path configs/data/imo_sampel.jsonl does not exist"),
            ("grpo.overrides.data.path=configs/data/tiny_proofz.jsonl",
             "grpo: data.path configs/data/tiny_proofz.jsonl does not exist"),
            ("eval.overrides.rc.summarizer=/no/summarizer", "rc.summarizer /no/summarizer does not exist"),
            ("grpo.overrides.data.path=mydata/rows.jsonl", "grpo: data.path mydata/rows.jsonl does not exist")):
        assert cli.main(["pipeline", "--config", TINY, "--print-config", override]) == 2
        assert message in capsys.readouterr().err
    # A run directory started otherwise, as the run would refuse it.
    started = stage_config(sft.SFTConfig, load_config(PipelineConfig, TINY).sft, "sft",
                           {"output_dir": str(tmp_path / "sft")})
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text(dump_json(dataclasses.replace(started, steps=40)))
    (tmp_path / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 6.0}) + "\n")  # it trained a step
    assert cli.main(["pipeline", "--config", TINY, "--print-config", f"output_dir={tmp_path}"]) == 2
    assert "(steps: 40 -> 120); a pipeline's run directory continues only as it started" in capsys.readouterr().err


@pytest.mark.parametrize("override, meant", [("sft.stepz=3", "sft.overrides.steps"),
                                             ("grpo.steps=abc", "grpo.overrides.steps"),
                                             ("eval.samples=1", "eval.overrides.samples")])
def test_a_stage_setting_given_outside_its_overrides_names_where_it_goes(monkeypatch, override, meant):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=rf"unknown config key {override.split('=')[0]} \(did you mean {meant}\?\)"):
        load_config(PipelineConfig, TINY, [override])


def test_an_output_dir_holding_another_commands_run_is_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    # Else the pipeline wrote its stages beside an SFT run, which then refused to resume (its
    # folder had become a pipeline's).
    from qed_jax import cli, sft
    from qed_jax.config import dump_json
    from qed_jax.pipeline import run

    sft_run = tmp_path / "sft-run"
    sft_run.mkdir()
    (sft_run / "config.json").write_text(dump_json(load_config(sft.SFTConfig, ROOT / "configs/sft/tiny.yaml")))
    (sft_run / ".lock").write_text("")  # as the run left it
    message = (f"{sft_run} holds another command's run or a model ({sft_run / 'config.json'}: a trainer's, an "
               "evaluation's or a model's); the pipeline would write its stages beside it and strand it: use another "
               "output_dir")
    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={sft_run}", "judge=http://127.0.0.1:9/v1"])
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        run(config)
    assert sorted(p.name for p in sft_run.iterdir()) == [".lock", "config.json"]  # left as it was
    monkeypatch.chdir(ROOT)
    assert cli.main(["pipeline", "--config", TINY, "--print-config", f"output_dir={sft_run}"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_a_trainer_whose_config_changed_is_refused_before_any_stage_runs(tmp_path):
    import dataclasses

    from qed_jax import sft
    from qed_jax.config import dump_json
    from qed_jax.pipeline import run

    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", "judge=http://127.0.0.1:9/v1"])
    started = stage_config(sft.SFTConfig, config.sft, "sft", {"output_dir": str(tmp_path / "sft")})
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text(dump_json(dataclasses.replace(started, steps=40)))
    (tmp_path / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 6.0}) + "\n")  # it trained a step
    with pytest.raises(ConfigError, match=r"\(steps: 40 -> 120\); a pipeline's run directory continues only as it "
                                          r"started \(config and data\).*use a new output_dir$") as error:
        run(config)
    assert "--resume-with-changes" not in str(error.value)  # the pipeline has no such flag
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "sft"]  # nothing ran: not even the base export
    # Nor may its export's dtype change: the evaluations after it may hold the first export's.
    (tmp_path / "sft" / "config.json").write_text(dump_json(dataclasses.replace(started, export_dtype="float16")))
    with pytest.raises(ConfigError, match=r"\(export_dtype: \"float16\" -> \"float32\"\); a pipeline's run directory "):
        run(config)
    # A run that finished no step has nothing to continue: it starts again as set up now (the
    # unreachable judge is what stops this pipeline, after every check of the run directories).
    (tmp_path / "sft" / "metrics.jsonl").unlink()
    from qed_jax.errors import JudgeUnavailable
    with pytest.raises(JudgeUnavailable, match=r"cannot reach the judge at http://127.0.0.1:9/v1"):
        run(config)


def test_a_grpo_run_from_an_earlier_sft_model_is_refused_once_sft_trains_again(tmp_path, monkeypatch):
    """sft/ deleted (or lost) and trained again: grpo/ still holds the run started from the old
    SFT model, which would otherwise be resumed, or found complete, as if it were the new one's."""
    from qed_jax import grpo, sft
    from qed_jax.config import dump_json
    from qed_jax.pipeline import run, stages

    # micro-batches of 8 rows: one per device of the tests' 8, as the pipeline checks before any stage
    config = load_config(PipelineConfig, ROOT / TINY,
                         [f"output_dir={tmp_path}", *SHORT, "sft.overrides.micro_batches=1"])
    s = stages(config, "http://127.0.0.1:9/v1")
    (tmp_path / "grpo").mkdir(parents=True)
    (tmp_path / "grpo" / "config.json").write_text(dump_json(s.grpo))
    monkeypatch.setattr(sft, "train", lambda c: pytest.fail("SFT trained"))
    monkeypatch.setattr(grpo, "train", lambda c: pytest.fail("GRPO ran on from the old SFT model"))
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/sft holds no run, so sft would train again, but "
                                          rf"{tmp_path}/grpo holds a grpo run started from its earlier model; delete "):
        run(config)  # found before any stage runs
    assert not (tmp_path / "base").exists()
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text(dump_json(s.sft))  # its checkpoints lost: it trains again
    monkeypatch.setattr(sft, "train", lambda c: {"complete": False, "start_step": 0, "step": 3, "loss": 1.0})
    with pytest.raises(ConfigError, match=rf"^sft trained now \({tmp_path}/sft\), but {tmp_path}/grpo holds a grpo "
                                          rf"run started from its earlier model; delete {tmp_path}/grpo "):
        run(config)
    # SFT found complete, or its export made again from its last checkpoint: GRPO goes on as it is.
    for complete in (True, False):
        result = {"complete": complete, "start_step": 3, "step": 3, "loss": 1.0}
        monkeypatch.setattr(sft, "train", lambda c, result=result: result)
        with pytest.raises(pytest.fail.Exception, match="GRPO ran on"):
            run(config)


def test_a_base_export_drawn_from_another_init_is_refused(tmp_path):
    """sft/ deleted and the pipeline rerun with another SFT seed: base/hf, exported from the first
    seed's init, is no longer the model SFT starts from."""
    import dataclasses

    from qed_jax.pipeline import export_base, stages

    s = stages(load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", *SHORT]), "http://127.0.0.1:9/v1")
    assert export_base(s.sft, Path(s.base)) and not export_base(s.sft, Path(s.base))  # once
    reseeded = dataclasses.replace(s.sft, seed=7)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/base/hf was exported from another init than SFT starts from "
                                          rf"now \(seed: 0 -> 7\): delete {tmp_path}/base and the base evaluations "
                                          rf"\({tmp_path}/eval/base-\*\)"):
        export_base(reseeded, Path(s.base))
    (tmp_path / "base" / "init.json").unlink()  # as an earlier version exported it: taken as it is
    assert not export_base(reseeded, Path(s.base))


def test_evaluations_of_a_model_that_trains_anew_are_refused_before_any_stage(tmp_path, monkeypatch):
    from qed_jax import grpo, sft
    from qed_jax.config import dump_json
    from qed_jax.pipeline import run, stages

    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", *SHORT])
    s = stages(config, "http://127.0.0.1:9/v1")
    grpo_eval = next(c for c in s.evals if c.model.path == str(tmp_path / "grpo" / "hf"))
    Path(grpo_eval.output_dir).mkdir(parents=True)
    (Path(grpo_eval.output_dir) / "config.json").write_text(dump_json(grpo_eval))
    drew_a_sample(grpo_eval.output_dir)
    monkeypatch.setattr(sft, "train", lambda c: pytest.fail("SFT trained"))
    monkeypatch.setattr(grpo, "train", lambda c: pytest.fail("GRPO trained"))
    for done in ([], ["sft"]):  # sft/ deleted (so grpo trains anew too), or grpo/ alone
        for stage in done:
            (tmp_path / stage).mkdir(exist_ok=True)
            (tmp_path / stage / "config.json").write_text(dump_json(getattr(s, stage)))
        why = "trains from a model trained anew" if not done else "holds no run, so it would train again"
        with pytest.raises(ConfigError, match=rf"^{tmp_path}/grpo {why}, but {grpo_eval.output_dir} holds an "
                                              rf"evaluation of its earlier model; delete it"):
            run(config)
        assert not (tmp_path / "base").exists()  # no stage ran
    # Also when this config leaves that evaluation out (the report would show it beside the new ones).
    narrower = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", *SHORT, "eval.models=[sft]"])
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/grpo holds no run, so it would train again, but "
                                          rf"{grpo_eval.output_dir} holds an evaluation of its earlier model"):
        run(narrower)
    assert not (tmp_path / "base").exists()


def test_the_report_covers_the_evaluations_of_this_configs_models_that_drew_samples(tmp_path):
    from qed_jax.config import dump_json
    from qed_jax.pipeline import check_run_directories, report_runs, stages

    s = stages(load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", *SHORT, "eval.models=[sft]"]),
               "http://127.0.0.1:9/v1")
    template = json.loads(dump_json(s.evals[0]))
    for name, model, drew in [("grpo-kept", str(tmp_path / "grpo" / "hf"), True),
                              ("grpo-stopped-before-its-first-sample", str(tmp_path / "grpo" / "hf"), False),
                              ("other-model", str(tmp_path / "elsewhere"), True), ("an-endpoint", None, True)]:
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({**template, "model": {**template["model"], "path": model}}))
        if drew:
            drew_a_sample(folder)
    assert report_runs(s, tmp_path) == [c.output_dir for c in s.evals] + [str(tmp_path / "eval" / "grpo-kept")]
    with pytest.raises(ConfigError, match=r"grpo-kept holds an evaluation of its earlier model"):
        check_run_directories(s, tmp_path)  # sft/ and grpo/ hold no run: both train anew


def test_a_second_pipeline_on_an_output_dir_in_use_fails_at_once(tmp_path, monkeypatch):
    import os

    from qed_jax import standin_judge
    from qed_jax.pipeline import run
    from qed_jax.rundir import run_lock

    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path / 'p'}"])
    # Nor is the stand-in judge's port opened for a run that cannot start.
    monkeypatch.setattr(standin_judge, "StandinJudge", lambda: pytest.fail("the stand-in judge was started"))
    with run_lock(tmp_path / "p"):  # as a first pipeline holds it
        with pytest.raises(ConfigError, match=rf"^{tmp_path}/p is in use by another run \(pid {os.getpid()} on "):
            run(config)
        assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [".lock"]  # no stage ran


def test_a_rerun_that_would_shrink_an_evaluation_is_refused_before_any_stage(tmp_path):
    from qed_jax.config import dump_json
    from qed_jax.pipeline import run

    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}"])
    started = eval_configs(config, {m: str(tmp_path / m / "hf") for m in ("base", "sft", "grpo")}, "http://x/v1",
                           tmp_path)[0]
    Path(started.output_dir).mkdir(parents=True)
    (Path(started.output_dir) / "config.json").write_text(dump_json(started))  # samples=3
    sample = {"type": "sample", "problem_id": "PB-Basic-001", "sample": 2, "completion_tokens": 4,
              "truncated": False}  # its third
    (Path(started.output_dir) / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    with pytest.raises(ConfigError, match=r"base-imo_proofbench-single holds a run with samples drawn up to index 2 "
                                          r"\(samples=3\): a rerun may extend it, not shrink it to 1"):
        run(load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", "eval.overrides.samples=1"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "eval"]  # no stage ran


def test_an_evaluation_of_a_benchmark_edited_since_is_refused_before_any_stage(tmp_path):
    """A row's problem text edited in the benchmark file after its samples were drawn: found by
    the checks before any stage (it was found only when that evaluation began, after training)."""
    from qed_jax.config import dump_json
    from qed_jax.data import read_rows
    from qed_jax.evaluate import problem_fingerprints, problems_from_rows
    from qed_jax.pipeline import run

    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}"])
    started = eval_configs(config, {m: str(tmp_path / m / "hf") for m in ("base", "sft", "grpo")}, "http://x/v1",
                           tmp_path)[0]
    out = Path(started.output_dir)
    out.mkdir(parents=True)
    (out / "config.json").write_text(dump_json(started))
    sample = {"type": "sample", "problem_id": "PB-Basic-001", "sample": 0, "completion_tokens": 4, "truncated": False}
    (out / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    fingerprints = problem_fingerprints(problems_from_rows(read_rows(started.benchmark.path), started.benchmark))
    fingerprints["PB-Basic-001"]["problem"] = "0" * 16  # as it read when the sample was drawn
    (out / "problem_fingerprints.json").write_text(json.dumps(fingerprints))
    with pytest.raises(ConfigError, match=r"base-imo_proofbench-single holds samples of problem 'PB-Basic-001' whose "
                                          r"problem changed in .* since they were drawn"):
        run(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "eval"]  # no stage ran
    assert (out / "samples.jsonl").read_text() == json.dumps(sample) + "\n"


def test_a_trainers_mesh_that_does_not_fit_the_devices_is_refused_before_any_stage(tmp_path, monkeypatch):
    """A GRPO mesh that did not fit the devices was found only when GRPO began, after SFT trained;
    the error names the stage, as its config's errors do (the tests' 8 CPU devices)."""
    from qed_jax import sft
    from qed_jax.pipeline import run

    monkeypatch.setattr(sft, "train", lambda c: pytest.fail("SFT trained"))
    for overrides, message in (
            (["sft.overrides.micro_batches=1", "grpo.overrides.mesh.data=3"],
             "grpo stage (configs/rl/tiny.yaml, with the pipeline config's grpo.overrides): mesh.data=3, mesh.fsdp=1, "
             "mesh.tensor=1 needs 3 devices, not the 8 devices here"),
            (["sft.overrides.micro_batches=2"],
             "sft stage (configs/sft/tiny.yaml, with the pipeline config's sft.overrides): batch_size / micro_batches "
             "gives 4 rows per micro-batch, which do not split over the 8 data-parallel devices")):
        config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}", *overrides])
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            run(config)
        assert not (tmp_path / "base").exists()  # no stage ran


def test_a_judge_template_that_does_not_fit_its_stage_is_refused_before_any_stage(tmp_path):
    from qed_jax.pipeline import run

    config = load_config(PipelineConfig, ROOT / TINY, [f"output_dir={tmp_path}",
                                                       "eval.overrides.judge.template=rl_grader"])
    with pytest.raises(ConfigError, match=r"^judge.template rl_grader grades against the field 'rubric', which proof "
                                          r"benchmark imo_proofbench does not pass to the judge"):
        run(config)
    assert not (tmp_path / "base").exists()  # no stage ran


def test_a_changed_run_in_a_stage_checkpoint_dir_gets_advice_that_reaches_it():
    """A stage config that sets checkpoint_dir (the 4B configs name a bucket) shares it with every
    pipeline run from that config: a new output_dir alone would meet the same checkpoints."""
    from qed_jax.errors import RunConfigChanged
    from qed_jax.pipeline import pipeline_advice

    with pytest.raises(ConfigError, match=re.escape(
            "/b/ck holds a run that differs from this one (optim.lr: 0.003 -> 0.001); sft's checkpoint_dir, set in "
            "its config, holds that run's checkpoints, which a new output_dir alone would meet again: give sft a "
            "checkpoint_dir of its own too (sft.overrides.checkpoint_dir=...), or leave it out "
            "(output_dir/sft/checkpoints)") + "$"):
        with pipeline_advice("sft", "/b/ck"):
            raise RunConfigChanged("/b/ck", ["optim.lr: 0.003 -> 0.001"], "checkpoint_dir")
    # The default checkpoints (output_dir/sft/checkpoints), whose data changed: a new output_dir is the way.
    with pytest.raises(ConfigError, match=r"\(training data: a -> b\); a pipeline's run directory .*use a new "
                                          r"output_dir$"):
        with pipeline_advice("sft", None):
            raise RunConfigChanged("/o/sft/checkpoints", ["training data: a -> b"], "checkpoint_dir")


def test_the_standin_judge_prints_no_traceback_for_a_client_that_left_mid_reply(capsys):
    # A judge client stops at a 404 with other requests in flight: writing their replies then
    # fails (a broken pipe, a reset), which socketserver printed as a traceback.
    from qed_jax.standin_judge import StandinJudge

    def fail_in_handler(error):
        try:
            raise error
        except Exception:
            judge.httpd.handle_error(None, ("127.0.0.1", 1))

    with StandinJudge() as judge:
        fail_in_handler(BrokenPipeError(32, "Broken pipe"))
        fail_in_handler(ConnectionResetError(104, "Connection reset by peer"))
        assert capsys.readouterr().err == ""
        fail_in_handler(ValueError("a fault of the server's own"))  # still shown
        assert "ValueError: a fault of the server's own" in capsys.readouterr().err


def test_the_standin_judge_answers_a_request_cut_short_or_not_json_without_a_traceback(capfd):
    """A client stopped while it sent its request (Ctrl-C in a judge run): the body ends early,
    which the stand-in parsed anyway and printed the JSON error's traceback. Now it answers
    nobody; a whole body that is not JSON gets a 400."""
    import socket
    from urllib.parse import urlparse

    from qed_jax.standin_judge import StandinJudge

    with StandinJudge() as judge:
        address = (urlparse(judge.url).hostname, urlparse(judge.url).port)

        def post(body: bytes, length: int) -> bytes:
            with socket.create_connection(address, timeout=30) as connection:
                connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                   + f"\r\nContent-Length: {length}\r\n\r\n".encode() + body)
                connection.shutdown(socket.SHUT_WR)
                return connection.makefile("rb").read()

        assert post(b'{"model": "qed-', 100) == b""  # left mid-body: no reply
        reply = post(b"not json", 8)
        assert reply.startswith(b"HTTP/1.0 400") and b"the request body is not JSON" in reply
        assert judge.requests == 0
    assert capfd.readouterr().err == ""


def test_the_standin_judge_serves_on_its_own_for_commands_run_by_hand(tmp_path):
    """`python -m qed_jax.standin_judge` (README's way to try eval or grpo offline): it prints
    its URL, `qed-jax judge` grades through it, and Ctrl-C stops it in one line."""
    # Started with SIGINT ignored, as a script's background job is (and a pytest-xdist worker's
    # children are): Ctrl-C must stop it all the same.
    server = subprocess.Popen([sys.executable, "-m", "qed_jax.standin_judge", "--port", "0"], cwd=ROOT, env=cli_env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        url = re.search(r"at (http://127\.0\.0\.1:\d+/v1): set judge\.base_url=\S+ judge\.model=qed-jax-standin-judge;",
                        server.stdout.readline())[1]
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"problem": "P", "proof": "<think>x</think> Q.E.D."}) + "\n")

        def judge(model):
            return subprocess.run([sys.executable, "-m", "qed_jax.cli", "judge", "--input", str(rows), "--output",
                                   str(tmp_path / "graded.jsonl"), f"base_url={url}", f"model={model}",
                                   f"cache_path={tmp_path / 'cache.sqlite'}"], cwd=ROOT, env=cli_env(1),
                                  capture_output=True, text=True, timeout=120)

        graded = judge("qed-jax-standin-judge")
        assert graded.returncode == 0, graded.stderr[-2000:]
        assert json.loads((tmp_path / "graded.jsonl").read_text())["score"] == 7
        # Under a real judge's name it grades nothing, so none of its grades is cached as that judge's.
        refused = judge("openai/gpt-oss-20b")
        assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].endswith(
            "the stand-in judge serves model qed-jax-standin-judge only, so that its grades are never cached as a "
            "real judge's; set judge.model=qed-jax-standin-judge) for judge.model 'openai/gpt-oss-20b': check "
            "judge.model, judge.base_url and judge.api"), refused.stderr[-2000:]
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and err.strip().splitlines() == ["stand-in judge: stopped after 1 requests"]
    import socket

    with socket.socket() as taken:  # a port in use is one line
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run([sys.executable, "-m", "qed_jax.standin_judge", "--port", str(port)], cwd=ROOT,
                                 env=cli_env(1), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"stand-in judge: cannot serve on 127.0.0.1:{port}: Address already in use; choose another --port"]
    no_port = subprocess.run([sys.executable, "-m", "qed_jax.standin_judge", "--port", "70000"], cwd=ROOT,
                             env=cli_env(1), capture_output=True, text=True, timeout=60)
    assert no_port.returncode == 2 and no_port.stderr.strip().splitlines()[-1] == (
        "python -m qed_jax.standin_judge: error: --port must be between 0 and 65535, got 70000")
