"""`qed-jax pipeline`: the whole recipe in one command, its stages run as a user would run them by
hand: SFT, then GRPO from the SFT model, then evaluation of the base, SFT and GRPO models on each
benchmark in each mode (single-shot and reasoning cache), then one report over every evaluation.

Each stage is the stage's own library call (what `qed-jax sft`, `grpo`, `eval`, `report` call)
with its own config: the stage's YAML, then the pipeline's overrides for it, then the paths that
chain the stages. One run directory holds everything:

  OUTPUT_DIR/base/hf                     the model SFT starts from, exported for evaluation
  OUTPUT_DIR/sft/, OUTPUT_DIR/grpo/      the trainers' run directories (metrics, checkpoints, hf/)
  OUTPUT_DIR/eval/MODEL-BENCHMARK-MODE/  each evaluation's config.json and samples.jsonl
  OUTPUT_DIR/judge_cache.sqlite          the judge's grades
  OUTPUT_DIR/report.md, report.json, *.png

A rerun of the same command does only what is left: a finished trainer says so, an evaluation
resumes from its samples.jsonl, the base export is kept; the report is rebuilt from the runs.
Ctrl-C: a trainer writes a checkpoint first, an evaluation has appended every finished sample and
grade already; the command exits 130 and a rerun continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

from qed_jax.config import (ConfigError, check_local_output_dir, check_url, is_missing_local_path, json_values,
                            load_config, not_found, overrides_of, write_text_atomic)
from qed_jax.errors import JudgeUnavailable, RunConfigChanged, noted

MODELS = ("base", "sft", "grpo")
STANDIN = "standin"


@dataclasses.dataclass(frozen=True)
class StageConfig:
    config: str  # the stage's own YAML
    overrides: dict[str, Any] | None = None  # merged into it, nested as in that YAML


def _sft_config_class():
    from qed_jax.sft import SFTConfig

    return SFTConfig


def _grpo_config_class():
    from qed_jax.grpo import GRPOConfig

    return GRPOConfig


# Each trainer's stage, whose overrides are for its config class: a key of it given outside them
# (sft.steps) is refused with the key it belongs at (sft.overrides.steps).
@dataclasses.dataclass(frozen=True)
class SFTStageConfig(StageConfig):
    overrides: dict[str, Any] | None = dataclasses.field(default=None, metadata=overrides_of(_sft_config_class))


@dataclasses.dataclass(frozen=True)
class GRPOStageConfig(StageConfig):
    overrides: dict[str, Any] | None = dataclasses.field(default=None, metadata=overrides_of(_grpo_config_class))


@dataclasses.dataclass(frozen=True)
class BenchmarkStage:
    config: str  # an eval YAML, e.g. configs/eval/imo_proofbench.yaml
    rows: str | None = None  # the rows to evaluate on (its benchmark.path); default: the YAML's


# The three bundled benchmarks on their made-up sample rows: an offline run.
SAMPLE_BENCHMARKS = tuple(BenchmarkStage(f"configs/eval/{name}.yaml", f"configs/data/{name}_sample.jsonl")
                          for name in ("imo_proofbench", "proofbench", "answerbench"))


def _eval_config_class():
    from qed_jax.evaluate import EvalConfig

    return EvalConfig


@dataclasses.dataclass(frozen=True)
class EvalStageConfig:
    benchmarks: list[BenchmarkStage] = SAMPLE_BENCHMARKS
    models: list[str] = MODELS  # which of base, sft, grpo to evaluate
    modes: list[str] = ("single", "rc")
    # Merged into every evaluation's config.
    overrides: dict[str, Any] | None = dataclasses.field(default=None, metadata=overrides_of(_eval_config_class))

    def __post_init__(self):
        from qed_jax.evaluate import MODES

        for name in ("benchmarks", "models", "modes"):
            if not getattr(self, name):
                raise ConfigError(f"eval.{name} is empty: nothing to evaluate")
        for name, known in (("models", MODELS), ("modes", MODES)):
            unknown = sorted(set(getattr(self, name)) - set(known))
            if unknown:
                raise ConfigError(f"eval.{name}: unknown {name[:-1]} {unknown[0]!r}; choose from {', '.join(known)}")
        for name in ("models", "modes"):
            twice = next((v for v in getattr(self, name) if getattr(self, name).count(v) > 1), None)
            if twice is not None:
                raise ConfigError(f"eval.{name} lists {twice!r} twice")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    # standin: the offline stand-in judge (qed_jax/standin_judge.py, NOT a real judge), started
    # by the command for the evaluations; or an OpenAI-compatible judge's base URL.
    judge: str | None = None
    sft: SFTStageConfig = SFTStageConfig("configs/sft/tiny.yaml")
    grpo: GRPOStageConfig = GRPOStageConfig("configs/rl/tiny.yaml")
    eval: EvalStageConfig = EvalStageConfig()
    output_dir: str = "runs/pipeline"

    def __post_init__(self):
        check_local_output_dir(self.output_dir)
        if not self.judge:
            raise ConfigError("pipeline: set judge to an OpenAI-compatible judge's base URL, or to standin "
                              "for the offline stand-in (full marks for any proof after </think>; not a judge)")
        if self.judge != STANDIN:
            with noted(ConfigError, f"judge is {STANDIN}, the offline stand-in, or an OpenAI-compatible judge's URL"):
                check_url(self.judge, "judge")


SURROGATE_PAIR = re.compile(r"\\ud[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}")


def yaml_escape(pair: re.Match) -> str:
    """JSON's escape of a character past U+FFFF (a surrogate pair) as YAML's: \\U and 8 digits."""
    character = json.loads('"' + pair[0] + '"')
    return f"\\U{ord(character):08x}"


def as_overrides(values: dict | None) -> list[str]:
    """`key=value` overrides that set each of `values` as it is: the value written as JSON, which
    the YAML loader reads back (a path with " #" or ": " in it stays the one string; a date as its
    text, as a stage's own YAML would give it). A mapping merges into the section or mapping field
    it is given for, except benchmark.groups, which it replaces (`config.merge`). A character past
    U+FFFF is written as YAML's \\U escape: YAML reads JSON's pair of \\u surrogates as two broken
    characters."""
    return [f"{key}={SURROGATE_PAIR.sub(yaml_escape, json.dumps(value, default=str))}"
            for key, value in (values or {}).items()]


def leaves(values: dict, prefix: str = ""):
    """(dotted key, value) for each leaf of a nested mapping (an empty mapping is a leaf):
    {"model": {"path": x}} -> ("model.path", x)."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_not_chained(stage: StageConfig, name: str, chained) -> None:
    """ConfigError when a stage's overrides set a key the pipeline sets itself (`chained`): it
    would be replaced in silence."""
    for key, _ in leaves(stage.overrides or {}):
        if clash := next((c for c in chained if key == c or key.startswith(c + ".") or c.startswith(key + ".")),
                         None):
            raise ConfigError(f"{name}.overrides sets {key}, but the pipeline sets {clash} itself (to chain the "
                              "stages: the output folders, the models each stage starts from, the judge, eval.modes "
                              "and each benchmark's rows); leave it out, or set the pipeline's own setting")


def stage_config(cls, stage: StageConfig, name: str, chained: dict | None = None, check=None):
    """A stage's config: its YAML, the pipeline's overrides, then `chained` (key: value, the paths
    chaining the stages), which the overrides may not set; `check(config)` may refuse it further.
    An error names the stage (`name`, the pipeline's key for it) and its YAML."""
    check_not_chained(stage, name, chained or {})
    try:
        config = load_config(cls, stage.config, [*as_overrides(stage.overrides), *as_overrides(chained)])
        if check is not None:
            check(config)
        return config
    except ConfigError as e:
        raise ConfigError(f"{name} stage ({stage.config}, with the pipeline config's {name}.overrides): {e}") from None


class Progress:
    """One line per stage event, with the seconds since the stage began."""

    def __init__(self, stages: int):
        self.stages, self.number, self.start = stages, 0, time.perf_counter()

    def begin(self, name: str, what: str) -> None:
        self.number += 1
        self.name, self.start = name, time.perf_counter()
        self.line(what)

    def line(self, what: str) -> None:
        print(f"[{self.number}/{self.stages} {self.name}] {what}", flush=True)

    def done(self, what: str) -> None:
        self.line(f"{what} ({time.perf_counter() - self.start:.1f} s)")


# --------------------------------------------------------------------------------------------
# Stages


def base_model(sft_config, out: Path) -> str:
    """The model SFT starts from, as something evaluation loads: its model.path (a folder, Hub id
    or gs:// path), or else out/base/hf, the export of the random init it draws (export_base)."""
    return sft_config.model.path or str(out / "base" / "hf")


BASE_INIT = "init.json"  # beside the base export: what it was drawn from (`base_init`)


def base_init(sft_config) -> dict:
    """What the random init SFT starts from is drawn from, and how it is exported."""
    m = sft_config.model
    return {"preset": m.preset, "param_dtype": m.param_dtype, "seed": sft_config.seed,
            "export_dtype": sft_config.export_dtype}


def export_base(sft_config, folder: Path) -> bool:
    """Export the random init SFT starts from (its preset and seed) to `folder`, once; returns
    whether it was written now. An export drawn from another init (SFT redone with another seed
    or preset) is refused: the base evaluations would not be of the model SFT starts from."""
    from qed_jax.pretrained import save_pretrained
    from qed_jax.sharding import make_mesh
    from qed_jax.trainer import open_model, resolve_tokenizer

    if sft_config.model.path:
        return False
    init, recorded = base_init(sft_config), folder.parent / BASE_INIT
    if (folder / "config.json").exists():
        # An export by an earlier version has no record: it is taken as it is.
        was = json.loads(recorded.read_text()) if recorded.exists() else init
        changed = [f"{key}: {was.get(key)!r} -> {value!r}" for key, value in init.items() if was.get(key) != value]
        if changed:
            raise ConfigError(f"{folder} was exported from another init than SFT starts from now "
                              f"({'; '.join(changed)}): delete {folder.parent} and the base evaluations "
                              f"({folder.parent.parent / 'eval'}/base-*) to export and evaluate it again")
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recorded, json.dumps(init) + "\n")
    model = open_model(sft_config.model, sft_config.seed)(make_mesh(sft_config.mesh))
    # save_pretrained writes config.json last: a killed export has none here, and is redone.
    save_pretrained(model, folder, dtype=sft_config.export_dtype or model.config.param_dtype,
                    assets_from=resolve_tokenizer(sft_config.tokenizer, sft_config.model))
    return True


