"""The reasoning-cache loop against a host loop over the sampler, its token contract, its compile
count and the RC states for GRPO."""

import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qed_jax
from qed_jax import cli
from qed_jax import reasoning_cache as rc
from qed_jax.config import ConfigError, ModelConfig, preset
from qed_jax.model import Qwen3
from qed_jax.sampling import Sampler, SamplingParams
from qed_jax.tokenizer import load_tokenizer, stop_ids
from tests.helpers import make_hf_model, make_hf_model_with_tokenizer, make_tokenizer

TOKENIZER = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "tokenizer"
PROBLEMS = [  # 10, 37, 17 and 60 tokens with the tiny tokenizer
    "Prove that n^2 + n is even.",
    "Let a, b be reals. Show (a+b)/2 >= sqrt(ab) for a, b >= 0.",
    "Prove sqrt(2) is irrational.",
    "Show that the triangle ABC is isosceles given that the angle bisector from A meets BC at its midpoint.",
]
# With these weights, greedy decoding writes token 468 in some rows and turns and not in others.
# Making </think>'s (tied) embedding a slightly scaled copy of 468's gives </think> the larger logit
# wherever 468's is the largest and positive, so greedy writes </think> (at least) where it would
# have written 468: some turns (and summaries) close their thinking and others never do, and some
# write </think> several times before other text (the text after the last one is the answer).
TRIGGER, BOOST = 468, 1.05
H_R, S, H_S = 16, 8, 12


def _model(seed: int, config: ModelConfig = preset("tiny"), think_end: int | None = None) -> Qwen3:
    """A tiny random Qwen3 with weights large enough for varied greedy text (std 0.1, norms
    perturbed), drawn with NumPy: eager JAX would compile an initializer per parameter shape."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return 1 + 0.1 * noise if any("norm" in str(p) for p in path) else 0.1 * noise

    values = jax.tree_util.tree_map_with_path(draw, state)
    if think_end is not None:
        embed = values["embed"][...]
        embed[think_end] = BOOST * embed[TRIGGER]
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, values))


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer(TOKENIZER)
    think_end = tokenizer.get_vocab()["</think>"]
    policy = _model(1, think_end=think_end)
    summarizer = _model(2, ModelConfig(**{**vars(preset("tiny")), "num_layers": 1, "intermediate_size": 96}))
    return tokenizer, think_end, policy, summarizer


# --------------------------------------------------------------------------------------------
# The reference: the sampler called turn by turn, prompts composed as lists on the host


def _pieces(tokenizer, template: str, slots: list[str], thinking: bool = True) -> list[list[int]]:
    """Literal ids of a template split at `slots` (in order), wrapped in the chat template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "@@"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    head, tail = text.split("@@")
    body = (Path(__file__).resolve().parent.parent / "configs" / "prompts" / f"{template}.txt").read_text().rstrip()
    literals = []
    for slot in slots:
        before, body = body.split("{" + slot + "}")
        literals.append(before)
    literals.append(body)
    literals[0], literals[-1] = head + literals[0], literals[-1] + tail
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in literals]


def _last(tokens: list[int], token: int) -> int:
    """The index of the last `token` in `tokens` (the judge splits a completion at its last </think>)."""
    return len(tokens) - 1 - tokens[::-1].index(token)


