"""Benchmark evaluation: sample k completions per problem from a checkpoint or an OpenAI-compatible
endpoint (single-shot), or solve each problem in reasoning-cache turns on a checkpoint (mode rc),
grade proofs with the judge and final answers with math-verify (the judge only where math-verify
cannot decide), and append every sample and every grade to `samples.jsonl` as it completes, so
that a rerun in the same output_dir does only what is left.

samples.jsonl holds three kinds of records, keyed by (problem_id, sample):
  {"type": "sample", ...}: the completion, its token count, finish reason, whether it was truncated
    (nothing to grade: no </think> where the judge requires one, or nothing after it),
    the seed and row it was drawn with (sample_seed(seed, k), the problem's place in the benchmark; an
    endpoint's request carried request_seed(seed, row)), and in mode rc each turn's reasoning,
    answer and summary texts with their token counts;
  {"type": "grade", ...}: score 0-7 (null when grading failed), reason, decided_by (judge; judge_cache:
    the judge's grade of the same prompt, from judge.cache_path; math_verify; truncated), judge reply;
  {"type": "turn_grade", "turn": t, ...}: the same for turn t's answer (mode rc, rc.grade_turns).
A failed grade is retried by the next run; the last grade record of a sample (or turn) counts.

In mode rc a sample's completion is its last turn's text (the answer is what follows its last
</think>; no fallback to earlier turns), and its completion_tokens are the policy's tokens summed
over all turns (the summarizer's are recorded per turn, apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from qed_jax.config import (WHOLE, ConfigError, check_dtype, check_local_output_dir, check_sampling, check_url,
                            dump_json, expand_paths, get_dotted, hashed_seed, is_missing_local_path, is_prompt_template,
                            is_rc_template, json_values, load_template, not_found, read_json_object, recorded_path,
                            require_at_least_one, require_range, run_moved, same_as_recorded, write_text_atomic)
from qed_jax.errors import JudgeUnavailable, first_line, json_error, noted, os_error_line, quoted, renamed
from qed_jax.judge import (MAX_SCORE, BadReply, Grade, GradeItem, Judge, JudgeConfig, answer_text, async_client,
                           chat_choice, check_answer_format, check_template_fields, is_empty, load_judge_template,
                           reason_counts, rejection_note, render_marking_scheme, reply_text, text_to_grade)
from qed_jax.rundir import record_working_dir, recorded_working_dir, refuse_a_pipelines_folder, run_lock
from qed_jax.tokenizer import THINK_END

log = logging.getLogger(__name__)

KINDS = ("proof", "answer")
# Our names for the fields a benchmark row provides → the row's own column names.
DEFAULT_FIELDS = {"id": "problem_id", "problem": "problem", "solution": "solution",
                  "guidelines": "grading_guidelines", "answer": "answer"}
SAMPLES_FILE = "samples.jsonl"
PROBLEMS_FILE = "problems.json"  # the benchmark's problem ids, in order: what a whole sample index covers
# More samples than one run draws and grades (each a completion of up to sampling.max_new_tokens
# tokens, a line of samples.jsonl and a judge request): a typo in samples, refused before anything
# is listed or drawn.
MAX_SAMPLES_PER_RUN = 1_000_000


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    name: str = "benchmark"
    kind: str = "proof"  # proof: graded by the judge | answer: final answer in \boxed{}
    path: str = "configs/data/imo_proofbench_sample.jsonl"  # .jsonl / .parquet file or hub dataset
    subset: str | None = None  # hub dataset config name
    split: str = "train"
    fields: dict[str, str] | None = None  # our name → column; missing names take DEFAULT_FIELDS
    # Where the reported split (e.g. Basic / Advanced) comes from: a column, and ordered
    # {label: regex}; a row takes the first label whose regex its column's text matches.
    group_field: str | None = None
    groups: dict[str, str] | None = dataclasses.field(default=None, metadata=WHOLE)  # an override replaces it
    limit: int | None = None  # the first N problems only (smoke runs)
    prompt_template: str | None = None  # default: proof_generation or answer_generation

    def __post_init__(self):
        if not self.name.strip():  # the report, and a pipeline's run folders, go by it
            raise ConfigError(f"benchmark.name is blank ({self.name!r}); name the benchmark, or leave it out for its "
                              "default")
        if self.kind not in KINDS:
            raise ConfigError(f"benchmark.kind must be one of {KINDS}, got {self.kind!r}")
        unknown = sorted(set(self.fields or {}) - set(DEFAULT_FIELDS))
        if unknown:
            raise ConfigError(f"benchmark.fields: unknown name {unknown[0]!r}; "
                              f"valid names: {', '.join(DEFAULT_FIELDS)}")
        if (self.group_field is None) != (self.groups is None):
            raise ConfigError("benchmark.group_field and benchmark.groups go together: set both or neither")
        if self.groups == {}:  # every problem would be in the group "other"
            raise ConfigError("benchmark.groups is empty: give at least one label: regex, or set "
                              "benchmark.group_field and benchmark.groups to null")
        require_at_least_one(self, ("limit",), "benchmark.")
        for label, pattern in (self.groups or {}).items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"benchmark.groups.{label}: invalid regex {pattern!r} ({e})") from None

    @property
    def field_map(self) -> dict[str, str]:
        return {**DEFAULT_FIELDS, **(self.fields or {})}


ONE_MODEL = ("model: set exactly one of model.path (a local checkpoint) and model.base_url (an OpenAI-compatible "
             "endpoint, with model.name)")


@dataclasses.dataclass(frozen=True)
class EvalModelConfig:
    """The model under test: a local checkpoint (path) or a served model (base_url + name)."""

    path: str | None = None  # Hugging Face folder, Hub id or qed-jax checkpoint
    tokenizer: str | None = None  # default: path
    dtype: str | None = None  # parameter dtype; default: the checkpoint's
    # Rows the local sampler decodes at once: set directly, or derived from a KV-cache budget
    # per device (GiB); with neither, a whole batch (batch_size) decodes at once.
    max_concurrent: int | None = None
    kv_cache_gib: float | None = None
    base_url: str | None = None  # an OpenAI-compatible endpoint, e.g. http://localhost:8001/v1
    name: str | None = None  # the served model's name
    api_key_env: str = "MODEL_API_KEY"  # environment variable holding the endpoint's key
    concurrency: int = 32  # requests in flight at the endpoint
    timeout_s: float = 3600.0  # per attempt at a request; with its ENDPOINT_RETRIES retries, (1 + those) x this

    def __post_init__(self):
        check_url(self.base_url, "model.base_url")
        if self.path is not None and not self.path.strip():  # else read as none: an endpoint at no URL
            raise ConfigError(f"model.path is empty ({self.path!r}); name a checkpoint, or set model.base_url (with "
                              "model.name) instead")
        if self.name is not None and not self.name.strip():  # a served model of no name
            raise ConfigError(f"model.name is blank ({self.name!r}); name the served model, or leave model.name out")
        if self.path is not None and self.base_url is not None:
            raise ConfigError(ONE_MODEL)
        if self.base_url is not None and not self.name:
            raise ConfigError("model.base_url is set but model.name is not: name the served model")
        require_at_least_one(self, ("concurrency", "max_concurrent"), "model.")
        require_range(self.kv_cache_gib, "model.kv_cache_gib", 0, low_open=True)
        require_range(self.timeout_s, "model.timeout_s", 0, low_open=True)
        check_dtype(self.dtype, "model.dtype")


@dataclasses.dataclass(frozen=True)
class EvalSamplingConfig:
    max_new_tokens: int = 49152
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        check_sampling(self, "sampling.")


@dataclasses.dataclass(frozen=True)
class EvalRCConfig:
    """Mode rc: the reasoning cache on the local model, as the recipe evaluates it: `turns` turns,
    a summary after every turn but the last, the no-summary marker in the first turn's prompt, and
    the final answer from the last turn only. Both roles sample with the `sampling` section (the
    recipe: temperature 0.8). The turn prompt's PROBLEM section holds the benchmark's prompt (its
    instruction, e.g. the proof instruction, and the problem), so the recipe's instruction applies."""

    turns: int = 3
    reasoning_tokens: int | None = None  # H_R, each turn's budget; default: sampling.max_new_tokens
    summary_tokens: int = 2048  # S: a summary is cut to this many tokens
    summarizer_tokens: int | None = None  # H_S, the summarizer's budget; default: summary_tokens
    no_summary: str | None = "None: this is the first attempt."  # null: an empty first summary
    reasoning_template: str = "rc_reasoning"  # a file in configs/prompts/ (without .txt) or a path
    summarize_template: str = "rc_summarize"
    problem_tokens: int | None = None  # P, the prompt buffer; default: each call's longest prompt's bucket
    # Rows per compiled call, the last one padded. Default: a call per sample index in a round,
    # whose row counts vary (each new count compiles the loop and allocates its caches once).
    batch_size: int | None = None
    summarizer: str | None = None  # a separate frozen summarizer (same vocabulary); default: the model
    summarizer_thinking: bool = False  # with summarizer: it thinks, its summary follows its </think>
    grade_turns: bool = False  # grade each earlier turn's answer too (the report's score per turn)

    def __post_init__(self):
        require_at_least_one(self, ("turns", "summary_tokens", "reasoning_tokens", "summarizer_tokens",
                                    "problem_tokens", "batch_size"), "rc.")
        if self.summarizer_thinking and not self.summarizer:  # "" is none too, as `if rc.summarizer` reads it
            raise ConfigError("rc.summarizer_thinking is for a separate summarizer: set rc.summarizer too")


