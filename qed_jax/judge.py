"""Rubric judge: prompts, proof extraction, score parsing, an OpenAI-compatible async client with
bounded concurrency and retries, and a SQLite grade cache that makes grading exactly-once.

The API key is read from the environment variable the config names, handed to the client, and
nowhere else: it is not logged, not hashed into cache keys, and not written to any file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import email.utils
import hashlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import sqlite3
import time
import urllib.parse
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai

from qed_jax.config import ConfigError, check_url, is_judge_template, load_template, require_range
from qed_jax.errors import JudgeUnavailable, first_line, quoted, setting_path_error
from qed_jax.tokenizer import THINK_END

log = logging.getLogger(__name__)

MAX_SCORE = 7
ANSWER_FORMATS = ("score", "points", "verdict")  # judge.answer_format: the tag a reply's grade is read from


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    base_url: str = "http://localhost:8000/v1"
    model: str = "openai/gpt-oss-20b"
    api: str = "chat"  # chat (Chat Completions) | responses (Responses API)
    api_key_env: str = "JUDGE_API_KEY"  # name of the environment variable holding the key
    template: str = "rl_grader"  # a file in configs/prompts/ (without .txt) or a path
    answer_format: str = "score"  # score: <score>N</score> | points: <points>N out of 7</points> | verdict
    allowed_scores: list[int] | None = None  # e.g. [0, 1, 6, 7] for IMO-ProofBench; default 0..7
    temperature: float = 1.0
    max_tokens: int = 81920
    reasoning_effort: str | None = "medium"
    concurrency: int = 32
    timeout_s: float = 900.0  # per request, the whole of it
    max_retries: int = 3  # on timeouts, broken connections, 408, 409, 429, 5xx and replies that are not completions
    backoff_s: float = 15.0  # first backoff; doubles each retry, with jitter (a Retry-After overrides it)
    parse_retries: int = 2  # extra requests when a reply has no parsable score, or was cut off at max_tokens
    require_think_end: bool = True  # a completion without </think> scores 0, unsent
    strip_self_evaluation: bool = False
    cache_path: str | None = "judge_cache.sqlite"
    # The GRPO learner stops a step when more than this fraction of the grades it asked of the
    # judge failed: a step trained on the few an ailing judge gave would teach the policy noise.
    max_failed_fraction: float = 0.05

    def __post_init__(self):
        check_url(self.base_url, "judge.base_url")
        if self.api not in ("chat", "responses"):
            raise ConfigError(f"judge.api must be chat or responses, got {self.api!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ConfigError(f"judge.answer_format must be score, points or verdict, got {self.answer_format!r}")
        if self.concurrency < 1:
            raise ConfigError("judge.concurrency must be at least 1")
        if self.allowed_scores is not None and (
                not self.allowed_scores or not all(type(s) is int and 0 <= s <= MAX_SCORE for s in self.allowed_scores)):
            raise ConfigError(f"judge.allowed_scores must be a non-empty list of integers from 0 to {MAX_SCORE} "
                              f"(or null for all of them), got {self.allowed_scores!r}")
        if self.answer_format == "verdict" and not {0, MAX_SCORE} <= self.scores:
            raise ConfigError(f"judge.allowed_scores {self.allowed_scores!r} leaves out 0 or {MAX_SCORE}, the scores "
                              "of the verdicts Incorrect and Correct (answer_format verdict): every grade would fail")
        require_range(self.timeout_s, "judge.timeout_s", 0, low_open=True)  # seconds per request
        if self.max_tokens < 1:
            raise ConfigError(f"judge.max_tokens must be at least 1, got {self.max_tokens!r}")
        for key in ("max_retries", "parse_retries", "backoff_s"):
            require_range(getattr(self, key), f"judge.{key}", 0)
        require_range(self.temperature, "judge.temperature", 0)
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ConfigError("judge.max_failed_fraction must be between 0 and 1 (a fraction of the grades a step "
                              f"asks of the judge), got {self.max_failed_fraction!r}")
        if self.cache_path is not None and not self.cache_path.strip():  # would turn the cache off unsaid
            raise ConfigError(f"judge.cache_path is empty ({self.cache_path!r}); name an SQLite file, or set it to null "
                              "to grade without a cache (a resumed run then regrades)")
        if self.cache_path is not None and "://" in self.cache_path:  # Path() would make a local folder "gs:"
            raise ConfigError(f"judge.cache_path must be a local file (SQLite), got {self.cache_path}; to outlive "
                              "the machine, put it on a mount that does (e.g. NFS), or set it to null")

    @property
    def scores(self) -> set[int]:
        return set(self.allowed_scores) if self.allowed_scores is not None else set(range(MAX_SCORE + 1))


@dataclasses.dataclass(frozen=True)
class GradeItem:
    """One thing to grade. `completion` is a raw model output (the proof is what follows its last
    </think>); `proof` is an already-extracted proof. Give exactly one of them."""

    problem: str
    completion: str | None = None
    proof: str | None = None
    rubric: Any = None  # marking scheme: a string or a list of {title, points, desc}
    reference: str | None = None
    guidelines: Any = None
    answer: str | None = None


@dataclasses.dataclass
class Grade:
    score: int | None  # None when grading failed
    reward: float  # score / 7; 0 for failures and unsent items
    # ok | no_think_end | empty_proof | parse_failure | score_not_allowed | cut_off | bad_reply | http_<status>
    # | timeout | connection_error
    reason: str
    raw: str | None = None  # the judge's last reply
    latency_s: float = 0.0
    attempts: int = 0
    cached: bool = False

    @property
    def failed(self) -> bool:
        return self.score is None

    @property
    def sent(self) -> bool:
        """Whether the item went to the judge (or its cache): not scored 0 unsent."""
        return self.reason not in UNSENT_REASONS


def reason_counts(reasons: Counter) -> str:
    """ "http_500 x2, timeout x1": why grades failed, the most frequent first."""
    return ", ".join(f"{reason} x{n}" for reason, n in reasons.most_common())


def rejection_note(failures) -> str:
    """For failed grades (`failures`: their (reason, raw) pairs) whose requests the judge rejected
    (a 4xx not retried: it will reject them again), what it said last and what may change; else
    "". Appended to a line that says how many grades failed."""
    rejected = [raw for reason, raw in failures if rejected_request(reason)]
    if not rejected:
        return ""
    # Counted in grades, not requests: identical items share one request (`Judge._grade_one`).
    their = "their request" if len(rejected) > 1 else "its request"
    return (f"; {len(rejected)} failed because the judge rejected {their} (the last: {quoted(rejected[-1])}), "
            "and will again unless the request changes: check judge.model, judge.api, "
            "judge.max_tokens, judge.temperature and judge.reasoning_effort")


def rejected_request(reason: str | None) -> bool:
    """Whether a grade failed because the judge rejected its request: a 4xx it is not retried on."""
    return bool(reason and re.fullmatch(r"http_4\d\d", reason)) and int(reason[5:]) not in RETRIED_4XX


# Why an item scores 0 without a request: no </think> (with require_think_end), or no proof.
UNSENT_REASONS = ("no_think_end", "empty_proof")


# --------------------------------------------------------------------------------------------
# Pure pieces: templates, proof extraction, score parsing


CHECKPOINT_KEYS = ("title", "points", "desc", "description")  # what a marking scheme's checkpoint may hold


def render_marking_scheme(scheme: Any) -> str:
    """A string stays as is; a list of {title, points, desc} becomes one block per checkpoint."""
    if scheme is None:
        return "(none given)"
    if isinstance(scheme, str):
        return scheme.strip()
    if isinstance(scheme, list):
        blocks = []
        for i, item in enumerate(scheme, 1):
            if not isinstance(item, dict):
                raise ValueError(f"marking scheme item {i} is not a mapping: {item!r}")
            points = item.get("points")
            if points is not None and (isinstance(points, bool) or not isinstance(points, (int, float))
                                       or not 0 <= points <= MAX_SCORE):
                raise ValueError(f"marking scheme item {i}: points must be a number from 0 to {MAX_SCORE}, "
                                 f"got {points!r}")
            # A table's missing field is null (a Parquet struct column): no title, no description.
            title = str(item.get("title") or "").strip()
            desc = str(item.get("desc") or item.get("description") or "").strip()
            unread = [str(k) for k, v in item.items() if k not in CHECKPOINT_KEYS and isinstance(v, str) and v.strip()]
            if not (title or desc) and unread:  # its text would not reach the judge
                raise ValueError(f"marking scheme item {i} has its text under {', '.join(unread)}, which is not read: "
                                 "name it 'title', 'desc' or 'description'")
            head = f"Checkpoint {i}: {title}".strip()
            if points is not None:
                head += f" ({points} point{'s' if points != 1 else ''})"
            blocks.append(f"{head}\n{desc}".strip())
        return "\n\n".join(blocks)
    raise ValueError(f"marking scheme must be a string or a list of checkpoints, got {type(scheme).__name__}")


_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")  # {{field}} in a template


def load_judge_template(name: str) -> str:
    """The judge template `name` (a file, or one in configs/prompts/), checked: it shows the
    judge the proof, and every {{placeholder}} in it is one that `render_prompt` fills (any
    other would reach the judge as written, and its grade would count)."""
    template = load_template(name, "judge template", fits=is_judge_template)
    placeholders = prompt_fields(GradeItem(problem=""), "")
    known = ", ".join(f"{{{{{p}}}}}" for p in placeholders)
    for m in re.finditer(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", template):  # {{2}} in LaTeX is no placeholder
        if m.group(1) not in placeholders:
            raise ConfigError(f"judge template {name}: unknown placeholder {m.group(0)}; the placeholders are {known}")
        if m.group(0) != f"{{{{{m.group(1)}}}}}":
            raise ConfigError(f"judge template {name}: write {m.group(0)} as {{{{{m.group(1)}}}}}, without spaces")
    if "{{proof}}" not in template:
        raise ConfigError(f"judge template {name}: no {{{{proof}}}} placeholder, so the judge would never see the "
                          f"proof; the placeholders are {known}")
    return template


def check_answer_format(template: str, name: str, answer_format: str) -> None:
    """Refuse a judge template that never asks for the tag judge.answer_format reads (each bundled
    one ends with it, e.g. <points>N out of 7</points>): no reply would be read as a grade."""
    found = {tag: template.lower().rfind(f"<{tag}>") for tag in ANSWER_FORMATS}
    if found[answer_format] >= 0:
        return
    asked = max((tag for tag in ANSWER_FORMATS if found[tag] >= 0), key=found.get, default=None)
    hint = (f"it asks for <{asked}>: set judge.answer_format={asked}" if asked else
            f"ask for <{answer_format}> in it, as the bundled templates do")
    raise ConfigError(f"judge.template {name} never asks for the <{answer_format}> tag that judge.answer_format "
                      f"{answer_format} reads its grades from; {hint}")


def prompt_fields(item: GradeItem, proof: str) -> dict[str, str]:
    """What each {{placeholder}} of a judge template renders as, by its name."""
    return {
        "problem": item.problem.strip(),
        "marking_scheme": render_marking_scheme(item.rubric),
        "reference": (item.reference or "(none given)").strip(),
        "guidelines": render_marking_scheme(item.guidelines),
        "answer": (item.answer or "").strip(),
        "proof": proof,
    }


def render_prompt(template: str, item: GradeItem, proof: str) -> str:
    fields = prompt_fields(item, proof)
    return _PLACEHOLDER.sub(lambda m: fields.get(m.group(1), m.group(0)), template)


# A self-evaluation section starts at its heading, and everything from there on is cut:
#   a Markdown heading that begins with the name ("## Self-evaluation of the proof", "### 3. Self-check");
#   the name alone on its line, bold or not, or followed by a colon or a parenthesis
#   ("**Confidence:** high", "Self-assessment (7/7): ...", "**Self-check**").
# A line of the proof that merely begins with such a word ("Confidence bounds are ...",
# "Self-check of the base case: ...", "## Confidence intervals") is no heading; a plain (not
# bold) "Self-check:" line may be a step of the proof, so only a heading or bold one counts.
_HEADING = r"#+[ \t]*(?:\d+[.)]?[ \t]*)?"  # "## " or "### 3. "
_SELF = r"self[- ]?(?:evaluation|assessment|verification)"
_CONFIDENCE = r"confidence(?:[ \t]+(?:level|score|assessment))?"
_ALONE = r"[*_]{0,2}[ \t]*(?:[:(]|\r?$)"  # closing bold, then a colon, a parenthesis or the end of the line
_SELF_EVALUATION = re.compile(
    rf"^[ \t]*(?:{_HEADING}[*_]{{0,2}}(?:{_SELF}|self[- ]?check)\b"
    rf"|(?:{_HEADING})?[*_]{{0,2}}(?:{_SELF}|{_CONFIDENCE}){_ALONE}"
    rf"|[*_]{{2}}self[- ]?check{_ALONE}).*\Z",
    re.IGNORECASE | re.DOTALL | re.MULTILINE,
)


def extract_proof(completion: str, strip_self_evaluation: bool = False) -> str | None:
    """The text after the last </think>, or None when the reasoning never ended; with
    `strip_self_evaluation`, cut at the first self-evaluation heading (everything after it goes)."""
    if THINK_END not in completion:
        return None
    return given_proof(completion.rsplit(THINK_END, 1)[1], strip_self_evaluation)


def given_proof(proof: str, strip_self_evaluation: bool = False) -> str:
    """An already-extracted proof as it is graded: stripped of its self-evaluation as a
    completion's would be."""
    if strip_self_evaluation:
        proof = _SELF_EVALUATION.sub("", proof)
    return proof.strip()


