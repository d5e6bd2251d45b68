"""The evaluation report: from one or more run directories (written by `qed_jax.evaluate`) to a
Markdown table (one row per run, so several runs compare side by side, and for several models a
table of model against benchmark and mode), a JSON summary, and plots (score histogram, score
against completion tokens, and for reasoning-cache runs the mean score per turn).

Scores are on the judge's 0-7 scale and as % of 7. A failed grade is neither a 0 nor dropped
silently: the headline score leaves it out, and a second figure counts it as 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from qed_jax.config import ConfigError, recorded_path, without_non_finite
from qed_jax.errors import os_error_line
from qed_jax.evaluate import SAMPLES_FILE, read_problem_ids, read_run
from qed_jax.judge import MAX_SCORE
from qed_jax.rundir import recorded_working_dir

log = logging.getLogger(__name__)


def percent(score: float) -> float:
    return 100.0 * score / MAX_SCORE


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def summarize(config: dict, records: list[dict], problem_ids: list[str] | None = None,
              recorded_in: str | None = None) -> dict:
    """Statistics of one run. records: one per sample, with its last grade (evaluate.read_run);
    problem_ids: the benchmark's (evaluate.read_problem_ids), else those drawn so far;
    recorded_in: the working directory the run read its relative paths in."""
    k = config["samples"]
    graded = [r for r in records if r["graded"] and r["score"] is not None]
    failed = [r for r in records if r["graded"] and r["score"] is None]
    scores = [r["score"] for r in graded]
    problems = {r["problem_id"] for r in records} | set(problem_ids or ())
    # avg@k: the mean over problems of each sample index, then the mean and spread of those means,
    # over the indices drawn and graded for every problem of the benchmark, so that each mean
    # covers the same problems (a run stopped part-way, or with a failed grade the next run
    # retries, leaves an index partial: its scores count in the mean of all samples, not as one
    # of the k).
    whole = [i for i in range(k) if len({r["problem_id"] for r in graded if r["sample"] == i}) == len(problems)]
    per_sample = [_mean([r["score"] for r in graded if r["sample"] == i]) for i in whole]
    groups = {}
    present = {r["group"] for r in records if r.get("group") is not None}
    # In the config's order (Basic before Advanced), then any label it does not list ("other").
    order = list(config["benchmark"].get("groups") or {})
    for label in [g for g in order if g in present] + sorted(present - set(order)):
        group_scores = [r["score"] for r in graded if r.get("group") == label]
        groups[label] = {"mean": _mean(group_scores), "percent": percent(_mean(group_scores)),
                         "graded": len(group_scores)}
    tokens = np.array([r["completion_tokens"] for r in records], dtype=np.float64)
    benchmark = config["benchmark"]
    model = config["model"]
    mode = config.get("mode", "single")
    mean = _mean(scores)
    mean_failed_as_zero = sum(scores) / (len(graded) + len(failed)) if graded or failed else math.nan
    return {
        "benchmark": benchmark["name"],
        "benchmark_source": source_label(benchmark, recorded_in),
        "kind": benchmark["kind"],
        "mode": mode,
        "model": path_label(model["path"], recorded_in) if model["path"] else f"{model['name']} @ {model['base_url']}",
        "problems": len(problems),
        "samples_per_problem": k,
        "samples": len(records),
        "undrawn": len(problems) * k - len(records),  # (without problem_ids: of the problems drawn so far)
        "graded": len(graded),
        "failed": len(failed),
        "pending": len(records) - len(graded) - len(failed),
        "mean": mean,
        "percent": percent(mean),
        "mean_failed_as_zero": mean_failed_as_zero,
        "percent_failed_as_zero": percent(mean_failed_as_zero),
        "avg_at_k": {"k": len(per_sample), "mean": _mean(per_sample), "percent": percent(_mean(per_sample)),
                     "std": float(np.std(per_sample, ddof=1)) if len(per_sample) > 1 else math.nan,
                     "percent_std": percent(float(np.std(per_sample, ddof=1))) if len(per_sample) > 1 else math.nan,
                     "per_sample": per_sample},
        "groups": groups,
        "tokens": {"mean": _mean(tokens), "median": float(np.median(tokens)) if len(tokens) else math.nan,
                   "p90": float(np.percentile(tokens, 90)) if len(tokens) else math.nan},
        "truncated_fraction": _mean([float(r["truncated"]) for r in records]),
        "decided_by": dict(Counter(r["decided_by"] for r in graded + failed)),
        **({"turns": turn_summary(records, config.get("rc", {}).get("grade_turns", False))} if mode == "rc" else {}),
    }


def turn_summary(records: list[dict], grade_turns: bool) -> dict:
    """Mode rc: per turn, the mean score of its graded answers (failed grades left out) and how
    many there are. The last turn's answer is the sample's; earlier turns have grades only in
    runs with rc.grade_turns (else their mean is undefined). Of the earlier turns' grades, how
    many failed and, in a run that grades turns (`grade_turns`, the run's config, or any turn
    graded before), how many are not graded yet: a rerun with rc.grade_turns does both. Also how
    many summaries were written and how many of them are empty (a thinking summarizer that did
    not close its thinking within rc.summarizer_tokens, or wrote nothing after its last </think>:
    the next turn started over without one)."""
    count = len(records[0]["turn_scores"])
    per_turn = [[r["turn_scores"][t] for r in records if r["turn_scores"][t] is not None] for t in range(count)]
    means = [_mean(scores) for scores in per_turn]
    grading = Counter(state for r in records for state in r["turn_grading"])
    grading_turns = grade_turns or grading["graded"] + grading["failed"] > 0
    summaries = [t["summary_tokens"] for r in records for t in r["turns"] if t["summary_tokens"] is not None]
    return {"count": count, "mean": means, "percent": [percent(m) for m in means],
            "graded": [len(scores) for scores in per_turn], "failed_grades": grading["failed"],
            "pending_grades": grading["not graded"] if grading_turns else 0,
            "summaries": len(summaries), "empty_summaries": summaries.count(0)}


def _fmt(x: float, digits: int = 1) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


COLUMNS = ("run", "benchmark", "mode", "model", "score /7", "%", "avg@k ± std (%)", "split (%)",
           "per turn (%)", "failed", "tokens mean / median / p90", "truncated")


def table_row(run: str, s: dict) -> list[str]:
    a = s["avg_at_k"]
    split = " · ".join(f"{label} {_fmt(g['percent'])}" for label, g in s["groups"].items()) or "–"
    failed = str(s["failed"])
    if s["failed"]:
        failed += f" (as 0: {_fmt(s['percent_failed_as_zero'])}%)"
    if s["pending"]:
        failed += f"; {s['pending']} ungraded"
    if s["undrawn"]:
        failed += f"; {s['undrawn']} not drawn"
    turn_stats = s.get("turns", {})  # mode rc: the earlier turns' grades
    turn_grades = [f"{turn_stats[key]} {what}" for key, what in (("failed_grades", "failed"),
                                                                 ("pending_grades", "ungraded")) if turn_stats.get(key)]
    if turn_grades:
        failed += f"; earlier turns: {', '.join(turn_grades)}"
    t = s["tokens"]
    turns = " · ".join(f"t{i + 1} {_fmt(p)}" for i, p in enumerate(s["turns"]["percent"])) if "turns" in s else "–"
    if s.get("turns", {}).get("empty_summaries"):
        turns += f" ({s['turns']['empty_summaries']} of {s['turns']['summaries']} summaries empty)"
    return [run, s["benchmark"], s["mode"], s["model"], _fmt(s["mean"], 2), _fmt(s["percent"]),
            f"avg@{a['k']} {_fmt(a['percent'])} ± {_fmt(a['percent_std'])}", split, turns, failed,
            f"{_fmt(t['mean'], 0)} / {_fmt(t['median'], 0)} / {_fmt(t['p90'], 0)}",
            f"{_fmt(100 * s['truncated_fraction'])}%"]


# What Markdown would read as markup in a run's name or label: "|" would end the cell, "*x*" or
# "_x_" set it in italics, "<b>" pass as HTML. An "_" inside a word (imo_proofbench) is text.
MARKUP = re.compile(r"[\\|*`<>\[\]]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _table(header, rows) -> list[str]:
    def cells(row):  # and a line break would end the row
        return "| " + " | ".join(" ".join(MARKUP.sub(r"\\\g<0>", str(c)).splitlines()) for c in row) + " |"

    return [cells(header), "|" + "---|" * len(header)] + [cells(r) for r in rows]


def unfinished(summary: dict) -> bool:
    """Samples (or the earlier turns of rc samples) not drawn, not graded yet, or whose grading
    failed: a rerun does each."""
    turns = summary.get("turns", {})
    return bool(summary["pending"] or summary["undrawn"] or summary["failed"] or turns.get("failed_grades")
                or turns.get("pending_grades"))


def path_label(value: str | None, recorded_in: str | None) -> str | None:
    """A local path as the report names it: one spelling for every path to it, relative to here
    when it is under here, else absolute (a relative path as it read in the run's working
    directory `recorded_in`, so that runs started from two folders are not taken for one);
    anything else (a hub name) as it is."""
    path = recorded_path("path", value, recorded_in)
    if path is None or not os.path.exists(path):
        return path
    path = os.path.realpath(path)
    here = os.path.relpath(path)
    return path if here == os.pardir or here.startswith(os.pardir + os.sep) else here


def source_label(benchmark: dict, recorded_in: str | None = None) -> str:
    """Where a benchmark's problems come from: its file (`path_label`) or hub dataset, with the
    subset and a split other than train."""
    path, split = path_label(benchmark.get("path"), recorded_in), benchmark.get("split", "train")
    return " ".join(str(part) for part in (path, benchmark.get("subset"), None if split == "train" else split)
                    if part is not None)


def by_model(summaries: dict[str, dict]) -> tuple[list[str], list[list[str]]] | None:
    """Score (%) per model (rows) and benchmark + mode (columns), when the runs span several
    models; a pair the runs do not cover is "–" (two runs of one pair: the later one). Two
    benchmarks of one name from different sources (both left at the default name) are two
    columns, each labelled with its source."""
    models = list(dict.fromkeys(s["model"] for s in summaries.values()))
    if len(models) < 2:
        return None

    def column(s):
        return s["benchmark"], s["benchmark_source"], s["mode"]

    columns = list(dict.fromkeys(column(s) for s in summaries.values()))
    shared = {name for name, source, _ in columns
              if len({other for n, other, _ in columns if n == name}) > 1}
    cells = {(s["model"], column(s)): _fmt(s["percent"]) + ("*" if unfinished(s) else "") for s in summaries.values()}
    rows = [[m] + [cells.get((m, c), "–") for c in columns] for m in models]
    labels = [f"{name} ({source}) {mode}" if name in shared else f"{name} {mode}" for name, source, mode in columns]
    return ["model"] + labels, rows


def markdown(summaries: dict[str, dict]) -> str:
    lines = _table(COLUMNS, [table_row(run, s) for run, s in summaries.items()])
    pivot = by_model(summaries)
    if pivot is not None:
        star = ["", "\\* not finished: samples not drawn, not graded yet, or whose grading failed (a rerun does "
                       "them; the failed column below says how many)."] \
            if any(unfinished(s) for s in summaries.values()) else []
        lines = ["Score (%) by model:", "", *_table(*pivot), *star, "", "Every run:", "", *lines]
    notes = ("Scores leave failed grades out (a failed grade is not a 0); the failed column gives the "
             "score with them counted as 0. avg@k: the mean over the k samples of each sample's mean "
             "over problems (the samples drawn and graded, not failed, for every problem in the run); ± is their "
             "standard deviation (ddof 1). Truncated: nothing to grade (no `</think>`, or nothing after it). "
             "Reasoning-cache runs (mode rc): per turn, the mean score of each turn's answer (the last turn's is the run's "
             "score); tokens are the policy's over all turns, summaries apart.")
    return "\n".join(["# Evaluation report", "", *lines, "", notes, ""])


PANEL_COLUMNS = 3  # panels per row of a plot with one panel per run
PLOT_FILES = ("score_histogram.png", "score_vs_tokens.png", "score_per_turn.png")


def plot(summaries: dict[str, dict], runs: dict[str, list[dict]], out: Path) -> list[Path]:
    """score_histogram.png and score_vs_tokens.png (one panel per run), and for reasoning-cache
    runs score_per_turn.png (one line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False}):  # "$" in a run's name is text, not TeX
        return _plot(plt, summaries, runs, out)