def check_export(name: str, config) -> None:
    if not config.export_dtype:
        raise ConfigError(f"{name}: export_dtype is null, but the next stages load this stage's Hugging Face "
                          "export: set it (e.g. float32 for the tiny preset)")


def check_unchanged(config) -> None:
    """Refuse, before any stage runs, a trainer's run directory that was started with another
    config. The trainer would refuse it too, but only when its stage begins, and with advice
    (--resume-with-changes) that does not hold here. (Changed training data is found only when
    the stage restores its checkpoint, where `pipeline_advice` rewords the refusal.)"""
    from qed_jax.trainer import NOT_RUN_IDENTITY, check_run_config, finished_a_step

    out = Path(config.output_dir)
    with pipeline_advice():
        # A trainer alone re-exports a finished run in another export_dtype; here the stages after
        # it may hold evaluations of the first export, so that too is a change. A run that
        # finished no step starts again as set up now (as the trainer starts it).
        check_run_config(out, config, resume_with_changes=not finished_a_step(out, config.checkpoint_dir),
                         ignored=NOT_RUN_IDENTITY - {"export_dtype"})


@contextlib.contextmanager
def pipeline_advice(stage: str | None = None, checkpoint_dir: str | None = None):
    """A trainer's refusal of a changed run, with the advice that holds in a pipeline (which has
    no --resume-with-changes). When the run is in the `checkpoint_dir` that `stage`'s config sets
    (a bucket, say), a new output_dir alone would meet it again (another pipeline's run, maybe)."""
    try:
        yield
    except RunConfigChanged as e:
        if e.setting == "checkpoint_dir" and checkpoint_dir is not None:
            raise ConfigError(f"{e.refusal}; {stage}'s checkpoint_dir, set in its config, holds that run's "
                              f"checkpoints, which a new output_dir alone would meet again: give {stage} a "
                              f"checkpoint_dir of its own too ({stage}.overrides.checkpoint_dir=...), or leave it "
                              f"out (output_dir/{stage}/checkpoints)") from None
        raise ConfigError(f"{e.refusal}; a pipeline's run directory continues only as it started (config and "
                          "data), since later stages build on what earlier ones finished: use a new output_dir") from None


