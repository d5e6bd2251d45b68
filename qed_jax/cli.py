"""The `qed-jax` command. Thin: parse arguments, call the library, report errors in one line."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import json
import logging
import os
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path

from qed_jax.errors import (CheckpointError, ConfigError, JudgeUnavailable, StorageUnreachable, TrainingDiverged,
                            first_line, lost_process, os_error_line, out_of_device_memory, renamed)


def _check_destination(source: str, dest: str, overwrite: bool) -> bool:
    """Refuse a destination that holds or lies inside the source, and one that
    already holds something unless `overwrite` and it holds an earlier model (a Hugging Face
    folder or a qed-jax checkpoint: nothing else is ever deleted). True when there is an old
    model to replace: `_clear` empties it only once the source has loaded."""
    from etils import epath

    from qed_jax import checkpoint, rundir

    def real(path: str):  # symbolic links followed (epath's resolve does not)
        return epath.Path(path) if "://" in path else epath.Path(os.path.realpath(path))

    where, source_at = real(dest), real(source)
    if epath.Path(source).exists():  # not a Hub id
        if where == source_at:
            raise ConfigError(f"{dest}: the destination is the source itself; choose another folder")
        if where in source_at.parents or source_at in where.parents:
            raise ConfigError(f"{dest}: the destination would hold or lie inside the source {source}; "
                              "choose a folder apart from it")
    if where.name == "hf" and rundir.trainer_run(where.parent):  # even empty: a trainer's export cut off part-way
        raise ConfigError(f"{dest} is the export of the training run in {where.parent}, which its trainer makes from "
                          "its last checkpoint and the stages after it load, so convert leaves it alone; choose "
                          "another destination")
    if not where.exists() or not any(where.iterdir()):
        return False
    entries = list(where.iterdir())
    # A Hugging Face export cut off before its config.json (written last) still counts.
    holds_hf = any(p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json" for p in entries)
    if not (holds_hf or checkpoint.is_checkpoint_dir(where)):
        names = sorted((p.name for p in entries), key=lambda name: (name.startswith("."), name))  # hidden last
        example = ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
        raise ConfigError(f"{dest} holds {example} and no model (neither a Hugging Face folder nor a qed-jax "
                          "checkpoint), so --overwrite leaves it alone; empty it yourself or choose another "
                          "destination")
    trained = checkpoint.training_steps(where)
    if trained:
        raise ConfigError(f"{dest} holds a training run's checkpoints (step {trained[0]} has optimizer state), so "
                          "--overwrite leaves it alone; choose another destination")
    # A model's folders are a checkpoint's steps (and a save cut off), and a download's .cache
    # (`hf download --local-dir`); any other (a run kept beside the model, a .git) is not the
    # model's to delete.
    others = sorted(p.name for p in entries if p.is_dir() and p.name != ".cache"
                    and not p.name.split(".orbax-checkpoint-tmp")[0].isdigit())
    if others:
        raise ConfigError(f"{dest} holds the folder {others[0]}, which is no part of a model, so --overwrite leaves "
                          "it alone; move it out, or choose another destination")
    # Only now, for a folder that --overwrite would replace: the refusals above are its exceptions.
    if not overwrite:
        raise ConfigError(f"{dest} already exists and is not empty; pass --overwrite to replace it "
                          "(its contents are deleted once the source has loaded), or choose another destination")
    return True


def _clear(dest: str) -> None:
    """Delete what the folder `dest` (or the folder its link names) holds, keeping the folder."""
    from etils import epath

    local = "://" not in dest
    for child in epath.Path(os.path.realpath(dest) if local else dest).iterdir():
        if child.is_dir() and not (local and os.path.islink(child)):
            child.rmtree()
        else:
            child.unlink()


def _convert(args) -> None:
    from qed_jax import checkpoint
    from qed_jax.hf import require_local
    from qed_jax.pretrained import from_pretrained, loaded_from, save_pretrained
    from qed_jax.sharding import MeshConfig, make_mesh
    from qed_jax.trainer import StopSignals

    source, dest = os.path.expanduser(args.source), os.path.expanduser(args.dest)
    try:
        to_hf = checkpoint.is_checkpoint_dir(source)
        if to_hf:
            require_local(dest, "writes")  # before anything at the destination is replaced
        replace = _check_destination(source, dest, args.overwrite)
    except Exception as e:  # a bucket that cannot be reached: the storage client's own error, in one line
        remote = [path for path in (source, dest) if "://" in path]
        local_file = isinstance(e, OSError) and e.filename is not None and "://" not in os.fsdecode(e.filename)
        ours = type(e).__module__ == "builtins" and not isinstance(e, OSError)  # a bug, not the network
        if not remote or local_file or ours or isinstance(e, (ConfigError, CheckpointError)):
            raise
        raise StorageUnreachable(f"cannot reach {' or '.join(remote)} ({type(e).__name__}: {first_line(e)}); check "
                                 "the network and the storage credentials (`gcloud auth application-default login`)"
                                 ) from e
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1)) if args.fsdp else None
    model = from_pretrained(source, mesh=mesh, dtype=args.dtype, step=args.step)
    source = loaded_from(model)  # a Hub id's download: its tokenizer goes with the model
    # Ctrl-C or SIGTERM while the output is written lets the write finish (Orbax's threads stopped
    # half-way print their own tracebacks), then stops with the output whole.
    with StopSignals(STOP_SIGNALS, "finishing the output being written, then stopping",
                     f"exiting at once; {dest} is unfinished: rerun the same command with --overwrite") as stop:
        if replace:
            _clear(dest)
        if to_hf:  # a trainer's checkpoints export as its own export does: stopping where the sampler stops
            save_pretrained(model, dest, dtype=model.config.param_dtype, assets_from=source,
                            stop_on_turn_end=bool(checkpoint.training_steps(source)))
            wrote = f"wrote Hugging Face folder {dest} ({model.config.param_dtype})"
        else:
            checkpoint.save_model(model, dest, assets_from=source)
            wrote = f"wrote qed-jax checkpoint {dest} ({model.config.param_dtype})"
    if stop.raised:  # the output is whole; then `main`'s handler stops the command as it stops any other
        print(f"{wrote}, whole: {signal.Signals(stop.signum).name} came while it was written")
        signal.raise_signal(stop.signum)
    print(wrote)


def _generate(args) -> None:
    from qed_jax.config import check_seed, not_utf8
    from qed_jax.sampling import SamplingParams, generate
    from qed_jax.tokenizer import chat_prompt

    given = [flag for flag in GENERATE_RC_FLAGS if getattr(args, flag) is not None]
    if given and not args.reasoning_cache:
        flag = _flag(given[0])
        raise ConfigError(f"{flag} is for --reasoning-cache; add that flag or drop {flag}")
    if not args.summarizer and any(getattr(args, f) is not None for f in GENERATE_SUMMARIZER_FLAGS):
        flag = _flag(next(f for f in GENERATE_SUMMARIZER_FLAGS if getattr(args, f) is not None))
        raise ConfigError(f"{flag} is for --summarizer (a separate summarizer model); add one or drop {flag}")
    for flag, default in {**GENERATE_RC_FLAGS, **GENERATE_SUMMARIZER_FLAGS}.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.chat and args.reasoning_cache:
        raise ConfigError("--chat is for plain prompts: --reasoning-cache always puts each problem in the model's "
                          "chat template; drop --chat")
    check_seed(args.seed, "--seed")
    for n, prompt in enumerate(args.prompt, 1):
        if where := not_utf8(prompt):
            raise ConfigError(f"prompt {n} (--prompt) is not UTF-8 text ({where}); convert it, e.g. with "
                              "iconv -t UTF-8")
    if "" in args.prompt and args.reasoning_cache:  # the problem goes into the template as tokens of its own
        raise ConfigError(f"prompt {args.prompt.index('') + 1} (--prompt) is empty: a problem needs some text")
    if "" in args.prompt and not args.chat:  # a chat template wraps even an empty message
        raise ConfigError(f"prompt {args.prompt.index('') + 1} (--prompt) is empty: a plain prompt needs some text "
                          "(or pass --chat)")
    # Every flag is checked (the parameters check themselves when built) before a model loads.
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p)
    except ConfigError as e:  # named by the field: name the flag
        field, rest = str(e).split(" ", 1)
        raise ConfigError(f"{_flag(field) if hasattr(args, field) else field} {rest}") from None
    if args.reasoning_cache:
        _generate_reasoning_cache(args)
        return
    load, tokenizer = _open_generate_model(args)
    model = load(dtype=args.dtype)
    prompts = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    for n, conversation in enumerate(prompts if args.chat else [], 1):  # numbered as the flags are, from 1
        try:
            chat_prompt(tokenizer, conversation)
        except ValueError as e:  # the chat template refuses it
            raise ConfigError(f"prompt {n} (--prompt): {e}") from None
    completions = generate(model, tokenizer, prompts, params, seed=args.seed)
    for i, (prompt, c) in enumerate(zip(args.prompt, completions)):
        if args.json:
            print(json.dumps({"prompt": prompt, "tokens": c.tokens, "logprobs": c.logprobs,
                              "finish_reason": c.finish_reason, "text": c.text}))
        else:
            cut = f"cut off at --max-new-tokens {params.max_new_tokens}" if c.finish_reason == "length" else None
            _print_completion(i, len(completions), c.text, cut)


def _open_generate_model(args):
    """generate's model, opened (its files checked, a Hub id downloaded; nothing loaded), then
    its tokenizer: --tokenizer's, else the model folder's. Returns (load(dtype=...) → the model,
    tokenizer). A wrong --model is named as the model's path, and a missing tokenizer fails
    before any weight loads."""
    from qed_jax.pretrained import open_pretrained
    from qed_jax.tokenizer import load_tokenizer

    load = open_pretrained(args.model)
    try:
        return load, load_tokenizer(args.tokenizer or args.model)
    except ConfigError as e:
        if args.tokenizer:
            raise ConfigError(f"--tokenizer: {e}") from None
        raise ConfigError(f"{e}; or name one with --tokenizer") from None


def _print_completion(i: int, count: int, text: str, note: str | None) -> None:
    """Completion i of `count` as plain text. With several, each comes under a line that numbers
    it (and notes how it ended); one alone is the text only, its note on stderr."""
    if count > 1:
        print(f"=== prompt {i + 1} of {count}" + (f" ({note})" if note else "") + " ===")
    print(text)
    if count == 1 and note:
        print(f"[{note}]", file=sys.stderr)


# generate's flags that only --reasoning-cache reads, and those only --summarizer reads (or
# --summarizer itself), with their defaults: the parser leaves them None, so that one given
# without the flag it needs is refused rather than ignored.
GENERATE_RC_FLAGS = {"turns": 3, "summary_tokens": 2048, "summarizer_max_new_tokens": 2048, "summarizer": None}
GENERATE_SUMMARIZER_FLAGS = {"summarizer_temperature": 0.7, "summarizer_top_p": 0.8, "summarizer_top_k": 20,
                             "summarizer_thinking": False}
# RCParams' fields as generate's flags name them, in its errors ("" drops a hint generate cannot act on).
_RC_FIELD_FLAGS = {"RCParams.turns": "--turns", "RCParams.reasoning_tokens": "--max-new-tokens",
                   "RCParams.summary_tokens": "--summary-tokens",
                   "RCParams.summarizer_tokens": "--summarizer-max-new-tokens", " or shorten RCParams.no_summary": ""}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _generate_reasoning_cache(args) -> None:
    """RC turns per prompt: each prompt is a problem; --max-new-tokens caps each turn."""
    from qed_jax.pretrained import open_pretrained
    from qed_jax.reasoning_cache import RCParams, Summarizer, reasoning_cache
    from qed_jax.sampling import SamplingParams
    from qed_jax.tokenizer import load_tokenizer

    with renamed(ConfigError, _RC_FIELD_FLAGS):
        params = RCParams(turns=args.turns, reasoning_tokens=args.max_new_tokens, summary_tokens=args.summary_tokens,
                          summarizer_tokens=args.summarizer_max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p,
                          max_turns=max(args.turns, RCParams.max_turns), seed=args.seed)
    summarizer_params = None
    if args.summarizer:
        try:
            summarizer_params = SamplingParams(
                max_new_tokens=args.summarizer_max_new_tokens, temperature=args.summarizer_temperature,
                top_k=args.summarizer_top_k, top_p=args.summarizer_top_p)
        except ConfigError as e:  # named by the field: name the flag
            field, _, rest = str(e).partition(" ")
            raise ConfigError(f"{_flag('summarizer_' + field)} {rest}") from None
    load, tokenizer = _open_generate_model(args)
    load_summarizer = open_pretrained(args.summarizer) if args.summarizer else None
    summarizer_tokenizer = load_tokenizer(args.summarizer) if args.summarizer else None
    model = load(dtype=args.dtype)
    summarizer = None
    if args.summarizer:
        summarizer = Summarizer(load_summarizer(dtype=args.dtype), summarizer_params,
                                thinking=args.summarizer_thinking, tokenizer=summarizer_tokenizer)
    with renamed(ConfigError, _RC_FIELD_FLAGS):
        results = reasoning_cache(model, tokenizer, args.prompt, params, summarizer)
    for i, (prompt, result) in enumerate(zip(args.prompt, results)):
        if args.json:
            turns = [{"reasoning": t.reasoning, "answer": t.answer, "num_tokens": t.num_tokens,
                      "reasoning_tokens": len(t.reasoning_ids), "answer_tokens": len(t.answer_ids),
                      "finish_reason": t.finish_reason, "finished_thinking": t.finished_thinking,
                      "summary": t.summary, "summary_tokens": None if t.summary_ids is None else len(t.summary_ids),
                      "summary_cut": t.summary_cut, "summarizer_num_tokens": t.summarizer_num_tokens,
                      "summarizer_finish_reason": t.summarizer_finish_reason} for t in result.turns]
            print(json.dumps({"prompt": prompt, "answer": result.answer, "turns": turns}))
        else:
            _print_completion(i, len(results), result.answer or "", _rc_note(result, args.max_new_tokens))


def _rc_note(result, max_new_tokens: int) -> str | None:
    """How a reasoning-cache result's answer ended, when not whole: none, or cut off."""
    if result.answer is None:
        return "no </think> in the last turn: no answer"
    if result.turns[-1].finish_reason == "length":
        return f"the answer was cut off at --max-new-tokens {max_new_tokens}"
    return None