def text_to_grade(completion: str, config: JudgeConfig) -> tuple[str, str | None]:
    """(the text a completion is graded on, None), or ("", why it scores 0 unsent): no_think_end
    when the reasoning never ended and config.require_think_end (else the whole completion is
    graded as a proof), empty_proof when nothing is left (self-evaluation stripped as the config says)."""
    proof = extract_proof(completion, config.strip_self_evaluation)
    if proof is None:
        if config.require_think_end:
            return "", "no_think_end"
        proof = given_proof(completion, config.strip_self_evaluation)
    return (proof, None) if proof else ("", "empty_proof")


# A mark inside its tag, as judges write it: bare, between Markdown's asterisks, or out of 7 ("7/7",
# "7 out of 7", "**7** out of 7", "**7/7**"). Up to 9 digits: 5,000 digits are no score. Each optional
# part starts with its own character, so no two take the same text (read in linear time).
_MARK = r"\s*(?:\*+\s*)?([+-]?\d{1,9})\s*(?:\*+\s*)?(?:(?:/|out\s+of)\s*7\s*(?:\*+\s*)?)?"
# A tag and what it holds, whatever that is (no tag of its kind inside: read in linear time).
_TAGS = {name: re.compile(rf"<{name}>((?:(?!</?{name}>).)*)</{name}>", re.IGNORECASE | re.DOTALL)
         for name in ANSWER_FORMATS}