def train_stage(progress: Progress, name: str, train, config, summary) -> bool:
    """Run (or find complete) one trainer, whose Hugging Face export the next stages load.
    Whether it trained now (took steps), i.e. its model is new to the stages after it; an export
    made again from the finished checkpoint is the same model."""
    progress.begin(name, f"run directory {config.output_dir}; model: {config.model.describe()}")
    with pipeline_advice(name, config.checkpoint_dir), judge_advice(name):  # GRPO grades with the pipeline's judge
        result = train(config)
    if result["complete"]:
        state = "already complete"
    elif result["step"] == result["start_step"]:  # trained before, its export made again (deleted, or cut short)
        state = "already trained; exported again"
    else:
        state = f"resumed at step {result['start_step']}, done" if result["start_step"] else "done"
    progress.done(f"{state} at step {result['step']}: {summary(result)}")
    return result["step"] > result["start_step"]


def check_not_built_on_old(trained: str, trained_dir: str, next_name: str, next_dir: str, before: bool) -> None:
    """A stage that trains now (its run directory deleted, say: `before` any stage runs, else
    once it took steps) while the next one's directory holds a run started from its earlier
    model: going on would finish, or call complete, a run of the old model."""
    if not (Path(next_dir) / "config.json").exists():
        return
    if before and (Path(trained_dir) / "config.json").exists():
        return
    now = f"{trained_dir} holds no run, so {trained} would train again" if before else \
        f"{trained} trained now ({trained_dir})"
    raise ConfigError(f"{now}, but {next_dir} holds a {next_name} run started from its earlier model; delete "
                      f"{next_dir} (and its checkpoint_dir, if elsewhere) to train {next_name} from the new one")


