"""Data: SFT rows → tokens with assistant-only loss masks → Grain pipeline (shuffle, shard by
process, first-fit packing, batching, prefetch). Also the row readers shared by RL and eval.

Rows come from a local JSONL / JSON array / Parquet file or a hub dataset name. Bad rows are
skipped and counted, with the first few row numbers logged: never a crash mid-epoch, never
silent.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import grain
import numpy as np

from qed_jax.config import (ConfigError, check_seed, hashed_seed, is_missing_local_path, require_at_least_one,
                            require_file, require_range)
from qed_jax.errors import first_line, json_error
from qed_jax.tokenizer import render_chat, stop_ids, token_id

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = "configs/data/tiny_proofs.jsonl"  # .jsonl / .parquet file, or a hub dataset name
    name: str | None = None  # hub dataset config (e.g. FineProofs-SFT "default" or "all")
    split: str = "train"
    max_length: int = 512  # length of a packed row
    overflow: str = "drop"  # rows longer than max_length: drop | truncate
    eval_rows: int = 0  # rows held out (from the end, before shuffling) for the eval loss
    seed: int = 0
    packing_bins: int = 16
    prefetch: int = 2

    def __post_init__(self):
        check_seed(self.seed, "data.seed")
        if self.overflow not in ("drop", "truncate"):
            raise ConfigError(f"data.overflow must be drop or truncate, got {self.overflow!r}")
        require_at_least_one(self, ("max_length", "packing_bins"), "data.")
        require_range(self.eval_rows, "data.eval_rows", 0)
        require_range(self.prefetch, "data.prefetch", 0)


# --------------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: str, name: str | None = None, split: str = "train", key: str = "data file"
              ) -> list[tuple[str, Any]]:
    """(where, row) for every row of a local .jsonl / .json / .parquet file or a hub dataset
    (`datasets.load_dataset`): where is "line N" for JSON lines (its line in the file, blank
    lines counted), else "row N". A .json file may hold JSON lines or one array of rows. A JSONL
    line that is not JSON, or not UTF-8, stands as a BadRow. `name` and `split` choose within
    a Hub dataset: a local file is read whole (with a warning when they ask for something else).
    `key` names the path in its errors (e.g. the config key that gave it)."""
    local = Path(path)
    suffix = local.suffix.lower()  # D.JSONL too
    if suffix in (".jsonl", ".json", ".parquet") and (name is not None or split != "train"):
        log.warning("%s is a local file, read whole: the dataset name %r and split %r apply to Hub datasets only",
                    path, name, split)
    if suffix in (".jsonl", ".json"):
        require_file(local, key)
        with open(local, "rb") as f:
            if is_json_array(local, f):
                return _json_array_rows(path, f.read(), key)
            rows = _json_lines_rows(f)
        if suffix == ".json":
            refuse_one_object(local, rows, key)
        return rows
    if local.is_file() and suffix != ".parquet":
        kind = f"cannot read '{local.suffix}' files" if local.suffix else "its name has no suffix to tell its format by"
        raise ConfigError(f"{key} {path}: {kind}; use JSON lines (.jsonl or .json), a JSON array (.json) or "
                          "Parquet (.parquet), named so")
    if (suffix == ".parquet" and not local.is_dir()) or is_missing_local_path(path):
        require_file(local, key)
    if suffix == ".parquet":  # a file, or the folder of one partitioned table (pandas' and Spark's)
        import pyarrow
        import pyarrow.parquet

        try:
            return _numbered(pyarrow.parquet.read_table(local).to_pylist())
        except (pyarrow.ArrowException, OSError) as e:
            raise ConfigError(f"{key} {path}: not a readable Parquet file ({first_line(e)})") from None
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        return _numbered(datasets.load_dataset(path, name, split=split))
    # Offline, no such dataset, config or split (OSError, ValueError); files it cannot build a
    # table from (DatasetsError: a line that is not JSON, files whose columns differ); a folder
    # of empty files (StopIteration).
    except (ConnectionError, OSError, ValueError, DatasetsError, StopIteration) as e:
        if isinstance(e, StopIteration):
            cause = "its files hold no rows"
        elif isinstance(e, DatasetsError) and e.__cause__ is not None:  # "An error occurred ...": why is the cause
            cause = f"{first_line(e)}: {first_line(e.__cause__)}"
        else:
            cause = first_line(e)
        if local.is_dir():
            folder = "data folder" if key == "data file" else f"{key} (a folder)"
            # The split only where it was chosen or is the trouble (a folder of test.jsonl alone).
            chosen = f" (split {split!r})" if split != "train" or "split" in cause.lower() else ""
            # A file it could not build a table from: datasets names neither it nor its line right.
            if isinstance(e, DatasetsError) and (bad := first_bad_line(local)):
                raise ConfigError(f"{folder} {path}{chosen}: {bad}, so its files do not read as one Hugging Face "
                                  "dataset; fix or delete that line") from None
            columns = "; its files must share their columns" if "cast" in cause.lower() else ""
            raise ConfigError(f"{folder} {path}{chosen}: read as one Hugging Face dataset of its data "
                              f"files, which failed ({cause}){columns}; or give one .jsonl/.json/.parquet file "
                              "instead") from None
        what = "data" if key == "data file" else key
        raise ConfigError(f"{what} {path!r} (name {name!r}, split {split!r}): not a local .jsonl/.json/.parquet file, "
                          f"and loading it as a Hugging Face dataset failed: {cause}") from None


def is_json_array(path: Path, f) -> bool:
    """Whether the file `f` (opened "rb" from `path`) is a .json file holding one array of rows,
    not JSON lines; `f` is left at its start."""
    array = path.suffix.lower() == ".json" and f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")
    f.seek(0)
    return array


def holds_rows(row: Any) -> bool:
    """Whether `row` looks like an export's wrapper of rows ({"data": [rows]}), not a row itself."""
    return isinstance(row, dict) and not {"messages", "problem"} & set(row) and any(
        isinstance(value, list) and value and all(isinstance(item, dict) for item in value) for value in row.values())