_VALUES = {  # what a tag holds when it holds a mark
    "score": re.compile(_MARK, re.IGNORECASE),
    "points": re.compile(_MARK, re.IGNORECASE),
    "verdict": re.compile(r"\s*(correct|incorrect)\s*", re.IGNORECASE),
}


def tagged_score(reply: str | None, answer_format: str) -> int | None:
    """The last tag's value, whatever it is; None when there is no tag, or when the last one holds
    no mark (`<score>3.5</score>`): a mark in an earlier tag is one the judge quoted or weighed
    before its last word, not its grade. A judge served without a reasoning parser writes its
    reasoning first: only the text after its last </think> is read (a mark it weighed while
    thinking is not its grade)."""
    tags = _TAGS[answer_format].findall((reply or "").rpartition(THINK_END)[2])
    value = _VALUES[answer_format].fullmatch(tags[-1]) if tags else None
    if value is None:
        return None
    last = value.group(1)
    if answer_format == "verdict":
        return MAX_SCORE if last.lower() == "correct" else 0
    return int(last)


def parse_score(reply: str | None, answer_format: str, allowed: set[int]) -> int | None:
    """The last tag's value; None when there is none, it holds no mark, or its mark is off the scale."""
    value = tagged_score(reply, answer_format)
    return value if value in allowed else None