def check_evals_not_of_old(s: Stages, out: Path) -> None:
    """Before any stage: a trainer whose run directory holds no run trains anew, and so does every
    stage after it, so an evaluation that holds samples of their models' exports is of the
    earlier models (its own check would refuse it, but only after the training). Every
    evaluation in the run directory counts, this config's or not: the report covers them all."""
    from qed_jax.evaluate import holds_an_evaluation

    models = {c.output_dir: Path(c.model.path).resolve() for c in s.evals}  # a pipeline evaluates local models
    models.update((folder, recorded_model(Path(folder))) for folder in report_runs(s, out)[len(s.evals):])
    retrains = []
    for config in (s.sft, s.grpo):
        if retrains:  # the stage before it trains anew
            retrains.append((config.output_dir, f"{config.output_dir} trains from a model trained anew"))
        elif not (Path(config.output_dir) / "config.json").exists():
            retrains.append((config.output_dir, f"{config.output_dir} holds no run, so it would train again"))
    for trained_dir, why in retrains:
        export = Path(trained_dir) / "hf"
        old = [folder for folder, model in models.items() if model == export.resolve() and holds_an_evaluation(folder)]
        if old:
            raise ConfigError(f"{why}, but {old[0]} holds an evaluation of its earlier model; delete it (and the other "
                              f"evaluations of {export}) to evaluate the new one")


def with_judge(config: PipelineConfig, grpo_config, judge_cache: Path):
    """GRPO's grader: its reward rule if it has one, else the pipeline's judge, unless that is the
    stand-in, whose constant marks are no training signal."""
    if grpo_config.reward_rule:
        return grpo_config
    if config.judge == STANDIN:
        raise ConfigError("grpo: its config grades with the judge (no reward_rule), but the pipeline's judge is "
                          "the offline stand-in, which is for evaluation only; set grpo.overrides.reward_rule "
                          "(e.g. closes_thinking, the stand-in's own rule) or judge to a real judge's URL")
    check_not_chained(config.grpo, "grpo", ["judge.base_url", "judge.cache_path"])
    judge = dataclasses.replace(grpo_config.judge, base_url=config.judge, cache_path=str(judge_cache))
    return dataclasses.replace(grpo_config, judge=judge)