def refuse_one_object(path: Path, rows: list[tuple[str, Any]], key: str) -> None:
    """A .json file read as JSON lines (`rows`) whose first line is no row may be one JSON object
    over several lines (an export's {"data": [rows]}): every line would be skipped as malformed.
    On one line (`holds_rows`), it would be one malformed row."""
    if not rows or not (isinstance(rows[0][1], BadRow) or (len(rows) == 1 and holds_rows(rows[0][1]))):
        return
    try:
        whole = json.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8))
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(whole, dict):
        lists = [name for name, value in whole.items() if isinstance(value, list)]
        hint = f", e.g. the list under {lists[0]!r}" if lists else ""
        raise ConfigError(f"{key} {path}: holds one JSON object (keys {', '.join(map(repr, list(whole)[:5]))}), not "
                          f"rows: give JSON lines (one row per line) or one JSON array of rows{hint}")


def first_bad_line(folder: Path) -> str | None:
    """"FILE:N: why" for the first line that does not read in the JSON-lines files of a data
    folder (hidden files left out, as datasets leaves them), or None."""
    for file in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in file.relative_to(folder).parts)
        if hidden or file.suffix.lower() not in (".jsonl", ".json") or not file.is_file():
            continue
        with open(file, "rb") as f:
            if is_json_array(file, f):
                continue  # its parse error is datasets' to tell
            bad = next(((n, row) for n, row in json_lines(f) if isinstance(row, BadRow)), None)
        if bad is not None:
            return f"{file}:{bad[0]}: {bad[1].reason}"
    return None


def _numbered(rows) -> list[tuple[str, Any]]:
    return [(f"row {n}", row) for n, row in enumerate(rows, 1)]