# The row fields a template's placeholders are rendered from, under each field's accepted keys,
# and the bundled judge config whose template reads it. A row must give the answer an answer
# template compares with. A marking scheme may be absent (graded without one, as GRPO does for rows
# without a rubric), but not replaced by the other kind: guidelines sent to a template that reads
# a rubric would be dropped. ({{reference}} may be absent too: "(none given)".)
RUBRIC_KEYS = ("rubric", "rubrics")  # a row's marking scheme for the RL grader, under either key
GUIDELINES_KEYS = ("guidelines", "grading_guidelines", "grading_scheme")  # the benchmarks' kind of scheme
_ROW_FIELDS = {  # placeholder: (field, its keys in a row, the judge config that reads it)
    "marking_scheme": ("rubric", RUBRIC_KEYS, "configs/judge/rl_grader.yaml"),
    "guidelines": ("guidelines", GUIDELINES_KEYS, "configs/judge/imo_proofbench.yaml or proofbench.yaml"),
    "answer": ("answer", ("answer",), "configs/judge/answer.yaml"),
}


def needed_fields(template: str) -> list[str]:
    """The row fields (rubric, guidelines, answer) that `template` renders."""
    used = set(_PLACEHOLDER.findall(template))
    return [field for placeholder, (field, _, _) in _ROW_FIELDS.items() if placeholder in used]


def check_template_fields(template: str, name: str, gives: str, who: str) -> None:
    """Refuse a judge template that grades against a row field (rubric, guidelines or answer)
    other than `gives`, the one `who` passes to the judge: the judge would read "(none given)" in
    its place. The answer one passes must be rendered too: without it nothing could be checked."""
    placeholder, config = next((p, c) for p, (f, _, c) in _ROW_FIELDS.items() if f == gives)
    hint = f"use {config} or a template with {{{{{placeholder}}}}}"
    needs = needed_fields(template)
    for field in needs:
        if field != gives:
            raise ConfigError(f"judge.template {name} grades against the field '{field}', which {who} does not "
                              f"pass to the judge (it passes '{gives}'): {hint}")
    if gives == "answer" and "answer" not in needs:
        raise ConfigError(f"judge.template {name} never shows the judge the reference answer that {who} passes: {hint}")


def is_empty(value: Any) -> bool:
    """Whether a row's value gives nothing: absent, null, empty or blank (a table has every column,
    some cells empty)."""
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def row_field(row: dict, field: str, keys: tuple[str, ...], where: str) -> tuple[str, Any] | None:
    """(the row's key, its value) for a rubric, guidelines or answer; None when the row has none
    (absent, null, empty or blank). A numeric answer becomes a string, as eval reads one."""
    key = next((k for k in keys if not is_empty(row.get(k))), None)  # a table has every column, some null
    if key is None:
        return None
    value = row[key]
    if field == "answer":
        return key, answer_text(value, f"{where}: field 'answer'")
    try:
        render_marking_scheme(value)
    except ValueError as e:
        raise ConfigError(f"{where}: field '{key}': {e}") from None
    return key, value


def answer_text(value: Any, what: str) -> str:
    """A reference answer as text; a number written out in full: Python writes 0.00001 as
    "1e-05", which math-verify reads as e - 5. `what` names the field in an error."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{what} must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN: a table's missing value, written out
        raise ConfigError(f"{what} must be a string or a finite number, got {value}")
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    return str(value)


def item_from_row(row: Any, where: str, needs: list[str] = ()) -> GradeItem:
    """A GradeItem from a JSON row {problem, rubric|guidelines, reference?, answer?, proof|completion};
    `needs` are the fields the judge's template renders (`needed_fields`); `where` ("file:line")
    prefixes any error."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object")
    if not isinstance(row.get("problem"), str) or not row["problem"].strip():
        raise ConfigError(f"{where}: field 'problem' must be a non-empty string")
    has = [k for k in ("proof", "completion") if row.get(k) is not None]
    if len(has) != 1 or not isinstance(row[has[0]], str):
        raise ConfigError(f"{where}: give exactly one of the fields 'proof' and 'completion' (a string)")
    given = {field: found for field, keys, _ in _ROW_FIELDS.values()
             if (found := row_field(row, field, keys, where)) is not None}
    for field, keys, _ in _ROW_FIELDS.values():
        if field not in needs or field in given:
            continue
        other_scheme = [key for f, (key, _) in given.items() if f not in (field, "answer")]
        if field == "answer" or other_scheme:
            readers = "; ".join(f"{config} reads '{f}'" for f, _, config in _ROW_FIELDS.values())
            hint = (f"; its marking scheme is '{other_scheme[0]}': choose the judge config that reads it "
                    f"({readers})") if other_scheme else ""
            raise ConfigError(f"{where}: the judge's template grades against the field '{field}' "
                              f"({' or '.join(keys)}), which this row does not give{hint}")
    reference_key = next((k for k in ("reference", "solution") if not is_empty(row.get(k))), "reference")
    reference = row.get(reference_key)
    if reference is not None and not isinstance(reference, str):
        raise ConfigError(f"{where}: field '{reference_key}' must be a string (the reference solution)")
    value = {field: found[1] for field, found in given.items()}
    return GradeItem(problem=row["problem"], completion=row.get("completion"), proof=row.get("proof"),
                     rubric=value.get("rubric"), reference=reference,
                     guidelines=value.get("guidelines"), answer=value.get("answer"))


def warn_ungraded_schemes(numbered: list[tuple[str, Any]], items: list[GradeItem], needs: list[str]) -> None:
    """Warn of the rows (`numbered`: (where, row)) that give no marking scheme or guidelines
    where the judge's template renders one (`needs`): the judge grades them without it."""
    for field, keys, _ in _ROW_FIELDS.values():
        if field not in needs or field == "answer":  # an answer is required (item_from_row)
            continue
        missing = [(where, row) for (where, row), item in zip(numbered, items) if getattr(item, field) is None]
        if missing:
            where, row = missing[0]
            log.warning("%d of %d rows give no %s (%s), so the judge grades them without it; the first, %s, has the "
                        "fields %s", len(missing), len(items), field, " or ".join(keys), where,
                        ", ".join(map(repr, list(row)[:10])))