def eval_configs(config: PipelineConfig, models: dict[str, str], judge_url: str, out: Path) -> list:
    """Every evaluation: model x benchmark x mode, each in out/eval/MODEL-BENCHMARK-MODE."""
    from qed_jax.evaluate import EvalConfig, EvalRCConfig
    from qed_jax.standin_judge import STANDIN_MODEL

    judge = {"judge.base_url": judge_url, "judge.cache_path": str(out / "judge_cache.sqlite")}
    if config.judge == STANDIN:  # its grades are recorded, and cached, under their own judge name
        judge["judge.model"] = STANDIN_MODEL
    configs = []
    check_not_chained(StageConfig("", config.eval.overrides), "eval", ["output_dir"])  # MODEL-BENCHMARK-MODE
    # The reasoning cache's settings, given for every evaluation, are for the rc ones: a single-shot
    # one takes the section's defaults (its YAML's too).
    overrides = {mode: config.eval.overrides for mode in config.eval.modes}
    if "single" in overrides:
        overrides["single"] = {**{k: v for k, v in (config.eval.overrides or {}).items()
                                  if k != "rc" and not k.startswith("rc.")},
                               "rc": dataclasses.asdict(EvalRCConfig())}
    for name in config.eval.models:
        for b in config.eval.benchmarks:
            for mode in config.eval.modes:
                rows = {"benchmark.path": b.rows} if b.rows else {}
                c = stage_config(EvalConfig, StageConfig(b.config, overrides[mode]), "eval",
                                 {**rows, "model.path": models[name], "model.base_url": None, "model.name": None,
                                  "mode": mode, **judge})
                configs.append(dataclasses.replace(c, output_dir=str(out / "eval" / f"{name}-{c.benchmark.name}-{mode}")))
    folders = [c.output_dir for c in configs]
    if len(set(folders)) < len(folders):
        if any(key == "benchmark.name" for key, _ in leaves(config.eval.overrides or {})):
            raise ConfigError("eval.overrides sets benchmark.name, which gives every benchmark the same name, so "
                              "their runs would share a folder; leave it out (each YAML names its benchmark)")
        raise ConfigError("eval.benchmarks: two entries have the same benchmark.name, so their runs would share "
                          "a folder; give each its own benchmark.name in its YAML")
    return configs


# --------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class Stages:
    """Every stage's config, chained: what `run` runs."""
    sft: Any
    base: str  # the model SFT starts from (see base_model)
    grpo: Any
    evals: list


def stages(config: PipelineConfig, judge_url: str) -> Stages:
    """Build and check every stage's config (the judge at `judge_url`), touching no run directory:
    a mistake in any stage fails here, before the first one runs (and with --print-config)."""
    from qed_jax import grpo, sft

    out = Path(config.output_dir)
    sft_config = stage_config(sft.SFTConfig, config.sft, "sft", {"output_dir": str(out / "sft")},
                              check=lambda c: c.model.check_given())  # found by the trainer only as it starts
    base, sft_hf = base_model(sft_config, out), out / "sft" / "hf"
    grpo_config = with_judge(config, stage_config(grpo.GRPOConfig, config.grpo, "grpo", {
        "model.path": str(sft_hf), "model.preset": None, "tokenizer": None, "output_dir": str(out / "grpo")}),
        out / "judge_cache.sqlite")
    models = {"base": base, "sft": str(sft_hf), "grpo": str(out / "grpo" / "hf")}
    evals = eval_configs(config, models, judge_url, out)
    check_export("sft", sft_config)
    check_export("grpo", grpo_config)
    s = Stages(sft_config, base, grpo_config, evals)
    check_inputs_exist(s, out)
    return s


# The fields that name what a stage reads (not what it writes): data, benchmark rows, templates,
# tokenizers, a summarizer, the model SFT starts from.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # what data.read_rows reads as a local file
INPUT_FIELDS = ("path", "tokenizer", "template", "prompt_template", "reasoning_template", "summarize_template",
                "summarizer")