def _reference(tokenizer, policy, summarizer, problems, turns, summarize_last, first_summary, thinking,
               temperature=0.0):
    """Per problem, per turn: (generated tokens but a final stop, finish reason, summary ids or
    None, cut, summarizer tokens, summarizer finish reason). Turn t draws with key fold_in(0, 2t),
    its summary with fold_in(0, 2t + 1), as the compiled loop promises."""
    think_end, stops = tokenizer.get_vocab()["</think>"], stop_ids(tokenizer)
    r0, r1, r2 = _pieces(tokenizer, "rc_reasoning", ["problem", "summary"])
    s0, s1, s2, s3 = _pieces(tokenizer, "rc_summarize", ["problem", "summary", "reasoning"], thinking)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in problems]
    # One bucket: one compiled prefill and decode loop per model and budget.
    policy_sampler = Sampler(policy, buckets=(1024,), progress=False)
    summary_sampler = Sampler(summarizer, buckets=(1024,), progress=False)
    key = jax.random.key(0)
    summaries = [list(first_summary) for _ in problems]
    out = [[] for _ in problems]
    for t in range(turns):
        prompts = [r0 + p + r1 + s + r2 for p, s in zip(ids, summaries)]
        turn = policy_sampler.generate_ids(prompts, SamplingParams(H_R, temperature=temperature),
                                           jax.random.fold_in(key, 2 * t), stops)
        reasonings = []
        for c in turn:
            text = c.text_tokens
            reasonings.append(text[: _last(text, think_end)] if think_end in text else text)
        if t == turns - 1 and not summarize_last:
            for b, c in enumerate(turn):
                out[b].append((c.text_tokens, c.finish_reason, None, False, 0, None))
            break
        prompts = [s0 + p + s1 + s + s2 + r + s3 for p, s, r in zip(ids, summaries, reasonings)]
        written = summary_sampler.generate_ids(prompts, SamplingParams(H_S, temperature=temperature),
                                               jax.random.fold_in(key, 2 * t + 1), stops)
        for b, (c, w) in enumerate(zip(turn, written)):
            text = w.text_tokens
            if thinking:
                text = text[_last(text, think_end) + 1:] if think_end in text else []
            summaries[b] = text[:S]
            cut = len(text) > S or (w.finish_reason == "length" and len(text) > 0)
            out[b].append((c.text_tokens, c.finish_reason, text[:S], cut, len(w.tokens), w.finish_reason))
    return out


def _as_reference(turn: rc.Turn, think_end: int):
    """A loop turn in the reference's terms: the generated tokens rebuilt from its parts."""
    tokens = turn.reasoning_ids + ([think_end] + turn.answer_ids if turn.finished_thinking else [])
    assert len(tokens) == turn.num_tokens - (turn.finish_reason == "stop")
    return (tokens, turn.finish_reason, turn.summary_ids, turn.summary_cut, turn.summarizer_num_tokens,
            turn.summarizer_finish_reason)


def _three_turns_with_a_separate_summarizer(setup, temperature):
    """(the compiled loop's results, the host loop's turns) for PROBLEMS at `temperature`."""
    tokenizer, _, policy, summarizer = setup
    params = rc.RCParams(turns=3, reasoning_tokens=H_R, summary_tokens=S, temperature=temperature, no_summary="none",
                         max_turns=8)
    frozen = rc.Summarizer(summarizer, SamplingParams(H_S, temperature=temperature), thinking=False)
    results = rc.ReasoningCache(policy, tokenizer, params, frozen).run(PROBLEMS, key=jax.random.key(0))
    return results, _host_turns(setup, temperature)


def _host_turns(setup, temperature):
    tokenizer, _, policy, summarizer = setup
    marker = tokenizer("none", add_special_tokens=False)["input_ids"]  # no_summary
    return _reference(tokenizer, policy, summarizer, PROBLEMS, 3, False, marker, False, temperature)


def test_compiled_loop_equals_the_host_loop_with_a_separate_summarizer(setup):
    tokenizer, think_end, _, _ = setup
    results, expected = _three_turns_with_a_separate_summarizer(setup, 0.0)
    for result, ref in zip(results, expected):
        assert [_as_reference(t, think_end) for t in result.turns] == ref
        last = result.turns[-1]  # no answer (not an empty one) from a last turn that did not close its thinking
        assert result.answer == (tokenizer.decode(last.answer_ids, skip_special_tokens=False)
                                 if last.finished_thinking else None)
    turns = [t for r in results for t in r.turns]
    assert any(not r.turns[-1].finished_thinking for r in results)
    # The cases the contract must handle all occur (else the fixture no longer tests them).
    assert any(t.finished_thinking for t in turns) and any(not t.finished_thinking for t in turns)
    # Turns that wrote </think> more than once: split at the last one (the rest is reasoning).
    assert any(think_end in t.reasoning_ids and t.finished_thinking for t in turns)
    assert not any(think_end in t.answer_ids for t in turns)
    assert any(t.summary_cut for t in turns)
    assert all(len(t.summary_ids) == S for t in turns if t.summary_cut)
    assert [t.summary_ids is None for t in results[0].turns] == [False, False, True]