# --------------------------------------------------------------------------------------------
# The grade cache


class GradeCache:
    """SQLite, one row per graded (judge, template, sampling, item); committed per grade."""

    BUSY_TIMEOUT_S = 30.0  # how long a write waits for another process's write to the same file

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # under a file, or where nothing may be made
            raise setting_path_error("judge.cache_path", e) from None
        with self.failing_as_config_error():
            self.db = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_S, check_same_thread=False)
            self._set_wal()
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS grades (key TEXT PRIMARY KEY, grade TEXT NOT NULL)")
            self.db.commit()
            # An existing cache is written to only at the first new grade: find out now that it can be.
            self.db.execute("INSERT OR REPLACE INTO grades (key, grade) VALUES ('', '')")
            self.db.rollback()

    def _set_wal(self, attempts: int = 50) -> None:
        """WAL mode, which lets processes share the file. Two processes making a new cache at once
        (parallel evals on the default path) can find it locked without SQLite's busy wait: retried."""
        for attempt in range(attempts):
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == attempts - 1:
                    raise
                time.sleep(0.1)

    @contextlib.contextmanager
    def failing_as_config_error(self):
        """An SQLite error (a file that is not SQLite, damaged, cannot be written, or kept locked by
        another process's write) as one line."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise ConfigError(f"judge cache {self.path}: {e}: another process held it for over "
                                  f"{self.BUSY_TIMEOUT_S:g} s; rerun (grades already made are kept), or give each "
                                  "job its own judge.cache_path") from None
            raise ConfigError(f"judge cache {self.path}: {e}; judge.cache_path must name an SQLite file (or a new "
                              "file) in a writable directory, or be null for no cache (a damaged one: move it "
                              "aside)") from None

    def get(self, key: str) -> Grade | None:
        with self.failing_as_config_error():
            row = self.db.execute("SELECT grade FROM grades WHERE key = ?", (key,)).fetchone()
        return None if row is None else Grade(**{**json.loads(row[0]), "cached": True})

    def put(self, key: str, grade: Grade) -> None:
        record = json.dumps({**dataclasses.asdict(grade), "cached": False})
        with self.failing_as_config_error():
            self.db.execute("INSERT OR REPLACE INTO grades (key, grade) VALUES (?, ?)", (key, record))
            self.db.commit()

    def close(self) -> None:
        self.db.close()


# How a reply becomes a grade. Bump it with any change to that reading (the tags, which part of a
# reply is read, what fails): a cache's grades read the older way are asked for again, not reused.
# Version 2 (2026-12-02): only the text after the reply's last </think>; a cut-off reply is no grade.
# Version 3 (2026-12-07): a mark between asterisks (Markdown), or out of 7, inside its tag is read.
# Version 4: the last tag counts even when it holds no mark (no grade), not an earlier one that does.
GRADE_READING = 4


def cache_key(config: JudgeConfig, prompt: str) -> str:
    """What a grade depends on: the judge and its sampling, the prompt as sent (the template with
    the item rendered in it), the scale, and how a reply is read (GRADE_READING)."""
    payload = {
        "model": config.model, "api": config.api, "prompt": prompt, "format": config.answer_format,
        "allowed": sorted(config.scores), "temperature": config.temperature,
        "max_tokens": config.max_tokens, "reasoning_effort": config.reasoning_effort, "reading": GRADE_READING,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The client


class BadReply(Exception):
    """A server answered with status 200 but not with what the API promises (a body that is
    not JSON, an HTML page, a completion without choices)."""


def reply_text(content, where: str) -> str:
    """The text of a reply's content: a string, null (""), or a list of text parts (as some
    servers send), joined; BadReply for anything else."""
    if isinstance(content, list) and all(isinstance(part, dict) and isinstance(part.get("text"), str)
                                         for part in content):
        content = "".join(part["text"] for part in content)
    if content is not None and not isinstance(content, str):
        raise BadReply(f"{where} is not text: {quoted(content)}")
    try:
        (content or "").encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" without its pair: no request or file could hold it
        raise BadReply(f"{where} holds a lone surrogate {ascii(content[e.start])[1:-1]}") from None
    return content or ""


def not_json(e: ValueError) -> BadReply:
    if isinstance(e, UnicodeDecodeError):
        return BadReply(f"the reply is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})")
    return BadReply(f"the reply is not valid JSON ({e.msg})")


async def chat_choice(client, **kwargs):
    """`client.chat.completions.create(**kwargs)`, its first choice and that choice's text;
    BadReply when the reply is not a chat completion."""
    try:
        response = await client.chat.completions.create(**kwargs)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise not_json(e) from None
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
        raise BadReply(f"the reply is not a chat completion (it has no choices[0].message): {quoted(response)}")
    return response, choices[0], reply_text(getattr(choices[0].message, "content", None),
                                            "the reply's choices[0].message.content")


async def responses_text(client, **kwargs) -> tuple[str, bool]:
    """The text of `client.responses.create(**kwargs)`, and whether the reply was cut off
    (status incomplete: out of tokens); BadReply when the reply is not a Responses API reply."""
    try:
        response = await client.responses.create(**kwargs)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise not_json(e) from None
    if not isinstance(getattr(response, "output", None), list):
        raise BadReply(f"the reply is not a Responses API reply (it has no output list): {quoted(response)}")
    try:
        text = response.output_text  # joins the output's message parts; fails on other shapes
    except (AttributeError, TypeError, KeyError):
        raise BadReply(f"the reply's output is not a list of messages: {quoted(response.output)}") from None
    return reply_text(text, "the reply's output text"), getattr(response, "status", None) == "incomplete"


def async_client(base_url: str, api_key_env: str, timeout_s: float, max_retries: int) -> openai.AsyncOpenAI:
    """An OpenAI-compatible client, its key read from $api_key_env. A server on this machine
    (127.0.0.1, localhost, ::1, 0.0.0.0: a judge or model served beside the job, the pipeline's
    stand-in) is asked directly, without the environment's proxies (HTTP(S)_PROXY, ALL_PROXY)
    and CA settings: those are for the outside world, and a cluster's proxy cannot reach this
    machine's loopback."""
    direct = openai.DefaultAsyncHttpxClient(trust_env=False) if on_this_machine(base_url) else None
    return openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "unused", timeout=timeout_s,
                              max_retries=max_retries, http_client=direct)