def check_inputs_exist(s: Stages, out: Path) -> None:
    """A local input that is not there fails now, naming the stage and the setting, not when its
    stage starts after the trainers' hours. The models the stages make (under `out`) are not
    there yet, and a Hub id is looked up only when it is read."""
    made = out.expanduser().resolve()

    def missing(value: str) -> bool:
        local = Path(value).expanduser()
        if "://" in value or made == local.resolve() or made in local.resolve().parents:
            return False
        # A data file by its suffix is local even as "data/x.jsonl", which could be a Hub id.
        return not local.exists() if local.suffix.lower() in DATA_SUFFIXES else is_missing_local_path(value)

    named = [("sft", s.sft), ("grpo", s.grpo), *((f"eval {Path(c.output_dir).name}", c) for c in s.evals)]
    for stage, config in named:
        for key, value in leaves(json_values(config)):
            if key.rsplit(".", 1)[-1] in INPUT_FIELDS and isinstance(value, str) and missing(value):
                raise not_found(f"{stage}: {key}", value)


def judge_advice(stage: str):
    """JudgeUnavailable that says which pipeline settings hold the judge's URL and the rest, for
    `stage` (grpo or eval)."""
    return noted(JudgeUnavailable, f"{stage}'s judge: a pipeline sets judge.base_url from its judge setting; set the "
                                   f"other judge settings in {stage}.overrides, e.g. {stage}.overrides.judge.model=NAME")


def check_judge_before_training(config: PipelineConfig, s: Stages) -> None:
    """With a real judge, and training still to do, fail now when nothing answers at the judge's
    URL, or it refuses the key or does not serve the model a stage grades with, not after the
    trainers' hours (the evaluations would only find out then): one short request per model."""
    from qed_jax.judge import Judge

    if config.judge == STANDIN or (Path(s.grpo.output_dir) / "hf" / "config.json").exists():
        return
    graders = ([] if s.grpo.reward_rule else [("grpo", s.grpo.judge)]) + [("eval", c.judge) for c in s.evals]
    asked = set()
    for stage, grader in graders:
        request = (grader.model, grader.api, grader.api_key_env, grader.temperature, grader.reasoning_effort)
        if request in asked:  # the same request to the same judge
            continue
        asked.add(request)
        judge = Judge(dataclasses.replace(grader, cache_path=None))  # writes nothing
        try:
            with judge_advice(stage):
                judge.check_reachable(serves_model=True)
        finally:
            judge.close()


def check_hub_data_before_training(s: Stages) -> None:
    """With training still to do, read the Hub datasets the later stages name (GRPO's prompts,
    the benchmarks) now: one the Hub cannot serve (offline, a misspelt id, a wrong split) fails
    before the trainers' hours, not after. `datasets` keeps what it read for the stages."""
    from qed_jax.data import read_rows

    if (Path(s.grpo.output_dir) / "hf" / "config.json").exists():
        return
    named = {(c.benchmark.path, c.benchmark.subset, c.benchmark.split): "eval benchmark.path" for c in s.evals}
    named[(s.grpo.data.path, s.grpo.data.name, s.grpo.data.split)] = "grpo data.path"
    for (path, name, split), key in sorted(named.items(), key=str):
        local = Path(path).expanduser()
        if "://" not in path and local.suffix.lower() not in DATA_SUFFIXES and not local.exists():
            read_rows(path, name, split, key)


def check_meshes_before_training(config: PipelineConfig, s: Stages) -> None:
    """A trainer's mesh that does not fit the devices here, or rows that do not split over it,
    fails now, naming the stage, not when GRPO starts after SFT's hours."""
    from qed_jax import grpo, sft

    for name, meshes, stage_config in (("sft", sft.training_mesh, s.sft), ("grpo", grpo.training_meshes, s.grpo)):
        try:
            meshes(stage_config)
        except ConfigError as e:
            raise ConfigError(f"{name} stage ({getattr(config, name).config}, with the pipeline config's "
                              f"{name}.overrides): {e}") from None


def check_run_directories(s, out: Path) -> None:
    """What the stages would refuse, refused before any stage runs (and by --print-config): an
    output_dir `out` that is another command's run; a judge template that does not fit its stage;
    a trainer or an evaluation started with another config or of problems edited since, or
    holding runs of a model that will train anew."""
    from qed_jax import grpo
    from qed_jax.evaluate import check_held_problems, check_judge_template, check_rerun

    if (out / "config.json").is_file():  # a pipeline's folder holds its stages' folders, no config.json
        raise ConfigError(f"{out} holds another command's run or a model ({out / 'config.json'}: a trainer's, an "
                          "evaluation's or a model's); the pipeline would write its stages beside it and strand it: "
                          "use another output_dir")
    check_unchanged(s.sft)
    check_unchanged(s.grpo)
    grpo.check_judge_template(s.grpo)
    for c in s.evals:
        check_rerun(c)
        check_judge_template(c)
        check_held_problems(c)  # a benchmark file edited since
    check_not_built_on_old("sft", s.sft.output_dir, "grpo", s.grpo.output_dir, before=True)
    check_evals_not_of_old(s, out)