def json_lines(lines) -> list[tuple[int, Any]]:
    """(line number, row) for each non-blank line of JSON lines (an iterable of bytes, e.g. a
    file opened "rb"); a line that is not JSON, or not UTF-8, gives a BadRow."""
    rows = []
    for n, raw in enumerate(lines, 1):
        raw = raw.rstrip(b"\r\n")  # a string cut off at the line's end is "unterminated", not "a control character"
        if n == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark may open the file
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((n, BadRow(f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((n, _whole_text(row) if SURROGATE_ESCAPE.search(line) else row))
        except json.JSONDecodeError as e:
            rows.append((n, BadRow(f"not valid JSON ({json_error(e)})")))
    return rows


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate gets into JSON text


def _whole_text(row: Any) -> Any:
    """`row`, or a BadRow when one of its strings holds a lone surrogate: JSON lets an escape
    such as \\ud800 stand without its pair, but no tokenizer or HTTP client takes it."""
    def lone_surrogate(value, where: str | None) -> str | None:  # where: None for the row itself
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return (f"{where or 'the row'} holds a lone surrogate {ascii(value[e.start])[1:-1]} (half of an "
                        "escaped UTF-16 pair)")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        return next(filter(None, (lone_surrogate(item, f"{where}[{key!r}]" if where else f"field {key!r}")
                                  for key, item in items)), None)

    found = lone_surrogate(row, None)
    return BadRow(f"not valid text: {found}") if found else row


def _json_lines_rows(lines) -> list[tuple[str, Any]]:
    return [(f"line {n}", row) for n, row in json_lines(lines)]


def _json_array_rows(path: str, data: bytes, key: str) -> list[tuple[str, Any]]:
    """The rows of a .json file that opens with '[': one JSON array, whose one bad byte spoils
    the whole file (so an error naming where, not a skipped row), or JSON lines whose first row
    happens to be an array."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
        rows = json.loads(text)
        return _numbered(map(_whole_text, rows) if SURROGATE_ESCAPE.search(text) and isinstance(rows, list) else rows)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{key} {path}: line {line} is not UTF-8 text (byte {data[e.start]:#04x})") from None
    except json.JSONDecodeError as e:
        # A whole value on the first line, then more lines. Not a whole array over several lines
        # followed by more (two arrays appended, a stray ']'): read as lines, all but a few would
        # be skipped as malformed.
        if e.msg == "Extra data" and "\n" not in text[:e.pos].strip():
            return _json_lines_rows(data.split(b"\n"))
        raise ConfigError(f"{key} {path}: not a valid JSON array ({json_error(e, line=True)}); "
                          "a .json file that opens with '[' is read as one array of rows") from None


class BadRow(dict):
    """Stands in for an unparsable line (its `reason`: "not valid JSON (...)"), to be skipped
    or refused by what reads the rows."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


# --------------------------------------------------------------------------------------------
# SFT rows → chat messages → tokens + loss mask


def sft_messages(row: Any) -> list[dict]:
    """Chat messages of an SFT row: its `messages`, or problem + reasoning_content + proof.
    Raises ValueError naming what is wrong."""
    if isinstance(row, BadRow):
        raise ValueError(row.reason)
    if not isinstance(row, dict):
        raise ValueError("row is not a mapping")
    if row.get("messages"):
        messages = row["messages"]
        if not isinstance(messages, list):
            raise ValueError("field 'messages' is not a list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] is of type {type(m).__name__}, not a mapping with a role and content")
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}] has unknown role {m.get('role')!r}")
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                parts = "; a list of parts is not read" if isinstance(content, list) else ""
                raise ValueError(f"messages[{i}] has content that is not text ({type(content).__name__}{parts}): give "
                                 "the text as one string")
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):  # Qwen3's template writes it as none
                raise ValueError(f"messages[{i}] has reasoning_content that is not text ({type(reasoning).__name__}): "
                                 "give the thinking as one string")
            # An empty system prompt is common in exported chats and says nothing wrong about the row;
            # it is rendered as the chat template writes it. An empty user or assistant turn is.
            if m["role"] != "system" and (not content or not content.strip()):
                raise ValueError(f"messages[{i}] has empty content")
            # Its reply is what follows its thinking: a turn that ends with </think> has none.
            if m["role"] == "assistant" and not content.rpartition("</think>")[2].strip():
                raise ValueError(f"messages[{i}] has no reply after its </think> (its content is thinking alone)")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message is not the assistant's")
        # Its prompt: Qwen3's template also writes a reply's thinking only after the last user turn.
        if not any(m["role"] == "user" for m in messages[:-1]):
            raise ValueError("no user message before the assistant's: the reply has no problem it answers")
        return messages
    for field in ("problem", "reasoning_content", "proof"):
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"field {field!r} is of type {type(value).__name__}, not text")
        if not value or not value.strip():
            raise ValueError(f"field {field!r} is missing or empty (and there are no messages)")
    return [{"role": "user", "content": row["problem"]},
            {"role": "assistant", "content": row["proof"], "reasoning_content": row["reasoning_content"]}]