def test_compiled_loop_draws_what_the_host_loop_draws_when_sampling(setup):
    # Every row, turn and summary has its own key: the compiled loop's draws are the host loop's.
    think_end = setup[1]
    results, expected = _three_turns_with_a_separate_summarizer(setup, 0.9)
    greedy = _host_turns(setup, 0.0)
    assert [[_as_reference(t, think_end) for t in r.turns] for r in results] == expected != greedy


def test_compiled_loop_equals_the_host_loop_when_the_policy_summarizes_itself(setup):
    tokenizer, think_end, policy, _ = setup
    params = rc.RCParams(turns=2, reasoning_tokens=H_R, summary_tokens=S, summarizer_tokens=H_S, temperature=0.0,
                         summarize_last=True, no_summary=None, max_turns=8)
    # The policy thinks when it summarizes: its summary is its text after </think>.
    results = rc.ReasoningCache(policy, tokenizer, params).run(PROBLEMS, key=jax.random.key(0))
    expected = _reference(tokenizer, policy, policy, PROBLEMS, 2, True, [], thinking=True)
    for result, ref in zip(results, expected):
        assert [_as_reference(t, think_end) for t in result.turns] == ref
    summaries = [t.summary_ids for r in results for t in r.turns]
    assert None not in summaries  # a summary follows the last turn too
    # Summaries after </think> (one cut at S) and empty ones where the summarizer never closed it.
    assert [] in summaries and any(len(s) == S for s in summaries)


def test_more_turns_compile_nothing_new(setup, caplog):
    tokenizer, _, policy, summarizer = setup
    params = rc.RCParams(reasoning_tokens=H_R, summary_tokens=S, temperature=0.9, no_summary="none", max_turns=8)
    runner = rc.ReasoningCache(policy, tokenizer, params,
                               rc.Summarizer(summarizer, SamplingParams(H_S, temperature=0.7), thinking=False))
    # The batch and problem bucket of the first test: its compiled loop serves when run before.
    two = runner.run_ids([[5, 6, 7], [8] * 30, [1] * 64, [9]], turns=2)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        five = runner.run_ids([[9, 10], [11] * 12, [12] * 40, [13] * 3], turns=5)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == []
    assert [len(x) for x in two] == [2] * 4 and [len(x) for x in five] == [5] * 4
    assert all(t.num_tokens == H_R for x in five for t in x if t.finish_reason == "length")


def test_loop_on_a_mesh_equals_the_loop_on_one_device(setup):
    """Rows and caches split over 8 devices (batch 4 rounds up to 8 rows): the same tokens."""
    from qed_jax.sharding import MeshConfig, make_mesh

    tokenizer, _, policy, summarizer = setup
    params = rc.RCParams(turns=2, reasoning_tokens=H_R, summary_tokens=S, temperature=0.0, no_summary="none",
                         max_turns=8)
    frozen = rc.Summarizer(summarizer, SamplingParams(H_S, temperature=0.0), thinking=False)
    single = rc.ReasoningCache(policy, tokenizer, params, frozen).run_ids(
        [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROBLEMS])
    sharded = rc.ReasoningCache(policy, tokenizer, params, frozen, mesh=make_mesh(MeshConfig(data=-1)))
    assert sharded.batch_shards == 8
    assert sharded.run_ids([tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROBLEMS]) == single


# --------------------------------------------------------------------------------------------
# The pure pieces