def report_runs(s: Stages, out: Path) -> list[str]:
    """The evaluations the report covers: this config's, then the others the run directory holds
    of this config's models (a rerun with fewer eval.models, modes or benchmarks leaves them),
    as far as they drew samples."""
    from qed_jax.evaluate import SAMPLES_FILE

    runs = [c.output_dir for c in s.evals]
    ours = {Path(r).resolve() for r in runs}
    models = {Path(m).resolve() for m in (s.base, Path(s.sft.output_dir) / "hf", Path(s.grpo.output_dir) / "hf")}
    return runs + sorted(str(p.parent) for p in (out / "eval").glob(f"*/{SAMPLES_FILE}")
                         if p.parent.resolve() not in ours and recorded_model(p.parent) in models)


def recorded_model(folder: Path) -> Path | None:
    """The local model an evaluation's config.json names, resolved (None for none: an endpoint's)."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        path = json.loads((folder / "config.json").read_text())["model"]["path"]
        return Path(path).resolve() if isinstance(path, str) else None
    return None


def run(config: PipelineConfig) -> dict:
    """Run (or finish) every stage; returns the report's path, the evaluations' failed grades
    and the stand-in judge's request count (None with a real judge). Every stage's config is
    built and checked before the first stage starts."""
    from qed_jax import grpo, sft
    from qed_jax.evaluate import evaluate
    from qed_jax.report import report
    from qed_jax.rundir import run_lock
    from qed_jax.standin_judge import StandinJudge

    out = Path(config.output_dir)
    # One pipeline per output_dir: each stage locks its own folder, the base export is the pipeline's.
    # The stand-in opens its port only once the lock is held: a refused run leaves none open.
    with run_lock(out), (StandinJudge() if config.judge == STANDIN else contextlib.nullcontext()) as standin:
        judge_url = standin.url if config.judge == STANDIN else config.judge
        s = stages(config, judge_url)
        sft_config, base, grpo_config, evals = s.sft, s.base, s.grpo, s.evals
        check_run_directories(s, out)
        check_judge_before_training(config, s)
        check_hub_data_before_training(s)
        check_meshes_before_training(config, s)
        progress = Progress(stages=5)

        progress.begin("base", f"the model SFT starts from: {sft_config.model.describe()}")
        progress.done(f"{'exported to' if export_base(sft_config, Path(base)) else 'using'} {base}")
        if train_stage(progress, "sft", sft.train, sft_config, partial(sft.summary, digits=4)):
            check_not_built_on_old("sft", sft_config.output_dir, "grpo", grpo_config.output_dir, before=False)
        train_stage(progress, "grpo", grpo.train, grpo_config, partial(grpo.summary, best=False))

        progress.begin("eval", f"{len(evals)} evaluations; judge: " + (
            f"the offline stand-in at {judge_url} (NOT a real judge: full marks for any proof after </think>)"
            if config.judge == STANDIN else judge_url))
        failed = 0
        for n, c in enumerate(evals, 1):
            with judge_advice("eval"):
                counts = evaluate(c)
            failed += counts["failed"]
            did = (f"generated {counts['generated']} of {counts['total']} samples, wrote {counts['graded']} grades "
                   f"({counts['failed']} failed)" if counts["generated"] or counts["graded"] or counts["failed"]
                   else f"already complete ({counts['total']} samples graded)")
            progress.line(f"{n}/{len(evals)} {Path(c.output_dir).name}: {did}")
        progress.done(f"{len(evals)} evaluations in {out / 'eval'}")

        runs = report_runs(s, out)
        progress.begin("report", f"{len(runs)} runs")
        _, folder, plots = report(runs, output=str(out))
        progress.done(f"wrote {folder / 'report.md'}, report.json, " + ", ".join(p.name for p in plots))
    return {"report": folder / "report.md", "failed": failed,
            "standin_requests": standin.requests if config.judge == STANDIN else None}