MODES = ("single", "rc")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    benchmark: BenchmarkConfig = BenchmarkConfig()
    model: EvalModelConfig = EvalModelConfig()
    sampling: EvalSamplingConfig = EvalSamplingConfig()
    judge: JudgeConfig = JudgeConfig()
    mode: str = "single"  # single: one completion per sample | rc: reasoning-cache turns (local model)
    rc: EvalRCConfig = EvalRCConfig()
    samples: int = 3  # k samples per problem: the report's avg@k
    seed: int = 0  # sample k of problem p (its place in the benchmark) draws with sample_seed(seed, k) as row p
    batch_size: int = 64  # samples generated (then graded) per round; what a kill can lose
    output_dir: str = "runs/eval"

    def __post_init__(self):
        check_local_output_dir(self.output_dir)
        if (self.model.path is None) == (self.model.base_url is None):
            raise ConfigError(ONE_MODEL)
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "rc" and (given := next((f.name for f in dataclasses.fields(EvalRCConfig)
                                                  if getattr(self.rc, f.name) != f.default), None)):
            raise ConfigError(f"rc.{given} is for mode rc (the reasoning cache), and mode is {self.mode}: set mode=rc "
                              f"or drop rc.{given}")
        if self.mode == "rc" and self.model.base_url is not None:
            raise ConfigError("mode rc runs the reasoning cache on a local model: set model.path (a checkpoint "
                              "or Hugging Face folder) instead of model.base_url, or run mode single")
        sized = [key for key in ("max_concurrent", "kv_cache_gib") if getattr(self.model, key) is not None]
        if self.mode == "rc" and sized:
            raise ConfigError(f"mode rc decodes rc.batch_size rows per compiled call; model.{sized[0]} sizes the "
                              "single-shot sampler's waves: set rc.batch_size instead")
        require_at_least_one(self, ("samples", "batch_size"))
        require_range(self.samples, "samples", 1, MAX_SAMPLES_PER_RUN)  # a typo; with the problems, checked again


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    solution: str | None
    guidelines: Any
    answer: str | None
    group: str | None


@dataclasses.dataclass
class Sample:
    text: str
    completion_tokens: int
    finish_reason: str
    turns: list[dict] | None = None  # mode rc: each turn's texts and token counts (rc_turn_record)


# --------------------------------------------------------------------------------------------
# Rows → problems → prompts