def on_this_machine(url: str) -> bool:
    """Whether `url`'s host is this machine: localhost (or a name under it) or a loopback or
    unspecified address (0.0.0.0, as vLLM prints its URL; ::ffff:127.0.0.1 too)."""
    host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name, not an address
        return host == "localhost" or host.endswith(".localhost")
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_loopback or address.is_unspecified


MAX_RETRY_AFTER_S = 600.0  # the longest the judge waits before its next try (a Retry-After, or its own backoff)


def retry_after_s(response) -> float | None:
    """The wait a reply's Retry-After asks for (seconds, or an HTTP date), at most
    MAX_RETRY_AFTER_S; None when it asks for none."""
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S) if math.isfinite(seconds) else None


# The client errors a judge request is retried on (a proxy's timeout, a conflict, a rate limit);
# any other 4xx means the request itself is wrong.
RETRIED_4XX = (408, 409, 429)
# A judge that refuses the key (a missing or wrong api key) stops the run: every grade would fail.
REFUSED = (401, 403)
# So does one that has no such model (a misspelt judge.model) or no such path.
NOT_FOUND = 404
# What openai's client raises on a 200 whose body is not the API's JSON (an HTML page, a list,
# a body cut short), where it parses the reply into its types.
NOT_AN_API_REPLY = (ValueError, AttributeError, TypeError)

# How long the check before grading waits for the judge's GET /models (judge.timeout_s if shorter).
REACHABLE_TIMEOUT_S = 30.0
# The reply length of the one request `Judge.check_reachable(serves_model=True)` sends (the
# Responses API takes no fewer than 16).
PROBE_TOKENS = 16
# How many of the judge's listed models a warning about judge.model names.
MODELS_NAMED = 5
# What to do when nothing answers at the judge's URL.
UNREACHABLE_ADVICE = "start it, or point judge.base_url at one that answers"