def _judge(args) -> int | None:
    from tqdm.auto import tqdm

    from qed_jax.config import load_config, temporary_beside, without_non_finite
    from qed_jax.data import BadRow, json_lines, read_rows
    from qed_jax.judge import (Judge, JudgeConfig, check_answer_format, item_from_row, load_judge_template,
                               needed_fields, reason_counts, rejection_note, warn_ungraded_schemes)

    # The keys as a trainer's or eval's judge section names them work here too (error messages say judge.base_url).
    overrides = [o.removeprefix("judge.") for o in args.overrides]
    config = load_config(JudgeConfig, args.config, overrides, section="judge")
    template = load_judge_template(config.template)
    needs = needed_fields(template)
    check_answer_format(template, config.template, config.answer_format)
    source = Path(args.input)
    # A .json array, Parquet, a folder of data files, a Hub dataset, or a clear error (for a
    # missing or compressed file).
    if source.suffix.lower() in (".json", ".parquet", ".gz") or not source.exists() or source.is_dir():
        numbered = [(f"{source}: {where}", row) for where, row in read_rows(args.input, key="--input")]
    else:  # JSON lines, under any name (a pipe too): errors name the line
        with open(source, "rb") as f:
            numbered = [(f"{source}:{n}", row) for n, row in json_lines(f)]
    for where, row in numbered:
        if isinstance(row, BadRow):
            raise ConfigError(f"{where}: {row.reason}")
    rows = [row for _, row in numbered]
    items = [item_from_row(row, where, needs) for where, row in numbered]
    if not items:
        raise ConfigError(f"{args.input}: holds no rows to grade")
    if config.cache_path:
        args.kept_on_stop = (f"; the grades received are kept in the judge's cache {config.cache_path}: rerun the "
                             "same command to continue from them")
    output = Path(args.output)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory; give a file path, e.g. {output / 'graded.jsonl'}")
    # A pipe or a device (/dev/null, /dev/stdout) is written, never renamed over; the command's own
    # stdout (/dev/stdout, even when it is a file) gets the rows alone, its summary going to stderr.
    try:
        to_stdout = (sys.stdout is not None and output.exists()
                     and os.path.samestat(os.stat(output), os.fstat(sys.stdout.fileno())))
    except (OSError, ValueError):  # a stdout without a file behind it (None: fd 1 was closed)
        to_stdout = False
    in_place = to_stdout or (output.exists() and not output.is_file())
    target = output if in_place else Path(os.path.realpath(output))  # a link's file is replaced, not the link
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target if in_place else temporary_beside(target)
    try:
        # opened before any request: an unwritable output costs no grades
        with contextlib.nullcontext(sys.stdout) if to_stdout else open(tmp, "w") as f:
            warn_ungraded_schemes(numbered, items, needs)  # once the command is sure to grade them
            judge, received = Judge(config), []
            try:
                with tqdm(total=len(items), desc="grading", unit="proof") as bar:
                    grades = judge.grade_batch(items, on_grade=lambda i, grade: (bar.update(), received.append(grade)))
            except JudgeUnavailable as e:  # it went away mid-run: what it answered before is not lost
                kept = sum(g.sent and not g.failed and not g.cached for g in received)  # not the 0s scored unsent
                if not config.cache_path or not kept:
                    raise
                raise JudgeUnavailable(f"{e} ({kept} grade{'s were' if kept != 1 else ' was'} received before that, kept "
                                       f"in the judge's cache {config.cache_path}: rerun the same command to continue "
                                       "from them)") from e
            finally:
                judge.close()
            for row, g in zip(rows, grades):
                record = {**row, "score": g.score, "reward": None if g.failed else g.reward, "reason": g.reason,
                          "attempts": g.attempts, "latency_s": round(g.latency_s, 3), "cached": g.cached,
                          "judge_reply": g.raw}
                f.write(json.dumps(without_non_finite(record), default=str, allow_nan=False)
                        + "\n")  # a Parquet row's dates or bytes as text
        if not in_place:
            os.replace(tmp, target)
    finally:
        if not in_place:
            tmp.unlink(missing_ok=True)
    failed = [g for g in grades if g.failed]
    scored = [g.score for g in grades if not g.failed]
    unsent = Counter(g.reason for g in grades if not g.sent)
    mean = f"mean score {sum(scored) / len(scored):.2f}/7" if scored else "no score"
    zeros = f", {sum(unsent.values())} scored 0 unsent ({reason_counts(unsent)})" if unsent else ""
    print(f"graded {len(grades)} rows ({sum(g.cached for g in grades)} from cache{zeros}, {len(failed)} failed); "
          f"{mean}; wrote {output}", file=sys.stderr if to_stdout else sys.stdout)
    if unsent["no_think_end"]:
        print(f"{unsent['no_think_end']} completions have no </think>, so they scored 0 without a request "
              "(require_think_end): a server that splits off the reasoning leaves none in the text; give such rows "
              "as 'proof', or set require_think_end=false", file=sys.stderr)
    if failed:
        reasons = reason_counts(Counter(g.reason for g in failed))
        cached = ", the others come from the cache" if config.cache_path and scored else ""
        print(f"{len(failed)} grades failed ({reasons}; a row's judge_reply holds the judge's last reply or the "
              f"error, where there was one); rerun the same command to retry them{cached}"
              f"{rejection_note((g.reason, g.raw) for g in failed)}", file=sys.stderr)
        return 1