def test_compose_concatenates_literals_and_fills():
    rng = np.random.default_rng(0)
    pieces = rc.PromptPieces((np.array([1, 2, 3], np.int32), np.array([4], np.int32), np.array([5, 6], np.int32)),
                             ("problem", "summary"))
    B, P, S_ = 5, 6, 4
    problems, summaries = rng.integers(10, 99, (B, P)), rng.integers(100, 199, (B, S_))
    problem_lengths, summary_lengths = np.array([6, 1, 3, 6, 2]), np.array([0, 4, 2, 4, 1])
    tokens, lengths = rc.compose(pieces, B, dict(problem=(jnp.asarray(problems), jnp.asarray(problem_lengths)),
                                                 summary=(jnp.asarray(summaries), jnp.asarray(summary_lengths))))
    assert tokens.shape == (B, 3 + P + 1 + S_ + 2)
    for b in range(B):
        expected = pieces.ids(problem=problems[b, : problem_lengths[b]].tolist(),
                              summary=summaries[b, : summary_lengths[b]].tolist())
        assert lengths[b] == len(expected)
        assert np.asarray(tokens[b]).tolist() == expected + [0] * (tokens.shape[1] - len(expected))


def test_reasoning_and_summary_extraction():
    te, stop = 4, 2
    # Rows: </think> mid-way; none (ran out); none (stopped); </think> then stop; </think> first;
    # two of them (the last one splits, as the judge splits a completion); one past the text.
    outputs = [[7, 8, te, 9, 9, 9], [7, 8, 9, 9, 9, 9], [7, 8, stop, 0, 0, 0], [7, te, 9, stop, 0, 0],
               [te, 5, 6, 7, 8, 9], [7, te, 8, te, 9, stop], [7, 8, 9, stop, te, te]]
    lengths = np.array([6, 6, 3, 4, 6, 6, 4])
    finish = np.array([2, 2, 1, 1, 2, 1, 1])  # 1 stop, 2 length
    tokens = jnp.asarray(outputs, jnp.int32)
    assert np.asarray(rc.reasoning_lengths(tokens, jnp.asarray(lengths), jnp.asarray(finish), te)).tolist() == \
        [2, 6, 2, 1, 0, 3, 3]
    ids, n, cut = rc.extract_summary(tokens, jnp.asarray(lengths), jnp.asarray(finish), te, 3, thinking=True)
    assert np.asarray(n).tolist() == [3, 0, 0, 1, 3, 1, 0]
    # Row 0 fits S, but its summarizer ran out of budget while writing it: cut too.
    assert np.asarray(cut).tolist() == [True, False, False, False, True, False, False]
    assert np.asarray(ids).tolist() == [[9, 9, 9], [0, 0, 0], [0, 0, 0], [9, 0, 0], [5, 6, 7], [9, 0, 0], [0, 0, 0]]
    ids, n, cut = rc.extract_summary(tokens, jnp.asarray(lengths), jnp.asarray(finish), te, 3, thinking=False)
    assert np.asarray(n).tolist() == [3, 3, 2, 3, 3, 3, 3]
    assert np.asarray(cut).tolist() == [True, True, False, False, True, True, False]
    assert np.asarray(ids).tolist() == [[7, 8, te], [7, 8, 9], [7, 8, 0], [7, te, 9], [te, 5, 6], [7, te, 8],
                                        [7, 8, 9]]


def test_a_summarizer_whose_template_always_thinks_warns_with_its_thinking_off(setup, caplog):
    """A thinking model's template opens <think> whatever enable_thinking says: with thinking off,
    its reasoning and </think> would be taken as the summary."""
    tokenizer, _, policy, summarizer = setup
    params = rc.RCParams(turns=1, reasoning_tokens=2, summary_tokens=4, no_summary="none", max_turns=1)
    with caplog.at_level(logging.WARNING):
        rc.ReasoningCache(policy, tokenizer, params, rc.Summarizer(summarizer, thinking=True))
        assert not caplog.records
        rc.ReasoningCache(policy, tokenizer, params, rc.Summarizer(summarizer, thinking=False))
    assert [r.getMessage() for r in caplog.records] == [
        "the summarizer's chat template opens <think> although its thinking is off (a thinking model's template): "
        "each summary will hold its reasoning and </think>; turn its thinking on (generate --summarizer-thinking, "
        "eval rc.summarizer_thinking, GRPO rc.summarizer.thinking) so that a summary is its text after </think>"]