def _plot(plt, summaries: dict[str, dict], runs: dict[str, list[dict]], out: Path) -> list[Path]:
    names = list(summaries)
    columns = min(len(names), PANEL_COLUMNS)
    rows = math.ceil(len(names) / columns)
    paths = []
    for filename, draw in (("score_histogram.png", _histogram), ("score_vs_tokens.png", _scatter)):
        fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        for ax, name in zip(axes.flat, names):
            graded = [r for r in runs[name] if r["graded"] and r["score"] is not None]
            draw(ax, graded)
            if not graded:
                ax.text(0.5, 0.5, "no graded samples", transform=ax.transAxes, ha="center", va="center")
            ax.set_title(f"{summaries[name]['benchmark']}: {name}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        paths.append(out / filename)
    rc_runs = [name for name in names if "turns" in summaries[name]]
    if rc_runs:
        paths.append(_per_turn(plt, {name: summaries[name] for name in rc_runs}, out / "score_per_turn.png"))
    else:  # an earlier report's, of runs this one does not have
        (out / "score_per_turn.png").unlink(missing_ok=True)
    return paths


def _per_turn(plt, summaries: dict[str, dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (name, s) in enumerate(summaries.items()):
        turns = s["turns"]
        # Runs often coincide (every score 0, or 7): dashes and markers keep each line visible.
        ax.plot(range(1, turns["count"] + 1), turns["mean"], label=name, linestyle=("-", "--", ":")[i % 3],
                marker="os^D"[i % 4], markersize=8 - 1.5 * (i % 4), alpha=0.85)
    count = max(s["turns"]["count"] for s in summaries.values())
    ax.set_xticks(range(1, count + 1))
    ax.set_ylim(-0.2, MAX_SCORE + 0.2)
    ax.set_xlabel("reasoning-cache turn")
    ax.set_ylabel("mean score (0-7)")
    ax.set_title("Score per turn", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _histogram(ax, graded: list[dict]) -> None:
    ax.hist([r["score"] for r in graded], bins=np.arange(MAX_SCORE + 2) - 0.5, rwidth=0.85)
    ax.set_xticks(range(MAX_SCORE + 1))
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)  # an empty panel's axis would run below 0 samples
    ax.set_xlabel("score (0-7)")
    ax.set_ylabel("samples")


def _scatter(ax, graded: list[dict]) -> None:
    ax.scatter([r["completion_tokens"] for r in graded], [r["score"] for r in graded], s=12, alpha=0.6)
    ax.set_yticks(range(MAX_SCORE + 1))
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("score (0-7)")


def run_names(run_dirs: list[str]) -> list[str]:
    """Short unique names: the folder names, or the paths where folder names repeat."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def runs_in(folder: str) -> list[str]:
    """The eval runs a folder names: itself when it is one (or is not a folder: read_run says
    why), else the runs directly inside it, else those one level further down (a pipeline's
    output_dir, whose runs are in eval/), in name order."""
    path = Path(folder)
    if (path / SAMPLES_FILE).is_file() or not path.is_dir():
        return [folder]
    for pattern in ("*", "*/*"):
        runs = sorted(str(d) for d in path.glob(pattern) if (d / SAMPLES_FILE).is_file())
        if runs:
            return runs
    return [folder]


def previous_order(out: Path) -> list[str]:
    """The run names of the report.json in `out`, in its order (none when there is none)."""
    try:
        summaries = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return []
    return list(summaries) if isinstance(summaries, dict) else []


def check_not_another_run(output: Path, run_dirs: list[str]) -> None:
    """ConfigError when `output` is the folder of a run (its config.json), or of evaluation runs
    (a pipeline's, or any folder that `runs_in` finds runs in), and neither is one of `run_dirs`
    nor holds them: this report would replace that run's or those runs' own, or sit among a
    trainer's files."""
    held = [run for run in runs_in(str(output)) if run != str(output)]
    if not (output / "config.json").is_file() and not held:
        return
    here = os.path.realpath(output)
    if any(os.path.realpath(run) == here or os.path.realpath(run).startswith(here + os.sep) for run in run_dirs):
        return
    what = "another run (it holds a config.json)" if not held else \
        f"other evaluation runs ({os.path.relpath(held[0], output)}{', ...' if len(held) > 1 else ''})"
    raise ConfigError(f"--output {output} is the folder of {what}, not of those reported; write the report to a "
                      "folder of its own")


def report(run_dirs: list[str], output: str | None = None, plots: bool = True) -> tuple[str, Path, list[Path]]:
    """Write report.md, report.json (and the plots) to `output` (default: the run directory, or
    the one folder of runs given); returns the Markdown, the output folder and the plots' paths.
    A folder that holds runs stands for them."""
    if not run_dirs:
        raise ConfigError("give at least one run directory")
    # Where the report goes by default, a disk that refuses it is not one the user chose.
    elsewhere = "" if output is not None else "; or write the report elsewhere with --output"
    if output is None and len(run_dirs) == 1:
        output = run_dirs[0]
    # One run named twice (x and x/, a link to it, a folder and a run inside it) is one run.
    by_place = {}
    for run in (run for folder in run_dirs for run in runs_in(folder)):
        by_place.setdefault(os.path.realpath(run), run)
    run_dirs = list(by_place.values())
    runs_read = {run_dir: read_run(run_dir) for run_dir in run_dirs}  # a path that is no run: named first
    if output is None and len(run_dirs) == 1:  # named twice
        output = run_dirs[0]
    if output is None:
        raise ConfigError("several run directories need --output (a folder for the comparison)")
    check_not_another_run(Path(output), run_dirs)
    started = [run_dir for run_dir, (_, records) in runs_read.items() if records]  # past their first round
    if not started:
        raise ConfigError(f"{', '.join(run_dirs)}: the run{'s have' if len(run_dirs) > 1 else ' has'} no samples yet")
    for run_dir in sorted(set(run_dirs) - set(started)):  # left out of a comparison
        log.warning("%s: the run has no samples yet; left out of the report", run_dir)
    read = {name: (run_dir, *runs_read[run_dir]) for name, run_dir in zip(run_names(started), started)}
    # Written again over the same runs: in the order they had (a pipeline's: its stages), also
    # where the report goes to a pipeline's eval/ folder rather than to the pipeline's own.
    for earlier in (previous_order(Path(output)), previous_order(Path(output).parent)):
        if set(earlier) == set(read):
            read = {name: read[name] for name in earlier}
            break
    summaries, runs = {}, {}
    for name, (run_dir, config, records) in read.items():
        summaries[name] = summarize(config, records, read_problem_ids(run_dir), recorded_working_dir(Path(run_dir)))
        runs[name] = records
    out = Path(output)
    text = markdown(summaries)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text, encoding="utf-8")  # its dashes and ± in any locale
        (out / "report.json").write_text(json.dumps(without_non_finite(summaries), indent=2, allow_nan=False))
        if plots:
            return text, out, plot(summaries, runs, out)
        for name in PLOT_FILES:  # an earlier report's, of other data than this one's
            (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(os_error_line(e) + elsewhere) from None
    return text, out, []