def tokenize_sft(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask (1 = a token the model learns to write) of a conversation.
    The mask covers the final assistant turn after its generation prefix, up to and including
    its <|im_end|>. Prefix and answer are tokenized apart, as the model sees them at inference."""
    prefix = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full = render_chat(tokenizer, messages)
    if not full.startswith(prefix):
        raise ValueError(unrendered_prompt(prefix, full))
    answer = full[len(prefix):]
    opened = prefix.rstrip().endswith("<think>")  # the generation prompt opened the thinking block
    if opened and answer.lstrip().startswith("</think>"):
        raise ValueError(NO_REASONING)  # a template that writes an empty <think></think> (Qwen3-Thinking-2507's)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if end not in answer_ids:
        raise ValueError("the rendered answer has no <|im_end|>")
    stop = len(answer_ids) - answer_ids[::-1].index(end)  # through the last <|im_end|>
    chat_ids = {*stop_ids(tokenizer), token_id(tokenizer, "<|im_start|>")} - {None}  # not an unknown word's id
    if chat_ids.intersection(answer_ids[:stop - 1]):
        raise ValueError("the answer's text holds <|im_end|>, <|endoftext|> or <|im_start|>, which tokenize as the "
                         "chat's own tokens: trained, the model would learn to end its turn there")
    reasoning = messages[-1].get("reasoning_content")
    if isinstance(reasoning, str) and reasoning.strip() and reasoning.strip() not in answer:
        raise ValueError("the chat template does not write the assistant message's reasoning_content, so its thinking "
                         "would not be trained: use a tokenizer whose chat template thinks (Qwen3's), or give the rows "
                         "as messages without reasoning_content to train the answer alone")
    # The answer holds one thinking block: one </think>, and a <think> unless the generation prompt
    # opened it (written by the template from reasoning_content, or in the content itself).
    trained = answer_ids[:stop]
    for token, own in (("<think>", 0 if opened else 1), ("</think>", 1)):
        found = token_id(tokenizer, token)
        if found is not None and trained.count(found) > own:
            raise ValueError(f"the answer's text holds {token} beyond its thinking block's, which tokenizes as the "
                             "thinking block's token: trained, the model would learn to open or close its thinking "
                             "there")
    reply = answer[:answer.rfind("<|im_end|>")]
    if (opened or "<think>" in reply) and "</think>" not in reply:
        raise ValueError("the answer opens its thinking and never closes it (no </think>, e.g. a reply cut off "
                         "while thinking): trained, the model would learn to end its turn inside its thinking, with "
                         "no proof")
    ids = np.asarray(prompt_ids + answer_ids, np.int32)
    mask = np.zeros(len(ids), np.int32)
    mask[len(prompt_ids): len(prompt_ids) + stop] = 1
    return ids, mask


NO_REASONING = ("the chat template opens the answer with <think>, and the assistant message has no reasoning: give it "
                "reasoning_content (its thinking), or use a tokenizer whose chat template does not think")


def unrendered_prompt(prompt: str, full: str) -> str:
    """Why a conversation, rendered whole, does not start with its prompt (the conversation
    before the answer, with the generation prompt) as the chat template renders it."""
    same = len(os.path.commonprefix([prompt, full]))
    missing = prompt[same:]
    if "<think>" in missing:  # a thinking template: the answer must open with its reasoning
        return NO_REASONING
    return (f"the chat template renders the conversation's prompt as {missing[:40]!r}... where the whole "
            f"conversation has {full[same:same + 40]!r}...: it does not render it as prompt + answer")


NAMED_ROWS = 5  # of the rows a run leaves out, how many of each kind its log names (the rest it counts)


def warn_left_out(source: str, verb: str, named: list[tuple[str, str]], total: int) -> None:
    """Warn of each row left out in `named` ((where, why) pairs, the first NAMED_ROWS of `total`),
    and of how many more there were."""
    for where, why in named:
        log.warning("%s: %s %s: %s", source, verb, where, why)
    if total > len(named):
        log.warning("%s: %d more rows %s (the first %d are named above)", source, total - len(named), verb, len(named))


@dataclasses.dataclass
class PrepareStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_long: int = 0
    no_room: int = 0  # under overflow=truncate, the prompt alone fills max_length: no answer token left to train
    skipped: Counter = dataclasses.field(default_factory=Counter)  # reason → count
    first_skipped: list = dataclasses.field(default_factory=list)  # (where: "line N", reason)
    first_dropped: list = dataclasses.field(default_factory=list)  # (where, why): rows dropped for their length

    def skip(self, where: str, reason: str, kind: str | None = None) -> None:
        """Count a skipped row under `kind` (default: its reason); the first NAMED_ROWS are named."""
        self.skipped[kind or reason] += 1
        if len(self.first_skipped) < NAMED_ROWS:
            self.first_skipped.append((where, reason))

    def drop(self, where: str, why: str) -> None:
        """Name one of the first NAMED_ROWS rows dropped for their length (counted by the caller)."""
        if len(self.first_dropped) < NAMED_ROWS:
            self.first_dropped.append((where, why))

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.rows} rows kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.dropped_long:
            parts.append(f"{self.dropped_long} dropped as too long")
        if self.no_room:
            parts.append(f"{self.no_room} dropped: the prompt alone fills data.max_length, so raise it")
        if self.skipped:
            parts.append(f"{sum(self.skipped.values())} malformed skipped")
        return ", ".join(parts)


def prepare_sft(rows: list[tuple[str, Any]], tokenizer, config: DataConfig,
                source: str = "data") -> tuple[list[dict], PrepareStats]:
    """Tokenize every row of `rows` ((where, row) pairs, as `read_rows` gives them); skip
    malformed ones and handle long ones, counting both. Skipped rows are reported by where."""
    stats = PrepareStats(rows=len(rows))
    examples = []
    for where, row in rows:
        try:
            ids, mask = tokenize_sft(tokenizer, sft_messages(row))
        except ConfigError:  # not the row's fault (a tokenizer with no chat template)
            raise
        except ValueError as e:
            stats.skip(where, str(e), "unreadable line" if isinstance(row, BadRow) else None)
            continue
        if len(ids) > config.max_length:
            if config.overflow == "drop":
                stats.dropped_long += 1
                stats.drop(where, f"{len(ids)} tokens, over data.max_length {config.max_length}")
                continue
            ids, mask = ids[: config.max_length], mask[: config.max_length]
            if mask.sum() == 0:
                stats.no_room += 1
                stats.drop(where, f"its prompt alone fills data.max_length {config.max_length}")
                continue
            stats.truncated += 1
        examples.append({"tokens": ids, "loss_mask": mask})
    stats.kept = len(examples)
    warn_left_out(source, "skipped", stats.first_skipped, sum(stats.skipped.values()))
    warn_left_out(source, "dropped", stats.first_dropped, stats.dropped_long + stats.no_room)
    log.info("%s: %s", source, stats.summary())
    if not examples:
        advice = ""
        if stats.skipped:  # what the commonest fault of the rows is, to fix
            reason, count = stats.skipped.most_common(1)[0]
            advice = f"; {count} of them: {reason}"
        if stats.dropped_long:
            advice += "; raise data.max_length, or set data.overflow=truncate"
        raise ConfigError(f"{source}: no usable rows ({stats.summary()}){advice}")
    return examples, stats


# --------------------------------------------------------------------------------------------
# The Grain pipeline


def _packed_rows(examples: list[dict], config: DataConfig, epochs: int | None, process_index: int,
                 process_count: int) -> grain.IterDataset:
    """This process's share of `examples`, shuffled anew each pass, `epochs` passes of it (None:
    forever), first-fit packed into rows of config.max_length. Packing fills several bins at once
    across pass boundaries: over all passes each example comes `epochs` times, but a pass may end
    before some of its examples came, while some of the next pass's already did."""
    seed = order_seed(config.seed)
    ordered = grain.MapDataset.source(examples)[process_index::process_count].shuffle(seed=seed).repeat(epochs)
    return grain.experimental.FirstFitPackIterDataset(
        ordered.to_iter_dataset(), length_struct={field: config.max_length for field in examples[0]},
        num_packing_bins=config.packing_bins, seed=seed)