def test_a_summarizer_with_other_embedding_rows_than_the_policy_is_refused():
    """Either model may sample any id below its vocab_size (padding rows too), and each one's ids
    go into the other's prompt: in a model without that row the id would read NaN (an empty
    summary, or a turn that stops at once), so a summarizer with fewer or more rows is refused."""
    tokenizer = load_tokenizer(TOKENIZER)
    params = rc.RCParams(turns=1, reasoning_tokens=2, summary_tokens=4, no_summary="none", max_turns=1)
    smaller = _model(1, preset("tiny").replace(vocab_size=len(tokenizer)))  # holds the tokenizer, not 512 rows
    for policy, summarizer, rows in ((_model(0), smaller, (len(tokenizer), 512)),
                                     (smaller, _model(0), (512, len(tokenizer)))):
        with pytest.raises(ConfigError, match=rf"^the summarizer's vocab_size \({rows[0]}\) is not the policy's "
                                              rf"\({rows[1]}\): the policy's sampled ids go into its prompt"):
            rc.ReasoningCache(policy, tokenizer, params, rc.Summarizer(summarizer))
    rc.ReasoningCache(smaller, tokenizer, params, rc.Summarizer(_model(2, preset("tiny").replace(
        vocab_size=len(tokenizer)))))  # the same rows


def test_a_turn_past_the_trained_positions_warns_once(caplog):
    tokenizer = load_tokenizer(TOKENIZER)
    params = rc.RCParams(turns=1, reasoning_tokens=2, summary_tokens=4, temperature=0.0, no_summary="none",
                         max_turns=1)
    probe = rc.ReasoningCache(_model(1), tokenizer, params)
    problem = tokenizer(PROBLEMS[0], add_special_tokens=False)["input_ids"]
    (parts,) = rc.turn_parts(probe.prompts, len(problem), probe.shape(), False)
    length = sum(parts.values())
    limit = length - 1  # one position short of the longest turn
    loop = rc.ReasoningCache(_model(1, preset("tiny").replace(max_position_embeddings=limit)), tokenizer, params)
    rc._warn_past_trained_positions.cache_clear()  # whatever another test warned of
    with caplog.at_level(logging.WARNING, logger="qed_jax.reasoning_cache"):
        for _ in range(2):  # once, not at every call
            loop.run_ids([problem])
    # Self-summarizing: the longer role is summarizing, whose prompt also holds the turn's reasoning.
    template = probe.prompts.summarize.literal_tokens
    assert parts == {"template": template, "problem": len(problem), "summary": 4, "reasoning": 2, "summarizer": 4}
    assert [r.getMessage() for r in caplog.records] == [
        f"a reasoning-cache turn of the policy takes up to {length} positions (template {template}, problem "
        f"{len(problem)}, summary 4, reasoning 2, summarizer 4), past the model's max_position_embeddings ({limit}): "
        "positions beyond it were never trained; lower the reasoning cache's token budgets for this model (the rc "
        "section's, or generate's --max-new-tokens, --summary-tokens and --summarizer-max-new-tokens)"]


@pytest.mark.parametrize("field", ["batch_size", "problem_tokens"])
@pytest.mark.parametrize("value", [0, -1])
def test_rc_params_refuse_a_batch_or_problem_buffer_of_no_rows_or_tokens(field, value):
    # Else 0 ran as "the default" and -1 failed inside JAX (a cache of -1 rows) or said "raise problem_tokens (-1)".
    with pytest.raises(ConfigError, match=f"^RCParams.{field} must be at least 1"):
        rc.RCParams(**{field: value})
    assert getattr(rc.RCParams(**{field: None}), field) is None  # None is the default, derived from the call