def _eval(args) -> int | None:
    from qed_jax.config import dump_json, load_config
    from qed_jax.evaluate import EvalConfig, evaluate

    if args.config is None and not args.overrides:  # as the trainers say it
        raise ConfigError("no --config: start from one, e.g. --config configs/eval/imo_proofbench.yaml (the defaults "
                          "alone name no model)")
    config = load_config(EvalConfig, args.config, args.overrides)
    if args.print_config:
        print(dump_json(config))
        return
    counts = evaluate(config)
    cached = f", {counts['cached']} from the judge's cache {config.judge.cache_path}" if counts["cached"] else ""
    print(f"{config.output_dir}: {counts['total']} samples; this run generated {counts['generated']} and graded "
          f"{counts['graded']} ({counts['failed']} failed{cached}); `qed-jax report {config.output_dir}` for the table")
    if counts["failed"]:
        return 1


def _report(args) -> None:
    from qed_jax.report import report

    text, out, plots = report(args.run_dirs, args.output, plots=not args.no_plots)
    print(text)
    print(f"wrote {out}/report.md, report.json" + "".join(f", {p.name}" for p in plots))


def _pipeline(args) -> int | None:
    import time

    from qed_jax.config import dump_json, load_config
    from qed_jax.pipeline import STANDIN, PipelineConfig, check_run_directories, run, stages

    config = load_config(PipelineConfig, args.config, args.overrides)
    if args.print_config:
        # What the run would refuse, refused here too (the stand-in's port is chosen when it starts).
        check_run_directories(stages(config, "http://127.0.0.1:1/v1" if config.judge == STANDIN else config.judge),
                              Path(config.output_dir))
        print(dump_json(config))
        return
    start = time.perf_counter()
    result = run(config)
    print(Path(result["report"]).read_text(encoding="utf-8"))
    if result["standin_requests"] is not None:
        print(f"the offline stand-in judge answered {result['standin_requests']} requests (not a real judge: "
              "its marks only say whether a proof closed its reasoning)")
    print(f"{config.output_dir}: every stage done in {time.perf_counter() - start:.0f} s; report in {result['report']}")
    if result["failed"]:
        print(f"{result['failed']} grades failed; rerun the same command to retry them", file=sys.stderr)
        return 1