class Judge:
    """`Judge(config).grade_batch(items)` → one Grade per item, in order. `on_grade(i, grade)`,
    if given, is called as item i's grade completes (in completion order), so that a caller
    keeps each grade even when a later one stops the batch."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.template = load_judge_template(config.template)
        check_answer_format(self.template, config.template, config.answer_format)
        self.cache = GradeCache(config.cache_path) if config.cache_path else None
        self.requests_sent = 0
        # Requests answered with a 4xx that is not retried (the last one's status and message), and
        # with a completion: only the former, and a caller may stop (see evaluate.check_judge_accepts).
        self.rejected, self.last_rejection, self.completed = 0, None, 0
        self.warned_unlisted = False  # that judge.model is not among the judge's models: said once, not at every check

    def grade_batch(self, items: list[GradeItem], on_grade=None) -> list[Grade]:
        """Synchronous entry point for training and evaluation code."""
        return asyncio.run(self.grade_async(items, on_grade))

    async def grade_async(self, items: list[GradeItem], on_grade=None) -> list[Grade]:
        c = self.config
        semaphore = asyncio.Semaphore(c.concurrency)
        in_flight: dict[str, asyncio.Task] = {}  # cache key -> the one grading of that proof in this batch
        prompts = [self._prompt(item) for item in items]
        client = self._client()

        async def one(i: int, item: GradeItem) -> Grade:
            grade = await self._grade_one(client, semaphore, in_flight, *prompts[i])
            if on_grade is not None:
                on_grade(i, grade)
            return grade

        try:  # the client is closed however the batch ends, an unreachable judge included
            if any(prompt is not None and (self.cache is None or self.cache.get(cache_key(c, prompt)) is None)
                   for prompt, _ in prompts):  # a request to send: find out first that the judge answers
                await self._check_reachable(client)
            tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
            try:
                return list(await asyncio.gather(*tasks))
            except JudgeUnavailable:
                for task in tasks:
                    task.cancel()
                raise
        finally:
            await client.close()

    def check_reachable(self, serves_model: bool = False) -> None:
        """JudgeUnavailable now, with the URL, when nothing answers at the judge's endpoint (so
        that an evaluation finds out before it spends time sampling, not after). With
        `serves_model`, also send one request of a few tokens, for a caller that would otherwise
        find out hours later: JudgeUnavailable when it refuses the key or has no judge.model (which
        its model list may not show); any other failure of that request only warns."""
        async def check():
            client = self._client()
            try:
                await self._check_reachable(client)
                if serves_model:
                    await self._check_serves_model(client)
            finally:
                await client.close()

        asyncio.run(check())

    async def _check_serves_model(self, client) -> None:
        """One request as grading sends them, of a few tokens; its reply is not read (a reasoning
        judge may spend them all on its reasoning)."""
        c = self.config
        try:
            create = client.chat.completions.create if c.api == "chat" else client.responses.create
            await asyncio.wait_for(create(**self._request_args("Reply with OK.", PROBE_TOKENS)),
                                   min(c.timeout_s, REACHABLE_TIMEOUT_S))
        except openai.APIStatusError as e:
            if e.status_code in REFUSED:
                raise self._refused(e) from None
            if e.status_code == NOT_FOUND:
                raise self._not_found(e) from None
            log.warning("the judge at %s answered a test request with HTTP %d (%s); grading may fail the same way",
                        c.base_url, e.status_code, quoted(e.message))
        except (openai.APIConnectionError, asyncio.TimeoutError, *NOT_AN_API_REPLY) as e:
            log.warning("the judge at %s did not answer a test request (%s); going on", c.base_url, first_line(e))

    def _client(self) -> openai.AsyncOpenAI:
        c = self.config
        return async_client(c.base_url, c.api_key_env, c.timeout_s, max_retries=0)

    async def _check_reachable(self, client) -> None:
        """Fail fast, with the URL, when nothing answers at the endpoint at all."""
        timeout = min(self.config.timeout_s, REACHABLE_TIMEOUT_S)
        try:
            listed = await client.models.list(timeout=timeout)
        except openai.APIStatusError as e:  # something answered; some servers do not serve /models
            if e.status_code in REFUSED:
                raise self._refused(e) from None
        except openai.APITimeoutError:
            raise JudgeUnavailable(f"the judge at {self.config.base_url} did not answer GET /models within "
                                   f"{timeout:g} s (judge.timeout_s, at most {REACHABLE_TIMEOUT_S:g} s for this "
                                   "check): is it still starting, or overloaded?") from None
        except openai.APIConnectionError as e:
            raise self._unreachable(e) from None
        except NOT_AN_API_REPLY:
            raise JudgeUnavailable(f"the judge at {self.config.base_url} answered GET /models with something that "
                                   "is not an OpenAI-compatible API's reply (a web page, a login proxy?): is "
                                   "judge.base_url the API's root, e.g. http://localhost:8000/v1?") from None
        else:
            self._check_model_listed(getattr(listed, "data", None))

    def _check_model_listed(self, listed) -> None:
        """Warn, before anything is sampled, when the judge lists its models and judge.model is not
        one of them: a misspelt name stops the run at its first grade (HTTP 404). Only a warning,
        as some servers take names they do not list (Azure's deployments, Ollama's untagged names)."""
        c = self.config
        # A reply without the API's list (`{}`, `"data": null`) still answered: nothing to compare with.
        served = [m.id for m in listed if isinstance(getattr(m, "id", None), str)] if isinstance(listed, list) else []
        if served and c.model not in served and not self.warned_unlisted:
            self.warned_unlisted = True
            names = ", ".join(map(repr, served[:MODELS_NAMED])) + (
                f" and {len(served) - MODELS_NAMED} more" if len(served) > MODELS_NAMED else "")
            log.warning("judge.model %r is not among the models the judge at %s lists (%s): if grading stops with "
                        "HTTP 404, set judge.model to one of them", c.model, c.base_url, names)

    async def _answers(self, client) -> bool:
        """Whether anything still answers at the judge's endpoint (GET /models), after a request's
        reply broke off: any status or body is an answer."""
        try:
            await client.models.list(timeout=min(self.config.timeout_s, REACHABLE_TIMEOUT_S))
        except openai.APIConnectionError:  # timeouts too
            return False
        except (openai.APIStatusError, *NOT_AN_API_REPLY):
            pass
        return True

    def _unreachable(self, e: openai.APIConnectionError) -> JudgeUnavailable:
        return JudgeUnavailable(f"cannot reach the judge at {self.config.base_url}: {first_line(e.__cause__ or e)}; "
                                f"{UNREACHABLE_ADVICE}")

    def _not_found(self, e: openai.APIStatusError) -> JudgeUnavailable:
        c = self.config
        return JudgeUnavailable(f"the judge at {c.base_url} answered HTTP 404 ({quoted(e.message)}) for judge.model "
                                f"{c.model!r}: check judge.model, judge.base_url and judge.api")

    def _refused(self, e: openai.APIStatusError) -> JudgeUnavailable:
        c = self.config
        return JudgeUnavailable(f"the judge at {c.base_url} refused the request (HTTP {e.status_code}: "
                                f"{quoted(e.message)}); check its key (read from ${c.api_key_env}, "
                                "judge.api_key_env names the variable)")

    def _prompt(self, item: GradeItem) -> tuple[str | None, str | None]:
        """(the prompt that grades `item`, None), or (None, why it scores 0 unsent)."""
        c = self.config
        if (item.completion is None) == (item.proof is None):
            raise ValueError("a GradeItem needs exactly one of completion and proof")
        proof, unsent = ((given_proof(item.proof, c.strip_self_evaluation), None) if item.proof is not None
                         else text_to_grade(item.completion, c))
        if unsent or not proof:
            return None, unsent or "empty_proof"
        return render_prompt(self.template, item, proof), None

    async def _grade_one(self, client, semaphore, in_flight: dict[str, asyncio.Task], prompt: str | None,
                         unsent: str | None) -> Grade:
        if prompt is None:
            return Grade(score=0, reward=0.0, reason=unsent)
        key = cache_key(self.config, prompt)
        # A small policy often writes the same proof several times for one problem: every copy
        # waits for one grading, so the judge sees it once. Each copy gets its own Grade object.
        if key not in in_flight:
            in_flight[key] = asyncio.ensure_future(self._grade_prompt(client, semaphore, key, prompt))
        return dataclasses.replace(await in_flight[key])

    async def _grade_prompt(self, client, semaphore, key: str, prompt: str) -> Grade:
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        async with semaphore:
            grade = await self._request(client, prompt)
        if self.cache is not None and not grade.failed:
            self.cache.put(key, grade)
        return grade

    async def _request(self, client, prompt: str) -> Grade:
        c = self.config
        start = time.monotonic()
        attempts, transport_failures, parse_failures = 0, 0, 0
        reply, reason = None, "parse_failure"
        while True:
            attempts += 1
            self.requests_sent += 1
            retry_after = None
            try:
                # timeout_s bounds the whole request; the client's own timeout bounds each read.
                reply, cut_off = await asyncio.wait_for(self._send(client, prompt), c.timeout_s)
            except (openai.APITimeoutError, asyncio.TimeoutError):
                reason, reply = "timeout", None  # raw: the last attempt's reply or error, never an earlier one's
            except openai.APIConnectionError as e:
                # A reply that broke off (a reset, a body cut short) fails its item; a judge that
                # no longer answers at all stops the run.
                if transport_failures >= c.max_retries and not await self._answers(client):
                    raise self._unreachable(e) from None
                reason, reply = "connection_error", quoted(first_line(e), 500)
            except openai.APIStatusError as e:
                if e.status_code in REFUSED:  # no request of this run will get through
                    raise self._refused(e) from None
                if e.status_code == NOT_FOUND:
                    raise self._not_found(e) from None
                reason, retry_after, reply = f"http_{e.status_code}", retry_after_s(e.response), str(e.message)[:500]
                if e.status_code < 500 and e.status_code not in RETRIED_4XX:  # the request itself is wrong
                    self.rejected += 1
                    self.last_rejection = f"HTTP {e.status_code}: {quoted(e.message)}"
                    return Grade(None, 0.0, reason, raw=reply, latency_s=time.monotonic() - start, attempts=attempts)
            except BadReply as e:  # a proxy's error page, a server half-up: retried like a 5xx
                reason, reply = "bad_reply", str(e)
            else:
                self.completed += 1
                if cut_off:  # it ran out of judge.max_tokens: a score tag in it may be one it quoted
                    reason = "cut_off"
                elif (score := parse_score(reply, c.answer_format, c.scores)) is not None:
                    return Grade(score, score / MAX_SCORE, "ok", raw=reply,
                                 latency_s=time.monotonic() - start, attempts=attempts)
                else:  # a score tag with a value off the scale (8, or 3 where only 0, 1, 6, 7 are allowed)?
                    tagged = tagged_score(reply, c.answer_format) is not None
                    reason = "score_not_allowed" if tagged else "parse_failure"
                parse_failures += 1
                if parse_failures > c.parse_retries:
                    break
                continue
            transport_failures += 1
            if transport_failures > c.max_retries:
                break
            delay = min(retry_after * random.uniform(1.0, 1.2) if retry_after is not None  # as it asks, or
                        else c.backoff_s * 2 ** (transport_failures - 1) * random.uniform(0.5, 1.5), MAX_RETRY_AFTER_S)
            log.debug("judge request failed (%s); retrying in %.2fs", reason, delay)
            await asyncio.sleep(delay)
        return Grade(None, 0.0, reason, raw=reply, latency_s=time.monotonic() - start, attempts=attempts)

    async def _send(self, client, prompt: str) -> tuple[str, bool]:
        """The judge's reply to `prompt`, and whether it was cut off (it ran out of max_tokens)."""
        if self.config.api == "chat":
            _, choice, text = await chat_choice(client, **self._request_args(prompt, self.config.max_tokens))
            return text, choice.finish_reason == "length"
        return await responses_text(client, **self._request_args(prompt, self.config.max_tokens))

    def _request_args(self, prompt: str, max_tokens: int) -> dict:
        """The arguments of a request of judge.api for `prompt`, replies up to `max_tokens` long."""
        c = self.config
        if c.api == "chat":
            kwargs = dict(model=c.model, messages=[{"role": "user", "content": prompt}], temperature=c.temperature,
                          max_tokens=max_tokens)
            if c.reasoning_effort:
                kwargs["reasoning_effort"] = c.reasoning_effort
            return kwargs
        kwargs = dict(model=c.model, input=prompt, temperature=c.temperature, max_output_tokens=max_tokens)
        if c.reasoning_effort:
            kwargs["reasoning"] = {"effort": c.reasoning_effort}
        return kwargs

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