def usable_id(value) -> bool:
    """Whether a row's problem id can key its samples: non-empty text or a finite number (a float
    id keys as written, e.g. "3.0": a Parquet column of integer ids with nulls reads as floats)."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def problems_from_rows(rows: list[tuple[str, Any]], config: BenchmarkConfig,
                       new_run: bool = True) -> list[Problem]:
    """Problems in row order, from (where, row) pairs as `data.read_rows` gives them; a row
    without the problem text (or, for answer benchmarks, the answer) is an error that names the
    row and the column. A problem's id defaults to its row's index (0 for the first row), null
    too. A group_field that no row has is an error for a `new_run`, a warning for one that goes on (its
    samples were drawn under it, and benchmark.group_field is part of what the run is). A proof
    benchmark whose solution or guidelines column no row has is warned of, as are rows that lack a
    column (id, solution, guidelines) the others have; a blank or empty solution or guidelines is
    none (`given`)."""
    from qed_jax.data import BadRow

    if not rows:
        raise ConfigError(f"{config.path}: no problems to evaluate (it holds no rows)")
    fields = config.field_map
    problems, seen = [], {}  # seen: id -> (its row, whether the id is the row index)
    for n, (line, row) in enumerate(rows):
        where = f"{config.path}: {line}"
        if isinstance(row, BadRow):
            raise ConfigError(f"{where}: {row.reason}")
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is not a JSON object of named columns: {json.dumps(row)[:60]}")
        text = row.get(fields["problem"])
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"{where}: column {fields['problem']!r} (the problem) must be text, got "
                              f"{type(text).__name__}; map another with benchmark.fields.problem=COLUMN")
        if not text or not text.strip():
            raise ConfigError(f"{where}: column {fields['problem']!r} (the problem) is missing or empty; "
                              "map it with benchmark.fields.problem=COLUMN")
        answer = solution = None  # an answer benchmark grades against the answer, a proof one the solution
        if config.kind == "answer":
            answer = row.get(fields["answer"])
            if answer is None or not str(answer).strip():
                raise ConfigError(f"{where}: column {fields['answer']!r} (the reference answer) is missing or empty; "
                                  "map it with benchmark.fields.answer=COLUMN")
            answer = answer_text(answer, f"{where}: column {fields['answer']!r} (the reference answer)")
        else:
            solution = given(row, fields["solution"])
            if solution is not None and not isinstance(solution, str):
                raise ConfigError(f"{where}: column {fields['solution']!r} (the reference solution) must be text, "
                                  f"got {type(solution).__name__}; map another with benchmark.fields.solution=COLUMN")
        guidelines = given(row, fields["guidelines"])
        try:
            render_marking_scheme(guidelines)
        except ValueError as e:
            raise ConfigError(f"{where}: column {fields['guidelines']!r} (the grading guidelines): {e}") from None
        given_id = row.get(fields["id"])
        defaulted = given_id is None  # null: as if missing
        if not defaulted and not usable_id(given_id):
            raise ConfigError(f"{where}: column {fields['id']!r} (the problem's id) must be a non-empty text or a "
                              f"number, got {json.dumps(given_id, default=str)[:60]}; ids key the samples")
        pid = str(n if defaulted else given_id)
        if pid in seen:
            first, first_defaulted = seen[pid]
            if defaulted or first_defaulted:
                raise ConfigError(f"{where}: problem id {pid!r} is also {first}'s: {line if defaulted else first} has "
                                  f"no column {fields['id']!r}, so its id is its row index; give every row an id (ids "
                                  "key the samples, so they must be unique)")
            raise ConfigError(f"{where}: problem id {pid!r} is also {first}'s; ids key the samples, so they must be "
                              "unique")
        seen[pid] = (line, defaulted)
        problems.append(Problem(id=pid, problem=text, solution=solution, guidelines=guidelines, answer=answer,
                                group=group_of(row, config)))
    if config.group_field is not None and not any(isinstance(r, dict) and config.group_field in r for _, r in rows):
        missing = (f"{config.path}: no row has the column {config.group_field!r} (benchmark.group_field) that sorts "
                   "problems into benchmark.groups")
        if new_run:
            raise ConfigError(f"{missing}; set it to a column the rows have, or to null")
        log.warning("%s, so every problem is in the group of an empty text", missing)
    if not any(isinstance(r, dict) and r.get(fields["id"]) is not None for _, r in rows):
        log.warning("%s: no row has the column %r (benchmark.fields.id), so each problem's id is its row index, and "
                    "a run's samples stay with their problems only while the file keeps its rows in order; map it "
                    "with benchmark.fields.id=COLUMN", config.path, fields["id"])
    if config.kind == "proof":  # a column no row has is most likely mapped to the wrong name
        for name, what in (("solution", "a reference solution"), ("guidelines", "grading guidelines")):
            if not any(isinstance(r, dict) and given(r, fields[name]) is not None for _, r in rows):
                log.warning("%s: no row has the column %r (benchmark.fields.%s), so the judge grades every proof "
                            "without %s; map it with benchmark.fields.%s=COLUMN", config.path, fields[name], name,
                            what, name)
    # A column some rows lack (a row edited by hand, a misspelt key): those rows alone, said so.
    for name, what in (("id", "so their ids are their row indexes"),
                       *((("solution", "so their proofs are graded without a reference solution"),
                          ("guidelines", "so their proofs are graded without grading guidelines"))
                         if config.kind == "proof" else ())):
        lacking = [line for line, r in rows if given(r, fields[name]) is None]
        if 0 < len(lacking) < len(rows):
            log.warning("%s: %d of %d rows have no column %r (benchmark.fields.%s), %s: %s", config.path,
                        len(lacking), len(rows), fields[name], name, what,
                        ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""))
    if config.limit is not None:
        problems = problems[: config.limit]
    if not problems:
        raise ConfigError(f"{config.path}: no problems")
    return problems


def given(row: dict, column: str) -> Any:
    """A row's value in `column`; None where it gives none (`judge.is_empty`: absent, null, empty or
    blank), which the judge is told is not given."""
    value = row.get(column)
    return None if is_empty(value) else value


def group_of(row: dict, config: BenchmarkConfig) -> str | None:
    if config.group_field is None:
        return None
    value = row.get(config.group_field)
    text = "" if value is None else str(value)  # a row without it (or null) goes where "" does
    return next((label for label, pattern in config.groups.items() if re.search(pattern, text)), "other")


def load_prompt_template(config: BenchmarkConfig) -> str:
    name = config.prompt_template or f"{config.kind}_generation"
    template = load_template(name, "benchmark.prompt_template", fits=is_prompt_template)
    if "{{problem}}" not in template:
        raise ConfigError(f"{name}: the prompt template has no {{{{problem}}}} placeholder")
    return template


def render_prompt(template: str, problem: str) -> str:
    return template.replace("{{problem}}", problem.strip()).strip()


# --------------------------------------------------------------------------------------------
# Final answers: math-verify first, the judge only for what it cannot decide


def boxed_answer(text: str) -> str | None:
    """The contents of the \\boxed{...} (or \\fbox{...}) boxes whose braces close, when they all
    hold the same answer; None when there is none, or when they differ ("either \\boxed{3} or
    \\boxed{4}": the judge decides, as its template asks, rather than the last box). A box holding
    boxes counts as those. One pass that pairs every brace, so a text of many unclosed boxes stays
    linear."""
    box_braces = {m.end() - 1 for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)}
    open_braces, boxes = [], []  # boxes: (start, end) in the order they close, inner ones first
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            open_braces.append(m.start())
        elif open_braces:
            start = open_braces.pop()
            holds_a_box = boxes and boxes[-1][0] > start  # the last box closed began inside this one
            if start in box_braces and not holds_a_box:
                boxes.append((start, m.start()))
    answers = {text[start + 1:end].strip() for start, end in boxes}
    return answers.pop() if len(answers) == 1 else None


# A thin, medium or thick space (or a backslash-space) between groups of digits: 1\,000 is 1000
# (math-verify reads it as 1 times 000).
DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)(?:\\[,:;!]|\\ )(?=\d{3}(?!\d))")
# A box that holds a number and nothing else: digits, arithmetic, fractions and roots. Anything
# more (a congruence and its modulus, words, an equation, a list, a unit) leaves "unequal" to
# the judge: math-verify may have picked the wrong number out of it.
PLAIN_NUMBER = re.compile(r"(?:[0-9.+\-\u2212*/^(){}\[\]\s]"
                          r"|\\(?:[dt]?frac|sqrt|pi|cdot|times|div|left|right)(?![a-zA-Z]))*")


def plain_number(text: str) -> bool:
    return PLAIN_NUMBER.fullmatch(text) is not None


# What math-verify reads whole: numbers, variables, arithmetic, fractions, roots, powers, the usual
# functions and constants, sets, tuples and intervals, and one equation that names a variable.
# Anything else may be read as one number picked out of more, so that neither its "equal" nor its
# "not equal" is trusted: a congruence (n \equiv 1 \pmod 4 is read as the modulus, 4), a remark
# in words (4 \text{ (attained at } x=2) is read as 2), words themselves ("5 for n = 3"), two
# answers joined by a connective (x = 3 \lor x = 4 is read as 4), a relation (1 = 2 as 2).
ONE_VALUE_COMMANDS = frozenset(
    "frac dfrac tfrac sqrt cdot times div left right pi infty circ exp ln log sin cos tan cot sec csc arcsin "
    "arccos arctan binom lfloor rfloor lceil rceil { } , : ; ! ~".split() + [" "]
    + "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma tau "
      "upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega".split())
LATEX_COMMAND = re.compile(r"\\([a-zA-Z]+|.)")
ONE_VALUE_CHARACTERS = re.compile(r"[0-9a-zA-Z\s+\-\u2212*/^_(){}\[\].,=!'~]*")
WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")
# The left side of an answer's equation: a variable (x, a_n, \alpha), whose value the right side is.
VARIABLE = re.compile(r"\s*(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*")
# A number then a bracketed number (2(3), {2}(3), 2\,(3), (4)(3), 2\left(\frac12\right), x+2(3)):
# latex2sympy reads a mixed number, 2(3) as 5, not the product 6. A bracket holding more than a
# number (2(n+1), 2(\sqrt2+1), 3(2^{10}+1)) is read as a product.
MIXED_NUMBER = re.compile(r"[\d)\]}]\s*(?:(?:\\[,:;! ]|~)\s*)*(?:\\left\s*)?[(\[]"  # a number, a space, a bracket
                          r"\s*-?(?:[\d.,\s{}]|\\[dt]?frac(?![a-zA-Z]))*(?:\\right\s*)?[)\]]"  # a number, closed
                          r"|[)\]]\s*\d")
# Two numbers side by side with only space between (2 3, 2\,3, {2} 3, \frac{1}{2} 3, 1 000):
# math-verify reads a sum (2 3 as 5), a product or 1 000 as 0, never the list or the digit groups
# they may mean.
JUXTAPOSED_NUMBERS = re.compile(r"[\d}](?:\s|\\[,:;! ]|~)+\d")


def one_value(text: str) -> bool:
    """Whether math-verify's reading of `text` is its whole value (see ONE_VALUE_COMMANDS,
    MIXED_NUMBER and JUXTAPOSED_NUMBERS): only commands and characters it reads whole, no word,
    and at most one `=`, after a variable."""
    if any(command not in ONE_VALUE_COMMANDS for command in LATEX_COMMAND.findall(text)):
        return False
    if not ONE_VALUE_CHARACTERS.fullmatch(LATEX_COMMAND.sub(" ", text)) or WORD.search(text):
        return False
    sides = text.split("=")
    if len(sides) > 2 or (len(sides) == 2 and not VARIABLE.fullmatch(sides[0])):
        return False
    return not (MIXED_NUMBER.search(text) or JUXTAPOSED_NUMBERS.search(text))


# Commas between groups of three digits (1,000 or 12,345,678), which math-verify reads as one number.
DIGIT_GROUP_COMMA = re.compile(r"(?<![\d.])(?<!\d,)\d{1,3}(?:,\d{3})+(?![\d.]|,\d)")


def listed_items(text: str) -> list[str] | None:
    """The items `text` lists: its parts between commas outside any bracket; None when its
    brackets do not pair up."""
    depth, items = 0, [""]
    for character in text:
        depth += (character in "([{") - (character in ")]}")
        if depth < 0:
            return None
        if character == "," and depth == 0:
            items.append("")
        else:
            items[-1] += character
    return [item.strip() for item in items] if depth == 0 else None


BRACED_SET = re.compile(r"\s*\\\{(.*)\\\}\s*", re.S)


def set_items(text: str) -> list[str] | None:
    """The items of `text` when it is a bare list (`2, 3`) or one set (`\\{2, 3\\}`); else None."""
    items = listed_items(text)
    if items is not None and len(items) > 1:
        return items
    braced = BRACED_SET.fullmatch(text)
    return listed_items(braced[1]) if braced else None


def check_answer(predicted: str | None, reference: str) -> bool | None:
    """True when math-verify shows that `predicted` equals `reference`; False only when both are
    plain numbers (`PLAIN_NUMBER`) whose values differ; else None, for the judge to decide. Both
    must be answers math-verify reads whole (`one_value`: no words, no congruence, no 2(3)).
    math-verify's "not equal" also covers what it could not prove (a trigonometric identity), a
    timeout, text answers ("all odd n" parses into a product of letters) and numbers it picked
    out of more (60 degrees read as 60), so it decides nothing by itself."""
    if not predicted:
        return None
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    def ungrouped(text: str) -> str:  # 1\,000 and 1,000 as 1000
        return DIGIT_GROUP_COMMA.sub(lambda number: number[0].replace(",", ""), DIGIT_GROUP_SPACE.sub("", text))

    predicted, reference = ungrouped(predicted), ungrouped(reference)
    if not (one_value(predicted) and one_value(reference)):
        return None
    # math-verify reads a bare list (2, 3) as a set: it decides against a set or list of as many
    # items, none repeated, in any order; against anything else ((3, 2), 2, or 2, 2, 3) or with an
    # item repeated (3, 3, 4 against 3, 4, 4) the judge decides.
    if max(len(listed_items(predicted) or ()), len(listed_items(reference) or ())) > 1:
        items = [set_items(predicted), set_items(reference)]
        if None in items or len(items[0]) != len(items[1]) or any(len(set(i)) < len(i) for i in items):
            return None
    # math-verify bounds its time with SIGALRM, which only the main thread may set.
    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=seconds)
    pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=seconds)
    if not gold or not pred:
        return None
    try:
        # Rounded to 12 digits, not math-verify's 6: 1.414214 is not the exact answer \sqrt{2}. Its "equal"
        # also chops a difference below 1e-15 (2^{-100} equals 2^{-99}): values that differ are not trusted.
        if verify(gold, pred, float_rounding=12, timeout_seconds=seconds, raise_on_error=True) and not \
                numerically_different(*(getattr(x, "rhs", x) for x in (gold[0], pred[0])), floor=0):
            return True
    except (Exception, TimeoutException):  # sympy failed on an expression, or ran out of time
        return None
    if not (plain_number(predicted) and plain_number(reference)):
        return None
    return False if numerically_different(gold[0], pred[0]) else None


def numerically_different(a: Any, b: Any, floor: int = 1) -> bool:
    """Whether two parsed answers are real numbers (no symbols, sets or tuples) whose values, each
    evaluated to 30 digits (an evaluation that loses them all decides nothing), differ by more
    than 1e-9 of the larger (or by 1e-9 of `floor`, below it). Not real: sympy's cube root of -27
    is the complex principal root, where the answer means -3."""
    import sympy

    if not all(isinstance(x, sympy.Expr) and x.is_number for x in (a, b)):
        return False
    try:  # in sympy's numbers, not floats: 2^2025 against 2^2024 is past any float's range
        x, y = a.evalf(30, strict=True), b.evalf(30, strict=True)
        if not (x.is_real and y.is_real):
            return False
        return bool(abs(x - y) > sympy.Float("1e-9") * max(sympy.Integer(floor), abs(x), abs(y)))
    except (TypeError, ValueError, OverflowError, ArithmeticError):  # TypeError: a comparison with nan
        return False


# --------------------------------------------------------------------------------------------
# samples.jsonl: what is done


RECORD_KEYS = ("type", "problem_id", "sample")  # what every record of a run log has


DAMAGED_LOG = "the run log is damaged: mend that line, or move the run folder aside and run again"


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """The records of a run log. A last line cut short by a kill is left out, and with `repair`
    also cut from the file, so that appending starts on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            log.warning("%s: dropping a last record cut short (%d bytes)", path, len(data) - cut)
            with open(path, "r+b") as f:
                f.truncate(cut)
        data = data[:cut]
    records = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            record = json.loads(raw.decode())
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                              f"{DAMAGED_LOG}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({json_error(e)}); {DAMAGED_LOG}") from None
        if not isinstance(record, dict) or not all(k in record for k in RECORD_KEYS):
            raise ConfigError(f"{path}:{n}: not a record (each has {', '.join(RECORD_KEYS)}); {DAMAGED_LOG}")
        if (wrong := misread_value(record)) is not None:
            raise ConfigError(f"{path}:{n}: {wrong}; {DAMAGED_LOG}")
        records.append(record)
    return records