def _train(args, config_cls, train, summary, before_backend=None) -> None:
    """Shared by the trainers: resolve the config, print it or run, report one line.
    `before_backend()` runs after `jax.distributed.initialize` and before anything starts JAX's
    backend."""
    from qed_jax.config import dump_json, load_config

    check_distributed_flags(args)
    if args.config is None and not args.overrides and not args.print_config:
        raise ConfigError(f"no --config: start from one, e.g. --config {args.config_example} (the defaults alone "
                          "name no model, tokenizer or data)")
    distributed = args.distributed or args.coordinator
    if args.print_config or not distributed:  # a typo fails at once, before JAX starts
        config = load_config(config_cls, args.config, args.overrides)
    if args.print_config:
        if args.config is not None or args.overrides:  # what the run would refuse (the defaults alone may be shown)
            config.model.check_given()
        # On stderr, so that stdout is the JSON alone. A run logs these once its inputs are checked.
        print("derived: " + json.dumps(config.derived()), file=sys.stderr)
        print(dump_json(config))
        return
    _init_distributed(args)
    if before_backend is not None:
        before_backend()
    if distributed:
        from qed_jax.multihost import set_up_together

        # A config only one process refuses (its host's files, or flags of its own) stops all of
        # them at once: the others would wait for it until JAX's timeouts abort them.
        with set_up_together("reading the config"):
            config = load_config(config_cls, args.config, args.overrides)
    result = train(config, resume_with_changes=args.resume_with_changes)
    import jax

    which = f" (process {result['process']})" if jax.process_count() > 1 else ""
    if result["complete"]:
        print(f"{result['output_dir']} is already complete at step {result['step']}{which}: nothing to do "
              f"({summary(result)})")
        return
    print(f"done at step {result['step']}{which}: {summary(result)}; metrics in {result['output_dir']}/metrics.jsonl")


def _sft(args) -> None:
    from qed_jax.host import keep_freed_memory
    from qed_jax.sft import SFTConfig, summary, train

    # On CPU each step reuses the memory the last one freed (`host.keep_freed_memory`); not for
    # grpo, whose decode loops Ctrl-C must be able to stop while they run.
    # Process 0 alone reads the metrics log: another has a finished run's last loss from nowhere.
    _train(args, SFTConfig, train, lambda r: summary(r) if r["process"] == 0 or not r["complete"]
           else "process 0 reports the loss", before_backend=keep_freed_memory)


def _grpo(args) -> None:
    from qed_jax.grpo import GRPOConfig, summary, train

    # The rewards come from the metrics log, which process 0 alone keeps.
    _train(args, GRPOConfig, train, lambda r: summary(r) if r["process"] == 0 else "process 0 reports the rewards")


def _plan(args) -> int | None:
    import jax

    # A plan only compiles, for the slice it names: keep JAX off any local accelerator (which a
    # training job may be holding) unless the caller chose a platform.
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    # What is compiled for a topology without chips cannot be read back from JAX's persistent
    # compilation cache (with JAX_COMPILATION_CACHE_DIR set, a second plan warned, then compiled).
    jax.config.update("jax_enable_compilation_cache", False)
    from qed_jax import plan

    result = in_worker_thread(plan.plan, args.config, args.topology, args.overrides, trainer=args.trainer,
                              preset_name=args.preset, wave=args.wave_size)
    print(plan.to_json(result) if args.json else plan.format_report(result))
    if not result.fits:
        return 1


def check_distributed_flags(args) -> None:
    """The multi-host flags go together: --num-processes and --process-id with --coordinator
    (alone they would be ignored, and each worker would train a run of its own)."""
    given = [f for f in ("num_processes", "process_id") if getattr(args, f) is not None]
    if given and not args.coordinator:
        raise ConfigError(f"{_flag(given[0])} goes with --coordinator (the coordinator's host:port); add it, or drop "
                          f"{' and '.join(_flag(f) for f in given)}")
    if args.coordinator and len(given) < 2:
        raise ConfigError("--coordinator needs --num-processes and --process-id too")