@pytest.mark.parametrize("field", ["turns", "reasoning_tokens", "summary_tokens", "summarizer_tokens", "problem_tokens",
                                   "batch_size", "max_turns"])
@pytest.mark.parametrize("value", [8.0, 8.5, True, "8"])
def test_rc_params_refuse_a_count_that_is_not_a_whole_number(field, value):
    # Else summary_tokens=8.0 passed the range check and failed deep in the loop with a TypeError naming nothing.
    with pytest.raises(ConfigError, match=rf"^RCParams.{field} must be a whole number, got {re.escape(repr(value))}$"):
        rc.RCParams(**{field: value})
    assert getattr(rc.RCParams(**{field: np.int64(8)}), field) == 8  # numpy's integers are whole numbers
    with pytest.raises(ConfigError, match=r"^max_new_tokens must be a whole number, got 8\.0$"):
        SamplingParams(max_new_tokens=8.0)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, r"temperature must be 0 \(greedy\) or a finite number"),
    ("temperature", float("nan"), r"temperature must be 0 \(greedy\) or a finite number"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"), ("top_p", 1.7, r"top_p must be in \(0, 1\]"),
    ("top_k", -5, "top_k must be at least 0"), ("top_k", 1.5, r"top_k must be a whole number, got 1\.5$"),
    ("top_k", True, "top_k must be a whole number, got True$")])
def test_rc_params_check_their_sampling_as_sampling_params_do(field, value, message):
    # Else a negative temperature or top_p=0 decodes greedily, NaN makes NaN logits, and top_k=1.5
    # keeps the top 1, silently.
    with pytest.raises(ConfigError, match=f"^RCParams.{message}"):
        rc.RCParams(**{field: value})
    with pytest.raises(ConfigError, match=f"^{message}"):
        SamplingParams(**{field: value})


def test_templates_split_at_their_placeholders(tmp_path):
    literals, slots = rc.split_template("A {summary} B {problem} {other} C", rc.REASONING_SLOTS)
    assert literals == ["A ", " B ", " {other} C"] and slots == ("summary", "problem")
    with pytest.raises(ConfigError, match=r"\{reasoning\} must appear exactly once, found 0"):
        rc.split_template("{problem} {summary}", rc.SUMMARIZE_SLOTS, "mine.txt")
    with pytest.raises(ConfigError, match=r"\{problem\} must appear exactly once, found 2"):
        rc.split_template("{problem} {summary} {problem}", rc.REASONING_SLOTS)
    with pytest.raises(ConfigError, match=r"^mine.txt: \{\{problem\}\} has doubled braces; an RC template writes"):
        rc.split_template("{{problem}} {summary}", rc.REASONING_SLOTS, "mine.txt")  # as the judge's templates do
    for name, slots in (("rc_reasoning", rc.REASONING_SLOTS), ("rc_summarize", rc.SUMMARIZE_SLOTS)):
        rc.split_template(rc.load_rc_template(name), slots, name)
    path = tmp_path / "short.txt"
    path.write_text("P: {problem}\nS: {summary}\n")
    assert rc.load_rc_template(str(path)) == "P: {problem}\nS: {summary}"
    with pytest.raises(ConfigError, match="neither a file nor one of"):
        rc.load_rc_template("no_such_template")


def test_literal_pieces_carry_the_chat_wrappers():
    tokenizer = load_tokenizer(TOKENIZER)
    pieces = rc.tokenize_template(tokenizer, "Solve {problem} given {summary}.", rc.REASONING_SLOTS)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Solve X given Y."}], tokenize=False,
                                         add_generation_prompt=True)
    x, y = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("X", "Y"))
    assert tokenizer.decode(pieces.ids(problem=x, summary=y), skip_special_tokens=False) == text


# --------------------------------------------------------------------------------------------
# RC states for GRPO