def packed_batches(examples: list[dict], config: DataConfig, batch_size: int, epochs: int | None,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches [batch_size, max_length] of packed rows with fields tokens, loss_mask, segment_ids
    (0 = padding) and positions (restarting in each segment). Each process reads its own shard,
    `epochs` times (None: forever); the last rows that fill no whole batch are left out."""
    packed = _packed_rows(examples, config, epochs, process_index, process_count).map(_rename_packing_fields)
    batched = packed.batch(batch_size, drop_remainder=True)
    return grain.experimental.ThreadPrefetchIterDataset(batched, prefetch_buffer_size=config.prefetch)


def count_batches(examples: list[dict], config: DataConfig, batch_size: int, epochs: int,
                  process_count: int = 1) -> tuple[int, int]:
    """(whole batches, packed rows left out) of `epochs` passes over the examples, as
    `packed_batches` gives them: the fewest batches any process's share fills (every process
    takes as many steps), and the rows of all processes beyond that many batches."""
    lengths = [{"tokens": np.zeros(len(e["tokens"]), np.int8)} for e in examples]  # packed as the tokens are
    rows = [sum(1 for _ in _packed_rows(lengths, config, epochs, p, process_count)) for p in range(process_count)]
    batches = min(rows) // batch_size
    return batches, sum(rows) - batches * batch_size * process_count


# The version of how the trainers order their data and draw their samples (the shuffle and
# packing seeds, GRPO's rollout keys). Bump it with any change to them: each checkpoint records
# it, and a resume across a change is refused (a checkpoint's data position counts into the order
# it was written under). Version 2: seeds hashed from data.seed (`order_seed`), 2026-12-01.
DATA_ORDER = 2
# SFT sized by `epochs` reads a finite stream of that many passes and counts its steps from it
# (2026-12-02; it repeated forever and took one pass's packed rows times epochs, so some examples
# came twice and some never). Its runs record this order instead: one begun before is not resumed
# in the new one in silence, and runs whose stream did not change (GRPO, SFT sized by steps) go on.
EPOCHS_ORDER = f"{DATA_ORDER}, epochs counted"


def order_seed(data_seed: int) -> int:
    """The seed of a trainer's data order (Grain's shuffle and its packing bins), hashed from
    data.seed: Grain reshuffles epoch e with its seed + e, so data.seed 1 would otherwise give
    data.seed 0's order one epoch early."""
    return hashed_seed("data order", data_seed)