def _init_distributed(args) -> None:
    """Multi-host: on TPU pods `--distributed` auto-detects the slice; elsewhere name the
    coordinator, the number of processes and this process's id."""
    if args.distributed or args.coordinator:
        import jax

        try:
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
        except ValueError as e:  # what it could not find out (not on a TPU pod slice)
            raise ConfigError(f"jax.distributed.initialize: {first_line(e)} (on a TPU pod slice "
                              "--distributed finds the slice itself; elsewhere give --coordinator, --num-processes "
                              "and --process-id)") from None


def given_path(text: str) -> str:
    """A path (or Hub id) argument. An empty one, an unset shell variable's, would name the
    working directory: a report or an export written there, a folder read as a config. A
    leading `~` is the user's home, as in a config's paths: the shell leaves `--output=~/x` as it
    is, which would make a folder named ~ in the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a path (an unset shell variable?)")
    return os.path.expanduser(text)


class GivenOnce(argparse.Action):
    """An option that may stand once: argparse would keep the last of two, so `--config a.yaml
    --config b.yaml` would run b alone, where a user may well expect the two merged."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = f"_{self.dest}_given"
        if getattr(namespace, seen, False):
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): give one; "
                         "set single keys on top of it as key=value")
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, values)


def _add_trainer_parser(sub, name, run, example, summary, description) -> None:
    p = sub.add_parser(name, help=summary, description=description)
    p.add_argument("--config", action=GivenOnce, type=given_path, help=f"YAML config, e.g. {example}")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.lr=1e-4 mesh.fsdp=4 steps=200 (--print-config lists every key)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="continue a run in an existing output_dir although the config or the training data "
                   "differs from what it was started with (the old config.json is kept as config.N.json)")
    g = p.add_argument_group("multi-host")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (auto-detects TPU pod slices)")
    g.add_argument("--coordinator", help="coordinator address host:port (non-TPU clusters, tests)")
    g.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    g.add_argument("--process-id", type=int, help="this process's id (with --coordinator)")
    p.set_defaults(run=run, config_example=example)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qed-jax")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