# --------------------------------------------------------------------------------------------
# Rule-based graders: deterministic stand-ins for the judge on toy tasks (tests, CPU configs)


def _closes_thinking(proof: str) -> int:
    """Full marks for ending the reasoning and writing any answer at all."""
    return MAX_SCORE if proof.strip() else 0


RULES = {"closes_thinking": _closes_thinking}


class RuleGrader:
    """Same interface as Judge; scores the extracted proof with a named rule, sends nothing."""

    def __init__(self, rule: str, strip_self_evaluation: bool = False):
        if rule not in RULES:
            raise ConfigError(f"unknown grading rule {rule!r}; choose one of: {', '.join(RULES)}")
        self.rule, self.strip = RULES[rule], strip_self_evaluation

    def grade_batch(self, items: list[GradeItem], on_grade=None) -> list[Grade]:
        grades = []
        for i, item in enumerate(items):
            proof = (given_proof(item.proof, self.strip) if item.proof is not None
                     else extract_proof(item.completion, self.strip))
            if proof is None:
                grade = Grade(score=0, reward=0.0, reason="no_think_end")
            else:
                score = self.rule(proof)
                grade = Grade(score=score, reward=score / MAX_SCORE, reason="ok")
            grades.append(grade)
            if on_grade is not None:
                on_grade(i, grade)
        return grades

    def close(self) -> None:
        pass