def test_training_states_and_their_prompts():
    tokenizer = load_tokenizer(TOKENIZER)
    prompts = rc.build_prompts(tokenizer, rc.RCParams())
    # A deterministic fake trajectory of 3 turns, each followed by a summary.
    summaries = [[11, 12], [13], [14, 15, 16]]
    states = rc.training_states(summaries)
    assert states == [[], [11, 12], [13], [14, 15, 16]]
    problem = [20, 21, 22]
    ids = rc.state_prompt_ids(prompts, problem, states[3])
    r0, r1, r2 = (p.tolist() for p in prompts.reasoning.literals)
    assert ids == r0 + problem + r1 + [14, 15, 16] + r2
    assert rc.state_prompt_ids(prompts, problem, states[0]) == r0 + problem + r1 + r2
    # The same contract as the compiled loop's composition.
    tokens, n = rc.compose(prompts.reasoning, 1, dict(problem=(jnp.asarray([problem]), jnp.asarray([3])),
                                                      summary=(jnp.asarray([[14, 15, 16, 0]]), jnp.asarray([3]))))
    assert np.asarray(tokens[0, : int(n[0])]).tolist() == ids


def test_draw_states_uniformly_without_replacement():
    draws = [rc.draw_states(np.random.default_rng(seed), 4, 2) for seed in range(2000)]
    assert all(len(set(d)) == 2 and set(d) <= {0, 1, 2, 3} for d in draws)
    counts = np.bincount(np.concatenate(draws), minlength=4) / len(draws)
    np.testing.assert_allclose(counts, 0.5, atol=0.04)  # each state is drawn with probability 2/4
    assert rc.draw_states(np.random.default_rng(7), 4, 2) == rc.draw_states(np.random.default_rng(7), 4, 2)
    assert sorted(rc.draw_states(np.random.default_rng(0), 4, 4)) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="cannot draw 5 distinct states out of 4"):
        rc.draw_states(np.random.default_rng(0), 4, 5)


# --------------------------------------------------------------------------------------------
# Entry points


def test_module_and_package_entry_points_agree(setup):
    tokenizer, _, policy, _ = setup
    # The shapes of the self-summarizing test above: its compiled loop serves.
    params = rc.RCParams(turns=1, reasoning_tokens=H_R, summary_tokens=S, summarizer_tokens=H_S, temperature=0.0,
                         no_summary=None, max_turns=8)
    a = qed_jax.reasoning_cache(policy, tokenizer, PROBLEMS, qed_jax.RCParams(**vars(params)))
    b = rc.reasoning_cache(policy, tokenizer, PROBLEMS, params)
    assert [r.turns[0].reasoning for r in a] == [r.turns[0].reasoning for r in b]
    assert [len(r.turns) for r in a] == [1] * 4 and a[0].turns[0].summary is None


def test_ids_the_policy_cannot_read_and_released_weights_are_refused(setup):
    tokenizer, _, policy, _ = setup
    params = rc.RCParams(turns=1, reasoning_tokens=H_R, summary_tokens=S, summarizer_tokens=H_S, no_summary=None)
    loop = rc.ReasoningCache(policy, tokenizer, params)
    with pytest.raises(ValueError, match=rf"^problems\[1\] holds token id {policy.config.vocab_size}, outside"):
        loop.run_ids([[5, 6], [policy.config.vocab_size]])
    with pytest.raises(ValueError, match=r"^problems\[0\] is of type str, not token ids: give one list of ints per problem"):
        loop.run_ids(["Prove it."])
    # A problem past the largest bucket names the setting that takes it (the buffer P), not "the prompt".
    bucketed = rc.ReasoningCache(policy, tokenizer, params, buckets=(8,))
    with pytest.raises(ConfigError, match=r"^a problem takes 9 tokens, more than the largest prompt bucket \(8\); "
                                          r"set RCParams.problem_tokens to at least 9"):
        bucketed.run_ids([[5] * 9])
    with pytest.raises(ConfigError, match=r"^prompt buckets must be one or more token counts of at least 1 in "
                                          r"increasing order"):
        rc.ReasoningCache(policy, tokenizer, params, buckets=(64, 8))
    loop.release()
    with pytest.raises(RuntimeError, match="weights were released; call update_weights"):
        loop.run_ids([[5, 6]])