class Parser(argparse.ArgumentParser):
    """argparse's parser (and each command's, through add_subparsers), answering a misspelt
    command, choice or flag with what it resembles, in one line without the usage."""

    def parse_known_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)  # for error(): argparse keeps no copy
        return super().parse_known_args(args, namespace)

    def _check_value(self, action, value):  # argparse's own message varies with the Python version
        if action.choices is not None and value not in action.choices:
            close = difflib.get_close_matches(str(value), [str(choice) for choice in action.choices], n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            choices = ", ".join(repr(choice) for choice in action.choices)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} ({guess}choose from {choices})")

    def error(self, message):
        # A misspelt required flag (--confg) is first seen as the real one missing: name the typo too.
        unknown = [x for x in getattr(self, "given", ()) if x.startswith("--")
                   and x.split("=")[0] not in self._option_string_actions]
        if message.startswith("the following arguments are required") and unknown:
            message += f"; unrecognized arguments: {' '.join(unknown)}{suggested_flags(self, unknown)}"
        self.exit(2, f"{self.prog}: error: {message}; `{self.prog} --help` shows the usage\n")  # one line


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qed-jax", description="Post-train small Qwen3 models to write olympiad proofs: convert "
        "checkpoints, sample, grade with a judge, train (SFT, GRPO), evaluate on the bundled "
        "benchmarks and report, run all of it as one pipeline, and plan TPU memory. `qed-jax COMMAND --help` documents each command.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at DEBUG level, and show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"qed-jax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert", help="convert a Hugging Face folder <-> a qed-jax (Orbax) checkpoint",
        description="Convert between a Hugging Face Qwen3 folder and a qed-jax checkpoint "
        "directory. The direction follows SOURCE: a Hugging Face folder becomes a checkpoint, "
        "a checkpoint becomes a Hugging Face folder (its latest step, or --step). Tokenizer files travel along.",
    )
    p.add_argument("source", type=given_path,
                   help="Hugging Face model folder, qed-jax checkpoint directory, or Hugging Face Hub id "
                   "(e.g. Qwen/Qwen3-4B-Thinking-2507)")
    p.add_argument("dest", type=given_path, help="output directory (local; gs:// for a qed-jax checkpoint)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype of the output (default: keep the source's; of a Hugging Face folder "
                   "with mixed dtypes, the widest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier model (a Hugging Face folder or a qed-jax checkpoint) at the "
                   "destination: its contents are deleted once the source has loaded. A folder holding no "
                   "model, or a folder that is not the model's (another run's), is refused")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters over all devices while converting (for models larger "
                   "than one device's memory)")
    p.add_argument("--step", type=int, default=None,
                   help="which step of a checkpoint directory to convert (default: its latest)")
    p.set_defaults(run=_convert)

    p = sub.add_parser("generate", help="sample completions from a model",
                       description="Sample completions for one or more prompts with the jitted "
                       "KV-cache sampler. The tokenizer is read from the model folder unless --tokenizer names one.")
    p.add_argument("--model", required=True, type=given_path,
                   help="Hugging Face folder, qed-jax checkpoint or Hugging Face Hub id")
    p.add_argument("--tokenizer", type=given_path,
                   help="a folder or Hub id holding the tokenizer (default: the model's)")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text; repeat for a batch")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep, in (0, 1]; 1 = off (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: tokens, logprobs (under logits / temperature, before "
                   "top-k / top-p; at temperature 1 when greedy), finish_reason, text (with --reasoning-cache: "
                   "every turn's reasoning, answer, summary, token counts, finish reasons)")
    g = p.add_argument_group("reasoning cache", "Solve each prompt in turns: each turn sees the problem and "
                             "a summary of the turns before it, and a summarizer rewrites the summary after "
                             "every turn but the last. --max-new-tokens caps each turn; the answer is the last "
                             "turn's text after its last </think>.")
    g.add_argument("--reasoning-cache", action="store_true", help="run the reasoning-cache loop")
    rc, summarizer = GENERATE_RC_FLAGS, GENERATE_SUMMARIZER_FLAGS  # their defaults, applied in _generate
    g.add_argument("--turns", type=int, help=f"turns per problem (default: {rc['turns']})")
    g.add_argument("--summary-tokens", type=int,
                   help=f"the most tokens a summary keeps (longer ones are cut; default: {rc['summary_tokens']})")
    g.add_argument("--summarizer", type=given_path, help="a separate frozen summarizer model with the same vocabulary "
                   "(default: the model itself, thinking, with the sampling flags above)")
    g.add_argument("--summarizer-max-new-tokens", type=int,
                   help="the summarizer's budget (the model's own too, when it summarizes itself; default: "
                   f"{rc['summarizer_max_new_tokens']})")
    g.add_argument("--summarizer-temperature", type=float,
                   help=f"with --summarizer (default: {summarizer['summarizer_temperature']})")
    g.add_argument("--summarizer-top-p", type=float, help=f"with --summarizer (default: {summarizer['summarizer_top_p']})")
    g.add_argument("--summarizer-top-k", type=int, help=f"with --summarizer (default: {summarizer['summarizer_top_k']})")
    g.add_argument("--summarizer-thinking", action="store_const", const=True,
                   help="with --summarizer: it thinks first, and its summary is its text after its last </think>")
    p.set_defaults(run=_generate)

    p = sub.add_parser("judge", help="grade a file of proofs with the rubric judge",
                       description="Grade rows {problem, rubric or guidelines, reference?, answer?, "
                       "proof or completion} with an OpenAI-compatible judge. Exits 1 when some grades "
                       "failed (each row records its reason). The template decides which "
                       "fields it reads: the RL grader (configs/judge/rl_grader.yaml) 'rubric', "
                       "imo_proofbench.yaml and proofbench.yaml 'guidelines' and 'reference', answer.yaml "
                       "'answer'. No row is settled by math-verify (`eval` does that first for final "
                       "answers; this command does not). Grades are cached in "
                       "SQLite (judge.cache_path), so an interrupted run picks up where it stopped. "
                       "The API key is read from the environment variable judge.api_key_env.")
    p.add_argument("--config", action=GivenOnce, type=given_path,
                   help="YAML judge config (or a trainer config with a judge: section); default: the built-in "
                   "defaults, the recipe's RL grader (template rl_grader) at http://localhost:8000/v1, caching "
                   "grades in ./judge_cache.sqlite")
    p.add_argument("--input", required=True, type=given_path,
                   help="rows to grade: JSON lines (any other name, a pipe too), a "
                   ".json array, a .parquet file, a folder of such files or a Hugging Face dataset id")
    p.add_argument("--output", required=True, type=given_path,
                   help="JSONL output: each row plus score, reward, reason (a file is "
                   "replaced whole once every row is graded, a link's file and not the link; a named pipe or a "
                   "device is written as it is; the command's own stdout, e.g. /dev/stdout, sends the summary to "
                   "stderr)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. concurrency=8 (or judge.concurrency=8, as in other configs)")
    p.set_defaults(run=_judge)

    _add_trainer_parser(
        sub, "sft", _sft, "configs/sft/tiny.yaml", "supervised fine-tuning (stage 1 of the recipe)",
        "Supervised fine-tuning on a device mesh. Restarting with the same output_dir resumes from "
        "its latest checkpoint; Ctrl-C or SIGTERM writes one before exiting.")
    _add_trainer_parser(
        sub, "grpo", _grpo, "configs/rl/tiny.yaml", "GRPO with rubric rewards from the judge (stage 2)",
        "GRPO: sample a group of completions per prompt with the current policy, grade them with "
        "the judge (or a rule, for toy tasks), centre the rewards per group and update with a "
        "clipped policy loss. Restarting with the same output_dir resumes (Ctrl-C or SIGTERM writes a "
        "checkpoint first); the judge's grade cache makes grading exactly-once.")

    p = sub.add_parser(
        "eval", help="evaluate a model on a benchmark (IMO-ProofBench, ProofBench, IMO-AnswerBench)",
        description="Sample `samples` completions per problem from a local checkpoint (model.path) or an "
        "OpenAI-compatible endpoint (model.base_url, model.name), or with mode=rc solve each problem in "
        "reasoning-cache turns on the local checkpoint (rc.turns, rc.reasoning_tokens, rc.summary_tokens; "
        "rc.grade_turns=true grades every turn), grade proofs with the judge and final "
        "answers with math-verify (the judge only where it cannot decide). Every sample and grade is "
        "appended to OUTPUT_DIR/samples.jsonl as it completes: rerunning the same command finishes an "
        "interrupted run without generating or grading anything twice, and retries failed grades. "
        "Exits 1 when some grades failed.")
    p.add_argument("--config", action=GivenOnce, type=given_path,
                   help="YAML eval config, e.g. configs/eval/imo_proofbench.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.path=runs/grpo/hf samples=1 benchmark.limit=5 "
                   "(--print-config lists every key)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit (a config names a model first: model.path or "
                   "model.base_url)")
    p.set_defaults(run=_eval)

    p = sub.add_parser(
        "report", help="tables and plots of one or more eval runs",
        description="Summarize eval run directories: score on the 0-7 scale and as a percentage, avg@k with the "
        "std across the k samples, the benchmark's split (Basic/Advanced, or competition years), "
        "completion tokens (mean, median, p90), the truncated fraction, and failed grades apart. "
        "Prints Markdown and writes report.md, report.json and PNG plots; several run directories "
        "give one comparison table.")
    p.add_argument("run_dirs", nargs="+", type=given_path, metavar="RUN_DIR",
                   help="eval output directories, or folders of them (each stands for the runs inside)")
    p.add_argument("--output", type=given_path,
                   help="folder for report.md/json and plots, not another run's (default: the one RUN_DIR given; "
                   "required with several)")
    p.add_argument("--no-plots", action="store_true",
                   help="skip the PNG plots (and delete an earlier report's from the output folder: they would "
                        "show other data)")
    p.set_defaults(run=_report)

    p = sub.add_parser(
        "pipeline", help="the whole recipe in one command: SFT, GRPO, evaluation of base/SFT/GRPO, report",
        description="Run the stages as they would be run by hand, each with its own YAML plus the "
        "pipeline's overrides: SFT; GRPO from the SFT model; evaluation of the base, SFT and GRPO models "
        "on every benchmark in every mode (single-shot and reasoning cache); one report over all "
        "evaluations. Everything lands in one run directory (output_dir): base/, sft/, grpo/, "
        "eval/MODEL-BENCHMARK-MODE/, report.md, report.json and plots. Rerunning the same command skips "
        "what is done (finished trainers, finished samples and grades). Ctrl-C exits 130 after the "
        "current trainer step is checkpointed; nothing finished is lost. With `judge: standin` the "
        "command serves an offline stand-in judge on 127.0.0.1 for the evaluations: NOT a real judge "
        "(full marks for any proof written after </think>). Exits 1 when some grades failed.")
    p.add_argument("--config", action=GivenOnce, type=given_path, required=True,
                   help="pipeline YAML, e.g. configs/pipeline/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="pipeline overrides, e.g. output_dir=runs/p2 sft.overrides.steps=40 "
                   "eval.overrides.samples=1 eval.modes=[single] judge=http://localhost:8000/v1")
    p.add_argument("--print-config", action="store_true", help="print the resolved pipeline config and exit")
    p.set_defaults(run=_pipeline)

    p = sub.add_parser(
        "plan", help="compile a config for a TPU slice ahead of time: memory per chip, FLOPs",
        description="Compile a trainer config's step (and, for GRPO, the sampler's prefill and "
        "decode at a wave size) for a TPU slice ahead of time, on any machine with libtpu "
        "installed (pip install 'qed-jax[tpu]', or pip install -e '.[tpu]' in a clone). No weights "
        "are read. Prints per-chip memory "
        "(arguments, outputs, temporaries, buffers other programs keep resident, total, HBM, "
        "headroom) and FLOPs per call; exits 1 when a program does not fit.")
    p.add_argument("--config", action=GivenOnce, type=given_path, required=True,
                   help="SFT or GRPO YAML config, e.g. configs/sft/qed_nano_4b.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.max_length=8192")
    p.add_argument("--topology", required=True,
                   help="Cloud slice (v5p-64 and v4-32 count TensorCores; v5e-16, v6e-64 count chips) "
                   "or a topology name such as v5p:2x4x4")
    p.add_argument("--trainer", choices=["sft", "grpo"], help="the config's trainer (default: the one it is valid for)")
    p.add_argument("--preset", help="model preset to plan with when model.path is not a local folder "
                   "(a Hub id whose name is a preset needs none)")
    p.add_argument("--wave-size", type=int, help="GRPO: rows the sampler decodes at once (default: the trainer's: "
                   "sampling.max_concurrent, else what sampling.kv_cache_gib holds, else all samples at once)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(run=_plan)
    for p in sub.choices.values():  # -v also after the command (SUPPRESS keeps one given before it)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log at DEBUG level, and show the traceback of an error")
        p.set_defaults(parser=p)
    for p in (parser, *sub.choices.values()):  # no prefixes: --resume must not mean --resume-with-changes
        p.allow_abbrev = False
    return parser


# What to change when a command runs out of device memory (None: the commands that take a config).
OUT_OF_MEMORY_ADVICE = {
    None: "`qed-jax plan` shows what a config needs per chip: shard it over more devices (mesh.fsdp) or lower the "
          "batch or the lengths",
    "generate": "the cache holds every prompt's tokens and --max-new-tokens more: give a lower --max-new-tokens or "
                "fewer prompts (with --reasoning-cache, lower --summary-tokens or --summarizer-max-new-tokens), or "
                "--dtype bfloat16",
    "convert": "--fsdp shards the parameters over all devices while converting",
    "eval": "a local model decodes a whole batch at once unless told otherwise: set model.max_concurrent or "
            "model.kv_cache_gib (rows decoded at once), or lower sampling.max_new_tokens",
    "pipeline": "the stage that ran out says which: a trainer's config in `qed-jax plan` (mesh.fsdp, the batch, the "
                "lengths), an evaluation's eval.overrides.model.max_concurrent",
}


def suggested_flags(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """' (did you mean --max-new-tokens?)' for a misspelt flag among `unknown`, naming the
    command's flags closest to each; '' when none is close."""
    flags = [flag for action in parser._actions for flag in action.option_strings
             if flag.startswith("--") and flag not in ("--help", "--version")]  # never the answer to a typo
    guesses = {}
    for given in (x.split("=")[0] for x in unknown if x.startswith("--")):
        close = difflib.get_close_matches(given, flags, n=1)
        if close:
            guesses[given] = close[0]
    if not guesses:
        return ""
    if len(guesses) == 1:
        return f" (did you mean {next(iter(guesses.values()))}?)"
    return f" (did you mean {', '.join(f'{flag} for {given}' for given, flag in guesses.items())}?)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with key=value overrides taken wherever they stand: argparse takes the
    positional overrides as one run, so `--config C a=1 --print-config b=2` would leave b=2
    unrecognized (an option between overrides is easy to write)."""
    args, extra = build_parser().parse_known_args(argv)
    overrides = [x for x in extra if "=" in x and not x.startswith("-")] if hasattr(args, "overrides") else []
    if len(overrides) < len(extra):
        args.parser.error(f"unrecognized arguments: {' '.join(x for x in extra if x not in overrides)}"
                          + suggested_flags(args.parser, [x for x in extra if x not in overrides]))
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    """The `qed-jax` command; returns its exit status. After Ctrl-C or SIGTERM it ends the process
    itself (`os._exit(128 + signal)`, see `_exit_now`) once the command has cleaned up."""
    args = parse_args(argv)
    # Our own logs at INFO (DEBUG with -v); other libraries' at WARNING unless -v.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qed_jax").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # transformers' advice, e.g. that its models need PyTorch (qed-jax uses none of them)
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        # Exceptions Python cannot raise (in finalizers, or coroutines dropped when a read failed:
        # Orbax leaves hundreds of lines of them after the one-line error) only with -v.
        sys.unraisablehook = lambda u: logging.getLogger(__name__).debug(
            "ignored in %r: %s", u.object, u.exc_value)
        # Likewise the coroutines of a failed save that Orbax created and never ran: Python warns
        # of each as it is collected, maybe after the one-line error (at exit, say).
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    # gcsfs logs its last failed retry with a traceback, before our one-line error says the same, and
    # Orbax each of a failed save's threads (a full disk: hundreds of lines).
    for name in ("gcsfs", "absl"):
        if args.verbose:
            logging.getLogger(name).removeFilter(_without_traceback)
        else:
            logging.getLogger(name).addFilter(_without_traceback)
    if not sys.stderr.isatty():  # a log file: a progress bar's line every 30 s, not every step (tqdm reads
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_PROGRESS_SECONDS))  # this when first imported)
    # Ctrl-C (SIGINT) and SIGTERM (a TPU VM's preemption, a job scheduler) stop every command as
    # they stop the trainers (which catch them themselves to checkpoint first): the command's
    # cleanup runs and its last line says how it ended. SIGINT too when started from a shell that
    # ignores it in background jobs (Python raises KeyboardInterrupt only if SIGINT was not ignored
    # when it started). A KeyboardInterrupt raised where Python cannot pass it on (a
    # garbage-collection callback) is printed and dropped; the handler also records the signal, so
    # the command still stops.
    stopped_by = []

    def on_stop_signal(signum, frame):
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, on_stop_signal) for signum in STOP_SIGNALS}
    # A stop that lands in an evaluation's or a judge's requests leaves asyncio tasks behind, which
    # asyncio reports (a traceback each) as they are collected, after the command's last line.
    quiet_after_stop = lambda record: args.verbose or not stopped_by  # noqa: E731
    logging.getLogger("asyncio").addFilter(quiet_after_stop)
    try:
        return _run_command(args, stopped_by)
    finally:  # a caller in the same process (a test, a notebook) gets its own handlers back
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        logging.getLogger("asyncio").removeFilter(quiet_after_stop)


def _run_command(args, stopped_by: list[int]) -> int:
    """Runs the parsed command; its exit status. `stopped_by` records the stop signals received
    (see `main`); after one, the process ends here once the command has cleaned up."""
    interrupted, finished, status, failed_while_stopping = False, False, 0, None
    try:
        try:
            status = args.run(args) or 0  # a command's own failure status (e.g. failed grades: 1)
            finished = True  # all of it: a stop signal before now was dropped where it was raised
        except BaseException as e:
            if not stopped_by or isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            # The stop signal's KeyboardInterrupt, which a library turned into an error of its own on
            # the way out (anyio's cancel scopes, in an evaluation's requests; asyncio's
            # CancelledError, a BaseException): still a stop. A file the cleanup could not write
            # (a full disk) is a stop too, but not one that kept everything: the line says so.
            logging.getLogger(__name__).debug("stopped; the command ended with %r", e, exc_info=True)
            if isinstance(e, OSError):
                failed_while_stopping = e
            raise KeyboardInterrupt from e
        interrupted = bool(stopped_by)
    except (ConfigError, CheckpointError, JudgeUnavailable, StorageUnreachable, TrainingDiverged) as e:
        if args.verbose:
            raise
        _exit_if_another_process_stopped(args, e)  # a collective or save that waited for it: not the cause
        print(f"qed-jax {args.command}: error: {e}", file=sys.stderr)
        # A run that failed, or a bucket that cannot be reached: not a command to fix.
        return 1 if isinstance(e, (TrainingDiverged, StorageUnreachable)) else 2
    except KeyboardInterrupt:  # outside a training loop, which checkpoints on Ctrl-C itself
        _ignore_stop_signals()
        interrupted = True
    except OSError as e:  # a path given to the command (missing, a file where a folder goes), or the network
        if args.verbose:
            raise
        print(f"qed-jax {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 1 if e.filename is None else 2  # e.g. a gs:// path that cannot be reached: not a path to fix
    except Exception as e:
        if not args.verbose:
            _exit_if_another_process_stopped(args, e)
        if args.verbose or not out_of_device_memory(e):
            raise
        print(f"qed-jax {args.command}: error: out of device memory ({first_line(e)[:300]}); "
              f"{OUT_OF_MEMORY_ADVICE.get(args.command, OUT_OF_MEMORY_ADVICE[None])} (-v shows the traceback)",
              file=sys.stderr)
        return 1
    if interrupted:
        _ignore_stop_signals()
        signum = stopped_by[0] if stopped_by else signal.SIGINT
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        resume = "; what finished is kept: rerun the same command to continue" if args.command in RESUMABLE else ""
        resume = getattr(args, "kept_on_stop", None) or resume  # a command that said what it keeps
        if failed_while_stopping is not None:
            resume = f"; then a write failed: {_os_error(failed_while_stopping)}"
        if finished:
            resume = ", after the command had done all its work: nothing was cut short"
        print(f"qed-jax {args.command}: {how}{resume}", file=sys.stderr)
        _exit_now(128 + signum)
    return status


def _exit_if_another_process_stopped(args, error: Exception) -> None:
    """When `error` says that another process of this multi-process job is gone, say so in one
    line and exit at once (status 1): the interpreter's teardown would wait for that process at
    JAX's shutdown barrier until the coordination service gives up on it and aborts this one,
    minutes later, with pages of C++ logs."""
    jax = sys.modules.get("jax")  # not imported yet: no job of several processes either
    reason = lost_process(error) if jax is not None and jax.distributed.is_initialized() else None
    if reason is None:
        return
    print(f"qed-jax {args.command}: error: another process of this job stopped ({reason}); the checkpoints "
          "written are kept: run the same command again on every host to resume from the newest", file=sys.stderr)
    _exit_now(1)


# The signals that stop a command (after its cleanup), exiting with 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_stop_signals() -> None:
    """We are exiting: a second Ctrl-C or SIGTERM changes nothing."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _without_traceback(record: logging.LogRecord) -> bool:
    """A logging filter: the record's message, without the exception's traceback."""
    record.exc_info = record.exc_text = None
    return True


# Seconds between a progress bar's updates when stderr is not a terminal (a log file).
LOG_PROGRESS_SECONDS = 30

# Commands whose finished work a rerun always picks up (trainers print their own line when
# stopped; `judge` keeps its grades only in its cache, which may be off).
RESUMABLE = ("eval", "pipeline")


def in_worker_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs), run in a thread of its own while the main thread waits where Ctrl-C
    reaches it: a compilation in the main thread holds Python's signal handlers off until it
    ends (a 4B plan: a minute). Ctrl-C then ends the command at once (`_exit_now` stops the
    thread with the process); fn's error is raised here."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, name=getattr(fn, "__name__", "worker"), daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _exit_now(code: int) -> None:
    """Exit after Ctrl-C or SIGTERM without the interpreter's teardown. The command's cleanup has
    run (its `finally`s and `with`s, and the exception's frames are gone, closing their files),
    but teardown can still crash (SIGSEGV) when Ctrl-C cut an XLA compilation short, and it waits
    for a device call still running (a decode loop at the recipe's lengths: minutes; see
    DeviceCallInterrupted)."""
    gc.collect()  # files held only by reference cycles
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _os_error(e: OSError) -> str:
    """One line for an OSError: a path's says all there is, another (the network's) points to -v."""
    return os_error_line(e) + (" (-v shows the traceback)" if e.filename is None else "")


if __name__ == "__main__":
    sys.exit(main())