def misread_value(record: dict) -> str | None:
    """What is wrong with a record's counts or score (a hand edit, another program's log), or
    None: the report does arithmetic on them."""
    def is_count(value) -> bool:
        return type(value) is int and value >= 0

    checks = [("sample", record["sample"], is_count(record["sample"]), "a sample index")]
    if record["type"] == "sample":
        checks.append(("completion_tokens", record.get("completion_tokens"), is_count(record.get("completion_tokens")),
                       "a token count"))
        checks.append(("truncated", record.get("truncated"), type(record.get("truncated")) is bool, "true or false"))
        if "turns" in record:  # mode rc
            turns = record["turns"]
            checks.append(("turns", turns, isinstance(turns, list) and all(isinstance(t, dict) for t in turns),
                           "a list of turns"))
    elif record["type"] in ("grade", "turn_grade"):
        score = record.get("score")
        checks.append(("score", score, score is None or (is_count(score) and score <= MAX_SCORE),
                       f"a score from 0 to {MAX_SCORE} or null"))
        if record["type"] == "turn_grade":
            checks.append(("turn", record.get("turn"), is_count(record.get("turn")), "a turn index"))
    return next((f"{key} is {value!r}, not {expected}" for key, value, ok, expected in checks if not ok), None)


class RunLog:
    """What is done, by (problem_id, sample): the sample records, each sample's last grade and,
    by (problem_id, sample, turn), each turn's last grade."""

    def __init__(self, path: Path, records: list[dict] = ()):
        self.samples: dict[tuple[str, int], dict] = {}
        self.grades: dict[tuple[str, int], dict] = {}
        self.turn_grades: dict[tuple[str, int, int], dict] = {}
        for record in records:
            self._index(record)
        self.path, self.file = path, None

    @classmethod
    def read(cls, path: Path, repair: bool = True) -> "RunLog":
        """What the run log at `path` holds (nothing if it does not exist); see start_appending
        (and read_records for `repair`)."""
        return cls(path, read_records(path, repair=repair) if path.exists() else [])

    @classmethod
    def open(cls, path: Path) -> "RunLog":
        return cls.read(path).start_appending()

    def start_appending(self) -> "RunLog":
        """Open the log for `append`, creating it (its folder must exist)."""
        self.file = open(self.path, "a")
        return self

    def _index(self, record: dict) -> None:
        key = (record["problem_id"], record["sample"])
        if record["type"] == "turn_grade":
            self.turn_grades[(*key, record["turn"])] = record
        else:
            (self.samples if record["type"] == "sample" else self.grades)[key] = record

    def append(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: the record is not kept, and what came before it is whole
            with contextlib.suppress(OSError):  # the unwritten rest fails again; `close` would raise that instead
                self.file.close()
            self.file = None
            e.filename = e.filename or str(self.path)
            raise ConfigError(f"{os_error_line(e)}; the samples and grades written before it are kept: rerun the "
                              "same command to continue") from e
        self._index(record)

    def empty(self) -> bool:
        return not (self.samples or self.grades or self.turn_grades)

    def graded(self, key, turn: int | None = None) -> bool:
        """Whether the sample `key` (or its turn `turn`) has a grade that did not fail."""
        grade = self.grades.get(key) if turn is None else self.turn_grades.get((*key, turn))
        return grade is not None and grade["score"] is not None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_problem_ids(run_dir: str | Path) -> list[str] | None:
    """The ids of the problems a run evaluates (PROBLEMS_FILE), or None for a run from before
    the file was written."""
    path = Path(run_dir) / PROBLEMS_FILE
    if not path.is_file():
        return None
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        ids = None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConfigError(f"{path}: not a JSON list of problem ids; rerun the evaluation to write it again")
    return ids


def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """A run's config and one merged record per sample: the sample plus its last grade (if any)
    and, in mode rc, `turn_scores`: each turn's score (None where not graded, or failed), the
    last turn's being the sample's own, and `turn_grading`: for each earlier turn, whether its
    answer is "graded", its grade "failed", or it is "not graded"."""
    run_dir = Path(run_dir)
    config_path, samples_path = run_dir / "config.json", run_dir / SAMPLES_FILE
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: {'not a directory' if run_dir.exists() else 'no such directory'}")
    if not config_path.is_file() or not samples_path.is_file():
        raise ConfigError(f"{run_dir}: not an eval run directory (needs config.json and {SAMPLES_FILE}), "
                          "nor a folder of them")
    run = RunLog(samples_path, read_records(samples_path))
    config = read_json_object(config_path, "the run's config is damaged")
    missing = [key for key in ("samples", "benchmark", "model") if key not in config]
    if missing:
        raise ConfigError(f"{config_path}: no {', '.join(missing)}: not an eval run's config, or a damaged one")
    merged = []
    for key, sample in run.samples.items():
        grade = run.grades.get(key, {})
        record = {**sample, "graded": bool(grade), "score": grade.get("score"),
                  "reason": grade.get("reason"), "decided_by": grade.get("decided_by")}
        if "turns" in sample:
            earlier = [run.turn_grades.get((*key, t)) for t in range(len(sample["turns"]) - 1)]
            record["turn_scores"] = [None if g is None else g["score"] for g in earlier] + [record["score"]]
            record["turn_grading"] = ["not graded" if g is None else "failed" if g["score"] is None else "graded"
                                      for g in earlier]
        merged.append(record)
    return config, merged


# --------------------------------------------------------------------------------------------
# Generators: the local sampler, or an OpenAI-compatible endpoint


class LocalGenerator:
    def __init__(self, config: EvalModelConfig):
        from qed_jax.pretrained import from_pretrained, resolve
        from qed_jax.sampling import Sampler
        from qed_jax.tokenizer import check_vocab, load_tokenizer

        self.model = from_pretrained(config.path, dtype=config.dtype)
        self.tokenizer = load_tokenizer(resolve(config.tokenizer or config.path), "model.tokenizer")
        check_vocab(self.tokenizer, self.model.config.vocab_size, config.path)
        self.sampler = Sampler(self.model, max_concurrent=config.max_concurrent, kv_cache_gib=config.kv_cache_gib,
                               progress=False)

    def generate(self, prompts: list[str], seed: int, rows: list[int], sampling: EvalSamplingConfig,
                 on_sample) -> None:
        """Calls on_sample(i, Sample) for each prompt, prompt i drawn with `seed` as row `rows[i]`."""
        import jax

        from qed_jax.sampling import SamplingParams
        from qed_jax.tokenizer import chat_prompt, stop_ids

        ids = [chat_prompt(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        params = SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                top_k=sampling.top_k, top_p=sampling.top_p)
        completions = self.sampler.generate_ids(ids, params, jax.random.key(seed), stop_ids(self.tokenizer),
                                                row_ids=rows)
        for i, c in enumerate(completions):
            text = self.tokenizer.decode(c.text_tokens, skip_special_tokens=False)
            on_sample(i, Sample(text=text, completion_tokens=len(c.tokens), finish_reason=c.finish_reason))


def sample_seed(seed: int, k: int) -> int:
    """The seed sample k of every problem is drawn with in a run seeded `seed`. Hashed, not
    seed + k: runs with nearby seeds then share no samples (with seed + k, sample 1 of seed 0
    would be sample 0 of seed 1)."""
    return hashed_seed("sample", seed, k)


def request_seed(seed: int, row: int) -> int:
    """The seed of an endpoint request for row `row` drawn with `seed`: a server seeds each
    request's sampler with it, so requests with one seed would share one random stream."""
    return hashed_seed(seed, row)


ENDPOINT_RETRIES = 3  # a model endpoint's request is tried again on timeouts, 429 and 5xx


class EndpointGenerator:
    """Chat completions from a served model. A server that splits the reasoning off (vLLM's
    reasoning parser: `reasoning_content`) gets it joined back as reasoning + </think> + answer,
    so both kinds of server are graded alike."""

    def __init__(self, config: EvalModelConfig):
        self.config = config

    def generate(self, prompts: list[str], seed: int, rows: list[int], sampling: EvalSamplingConfig,
                 on_sample) -> None:
        """Calls on_sample(i, Sample) for each prompt; prompt i's request carries request_seed(seed, rows[i])."""
        asyncio.run(self._generate(prompts, seed, rows, sampling, on_sample))

    async def _generate(self, prompts, seed, rows, sampling, on_sample) -> None:
        import openai

        c = self.config
        client = async_client(c.base_url, c.api_key_env, c.timeout_s, max_retries=ENDPOINT_RETRIES)
        semaphore = asyncio.Semaphore(c.concurrency)

        async def one(i: int, prompt: str) -> None:
            kwargs = dict(model=c.name, messages=[{"role": "user", "content": prompt}],
                          seed=request_seed(seed, rows[i]), temperature=sampling.temperature, top_p=sampling.top_p,
                          max_tokens=sampling.max_new_tokens)
            if sampling.top_k:
                kwargs["extra_body"] = {"top_k": sampling.top_k}
            async with semaphore:
                try:
                    # The client's timeout bounds each read, which a reply trickling in renews.
                    reply = await asyncio.wait_for(chat_choice(client, **kwargs), (ENDPOINT_RETRIES + 1) * c.timeout_s)
                    sample = self._sample(*reply)
                except (openai.APIError, BadReply) as e:
                    if isinstance(e, openai.APIConnectionError) and not isinstance(e, openai.APITimeoutError):
                        raise ConfigError(f"cannot reach the model endpoint {c.base_url}: "
                                          f"{first_line(e.__cause__ or e)}; start it, or point model.base_url at one "
                                          "that answers") from None
                    raise ConfigError(f"the model endpoint {c.base_url} failed: {quoted(e, 500)}") from None
                except asyncio.TimeoutError:
                    raise ConfigError(f"the model endpoint {c.base_url} did not finish a reply within "
                                      f"{ENDPOINT_RETRIES + 1} x model.timeout_s ({c.timeout_s:g} s), its retries "
                                      "included") from None
            on_sample(i, sample)

        try:
            await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await client.close()

    @staticmethod
    def _sample(response, choice, content: str) -> Sample:
        split_off = getattr(choice.message, "reasoning_content", None)
        if split_off is None:
            split_off = getattr(choice.message, "reasoning", None)
        # A reasoning parser's field, "" when the model closed its thinking at once: </think> was written.
        reasoning = reply_text(split_off, "the reply's reasoning")
        if split_off is None or THINK_END in content:
            text = content
        elif content or choice.finish_reason != "length":
            text = f"{reasoning}{THINK_END}{content}"
        else:  # cut off inside its reasoning: it never wrote </think>
            text = reasoning
        usage = getattr(response, "usage", None)
        tokens = usage.completion_tokens if usage is not None else None
        if tokens is None:
            raise ConfigError("the model endpoint reports no usage.completion_tokens; evaluation records token counts")
        if type(tokens) is not int or tokens < 0:
            raise ConfigError(f"the model endpoint reports usage.completion_tokens {tokens!r}, not a count of tokens")
        return Sample(text=text, completion_tokens=tokens, finish_reason=choice.finish_reason or "stop")


class RCGenerator:
    """Mode rc: the reasoning cache on the local model (the model summarizes its own turns unless
    rc.summarizer names a separate one). One `generate` call solves every prompt, prompt i drawn
    with `seed` as row `rows[i]`."""

    def __init__(self, config: "EvalConfig"):
        from qed_jax.pretrained import from_pretrained, resolve
        from qed_jax.reasoning_cache import RCParams, ReasoningCache, Summarizer
        from qed_jax.sampling import SamplingParams
        from qed_jax.tokenizer import load_tokenizer

        m, rc, s = config.model, config.rc, config.sampling
        summarizer = None
        if rc.summarizer:
            sampling = SamplingParams(max_new_tokens=rc.summarizer_tokens or rc.summary_tokens,
                                      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
            summarizer = Summarizer(from_pretrained(rc.summarizer, dtype=m.dtype), sampling,
                                    thinking=rc.summarizer_thinking, tokenizer=load_tokenizer(resolve(rc.summarizer)))
        # max_turns = turns: the compiled loop holds no turn slots this run never uses.
        params = RCParams(turns=rc.turns, reasoning_tokens=rc.reasoning_tokens or s.max_new_tokens,
                          summary_tokens=rc.summary_tokens, summarizer_tokens=rc.summarizer_tokens,
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, no_summary=rc.no_summary,
                          problem_tokens=rc.problem_tokens, max_turns=rc.turns, batch_size=rc.batch_size,
                          reasoning_template=rc.reasoning_template, summarize_template=rc.summarize_template)
        tokenizer = load_tokenizer(resolve(m.tokenizer or m.path), "model.tokenizer")
        with rc_section_errors():
            self.cache = ReasoningCache(from_pretrained(m.path, dtype=m.dtype), tokenizer, params, summarizer)

    def generate(self, prompts: list[str], seed: int, rows: list[int], sampling: EvalSamplingConfig,
                 on_sample) -> None:
        """Calls on_sample(i, Sample) for each prompt (a problem for the turn prompt's PROBLEM
        section); `sampling` is already part of the loop's settings."""
        import jax

        with rc_section_errors():
            results = self.cache.run(prompts, key=jax.random.key(seed), row_ids=rows)
        for i, result in enumerate(results):
            turns = [rc_turn_record(t) for t in result.turns]
            on_sample(i, Sample(text=turn_completion(turns[-1]), completion_tokens=sum(t["tokens"] for t in turns),
                                finish_reason=turns[-1]["finish_reason"], turns=turns))


def rc_section_errors():
    """The reasoning cache's errors name RCParams' fields: name the eval config's keys instead."""
    from qed_jax.reasoning_cache import RCParams

    keys = {f"RCParams.{f.name}": f"rc.{f.name}" for f in dataclasses.fields(RCParams)}
    keys.update({f"RCParams.{name}": f"sampling.{name}" for name in ("temperature", "top_k", "top_p")})
    keys["RCParams.max_turns"] = "rc.turns"
    return renamed(ConfigError, keys)


def rc_turn_record(turn) -> dict:
    """A reasoning-cache turn as samples.jsonl records it: its reasoning and answer texts (answer
    null when the turn never wrote </think>), the policy's tokens (a stop token included), and
    the summary written after it (null after the last turn) with the summarizer's tokens."""
    summarized = turn.summary_ids is not None
    return {"reasoning": turn.reasoning, "answer": turn.answer,
            "tokens": turn.num_tokens, "finish_reason": turn.finish_reason, "summary": turn.summary,
            "summary_tokens": len(turn.summary_ids) if summarized else None, "summary_cut": turn.summary_cut,
            "summarizer_tokens": turn.summarizer_num_tokens if summarized else None}


def turn_completion(turn: dict) -> str:
    """A turn's text as the model wrote it: reasoning, then </think> and the answer if it has one."""
    return turn["reasoning"] if turn["answer"] is None else f"{turn['reasoning']}{THINK_END}{turn['answer']}"


# --------------------------------------------------------------------------------------------
# Grading


def grade_samples(judge: Judge, config: EvalConfig, problems: dict[str, Problem],
                  todo: list[tuple[dict, int | None]], on_grade) -> None:
    """Grades `todo`: (sample record, turn) pairs, turn None for the sample's own answer, else the
    index of the RC turn whose answer to grade. Calls on_grade(record, turn, score, reason,
    decided_by, judge_reply). Identical proofs in one call share one judge request."""
    to_judge = []
    for record, turn in todo:
        completion = record["completion"] if turn is None else turn_completion(record["turns"][turn])
        problem = problems[record["problem_id"]]
        if config.benchmark.kind == "proof":
            to_judge.append((record, turn, completion))
            continue
        answer_text, unsent = text_to_grade(completion, config.judge)
        if unsent:
            on_grade(record, turn, 0, unsent, "truncated", None)
            continue
        verdict = check_answer(boxed_answer(answer_text), problem.answer)
        if verdict is None:
            to_judge.append((record, turn, completion))
        else:
            on_grade(record, turn, MAX_SCORE if verdict else 0, "ok", "math_verify", None)
    if not to_judge:
        return
    items = [judge_item(problems[r["problem_id"]], c, config.benchmark.kind) for r, _, c in to_judge]

    def judged(i: int, grade: Grade) -> None:  # as each grade comes: a later failure loses none
        record, turn, _ = to_judge[i]
        decided_by = "judge_cache" if grade.cached else "judge" if grade.sent else "truncated"
        on_grade(record, turn, grade.score, grade.reason, decided_by, grade.raw)

    judge.grade_batch(items, on_grade=judged)


def judge_item(problem: Problem, completion: str, kind: str) -> GradeItem:
    if kind == "answer":
        return GradeItem(problem=problem.problem, completion=completion, answer=problem.answer)
    return GradeItem(problem=problem.problem, completion=completion, reference=problem.solution,
                     guidelines=problem.guidelines)


# --------------------------------------------------------------------------------------------
# The run


class _Unset:
    """A key that one of two config sections does not have (a config of an older version)."""

    def __repr__(self) -> str:
        return "(not set)"


_UNSET = _Unset()


# What a run's samples and grades depend on. A rerun may change anything else: samples (to extend
# a run to more samples), benchmark.limit (to more problems), concurrency, timeouts, the
# endpoints' addresses, the cache's path.
RUN_IDENTITY = (
    "benchmark.name", "benchmark.kind", "benchmark.path", "benchmark.subset", "benchmark.split",
    "benchmark.fields", "benchmark.group_field", "benchmark.groups", "benchmark.prompt_template",
    "mode", "seed", "sampling", "model.path", "model.tokenizer", "model.dtype", "model.name",
    "judge.model", "judge.api", "judge.template", "judge.answer_format", "judge.allowed_scores",
    "judge.temperature", "judge.max_tokens", "judge.reasoning_effort", "judge.require_think_end",
    "judge.strip_self_evaluation",
    # mode rc only
    "rc.turns", "rc.reasoning_tokens", "rc.summary_tokens", "rc.summarizer_tokens", "rc.no_summary",
    "rc.reasoning_template", "rc.summarize_template", "rc.summarizer", "rc.summarizer_thinking",
)

# The judge settings that shape only what the judge is asked and how its reply is read: a run
# whose grades none came from the judge (it rejected every request, say) may change them.
JUDGE_REQUEST_KEYS = ("judge.model", "judge.api", "judge.template", "judge.answer_format", "judge.allowed_scores",
                      "judge.temperature", "judge.max_tokens", "judge.reasoning_effort")


# A run the judge has graded nothing of stops, after a batch, when the judge has rejected this
# many requests (a 4xx not retried: 400, 413, 422) and completed none: the requests do not suit it
# (a parameter this model refuses, a max_tokens beyond its context), and every other would meet
# the same. The samples are kept, and the judge's request settings may change on the rerun.
REJECTED_TO_STOP = 5


def check_judge_accepts(judge: Judge, runlog: RunLog) -> None:
    """JudgeUnavailable when the judge rejects every request of a run it has graded nothing of
    (see REJECTED_TO_STOP). Called between batches, once every request sent has its answer."""
    if judge.rejected >= REJECTED_TO_STOP and not judge.completed and not judge_has_graded(runlog):
        raise JudgeUnavailable(
            f"the judge at {judge.config.base_url} rejected {judge.rejected} requests (the last: "
            f"{judge.last_rejection}) and completed none: the requests do not suit it; check judge.model, judge.api, "
            "judge.max_tokens, judge.temperature and judge.reasoning_effort, then rerun")


def judge_has_graded(runlog: RunLog) -> bool:
    """Whether any grade the run holds is the judge's (not math-verify's, nor a 0 given unsent)."""
    return any(g["score"] is not None and g.get("decided_by") in ("judge", "judge_cache")
               for g in (*runlog.grades.values(), *runlog.turn_grades.values()))


def check_rerun(config: EvalConfig, runlog: RunLog | None = None) -> None:
    """Refuse a rerun into a run directory whose samples and grades were made under another
    config (RUN_IDENTITY), or with fewer samples or problems than it holds (check_samples_kept;
    `runlog`: its run log, read here when not given). A run that holds no record yet (stopped
    before its first sample: a wrong model name, too long a max_new_tokens) may begin anew."""
    out = Path(config.output_dir)
    refuse_a_pipelines_folder(out)
    inside = sorted(d.name for d in out.glob("*") if (d / SAMPLES_FILE).is_file())
    if inside:  # a report of the folder would then stand for this run alone
        raise ConfigError(f"{out} is a folder of evaluation runs ({', '.join(inside[:3])}"
                          f"{', ...' if len(inside) > 3 else ''}): each run is a folder of its own; use another "
                          "output_dir, e.g. a new folder inside it")
    saved_path = out / "config.json"
    if not saved_path.is_file():
        return
    saved = expand_paths(read_json_object(saved_path, "the run's config is damaged: move the folder aside, or use "
                                                      "another output_dir"))
    if not is_eval_config(saved):  # a mistyped output_dir: that config.json is never replaced
        raise ConfigError(f"{out} holds another command's run ({saved_path} is not an evaluation's config: a "
                          "trainer's, a pipeline's or a model's); use another output_dir")
    runlog = runlog if runlog is not None else RunLog.read(out / SAMPLES_FILE, repair=False)
    if runlog.empty():
        return
    current = json_values(config)
    recorded_in = recorded_working_dir(out)  # a relative path is what it named there
    moved = run_moved(saved.get("output_dir"), out, recorded_in)  # a pipeline's folder moved: its models too
    judge_fixed = judge_has_graded(runlog)
    for key in RUN_IDENTITY:
        if (key.startswith("rc.") and config.mode != "rc") or (key in JUDGE_REQUEST_KEYS and not judge_fixed):
            continue
        old, new, leaf = get_dotted(saved, key), get_dotted(current, key), key.rsplit(".", 1)[-1]
        if not same_as_recorded(leaf, old, new, recorded_in, moved=moved):
            while isinstance(old, dict) and isinstance(new, dict):  # a section (sampling): the setting in it
                leaf = next(k for k in (*old, *new) if old.get(k, _UNSET) != new.get(k, _UNSET))
                key, old, new = f"{key}.{leaf}", old.get(leaf, _UNSET), new.get(leaf, _UNSET)
            if key in LOCAL_MODEL_KEYS and new and is_missing_local_path(new):
                raise not_found(key, new)  # a typo, more likely than another model meant for this run
            raise ConfigError(f"{out} holds a run with {key}={recorded_path(leaf, old, recorded_in)!r}, not {new!r}: "
                              "its samples and grades would not be comparable; choose another output_dir, or delete "
                              "the old run")
    if (out / TEMPLATES_FILE).is_file():
        recorded = read_json_object(out / TEMPLATES_FILE, "move the folder aside, or use another output_dir")
        for key, text in template_texts(config).items():
            if key in recorded and recorded[key] != text and (key not in JUDGE_REQUEST_KEYS or judge_fixed):
                raise ConfigError(f"{out} holds a run made with another text of {key} "
                                  f"({get_dotted(current, key) or 'the default'}): the template was edited since, so "
                                  "its samples and grades would not be comparable; choose another output_dir, or "
                                  "delete the old run")
    check_samples_kept(config, runlog)


def is_eval_config(saved: dict) -> bool:
    """Whether a config.json is an eval run's (not a trainer's, a model's or a pipeline's)."""
    return isinstance(saved.get("benchmark"), dict) and "mode" in saved and "optim" not in saved


def holds_an_evaluation(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds an eval run that drew something (one that drew nothing begins anew)."""
    return (Path(run_dir) / "config.json").exists() and not RunLog.read(Path(run_dir) / SAMPLES_FILE,
                                                                        repair=False).empty()


def check_samples_kept(config: EvalConfig, runlog: RunLog) -> None:
    """Refuse a rerun with fewer `samples`, or a `benchmark.limit` below the problems, than the
    run holds (the report counts every sample it holds, so they would be counted under the wrong
    avg@k). What it holds, not what its config last asked for: an extension stopped before it
    drew anything may be run again smaller."""
    indices = 1 + max((k for _, k in runlog.samples), default=-1)
    problems = len({pid for pid, _ in runlog.samples})
    # A stopped round may hold a later problem without an earlier one: the limit must reach the
    # furthest row held, not only the count (records from before rows were kept have none).
    rows = 1 + max((r["row"] for r in runlog.samples.values() if r.get("row") is not None), default=-1)
    for key, asked, holds, what in (
            ("samples", config.samples, indices, f"samples drawn up to index {indices - 1}"),
            ("benchmark.limit", config.benchmark.limit, max(problems, rows),
             f"samples of {problems} problems" + (f", up to row {rows - 1} of the benchmark" if rows > problems
                                                   else ""))):
        if asked is not None and asked < holds:
            raise ConfigError(f"{config.output_dir} holds a run with {what} ({key}={holds}): a rerun may extend it, "
                              f"not shrink it to {asked} (its report counts every sample it holds); give {key}={holds} "
                              f"or more (in a pipeline: eval.overrides.{key}={holds}), or choose another output_dir")


TEMPLATES_FILE = "templates.json"  # in an eval run directory: `template_texts` when it began


def template_texts(config: EvalConfig) -> dict[str, str]:
    """The text of each prompt template the run's samples and grades depend on, by its config
    key: a rerun names the same files, but one edited since would prompt otherwise."""
    texts = {"benchmark.prompt_template": load_prompt_template(config.benchmark),
             "judge.template": load_judge_template(config.judge.template)}
    if config.mode == "rc":
        for key in ("reasoning_template", "summarize_template"):
            texts[f"rc.{key}"] = load_template(getattr(config.rc, key), f"rc.{key}", fits=is_rc_template)
    return texts


MODEL_FILES = "model_files.json"  # in an eval run directory: `model_files` when it began, with each file's sha256
SUMMARIZER_FILES = "summarizer_files.json"  # the same of rc.summarizer (mode rc)


def guarded_models(config: EvalConfig) -> dict[str, tuple[str | None, str]]:
    """The model folders a run's samples come from: config key -> (its path, the file in the run
    directory that records its files)."""
    models = {"model.path": (config.model.path, MODEL_FILES)}
    if config.mode == "rc" and config.rc.summarizer:
        models["rc.summarizer"] = (config.rc.summarizer, SUMMARIZER_FILES)
    return models


def model_files(path: str | None) -> dict | None:
    """The files of the local model folder `path` (relative path -> [bytes, modification time in
    ns]), so that a rerun can tell the same path now holds another model (a re-export, a replaced
    folder); None for a Hub id, a served model (None) or a folder no longer there. A copied folder
    counts as another. Hidden files (a download's cache), checkpoint saves in progress or set
    aside, and documents (a model card added to the folder) are not the model."""
    folder = Path(path).expanduser() if path else None
    if folder is None or not folder.is_dir():
        return None
    files = {}
    for f in sorted(folder.rglob("*")):
        parts = f.relative_to(folder).parts
        if not is_model_file(parts) or not f.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):  # a save in progress may remove it
            stat = f.stat()
            files["/".join(parts)] = [stat.st_size, stat.st_mtime_ns]
    return files


def model_files_with_digests(key: str, path: str | None) -> dict | None:
    """`model_files` with each file's sha256 added, read again until no file changed while its
    digest was taken (a re-export landing then would pair one file's time with another's bytes)."""
    for _ in range(5):
        if (files := model_files(path)) is None:
            return None
        folder = Path(path).expanduser()
        try:
            digests = {name: file_digest(folder / name) for name in files}
        except FileNotFoundError:  # removed while read
            continue
        if model_files(path) == files:
            return {name: [*value, digests[name]] for name, value in files.items()}
    raise ConfigError(f"{key} {path}: its files kept changing while they were read (a save or copy in progress?); "
                      "run again once it is done")


def same_digest(path: Path, digest: str) -> bool:
    try:
        return file_digest(path) == digest
    except FileNotFoundError:  # removed since it was listed: not the same model
        return False


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


def is_model_file(parts: tuple[str, ...]) -> bool:
    """Whether a file in a model folder (its path's parts) is part of the model: not hidden (a
    download's cache), not a checkpoint save in progress or set aside, not a document."""
    return not (any(part.startswith(".") or ".orbax-checkpoint-tmp" in part or ".unreadable-" in part
                    for part in parts) or parts[-1].endswith(".md"))


def check_model_unchanged(config: EvalConfig) -> None:
    """Refuse a run from a local model (or summarizer) whose files changed since the run began:
    more samples would mix two models, and a finished run's results are not this model's. A
    file written again with the bytes it had is unchanged. A model no longer there is not
    checked (grading what was drawn needs no model)."""
    out = Path(config.output_dir)
    for key, (path, record_file) in guarded_models(config).items():
        now = model_files(path)
        if not (out / record_file).is_file() or now is None:
            continue
        recorded = {name: v for name, v in json.loads((out / record_file).read_text()).items()
                    if is_model_file(tuple(name.split("/")))}  # an earlier version also recorded documents
        rewritten = [name for name in now if name in recorded and recorded[name][:2] != now[name]]
        folder = Path(path).expanduser()
        # A file written again with the same bytes (an export made again from the same checkpoint)
        # is the same model: told apart by the digest recorded when the run began (older runs have none).
        if set(recorded) == set(now) and all(recorded[name][0] == now[name][0] and len(recorded[name]) > 2
                                             and same_digest(folder / name, recorded[name][2]) for name in rewritten):
            if rewritten:  # remembered with their new times, so that the next check reads nothing
                write_text_atomic(out / record_file, json.dumps(
                    {name: [*now[name], recorded[name][2]] for name in now}, indent=1) + "\n")
            continue
        if recorded != now:
            raise ConfigError(f"{out} holds samples of the {'summarizer' if key == 'rc.summarizer' else 'model'} at "
                              f"{path} as its files were then (they differ now: re-exported, retrained or replaced), "
                              "so its results are not this model's and more samples would mix two models: choose "
                              "another output_dir, or delete the old run")


LOCAL_MODEL_KEYS = ("model.path", "model.tokenizer", "rc.summarizer")  # what a model (or its tokenizer) is read from


def check_local_paths(config: EvalConfig) -> None:
    """ConfigError for a model, tokenizer or summarizer that names a local path that does not
    exist (a Hub id passes: loading it says what went wrong)."""
    values = json_values(config)
    for key in LOCAL_MODEL_KEYS:
        value = get_dotted(values, key) if config.mode == "rc" or not key.startswith("rc.") else None
        if value and is_missing_local_path(value):
            raise not_found(key, value)


PROBLEM_FINGERPRINTS = "problem_fingerprints.json"  # in an eval run directory: `problem_fingerprints`
PROBLEM_FIELDS = ("problem", "solution", "guidelines", "answer")  # what a prompt or a grade is made of


def problem_fingerprints(problems: list[Problem]) -> dict[str, dict]:
    """Each problem's row (its seed's stream) and a hash of each field its prompt and grades are
    made of, by id: a rerun can tell a benchmark file (or Hub revision) edited since."""
    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {p.id: {"row": row, **{field: digest(getattr(p, field)) for field in PROBLEM_FIELDS}}
            for row, p in enumerate(problems)}


def check_problems_unchanged(config: EvalConfig, problems: list[Problem], runlog: RunLog) -> None:
    """Refuse to go on with a run whose drawn problems are no longer in the benchmark as they
    were: their held samples and grades answer another text (or were drawn from another row's
    seed), and new samples of them would mix two benchmarks."""
    out = Path(config.output_dir)
    if not (out / PROBLEM_FINGERPRINTS).is_file():
        return  # a run from before the file was written
    recorded = read_json_object(out / PROBLEM_FINGERPRINTS, "move the folder aside, or use another output_dir")
    now = problem_fingerprints(problems)
    for pid in sorted({pid for pid, _ in runlog.samples}, key=str):
        if pid not in now:
            raise ConfigError(f"{out} holds samples of problem {pid!r}, which {config.benchmark.path} no longer has "
                              "(a row removed, or ids by row index that moved): the run's results would mix two "
                              "benchmarks; choose another output_dir, or delete the old run")
        was = recorded.get(pid, now[pid])  # a problem first drawn by an earlier version: not recorded
        changed = [field for field in ("row", *PROBLEM_FIELDS) if was.get(field) != now[pid][field]]
        if changed:
            raise ConfigError(f"{out} holds samples of problem {pid!r} whose {', '.join(changed)} changed in "
                              f"{config.benchmark.path} since they were drawn: they would not be comparable with new "
                              "ones; choose another output_dir, or delete the old run")


def check_judge_template(config: EvalConfig) -> None:
    """Refuse a judge template that grades against a field the benchmark does not pass the judge
    (a proof benchmark passes its guidelines, an answer benchmark its answer)."""
    b = config.benchmark
    template = load_judge_template(config.judge.template)
    check_template_fields(template, config.judge.template, "answer" if b.kind == "answer" else "guidelines",
                          f"{b.kind} benchmark {b.name}")
    check_answer_format(template, config.judge.template, config.judge.answer_format)


def check_held_problems(config: EvalConfig) -> None:
    """check_problems_unchanged for a run directory that holds samples, read without changing
    it: for a caller that checks before anything runs (the pipeline)."""
    from qed_jax.data import read_rows

    path = Path(config.output_dir) / SAMPLES_FILE
    if path.exists():
        b = config.benchmark
        problems = problems_from_rows(read_rows(b.path, b.subset, b.split, "benchmark.path"), b, new_run=False)
        check_problems_unchanged(config, problems, RunLog.read(path, repair=False))


def check_seeds(runlog: RunLog, config: EvalConfig) -> None:
    """Refuse to go on with a run whose samples were drawn with other seeds than this version
    draws them (earlier versions drew sample k with seed + k): old and new samples would mix."""
    for (pid, k), record in runlog.samples.items():
        if record.get("seed") != sample_seed(config.seed, k):
            raise ConfigError(f"{config.output_dir} holds sample {k} of problem {pid!r} drawn with seed "
                              f"{record.get('seed')}, where this version draws it with {sample_seed(config.seed, k)} "
                              "(an earlier version's seeding): its samples and new ones would not be comparable; "
                              "choose another output_dir, or delete the old run")


def prepare_output(config: EvalConfig, problems: list[Problem], runlog: RunLog | None = None) -> Path:
    """The run directory with its config.json and the ids of the benchmark's problems, for a
    config that check_rerun accepted (`runlog`: what the run holds, for the judge's template)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", dump_json(config))
    record_working_dir(out)  # a report read elsewhere finds the benchmark file its relative path named
    write_text_atomic(out / PROBLEMS_FILE, json.dumps([p.id for p in problems]) + "\n")
    write_text_atomic(out / PROBLEM_FINGERPRINTS, json.dumps(problem_fingerprints(problems), indent=1) + "\n")
    for key, (path, record_file) in guarded_models(config).items():
        if not (out / record_file).is_file() and (files := model_files_with_digests(key, path)) is not None:
            write_text_atomic(out / record_file, json.dumps(files, indent=1) + "\n")
    if not (out / TEMPLATES_FILE).is_file():
        write_text_atomic(out / TEMPLATES_FILE, json.dumps(template_texts(config), indent=1) + "\n")
    elif runlog is not None and not judge_has_graded(runlog):  # the judge's template may still change
        recorded = read_json_object(out / TEMPLATES_FILE, "move the folder aside, or use another output_dir")
        recorded["judge.template"] = load_judge_template(config.judge.template)
        write_text_atomic(out / TEMPLATES_FILE, json.dumps(recorded, indent=1) + "\n")
    return out


def generate_round(generator, config: EvalConfig, template: str, problems: dict[str, Problem],
                   units: list[tuple[str, int]], runlog: RunLog) -> int:
    """Draw the samples `units` [(problem_id, sample index)], one generator call per sample index
    k, appending each to the run log as it arrives; returns how many. Sample k of a problem draws
    with sample_seed(seed, k) as the row of the problem's place in the benchmark: its own random stream,
    whichever round it falls in (a round's shapes may still round floats differently)."""
    place = {pid: row for row, pid in enumerate(problems)}
    for k in sorted({k for _, k in units}):
        chosen = [pid for pid, kk in units if kk == k]
        rows = [place[pid] for pid in chosen]
        seed = sample_seed(config.seed, k)

        def on_sample(i: int, sample: Sample, chosen=chosen, rows=rows, k=k, seed=seed) -> None:
            record = {"type": "sample", "problem_id": chosen[i], "sample": k, "seed": seed, "row": rows[i],
                      "group": problems[chosen[i]].group, "completion": sample.text,
                      "completion_tokens": sample.completion_tokens, "finish_reason": sample.finish_reason,
                      "truncated": text_to_grade(sample.text, config.judge)[1] is not None}
            if sample.turns is not None:
                record["turns"] = sample.turns
            runlog.append(record)

        generator.generate([render_prompt(template, problems[pid].problem) for pid in chosen], seed,
                           rows, config.sampling, on_sample)
    return len(units)


def ungraded(runlog: RunLog, config: EvalConfig, units: list[tuple[str, int]]) -> list[tuple[dict, int | None]]:
    """What is left to grade among the generated samples `units`: (sample record, None) for a
    sample without a grade (or with a failed one), and with rc.grade_turns (record, t) for each
    such turn but the last (whose answer is the sample's)."""
    todo = []
    for u in units:
        if u not in runlog.samples:
            continue
        record = runlog.samples[u]
        if not runlog.graded(u):
            todo.append((record, None))
        if config.mode == "rc" and config.rc.grade_turns:
            todo += [(record, t) for t in range(len(record["turns"]) - 1) if not runlog.graded(u, t)]
    return todo


def make_generator(config: EvalConfig):
    if config.mode == "rc":
        return RCGenerator(config)
    return LocalGenerator(config.model) if config.model.path else EndpointGenerator(config.model)


def evaluate(config: EvalConfig, progress: bool = True) -> dict:
    """Run (or finish) an evaluation; returns counts: samples generated, grades written (graded;
    with rc.grade_turns the turns' too), of which failed, and the run's total of samples. One
    job at a time per output_dir (`rundir.run_lock`): a second would draw and grade the same
    samples again and append them twice."""
    with run_lock(Path(config.output_dir)):
        return _evaluate(config, progress)


def _evaluate(config: EvalConfig, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from qed_jax.data import read_rows

    out = Path(config.output_dir)
    runlog = RunLog.read(out / SAMPLES_FILE)
    check_rerun(config, runlog)
    new_run = runlog.empty()
    if new_run:  # what a run that drew nothing recorded of itself (another model, templates) is recorded anew
        for name in (MODEL_FILES, SUMMARIZER_FILES, TEMPLATES_FILE, PROBLEM_FINGERPRINTS):
            (out / name).unlink(missing_ok=True)
        check_local_paths(config)  # it draws every sample: a missing model fails before the benchmark is read
    b = config.benchmark
    check_judge_template(config)
    template_texts(config)  # every template it names is there (by its key), before a model loads
    problems = problems_from_rows(read_rows(b.path, b.subset, b.split, "benchmark.path"), b, new_run)
    by_id = {p.id: p for p in problems}
    template = load_prompt_template(b)
    check_seeds(runlog, config)
    check_problems_unchanged(config, problems, runlog)
    if config.samples * len(problems) > MAX_SAMPLES_PER_RUN:
        raise ConfigError(f"samples={config.samples} of each of {len(problems)} problems is "
                          f"{config.samples * len(problems):,} samples to draw and grade, more than a run takes "
                          f"({MAX_SAMPLES_PER_RUN:,}): lower samples, or split the benchmark")
    # Sample-major: all problems' sample 0 first, so a stopped run still has whole avg@1 data.
    units = [(p.id, k) for k in range(config.samples) for p in problems]
    to_generate = [u for u in units if u not in runlog.samples]
    to_grade = ungraded(runlog, config, units)
    counts = {"generated": 0, "graded": 0, "failed": 0, "cached": 0, "total": len(units)}
    check_model_unchanged(config)  # a finished run too: its results would stand for this model
    if not to_generate and not to_grade:
        if not new_run:
            prepare_output(config, problems, runlog)  # what the run is now (samples, after an extension stopped early)
        return counts
    if to_generate:  # a rerun that only grades needs no model
        check_local_paths(config)
    judge, bar = Judge(config.judge), None
    try:
        # Every proof goes to the judge, and every final answer math-verify cannot settle: find out
        # now if there is none, not after a round of sampling (a rerun that only grades answers
        # may find every one settled without it).
        if b.kind == "proof" or to_generate:
            judge.check_reachable()
        generator = make_generator(config) if to_generate else None
        prepare_output(config, problems, runlog)  # every check passed: make the run directory
        runlog.start_appending()
        bar = tqdm(total=len(units), initial=sum(runlog.graded(u) for u in units), desc=f"eval {b.name}",
                   unit="sample", disable=not progress)
        scores = [runlog.grades[u]["score"] for u in units if runlog.graded(u)]
        failures, failed_grades = Counter(), []  # reasons counted; (reason, judge reply or error) of each

        def on_grade(record, turn, score, reason, decided_by, reply):
            grade = {"type": "grade", "problem_id": record["problem_id"], "sample": record["sample"],
                     "score": score, "reason": reason, "decided_by": decided_by, "judge_reply": reply}
            if turn is not None:
                grade.update(type="turn_grade", turn=turn)
            runlog.append(grade)
            counts["graded"] += 1
            counts["cached"] += decided_by == "judge_cache"
            if score is None:
                counts["failed"] += 1
                failures[reason] += 1
                failed_grades.append((reason, reply))
            elif turn is None:
                scores.append(score)
                bar.update()
            bar.set_postfix(mean=f"{sum(scores) / len(scores):.2f}/7" if scores else "–", failed=counts["failed"],
                            refresh=False)

        with noted(JudgeUnavailable, "what was drawn and graded is kept for the rerun"):
            if to_grade:
                grade_samples(judge, config, by_id, to_grade, on_grade)
                check_judge_accepts(judge, runlog)
            for start in range(0, len(to_generate), config.batch_size):
                batch = to_generate[start: start + config.batch_size]
                counts["generated"] += generate_round(generator, config, template, by_id, batch, runlog)
                grade_samples(judge, config, by_id, ungraded(runlog, config, batch), on_grade)
                check_judge_accepts(judge, runlog)
        bar.close()  # before the warning, which would otherwise print on the bar's line
        if failures:
            log.warning("%s: %d grade%s failed (%s); the next run retries them%s", config.output_dir,
                        counts["failed"], "s" if counts["failed"] != 1 else "", reason_counts(failures),
                        rejection_note(failed_grades))
    finally:  # whatever failed, the samples and grades written so far are on disk
        if bar is not None:
            bar.close()
        judge.close()
        runlog.close()
    return counts