@pytest.mark.parametrize("turns", [2.5, "2", True, 0, 9])
def test_a_turn_count_that_is_not_a_whole_number_in_range_is_refused(setup, turns):
    """A fractional count ran the whole loop, then failed reading its turns back with a TypeError
    that named nothing; True ran as 1 turn; a string failed comparing."""
    tokenizer, _, policy, _ = setup
    params = rc.RCParams(turns=1, reasoning_tokens=2, summary_tokens=S, summarizer_tokens=2, no_summary=None,
                         max_turns=8)
    with pytest.raises(ConfigError, match=rf"^turns must be a whole number from 1 to max_turns \(8\), got "
                                          rf"{re.escape(repr(turns))}$"):
        rc.ReasoningCache(policy, tokenizer, params).run_ids([[5, 6]], turns=turns)


def test_generate_cli_notes_a_missing_or_cut_off_answer():
    from types import SimpleNamespace

    def result(answer, finish):
        return SimpleNamespace(answer=answer, turns=[SimpleNamespace(finish_reason="stop"),
                                                     SimpleNamespace(finish_reason=finish)])

    assert cli._rc_note(result(None, "length"), 6) == "no </think> in the last turn: no answer"
    assert cli._rc_note(result("By induction", "length"), 6) == "the answer was cut off at --max-new-tokens 6"
    assert cli._rc_note(result("By induction. QED", "stop"), 6) is None


def test_generate_cli_reasoning_cache_json(tmp_path, capsys):
    make_hf_model_with_tokenizer(tmp_path)
    capsys.readouterr()
    rc_code = cli.main(["generate", "--model", str(tmp_path), "--reasoning-cache", "--turns", "2",
                        "--prompt", "Let n be", "--prompt", "Prove", "--max-new-tokens", "6",
                        "--summary-tokens", "32", "--summarizer-max-new-tokens", "5", "--temperature", "0.7", "--seed", "1", "--json"])
    assert rc_code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["Let n be", "Prove"]
    for r in rows:
        assert len(r["turns"]) == 2 and r["answer"] == r["turns"][-1]["answer"]
        first, last = r["turns"]
        assert 1 <= first["num_tokens"] <= 6 and first["finish_reason"] in ("stop", "length")
        assert isinstance(first["summary"], str) and last["summary"] is None
        assert 1 <= first["summarizer_num_tokens"] <= 5
    # Errors of the reasoning cache name generate's flags, in one line.
    base = ["generate", "--model", str(tmp_path), "--reasoning-cache", "--prompt", "p", "--max-new-tokens", "4"]
    assert cli.main([*base, "--summary-tokens", "2"]) == 2
    marker = len(load_tokenizer(tmp_path)(rc.RCParams.no_summary, add_special_tokens=False)["input_ids"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"qed-jax generate: error: the no-summary marker takes {marker} tokens, more than --summary-tokens (2): "
        f"raise --summary-tokens to at least {marker}")
    other = tmp_path / "other"
    make_hf_model(other)
    make_tokenizer(vocab_size=300).save_pretrained(other)
    assert cli.main([*base, "--summarizer", str(other)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qed-jax generate: error: the summarizer's tokenizer has another vocabulary than the policy's; RC passes "
        "the policy's token ids to the summarizer, so both must share one vocabulary")


def test_one_problem_string_alone_is_one_problem(setup):
    """A string alone is one problem (as `generate` takes one prompt), not one per character."""
    tokenizer, _, policy, _ = setup
    params = rc.RCParams(turns=1, reasoning_tokens=2, summary_tokens=S, summarizer_tokens=2, temperature=0.0,
                         no_summary=None, max_turns=8)
    alone = qed_jax.reasoning_cache(policy, tokenizer, "Prove it.", params)
    listed = qed_jax.reasoning_cache(policy, tokenizer, ["Prove it."], params)
    assert [r.problem for r in alone] == ["Prove it."]
    assert [t.num_tokens for t in alone[0].turns] == [t.num_tokens for t in listed[0].turns]