def pack_sequences(sequences: list[dict], length: int) -> dict:
    """First-fit pack sequences (dicts of equal-length 1-D arrays, each at most `length` long)
    into rows [R, length], with the same Grain packing as SFT. Adds segment_ids (1, 2, ... per
    row; 0 = padding) and positions restarting at 0 in each segment. Deterministic: no bin
    shuffling, one bin per sequence, so nothing is emitted before every sequence has a place."""
    too_long = [i for i, seq in enumerate(sequences) if len(seq["tokens"]) > length]
    if too_long:
        raise ValueError(f"sequence {too_long[0]} has {len(sequences[too_long[0]]['tokens'])} tokens, "
                         f"more than the row length {length}")
    fields = list(sequences[0])
    packed = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(sequences).to_iter_dataset(), length_struct={k: length for k in fields},
        num_packing_bins=max(len(sequences), 1), shuffle_bins=False)
    rows = list(packed)
    out = {k: np.stack([row[k] for row in rows]) for k in fields}
    out["segment_ids"] = np.stack([row["tokens_segment_ids"] for row in rows])
    out["positions"] = np.stack([row["tokens_positions"] for row in rows])
    return out


def _rename_packing_fields(row: dict) -> dict:
    return {"tokens": row["tokens"], "loss_mask": row["loss_mask"],
            "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}
