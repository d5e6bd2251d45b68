"""GRPO: the pure math against NumPy, the update's basic properties, the learner loop against
the loopback judge (including a SIGKILL mid-step), learning on the toy task, and the same loop
as 2 processes (equal to 1 process, resumed after a SIGKILL, stopped by one signal)."""

import dataclasses
import json
import logging
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qed_jax.config import PRESETS, load_config
from qed_jax.config import ConfigError
from qed_jax.data import pack_sequences
from qed_jax.hf import SafetensorsFolder
from qed_jax.grpo import (AGGREGATIONS, METRIC_SUMS, GRPOConfig, Learner, LossConfig, accumulate_step, aggregate,
                          clipped_policy_loss, group_advantages, grpo_loss, kl_k3, load_prompts, reward_summary,
                          rollout_sequences, run_updates, sequence_logprobs, summary, trained_samples, update_samples)
from qed_jax.multihost import process_rows
from qed_jax.sampling import Sampler
from qed_jax.sharding import MeshConfig, make_mesh
from qed_jax.model import Qwen3
from qed_jax.trainer import OptimConfig, decay_mask, make_optimizer
from tests.judge_server import JudgeServer
from tests.helpers import assert_signal_writes_a_checkpoint, cli_env, finish, logged_steps, processes, read_metrics

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "rl" / "tiny.yaml")
TINY_RC = str(REPO / "configs" / "rl" / "tiny_rc.yaml")


# --- pure math against NumPy ------------------------------------------------------------------


def test_the_closing_line_gives_the_last_steps_rewards_or_says_none_were_logged_here():
    history = [{"step": 1, "reward_mean": 0.5}, {"step": 2, "reward_mean": float("nan")},
               {"step": 3, "reward_mean": 0.75}, {"step": 4}]
    assert summary(reward_summary(history)) == "reward mean 0.6250 over the last 2 steps, best 0.7500 at step 3"
    assert summary(reward_summary(history, last=1), best=False) == "reward mean 0.7500 over the last 1 steps"
    # A run found complete in checkpoints that another run directory logged.
    assert summary(reward_summary([])) == ("no reward logged in this run directory (it was trained where its "
                                           "checkpoints were written)")


def test_advantages_match_numpy_including_all_equal_groups():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 8, (5, 6)).astype(np.float32) / 7
    rewards[2] = 3 / 7  # an all-equal group
    ref = rewards - rewards.mean(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(rewards))), ref, atol=1e-6)
    ref_std = ref / (rewards.std(1, keepdims=True) + 1e-6)
    out = np.asarray(group_advantages(jnp.asarray(rewards), normalize_std=True))
    np.testing.assert_allclose(out, ref_std, atol=1e-6)
    assert np.all(out[2] == 0)


@pytest.mark.parametrize("group", [5, 6, 7, 8, 12, 16])
def test_a_group_of_equal_grades_has_advantage_exactly_zero(group):
    """Each grade 0-7 given to a whole group, and to a group with one failed grade: advantages
    exactly 0, with or without normalize_std, and drop_zero_advantage_groups drops the group. (A
    float32 mean of 16 copies of 6/7 is not 6/7: such groups got ~2e-7, 0.15 after the std.)"""
    rewards = np.repeat(np.arange(8, dtype=np.float32)[:, None] / 7, group, axis=1)
    failed = rewards.copy()
    failed[:, 0] = 0.0  # what a failed grade carries
    valid = np.ones(rewards.shape, bool)
    valid[:, 0] = False
    for r, v in ((rewards, None), (failed, jnp.asarray(valid))):
        for normalize_std in (False, True):
            out = np.asarray(group_advantages(jnp.asarray(r), normalize_std, valid=v))
            assert np.all(out == 0), out
        v = jnp.ones(r.shape, bool) if v is None else v
        assert not np.asarray(trained_samples(v, group_advantages(jnp.asarray(r), valid=v), True)).any()


def test_failed_grades_are_left_out_of_their_group():
    rng = np.random.default_rng(7)
    rewards = rng.integers(0, 8, (4, 5)).astype(np.float32) / 7
    valid = np.ones((4, 5), bool)
    valid[0, 1] = False  # one failure: the other four form the baseline
    valid[1, :4] = False  # one graded sample left: no baseline, nothing trained
    valid[2, :] = False
    rewards[~valid] = 0.0  # what a failed Grade carries; it must not count as a score of 0
    advantages = np.asarray(group_advantages(jnp.asarray(rewards), valid=jnp.asarray(valid)))
    for p in range(4):
        graded = rewards[p][valid[p]]
        expected = np.where(valid[p], rewards[p] - (graded.mean() if graded.size else 0.0), 0.0)
        np.testing.assert_allclose(advantages[p], expected, atol=1e-6)
    trained = np.asarray(trained_samples(jnp.asarray(valid), jnp.asarray(advantages), False))
    assert trained[0].tolist() == [True, False, True, True, True]
    assert not trained[1].any() and not trained[2].any() and trained[3].all()


def test_dropped_groups_leave_the_sample_normalizer():
    """The recipe filters zero-advantage groups before batching: the update's sample count is
    that of the samples left."""
    valid = jnp.ones((3, 2), bool)
    advantages = jnp.asarray([[0.5, -0.5], [0.0, 0.0], [0.25, -0.25]])
    trained = np.asarray(trained_samples(valid, advantages, True)).reshape(-1).astype(np.float32)
    assert trained.tolist() == [1, 1, 0, 0, 1, 1]
    seen = []

    class Recorder:  # stands in for the Learner
        def update(self, params, opt_state, ref, rows, num_sequences, num_tokens):
            seen.append((num_sequences, int(rows["mask"].sum()), num_tokens))
            return params, opt_state, {"loss": 0.0}

    config = GRPOConfig(prompts_per_step=3, samples_per_prompt=2, train_length=8, max_prompt_length=4,
                        max_new_tokens=4)
    sequences = [{"tokens": np.zeros(4, np.int32), "mask": np.ones(4, np.float32)} for _ in range(6)]
    run_updates(Recorder(), None, None, None, sequences, trained, config)
    # 4 samples of 4 tokens are packed (two to a row) and counted; the dropped group is not. The
    # loss scores no row's first token, so 2 of the 16 are not among the update's tokens.
    assert seen == [(4, 4 * 4, 14)]


def test_a_skipped_update_still_takes_its_place_in_the_learning_rate_schedule():
    """A cosine sized for the run's updates reaches its end although the first steps train
    nothing (every group dropped): the lr of each applied update is its place's in the run."""
    import optax

    from qed_jax.trainer import lr_schedule, make_optimizer

    config = load_config(GRPOConfig, None, ["steps=10", "prompts_per_step=2", "samples_per_prompt=2", "train_length=8",
                                            "max_prompt_length=4", "max_new_tokens=4", "optim.schedule=cosine",
                                            "optim.warmup_ratio=0", "optim.lr=1.0", "optim.weight_decay=0",
                                            "minibatches=2", "drop_zero_advantage_groups=true"])
    optimizer = make_optimizer(config.optim, config.optimizer_updates, {"w": True})
    applied = []

    class Learner:  # the real optimizer on one weight; a constant gradient of 1 moves it by the lr (Adam)
        def update(self, params, opt_state, ref, rows, num_sequences, num_tokens):
            updates, opt_state = optimizer.update({"w": jnp.ones(())}, opt_state, params)
            applied.append(-float(updates["w"]))
            return optax.apply_updates(params, updates), opt_state, {"loss": 0.0}

    params, opt_state = {"w": jnp.zeros(())}, optimizer.init({"w": jnp.zeros(())})
    sequences = [{"tokens": np.zeros(4, np.int32), "mask": np.ones(4, np.float32)} for _ in range(4)]
    for step in range(config.steps):  # steps 0-4 train nothing; from step 5 only update 2 of each step's 2 trains
        trained = np.array([False, step >= 5] * 2)
        params, opt_state, _ = run_updates(Learner(), params, opt_state, None, sequences, trained, config)
    schedule = lr_schedule(config.optim, config.optimizer_updates)
    np.testing.assert_allclose(applied, [float(schedule(2 * step + 1)) for step in range(5, 10)], rtol=1e-4)
    counts = {type(s).__name__: int(s.count) for s in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, (optax.ScaleByAdamState, optax.ScaleByScheduleState)))
        if hasattr(s, "count")}
    assert counts == {"ScaleByAdamState": 5, "ScaleByScheduleState": 20}  # Adam's bias correction: 5 applied


def test_each_update_takes_the_same_samples_whatever_the_number_of_processes():
    one = update_samples(12, 3)
    assert [u.tolist() for u in one] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    for count in (2, 4):
        share = 12 // count
        parts = [update_samples(share, 3, first_sample=p * share) for p in range(count)]
        for m in range(3):  # update m: the same samples of the step, spread evenly over processes
            assert sorted(p * share + i for p in range(count) for i in parts[p][m]) == one[m].tolist()
            assert len({len(parts[p][m]) for p in range(count)}) <= 2


def test_process_rows_inverts_the_global_batch():
    """A process's rows come back from a global array sharded over rows, replicas counted once
    (here the rows are replicated over the tensor axis)."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    np.testing.assert_array_equal(process_rows(jax.make_array_from_process_local_data(sharding, rows)), rows)


def test_rl_rows_take_a_rubric_under_either_key_and_skip_a_malformed_one(tmp_path, caplog):
    from qed_jax.tokenizer import load_tokenizer

    rows = [{"problem": "P1", "rubrics": "scheme 1"}, {"problem": "P2", "rubric": "scheme 2"}, {"problem": "P3"},
            {"problem": "P4", "rubric": ["not a checkpoint"]}, {"problem": 5}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # a blank line first: lines count it
    config = load_config(GRPOConfig, TINY, [f"data.path={path}"])
    with caplog.at_level(logging.WARNING):
        prompts = load_prompts(config, load_tokenizer(REPO / "configs" / "tiny" / "tokenizer"))
    assert [(p["problem"], p["rubric"]) for p in prompts] == [("P1", "scheme 1"), ("P2", "scheme 2"), ("P3", None)]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped line 5: field 'rubric': marking scheme item 1 is not a mapping: 'not a checkpoint'",
        f"{path}: skipped line 6: field 'problem' is missing, empty or not text"]
    # With none left, the error says why each row was left out, and what to raise.
    with pytest.raises(ConfigError, match=rf"^{path}: no usable prompts among its 5 rows \(3 longer than 8 tokens: "
                                          r"raise max_prompt_length; 2 malformed \(the warnings above name them\)\)$"):
        load_prompts(load_config(GRPOConfig, TINY, [f"data.path={path}", "max_prompt_length=8"]),
                     load_tokenizer(REPO / "configs" / "tiny" / "tokenizer"))
    # An empty file says so, not "among its 0 rows ()".
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=rf"^{empty}: no problems to train on \(it holds no rows\)$"):
        load_prompts(load_config(GRPOConfig, TINY, [f"data.path={empty}"]),
                     load_tokenizer(REPO / "configs" / "tiny" / "tokenizer"))


def test_rl_rows_without_a_marking_scheme_or_a_problem_field_say_which_setting_maps_them(tmp_path, caplog):
    from qed_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(REPO / "configs" / "tiny" / "tokenizer")
    path = tmp_path / "rows.jsonl"

    def load(rows, *overrides):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qed_jax.grpo"):
            prompts = load_prompts(load_config(GRPOConfig, TINY, [f"data.path={path}", *overrides]), tokenizer)
        return prompts, [r.getMessage() for r in caplog.records]

    judged = "reward_rule=null"
    schemes = [{"problem": "P1", "guidelines": "7 if right"}, {"problem": "P2", "scheme": "7 if right"}]
    assert load(schemes, judged)[1] == [
        f"{path}: no row has a marking scheme under 'rubrics' or 'rubric' (data.rubric_field); its rows have "
        "'guidelines', grading guidelines that GRPO does not show the judge, so the judge grades every completion "
        "without one; map one with data.rubric_field=FIELD"]
    assert load(schemes)[1] == []  # a rule grader reads no scheme
    assert load([*schemes, {"problem": "P3", "rubric": "7 if right"}], judged)[1] == []  # one row has one
    with pytest.raises(ConfigError, match=rf"^{path}: no row has a marking scheme under 'schem' or 'rubric' or "
                                          r"'rubrics' \(data.rubric_field\); its rows have 'guidelines', .*: set "
                                          r"data.rubric_field to the field that holds them$"):
        load(schemes, judged, "data.rubric_field=schem")  # a field named by hand that no row has
    # Problems under another name: one error naming the setting, not one warning per row.
    with pytest.raises(ConfigError, match=rf"^{path}: no row has the field 'problem' \(data.problem_field\); set "
                                          r"data.problem_field to the field that holds the problems \(the first row "
                                          r"has: 'question', 'rubric'\)$"):
        load([{"question": "P1", "rubric": "r"}, {"question": "P2"}])
    prompts, warnings = load([{"problem": "P1"}, ["a", "list"], {"problem": "P2"}])
    assert [p["problem"] for p in prompts] == ["P1", "P2"]
    assert warnings == [f'{path}: skipped line 2: not a JSON object of named fields: ["a", "list"]']


def test_grpo_schedule_counts_optimizer_updates_not_steps():
    config = load_config(GRPOConfig, None, ["steps=10", "updates_per_step=2", "minibatches=3", "prompts_per_step=3",
                                            "optim.schedule=cosine", "optim.warmup_ratio=0.1"])
    assert config.optimizer_updates == 60 and config.derived()["optimizer_updates"] == 60


def test_rl_prompts_wrap_the_problem_in_the_task_template():
    from qed_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(REPO / "configs" / "tiny" / "tokenizer")
    config = load_config(GRPOConfig, TINY)
    (first, *_) = load_prompts(config, tokenizer)
    text = tokenizer.decode(first["prompt_ids"])
    assert f"Generate a rigorous proof to the following question:\n\n{first['problem']}" in text
    custom = load_config(GRPOConfig, TINY, ["data.task_template=Prove this. {problem} Be brief."])
    assert f"Prove this. {first['problem']} Be brief." in tokenizer.decode(load_prompts(custom, tokenizer)[0]["prompt_ids"])
    with pytest.raises(ConfigError, match="task_template must contain"):
        load_config(GRPOConfig, TINY, ["data.task_template=no placeholder"])


@pytest.mark.parametrize("override", ["sampling.top_k=20", "sampling.top_p=0.9"])
def test_filtered_sampling_is_refused_in_grpo(override):
    with pytest.raises(ConfigError, match="GRPO samples from the whole tempered distribution"):
        load_config(GRPOConfig, TINY, [override])


def test_policy_loss_kl_and_aggregations_match_numpy():
    rng = np.random.default_rng(1)
    S, T = 6, 9
    lp = rng.normal(-2, 0.5, (S, T)).astype(np.float32)
    old = lp + rng.normal(0, 0.6, (S, T)).astype(np.float32)
    ref = lp + rng.normal(0, 0.3, (S, T)).astype(np.float32)
    adv = rng.normal(0, 1, S).astype(np.float32)
    adv[1] = 0.0
    mask = (rng.random((S, T)) < 0.7).astype(np.float32)
    mask[3] = 0.0  # a fully masked sample

    ratio = np.exp(lp - old)
    expected = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - 0.2, 1 + 0.28) * adv[:, None])
    loss, clipped = clipped_policy_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(np.repeat(adv[:, None], T, 1)), 0.2, 0.28)
    np.testing.assert_allclose(np.asarray(loss), expected, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), (np.clip(ratio, 0.8, 1.28) * adv[:, None] < ratio * adv[:, None]))
    np.testing.assert_allclose(np.asarray(kl_k3(jnp.asarray(lp), jnp.asarray(ref))),
                               np.exp(ref - lp) - (ref - lp) - 1, atol=1e-6)

    n_seq, n_tok = np.float32(S), mask.sum()
    lengths = np.maximum(mask.sum(1), 1)
    refs = {
        "sample_sum": (expected * mask).sum() / S,
        "token_mean": (expected * mask).sum() / n_tok,
        "seq_mean_token_mean": ((expected * mask).sum(1) / lengths).sum() / S,
    }
    for mode, value in refs.items():
        out = aggregate(jnp.asarray(expected), jnp.asarray(mask), mode, n_seq, n_tok)
        np.testing.assert_allclose(float(out), value, atol=1e-6, err_msg=mode)
    # Microbatches normalized by whole-update totals add up to the full aggregate.
    for mode, value in refs.items():
        halves = sum(float(aggregate(jnp.asarray(expected[i:i + 3]), jnp.asarray(mask[i:i + 3]), mode, n_seq, n_tok))
                     for i in (0, 3))
        np.testing.assert_allclose(halves, value, atol=1e-6, err_msg=mode)


def test_sequence_logprobs_equal_the_tempered_log_softmax_of_the_models_logits():
    model = Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = np.random.default_rng(3).integers(0, 512, (3, 9)).astype(np.int32)
    scaled = np.asarray(model(jnp.asarray(tokens)))[:, :-1] / 0.7
    ref = scaled - scaled.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    ref = np.take_along_axis(ref, tokens[:, 1:, None], -1)[..., 0]
    out = sequence_logprobs(graphdef, nnx.to_pure_dict(state), jnp.asarray(tokens), 0.7)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


# --- the update --------------------------------------------------------------------------------


def _rows(tokens, prompt, advantages, old=None):
    """One sample per row [S, L]: its prompt, then a completion to the end of the row."""
    S, L = tokens.shape
    mask = np.zeros((S, L), np.float32)
    mask[:, prompt:] = 1.0
    return {"tokens": tokens, "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (S, L)).copy(),
            "segment_ids": np.ones((S, L), np.int32), "mask": mask,
            "old_logprobs": np.zeros((S, L), np.float32) if old is None else old,
            "advantages": np.repeat(np.asarray(advantages, np.float32)[:, None], L, 1),
            "sample_lengths": np.full((S, L), L - prompt, np.float32)}


def _update_setup(advantages, weight_decay=0.0):
    model = Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    S, L, prompt = len(advantages), 24, 8
    tokens = np.random.default_rng(4).integers(0, 512, (S, L)).astype(np.int32)
    loss = LossConfig(temperature=1.0, clip_eps_low=0.2, clip_eps_high=0.2, entropy_coef=0.0)
    rows = _rows(tokens, prompt, advantages)
    optimizer = make_optimizer(OptimConfig(lr=1e-3, schedule="constant", warmup_ratio=0.0,
                                           weight_decay=weight_decay, grad_clip=1.0), 10, decay_mask(model))
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    opt_state = jax.jit(optimizer.init)(params)
    learner = Learner(graphdef, optimizer, loss, mesh, params, opt_state, rows_per_micro=2)
    learner.recompute_old_logprobs(params, rows)
    before = jax.tree.map(np.asarray, params)
    new_params, _, metrics = learner.update(params, opt_state, None, rows, num_sequences=S,
                                            num_tokens=np.count_nonzero(rows["mask"][:, 1:]))
    seq_logprob = lambda p: float(jnp.sum(  # noqa: E731
        sequence_logprobs(graphdef, p, jnp.asarray(tokens), 1.0)[0] * rows["mask"][0, 1:]))
    return before, new_params, metrics, seq_logprob


def test_untrained_tokens_far_below_the_reference_keep_the_loss_finite():
    """A prompt's tokens are not trained, and their stored old log-prob is 0: where the policy
    gives them log-probs far below that (or below the reference model's), the k3 term's
    exponential overflows, and inf times a mask of 0 made approx_kl, the KL loss and every
    gradient NaN. Here the policy is the tiny model with its (tied) head scaled 200x, the
    reference the model as built, and the one trained token the policy's greedy choice."""
    model = Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ref_params = nnx.to_pure_dict(state)
    params = {**ref_params, "embed": ref_params["embed"] * 200.0}
    L = 12
    tokens = np.random.default_rng(5).integers(0, 512, (2, L)).astype(np.int32)
    logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))
    tokens[:, -1] = logits[:, -2].argmax(-1)
    lp = np.asarray(sequence_logprobs(graphdef, params, jnp.asarray(tokens), 1.0))
    assert lp[:, :-1].min() < -90  # prompt tokens: e^(0 - lp) overflows float32
    old = np.zeros((2, L), np.float32)
    old[:, -1] = lp[:, -1]
    rows = _rows(tokens, L - 1, [1.0, -1.0], old)
    micro = {**rows, "num_sequences": np.float32(2), "num_tokens": np.float32(2)}
    loss = LossConfig(temperature=1.0, kl_coef=0.1)
    (total, metrics), grads = jax.value_and_grad(partial(grpo_loss, graphdef, loss=loss), has_aux=True)(
        params, ref_params, micro)
    assert np.isfinite(float(total)) and np.isfinite(float(metrics["approx_kl"]))
    assert abs(float(metrics["approx_kl"])) < 1e-4  # the trained tokens' old log-probs are the policy's
    # approx_kl estimates KL(old || policy), under the old policy that drew the tokens: per token
    # e^(lp - old) - (lp - old) - 1 (the other way round it overstates the KL as the policy drifts).
    shifted = {**micro, "old_logprobs": np.where(rows["mask"] > 0, rows["old_logprobs"] + 1.0, 0.0).astype(np.float32)}
    _, shifted_metrics = grpo_loss(graphdef, params, ref_params, shifted, loss=loss)
    np.testing.assert_allclose(float(shifted_metrics["approx_kl"]), 2 * (np.exp(-1.0) + 1.0 - 1.0), rtol=1e-4)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    delta = np.float32(-150.0)
    g = jax.grad(lambda lp: jnp.sum(kl_k3(lp, jnp.zeros(2), jnp.asarray([1.0, 0.0]))))(jnp.asarray([-1.0, delta]))
    assert np.isfinite(np.asarray(g)).all() and float(g[1]) == 0.0


def test_zero_advantages_leave_params_unchanged():
    params, new_params, metrics, _ = _update_setup([0.0, 0.0, 0.0, 0.0])
    assert float(metrics["grad_norm"]) == 0.0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_positive_advantage_raises_that_completions_logprob():
    params, new_params, _, seq_logprob = _update_setup([1.0, 0.0, 0.0, 0.0])
    assert seq_logprob(new_params) > seq_logprob(jax.tree.map(jnp.asarray, params)) + 1e-3


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_a_packed_update_equals_the_padded_one(aggregation):
    """Samples of different lengths, packed several to a row, give the loss and gradients of
    one sample per padded row."""
    model = Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(6)

    class Done:  # what rollout_sequences reads of a completion
        def __init__(self, n):
            self.tokens = rng.integers(0, 512, n).tolist()
            self.logprobs = rng.normal(-3, 0.5, n).tolist()

    prompts = [{"prompt_ids": rng.integers(0, 512, p).tolist()} for p in (5, 9, 3, 7, 4)]
    completions = [Done(n) for n in (6, 2, 11, 4, 8)]
    sequences = rollout_sequences(prompts, completions, rng.normal(0, 1, 5), old_logprobs_from_sampler=True)
    packed = pack_sequences(sequences, 24)
    padded = {k: np.zeros((5, 24), v.dtype) for k, v in packed.items()}  # one sample per row
    for i, seq in enumerate(sequences):
        n = len(seq["tokens"])
        for k, v in seq.items():
            padded[k][i, :n] = v
        padded["segment_ids"][i, :n] = 1
        padded["positions"][i, :n] = np.arange(n)
    assert len(packed["tokens"]) < 5
    loss = LossConfig(temperature=0.9, clip_eps_low=0.2, clip_eps_high=0.28, entropy_coef=0.01, aggregation=aggregation)
    totals = {"num_sequences": np.float32(5), "num_tokens": np.float32(packed["mask"][:, 1:].sum())}
    accumulate = jax.jit(partial(accumulate_step, graphdef, loss))
    results = []
    for rows in (packed, padded):
        grads = jax.tree.map(jnp.zeros_like, params)
        sums = {k: jnp.float32(0) for k in METRIC_SUMS}
        for i in range(len(rows["tokens"])):  # one row per micro-batch: accumulation included
            grads, sums = accumulate(params, None, grads, sums, {**{k: v[i:i + 1] for k, v in rows.items()}, **totals})
        results.append((sums, grads))
    (sums_a, grads_a), (sums_b, grads_b) = results
    for key in METRIC_SUMS:
        np.testing.assert_allclose(float(sums_a[key]), float(sums_b[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# --- the learner loop --------------------------------------------------------------------------


def _grpo(args, config=TINY, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "qed_jax.cli", "grpo", "--config", config, *args],
                            cwd=REPO, env=cli_env(1), **kwargs)


def _judge_args(server, tmp_path):
    return ["reward_rule=null", f"judge.base_url={server.url}", "judge.model=judge", "judge.concurrency=2",
            f"judge.cache_path={tmp_path / 'cache.sqlite'}", "judge.require_think_end=false",
            "judge.backoff_s=0.01", "prompts_per_step=4", "samples_per_prompt=4", "export_dtype=null"]


def test_an_unreachable_judge_stops_grpo_before_it_samples_and_may_move(tmp_path, monkeypatch):
    import socket

    from qed_jax.errors import JudgeUnavailable
    from qed_jax.grpo import train

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setattr(Sampler, "generate_ids", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    with JudgeServer(default=("hash", 0.0)) as server:
        args = [*_judge_args(server, tmp_path), "steps=1", f"output_dir={tmp_path / 'run'}"]
        moved = [a.replace(server.url, f"http://127.0.0.1:{port}/v1") for a in args]
        with pytest.raises(JudgeUnavailable, match=f"^cannot reach the judge at http://127.0.0.1:{port}/v1: "):
            train(load_config(GRPOConfig, TINY, moved))
        assert server.total == 0
        assert not (tmp_path / "run").exists()  # no run began (a changed command is not refused), nothing is left
        # The judge's address is not part of what the run is: the rerun at a live judge goes on.
        monkeypatch.undo()
        assert train(load_config(GRPOConfig, TINY, args))["step"] == 1
        assert server.total > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["judge"]["base_url"] == server.url
    # A run with only its export left (stopped after its last step's save) grades nothing: no judge needed.
    moved_exporting = [a.replace("export_dtype=null", "export_dtype=float32") for a in moved]
    assert train(load_config(GRPOConfig, TINY, moved_exporting), resume_with_changes=True)["step"] == 1
    assert (tmp_path / "run" / "hf" / "config.json").exists()


def test_a_sampling_mesh_that_does_not_fit_is_named_and_refused_before_the_model_loads(tmp_path, monkeypatch):
    """The error names the setting that was given (sampling.mesh, not the training mesh;
    sampling.max_concurrent), and comes in the setup: at the recipe's scale, loading the model
    first takes minutes."""
    from qed_jax import grpo

    def no_load(*args, **kwargs):
        return lambda mesh: pytest.fail("the model loaded before the sampling mesh was checked")

    monkeypatch.setattr(grpo, "open_model", no_load)
    refusals = {
        "sampling.mesh.data=4": ("sampling.mesh.data=4, sampling.mesh.fsdp=1, sampling.mesh.tensor=1 needs 4 devices, "
                                 "not the 8 devices here"),
        "sampling.mesh.tensor=3": ("sampling.mesh.data=-1, sampling.mesh.fsdp=1, sampling.mesh.tensor=3: the other "
                                   "axes (3 devices) do not divide the 8 devices here"),
        "sampling.max_concurrent=6": ("sampling.max_concurrent must be a multiple of the sampling mesh's 8 batch "
                                      "shards, so rows split evenly; got 6"),
    }
    for given, message in refusals.items():
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            grpo.train(load_config(GRPOConfig, TINY, [given, "steps=1", f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("template,field", [("proofbench_grader", "guidelines"), ("answer_judge", "answer")])
def test_a_judge_template_that_reads_no_rubric_is_refused_in_the_setup(tmp_path, template, field):
    """GRPO passes the judge each prompt's rubric only: a template that grades against a benchmark's
    guidelines or answer would read "(none given)" in every request."""
    from qed_jax.grpo import train

    with JudgeServer(default=("hash", 0.0)) as server:
        args = [*_judge_args(server, tmp_path), f"judge.template={template}", f"output_dir={tmp_path / 'run'}"]
        with pytest.raises(ConfigError, match=rf"^judge.template {template} grades against the field '{field}', "
                                              "which GRPO does not pass to the judge \\(it passes 'rubric'\\): use "
                                              "configs/judge/rl_grader.yaml or a template with {{marking_scheme}}$"):
            train(load_config(GRPOConfig, TINY, args))
        assert server.total == 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_step_that_diverges_stops_grpo_before_it_is_saved(tmp_path):
    from qed_jax.errors import TrainingDiverged
    from qed_jax.grpo import train

    with JudgeServer(default=("hash", 0.0)) as server:
        args = [*_judge_args(server, tmp_path), "steps=3", "checkpoint_every=1", "optim.lr=1e30",
                "optim.warmup_ratio=0", f"output_dir={tmp_path / 'run'}"]
        with pytest.raises(TrainingDiverged, match=r"^step 2: (loss nan and )?grad_norm nan( and parameters no longer "
                                                   r"finite after the update)?, so training stopped before saving it; "
                                                   r"the newest checkpoint, step 1, is kept"):
            train(load_config(GRPOConfig, TINY, args))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]  # the NaN step's metrics are logged


def test_steps_against_the_loopback_judge(tmp_path):
    with JudgeServer(default=("hash", 0.0)) as server:
        proc = _grpo([*_judge_args(server, tmp_path), "steps=3", f"output_dir={tmp_path / 'run'}"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert server.total == len(server.by_prompt) <= 3 * 16  # identical completions share a request
    assert all(m["judge_failed"] == 0 and m["graded_fraction"] == 1.0 for m in metrics)
    assert all(0 < m["reward_std"] for m in metrics)  # hash scores vary, so advantages do
    for key in ("reward_mean", "success_rate", "completion_length_mean", "completion_length_max",
                "truncated_fraction", "clip_fraction", "approx_kl", "entropy", "judge_latency_s",
                "sample_s", "judge_s", "train_s", "loss", "grad_norm"):
        assert key in metrics[0], key


def test_judge_sees_the_bare_problem_and_failed_grades_are_excluded_and_counted(tmp_path):
    # The server's replies are scripted by request count: the 3rd request fails (a 400 is not
    # retried), every other is scored. 1 failure in 16 is over the default 5 %, within 10 %.
    script = [("score", 3), ("score", 5), ("status", 400)] + [("score", 3), ("score", 5)] * 20
    with JudgeServer({"_": script}) as server:
        result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "grpo", "--config", TINY,
                                 *_judge_args(server, tmp_path), "steps=1", "judge.max_failed_fraction=0.1",
                                 f"output_dir={tmp_path / 'run'}"], cwd=REPO, env=cli_env(1), capture_output=True,
                                text=True, timeout=300)
        prompts = [body["messages"][-1]["content"] for body in server.bodies]
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = read_metrics(tmp_path / "run")
    assert metrics["judge_failed"] >= 1 and metrics["graded_fraction"] == 1 - metrics["judge_failed"] / 16
    assert 3 / 7 <= metrics["reward_mean"] <= 5 / 7  # the failure is not a score of 0
    assert prompts and not any("Generate a rigorous proof" in p for p in prompts)


def test_nearby_data_seeds_give_unrelated_prompt_orders():
    from qed_jax.grpo import prompt_batches

    # With data.seed as Grain's seed, seed 1's steps 1-12 were seed 0's steps 7-18 (Grain
    # reshuffles epoch e with seed + e).
    prompts = list(range(48))
    seed_0, seed_1 = prompt_batches(prompts, 8, 0), prompt_batches(prompts, 8, 1)
    steps_0, steps_1 = [next(seed_0) for _ in range(18)], [next(seed_1) for _ in range(12)]
    assert steps_0[6:] != steps_1 and steps_0[:6] != steps_1[:6]
    assert sorted(sum(steps_0[6:12], [])) == prompts  # each epoch is every prompt once


def test_no_step_holds_a_problem_twice_where_one_epoch_ends_and_the_next_begins():
    from qed_jax.grpo import prompt_batches

    # 50 prompts, 8 per step: each epoch is 6 steps of distinct prompts and leaves 2 out.
    batches = prompt_batches(list(range(50)), 8, 0)
    steps = [next(batches) for _ in range(60)]
    assert all(len(set(step)) == 8 for step in steps)
    epochs = [sum(steps[e * 6:(e + 1) * 6], []) for e in range(10)]
    assert all(len(set(epoch)) == 48 for epoch in epochs)
    assert len({tuple(sorted(set(range(50)) - set(epoch))) for epoch in epochs}) > 1  # not always the same 2 left out
    state = batches.get_state()  # a resumed run goes on where the checkpoint was written
    ahead = [next(batches) for _ in range(3)]
    resumed = prompt_batches(list(range(50)), 8, 0)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(3)] == ahead
    few = prompt_batches(list(range(5)), 8, 0)  # fewer prompts than a step: all of them, then more
    assert all(set(next(few)) == set(range(5)) for _ in range(4))


def test_the_failed_share_counts_only_completions_sent_to_the_judge():
    from qed_jax.errors import JudgeUnavailable
    from qed_jax.grpo import check_failures, sample_stats
    from qed_jax.judge import Grade
    from qed_jax.sampling import Completion

    config = load_config(GRPOConfig, TINY, ["judge.max_failed_fraction=0.25"])
    # 16 completions: 12 without </think> (0, unsent), 3 graded, 1 failed: 1 of the 4 sent.
    grades = [Grade(0, 0.0, "no_think_end")] * 12 + [Grade(7, 1.0, "ok", attempts=1)] * 3 + [
        Grade(None, 0.0, "http_500", attempts=3)]
    completions = [Completion(tokens=[1], logprobs=[0.0], finish_reason="stop")] * 16
    valid = np.array([not g.failed for g in grades])

    def check():
        check_failures(sample_stats(grades, completions, valid, valid), grades, config, step=3)

    check()  # 1 of 4 is the 25 % allowed
    at_29 = dataclasses.replace(config, judge=dataclasses.replace(config.judge, max_failed_fraction=0.29))
    check_failures({"failed": np.array([29]), "sent": np.array([100])}, [], at_29, step=3)  # 0.29 * 100 < 29 in floats
    grades[11] = Grade(0, 0.0, "empty_proof")
    grades[10] = Grade(None, 0.0, "timeout", attempts=4)  # now 2 of the 5 sent (2 of 16 completions)
    valid = np.array([not g.failed for g in grades])
    with pytest.raises(JudgeUnavailable, match="^step 3: the judge at .* failed on 2 of the 5 completions sent to it "
                                               r"\(judge.max_failed_fraction is 0.25\); reasons: "):
        check()


def test_judge_latency_counts_only_the_grades_the_judge_answered_this_step():
    from qed_jax.grpo import rollout_metrics, sample_stats
    from qed_jax.judge import Grade
    from qed_jax.sampling import Completion

    # A cache hit keeps the latency and attempts of the request that first graded it (often in an
    # earlier step, or before a resume): it says nothing of this step's judge.
    grades = [Grade(7, 1.0, "ok", latency_s=0.25, attempts=1), Grade(3, 3 / 7, "ok", latency_s=0.75, attempts=2),
              Grade(7, 1.0, "ok", latency_s=9.0, attempts=1, cached=True), Grade(0, 0.0, "no_think_end")]
    completions = [Completion(tokens=[1], logprobs=[0.0], finish_reason="stop")] * 4
    valid = np.ones(4, bool)
    assert rollout_metrics(sample_stats(grades, completions, valid, valid))["judge_latency_s"] == 0.5
    only_cached = rollout_metrics(sample_stats(grades[2:], completions[2:], valid[2:], valid[2:]))
    assert only_cached["judge_latency_s"] == 0.0


def test_judge_settings_given_with_a_reward_rule_are_named_as_unused(caplog):
    from qed_jax.grpo import check_judge_template

    with caplog.at_level(logging.WARNING, logger="qed_jax.grpo"):
        check_judge_template(load_config(GRPOConfig, TINY))
        assert not caplog.records
        check_judge_template(load_config(GRPOConfig, TINY, ["judge.base_url=http://127.0.0.1:9/v1", "judge.model=j"]))
    assert [r.getMessage() for r in caplog.records] == [
        "reward_rule closes_thinking grades the rollouts, so judge.base_url, judge.model are not used; set "
        "reward_rule=null to grade with the judge"]


def test_too_many_failed_grades_stop_the_step_before_it_is_saved(tmp_path):
    with JudgeServer({"_": [("status", 400)]}) as server:
        result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "grpo", "--config", TINY,
                                 *_judge_args(server, tmp_path), "steps=2", "checkpoint_every=1",
                                 f"output_dir={tmp_path / 'run'}"], cwd=REPO, env=cli_env(1), capture_output=True,
                                text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qed-jax grpo: error: step 1:") and server.url in last and "http_400 x16" in last
    assert last.endswith("its graded completions cached; 16 failed because the judge rejected their request (the "
                         "last: Error code: 400 - scripted 400), and will again unless the request changes: check "
                         "judge.model, judge.api, judge.max_tokens, judge.temperature and judge.reasoning_effort "
                         "(a rerun resumes at step 1)")
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]


# HTTP 400 fails each request (not retried), and the step stops on too many failed grades;
# 401 (the key refused) stops the step at the first reply, the judge unusable.
@pytest.mark.parametrize("refusal", [400, 401])
def test_a_judge_failing_mid_run_saves_the_steps_before_it_and_the_rerun_redoes_only_that_step(tmp_path, refusal):
    run = tmp_path / "run"
    with JudgeServer(default=("hash", 0)) as server:
        args = [*_judge_args(server, tmp_path), "steps=3", "checkpoint_every=10", f"output_dir={run}"]
        # Steps 1 and 2 graded, then every request of step 3 refused; no regular checkpoint
        # before step 10.
        server.switch_after(lambda: logged_steps(run) >= 2, ("status", refusal))
        failed = _grpo(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, stderr = failed.communicate(timeout=300)
        assert failed.returncode == 2, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].endswith("(a rerun resumes at step 3)")
        assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
        assert [m["step"] for m in read_metrics(run)] == [1, 2]
        refused = set(server.switched)
        server.switch_after(None, None)
        graded_before = dict(server.by_prompt)
        rerun = _grpo(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, stderr = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    # The rerun sampled step 3 alone, from step 2's weights and the same prompts: it sent the
    # judge what was refused before, and no more than one step's 16 completions.
    sent_again = {prompt for prompt, n in server.by_prompt.items() if n > graded_before.get(prompt, 0)}
    assert refused and refused <= sent_again and len(sent_again) <= 16


# Per step: 4 problems x 4 samples, or with RC 4 problems x 2 states x 4 samples (slow: 45 s).
@pytest.mark.parametrize("config", [TINY, pytest.param(TINY_RC, marks=pytest.mark.slow)], ids=["plain", "rc"])
def test_sigkill_mid_step_resumes_without_regrading(tmp_path, config):
    run = tmp_path / "run"
    with JudgeServer(default=("hash", 0.1)) as server:
        # Once step 2 is logged, the judge answers 5 requests and holds the rest: the kill lands
        # mid-step 3 however slowly this machine runs. When both of the client's slots
        # (judge.concurrency) hold a request, every grade before them is in its cache.
        server.hold_after(lambda: logged_steps(run) >= 2, answers=5)
        args = [*_judge_args(server, tmp_path), "steps=3", "checkpoint_every=1", f"output_dir={run}"]
        proc = _grpo(args, config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not (
                len(server.held) == 2 and (run / "checkpoints" / "2").exists()):
            time.sleep(0.05)
        held = set(server.held)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(held) == 2 and (run / "checkpoints" / "2").exists(), "the run never held both slots after step 2"
        assert [m["step"] for m in read_metrics(run)] == [1, 2]
        server.release()
        assert _grpo(args, config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=300) == 0
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    # Each distinct completion was graded once, but the two held at the kill: once more after it.
    assert {prompt for prompt, n in server.by_prompt.items() if n > 1} == held
    assert all(server.by_prompt[prompt] == 2 for prompt in held)


def test_paper_config_loads_and_prints_derived_numbers():
    config = load_config(GRPOConfig, REPO / "configs" / "rl" / "qed_nano_4b.yaml")
    derived = config.derived()
    assert derived["samples_per_step"] == 1024
    assert derived["loss_normalizer"] == "trained samples per update (at most 1024)"
    assert config.optim.lr == 1e-6 and config.optim.grad_clip == 0.3 and config.optim.weight_decay == 0.01
    assert config.loss.clip_eps_low == config.loss.clip_eps_high == 4.0 and config.loss.kl_coef == 0.0
    assert config.loss.entropy_coef == 1e-4 and config.loss.temperature == 0.8
    assert config.max_new_tokens == 49152 and not derived["reference_model"]
    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "grpo", "--config",
                             str(REPO / "configs" / "rl" / "qed_nano_4b.yaml"), "--print-config"],
                            cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["max_new_tokens"] == 49152  # stdout is the config as JSON, alone
    derived = next(line for line in result.stderr.splitlines() if line.startswith("derived: "))
    assert json.loads(derived[len("derived: "):])["samples_per_step"] == 1024


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_config_raises_the_reward(tmp_path, seed):
    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "grpo", "--config", TINY, f"seed={seed}",
                             f"data.seed={seed}", f"output_dir={tmp_path}"], cwd=REPO, env=cli_env(1),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rewards = [m["reward_mean"] for m in read_metrics(tmp_path)]
    start, end = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert start < 0.5 and end >= start + 0.3, (start, end)


def test_sharded_training_with_a_different_sampling_mesh(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qed_jax.cli", "grpo", "--config", TINY, "steps=2", "export_dtype=null",
         "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "sampling.mesh.data=4", "sampling.mesh.tensor=2",
         "sampling.dtype=bfloat16", "sampling.max_concurrent=24", f"output_dir={tmp_path}"],
        cwd=REPO, env=cli_env(8), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path):
    proc = _grpo(["steps=400", "checkpoint_every=1000", "export_dtype=null", f"output_dir={tmp_path}"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_signal_writes_a_checkpoint(proc, tmp_path, steps=3)


def test_recomputed_old_logprobs_agree_with_the_samplers(tmp_path):
    losses = {}
    for source in ("sampler", "recompute"):
        result = subprocess.run(
            [sys.executable, "-m", "qed_jax.cli", "grpo", "--config", TINY, "steps=1", "export_dtype=null",
             f"old_logprobs={source}", "micro_batch_rows=2", f"output_dir={tmp_path / source}"],
            cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        (metrics,) = read_metrics(tmp_path / source)
        assert metrics["approx_kl"] < 1e-6 and metrics["clip_fraction"] == 0.0, (source, metrics)
        losses[source] = metrics["loss"]
    assert abs(losses["sampler"] - losses["recompute"]) < 1e-4, losses


# --- reasoning-cache states ---------------------------------------------------------------------


class _ScriptedTrajectories:
    """Stands in for the compiled RC loop: per problem, turns whose summaries are scripted ids."""

    def __init__(self, prompts, summaries_by_problem):
        self.prompts, self.summaries_by_problem, self.released = prompts, summaries_by_problem, False

    def run_ids(self, problems, key=None, row_ids=None):
        from qed_jax.reasoning_cache import Turn

        return [[Turn(reasoning_ids=[1], answer_ids=[], num_tokens=4, finish_reason="length", summary_ids=s,
                      summary_cut=len(s) == 3) for s in self.summaries_by_problem[tuple(p)]] for p in problems]

    def release(self):
        self.released = True


def test_rc_states_draws_and_group_layout():
    from qed_jax.grpo import RCRollouts, RCTrainConfig
    from qed_jax.reasoning_cache import PromptPieces, RCPrompts

    # Literal pieces [100], [101], [102] around {problem} and {summary}.
    pieces = PromptPieces(tuple(np.array([x], np.int32) for x in (100, 101, 102)), ("problem", "summary"))
    summaries = {(7,): [[11], [12, 12], [13, 13, 13]], (8, 8): [[21], [], [23, 23, 23]]}  # T = 3 turns
    rollouts = object.__new__(RCRollouts)
    rollouts.config = RCTrainConfig(turns=3, states_per_problem=2)
    rollouts.cache = _ScriptedTrajectories(RCPrompts(pieces, pieces), summaries)
    rows = [{"problem": "seven", "rubric": None, "problem_ids": [7]},
            {"problem": "eight", "rubric": "r", "problem_ids": [8, 8]}]
    group_rows, per_turn = rollouts.group_rows(rows, None, (0,), group_size=3)

    assert rollouts.cache.released
    assert len(group_rows) == 2 * 2 * 3  # problems x states x group
    for g in range(4):  # each group: one problem, one state, its rollouts in a row
        group = group_rows[3 * g: 3 * g + 3]
        assert all(r is group[0] for r in group)
    for p, row in enumerate(rows):
        drawn = [group_rows[3 * g]["state"] for g in (2 * p, 2 * p + 1)]
        assert len(set(drawn)) == 2 and all(0 <= k <= 3 for k in drawn)  # T + 1 states, no repeats
        states = [[]] + summaries[tuple(row["problem_ids"])]
        for g in (2 * p, 2 * p + 1):
            r = group_rows[3 * g]
            # The grader reads problem and rubric; the prompt carries the state's summary.
            assert (r["problem"], r["rubric"]) == (row["problem"], row["rubric"])
            assert r["prompt_ids"] == [100, *row["problem_ids"], 101, *states[r["state"]], 102]
    assert per_turn["summary_cut"].tolist() == [False, False, True, False, False, True]
    assert per_turn["summary_length"].tolist() == [1, 2, 3, 1, 0, 3]
    # A problem's draw depends on its index in the step, not on which call (process) draws it.
    second_alone = rollouts.group_rows(rows[1:], None, (0,), group_size=3, first_problem=1)[0]
    assert [r["state"] for r in second_alone] == [r["state"] for r in group_rows[6:]]

    # Draws are uniform over the T + 1 states: every state is drawn about equally often.
    counts = np.zeros(4)
    for draw in range(400):
        for r in rollouts.group_rows(rows[:1], None, (1, draw), group_size=1)[0]:
            counts[r["state"]] += 1
    assert counts.sum() == 800 and np.all(np.abs(counts / 800 - 0.25) < 0.05)


def test_rc_metrics_per_state_over_graded_rollouts_and_per_turn():
    from qed_jax.grpo import rc_metrics

    stats = {"state": np.array([0, 0, 2, 2, 2, 1]), "reward": np.array([1.0, 0.0, 0.5, 0.25, 0.9, 0.3], np.float32),
             "valid": np.array([True, True, True, True, False, False])}
    per_turn = {"summary_length": np.array([4, 0, 8]), "summary_cut": np.array([False, False, True]),
                "turn_truncated": np.array([True, False, True])}
    out = rc_metrics(stats, per_turn, 4)
    assert out["reward_state_0"] == 0.5 and out["reward_state_2"] == pytest.approx(0.375)
    assert np.isnan(out["reward_state_1"]) and np.isnan(out["reward_state_3"])  # failed grade; not drawn
    assert (out["summary_length_mean"], out["summaries_cut"], out["summaries_empty"],
            out["trajectory_truncated_fraction"]) == (4.0, 1, 1, 2 / 3)


def test_rc_prompts_leave_room_for_the_summary_and_the_template(tmp_path):
    from qed_jax.grpo import rc_template_tokens
    from qed_jax.tokenizer import load_tokenizer

    config = load_config(GRPOConfig, TINY_RC)
    tokenizer = load_tokenizer(REPO / "configs" / "tiny" / "tokenizer")
    literal = rc_template_tokens(config.rc, tokenizer)
    prompts = load_prompts(config, tokenizer)
    assert all(len(p["problem_ids"]) + config.rc.summary_tokens + literal <= config.max_prompt_length
               for p in prompts)
    assert prompts[0]["problem_ids"] == tokenizer(prompts[0]["problem"], add_special_tokens=False)["input_ids"]
    with pytest.raises(ConfigError, match="leaves no room for a problem"):
        load_prompts(load_config(GRPOConfig, TINY_RC, ["max_prompt_length=300"]), tokenizer)
    with pytest.raises(ConfigError, match="states_per_problem must be between 1 and rc.turns \\+ 1 = 3"):
        load_config(GRPOConfig, TINY_RC, ["rc.states_per_problem=4"])
    # One rc.* key on a config without the section brings the section's default budgets along.
    with pytest.raises(ConfigError, match=r"^max_prompt_length \(128\) must be longer than rc.summary_tokens \(2048\): "
                                          r".*any rc.\* key\) takes the section's defaults for the keys it does not set: "
                                          r"lower rc.summary_tokens or raise max_prompt_length$"):
        load_config(GRPOConfig, REPO / "configs" / "rl" / "tiny.yaml", ["rc.turns=2"])


def test_rc_grpo_grades_the_original_problem_and_logs_per_state_metrics(tmp_path):
    with JudgeServer(default=("hash", 0.0)) as server:
        result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "grpo", "--config", TINY_RC,
                                 *_judge_args(server, tmp_path), "steps=2", f"output_dir={tmp_path / 'run'}"],
                                cwd=REPO, env=cli_env(2), capture_output=True, text=True, timeout=300)
        prompts = [body["messages"][-1]["content"] for body in server.bodies]
    assert result.returncode == 0, result.stderr[-3000:]
    # The grader sees the problem as the dataset gives it, never a state's summary.
    problems = [json.loads(line)["problem"] for line in (REPO / "configs/data/tiny_proofs.jsonl").open()]
    assert prompts and all(any(p in text for p in problems) for text in prompts)
    assert not any("SUMMARY OF PREVIOUS ATTEMPT" in text for text in prompts)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        per_state = [m[f"reward_state_{k}"] for k in range(3)]
        drawn = [r for r in per_state if np.isfinite(r)]
        assert drawn and all(0.0 <= r <= 1.0 for r in drawn)
        assert m["summaries_cut"] >= 0 and 0.0 <= m["summary_length_mean"] <= 8
        assert m["packed_rows"] > 0 and np.isfinite(m["loss"]) and m["trajectory_s"] > 0


def test_rc_step_times_count_the_trajectories_once(tmp_path, monkeypatch):
    """trajectory_s and sample_s are separate phases: a clock that jumps 1,000 s inside the
    trajectories shows in trajectory_s alone."""
    from qed_jax import grpo

    jump = {"s": 0.0}

    class Clock:  # the real clock, plus the jumps
        def __getattr__(self, name):
            return getattr(time, name)

        def perf_counter(self):
            return time.perf_counter() + jump["s"]

    real_group_rows = grpo.RCRollouts.group_rows
    problem_buffers = []

    def slow_group_rows(self, *args, **kwargs):
        out = real_group_rows(self, *args, **kwargs)
        jump["s"] += 1000.0
        problem_buffers.append(self.cache.params.problem_tokens)
        return out

    monkeypatch.setattr(grpo, "time", Clock())
    monkeypatch.setattr(grpo.RCRollouts, "group_rows", slow_group_rows)
    with JudgeServer(default=("hash", 0.0)) as server:
        grpo.train(load_config(GRPOConfig, TINY_RC, [*_judge_args(server, tmp_path), "steps=1",
                                                     f"output_dir={tmp_path / 'run'}"]))
    (metrics,) = read_metrics(tmp_path / "run")
    assert metrics["trajectory_s"] >= 1000.0
    # Every step's trajectories on one problem buffer, the bucket of the longest problem any step may
    # draw, not that of the step's longest: no step compiles the loop again.
    from qed_jax.sampling import bucket_length
    from qed_jax.tokenizer import load_tokenizer

    limit = grpo.problem_token_limit(load_config(GRPOConfig, TINY_RC), load_tokenizer(REPO / "configs/tiny/tokenizer"))
    assert problem_buffers == [bucket_length(limit)], (problem_buffers, limit)
    assert 0.0 < metrics["sample_s"] < 1000.0 and metrics["judge_s"] < 1000.0 and metrics["train_s"] < 1000.0


def test_a_separate_rc_summarizer_is_checked_in_the_setup(tmp_path):
    """Its files are checked where every process hears of one host's missing copy, before any
    model loads; the loader reads it after."""
    from qed_jax.grpo import open_summarizer, train
    from tests.helpers import make_hf_model_with_tokenizer

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^rc.summarizer.path {tmp_path}/nowhere does not exist"):
        train(load_config(GRPOConfig, TINY_RC, [f"rc.summarizer.path={tmp_path / 'nowhere'}", f"output_dir={run}"]))
    assert not (run / "checkpoints").exists()
    make_hf_model_with_tokenizer(tmp_path / "summarizer")
    separate = load_config(GRPOConfig, TINY_RC, [f"rc.summarizer.path={tmp_path / 'summarizer'}"])
    load, tokenizer = open_summarizer(separate)
    assert load(None, dtype="bfloat16").config.param_dtype == "bfloat16" and tokenizer.eos_token is not None
    assert open_summarizer(load_config(GRPOConfig, TINY_RC)) is None  # the policy summarizes


def test_rc_recipe_config_loads_with_1024_samples_per_step():
    config = load_config(GRPOConfig, REPO / "configs" / "rl" / "qed_nano_4b_rc.yaml")
    derived = config.derived()
    assert (config.prompts_per_step, config.rc.states_per_problem, config.samples_per_prompt) == (32, 2, 16)
    assert derived["samples_per_step"] == 1024 and derived["rc"]["states"] == 4
    assert config.rc.reasoning_tokens == config.max_new_tokens == 49152
    s = config.rc.summarizer
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.thinking) == (2048, 0.7, 0.8, 20, False)


# --- several processes ---------------------------------------------------------------------------

# Every process packs its own samples: 3 to a row here, so the 2-process rows differ from the
# 1-process ones; two updates per step (each takes every other sample of each process); old
# log-probs recomputed on the global mesh and brought back to the process that packed them.
_SPREAD = ["prompts_per_step=8", "samples_per_prompt=4", "train_length=288", "minibatches=2",
           "old_logprobs=recompute", "export_dtype=null"]


def _finish(procs) -> list[tuple[str, str]]:
    """Wait for every process (text pipes), assert that each exited 0, and return their outputs."""
    outputs = finish(procs)
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outputs]
    return outputs


@pytest.mark.slow  # two processes, killed and restarted: 1-3 min on 2 cores
def test_two_processes_resume_after_sigkill_without_regrading(tmp_path):
    run = tmp_path / "run"
    with JudgeServer(default=("hash", 0.1)) as server:
        args = ["grpo", "--config", TINY, *_judge_args(server, tmp_path), *_SPREAD, "steps=3", "checkpoint_every=1",
                f"output_dir={run}"]
        # As in the one-process test: once step 2 is logged, 5 of step 3's requests (of both
        # processes, 16 each) are answered, then the judge holds both slots of each process.
        server.hold_after(lambda: logged_steps(run) >= 2, answers=5)
        with processes(args, count=2, devices=4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as procs:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and all(p.poll() is None for p in procs) and not (
                    len(server.held) == 4 and (run / "checkpoints" / "2").exists()):
                time.sleep(0.05)
            held = set(server.held)
            procs[1].send_signal(signal.SIGKILL)
            procs[1].wait()
            server.release()
            # Process 0 finishes grading its share, then waits for process 1 in the step's gather:
            # killed there, it has no request in flight.
            deadline = time.monotonic() + 120
            quiet_since, seen = time.monotonic(), server.total
            while time.monotonic() < deadline and procs[0].poll() is None and time.monotonic() - quiet_since < 2:
                if server.total != seen or server.active:
                    quiet_since, seen = time.monotonic(), server.total
                time.sleep(0.05)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
        assert len(held) == 4 and (run / "checkpoints" / "2").exists(), "the run never held every slot after step 2"
        assert [m["step"] for m in read_metrics(run)] == [1, 2]
        with processes(args, count=2, devices=4, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True) as procs:
            _finish(procs)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    # Each distinct completion was graded once, but the two that process 1 had in flight (held)
    # when it was killed: once more after it. Process 0's held requests were answered.
    repeats = {prompt for prompt, n in server.by_prompt.items() if n > 1}
    assert len(repeats) == 2 and repeats <= held and all(server.by_prompt[prompt] == 2 for prompt in repeats)


@pytest.mark.slow  # two processes and a single-process reference: about a minute on 2 cores
def test_two_processes_sample_grade_and_learn_what_one_does(tmp_path):
    with JudgeServer(default=("hash", 0.0)) as server:
        args = ["grpo", "--config", TINY, *_judge_args(server, tmp_path), *_SPREAD, "steps=4", "export_dtype=float32"]
        single = subprocess.run([sys.executable, "-m", "qed_jax.cli", *args, f"output_dir={tmp_path / 'one'}"],
                                cwd=REPO, env=cli_env(8), capture_output=True, text=True, timeout=300)
        assert single.returncode == 0, single.stderr[-3000:]
        judged_by_one = set(server.by_prompt)
        with processes([*args, f"output_dir={tmp_path / 'two'}"], count=2, devices=4, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True) as procs:
            outputs = _finish(procs)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    # Process 0 alone keeps the metrics log that the closing line's rewards come from.
    assert "done at step 4 (process 0): reward mean " in outputs[0][0]
    assert "done at step 4 (process 1): process 0 reports the rewards;" in outputs[1][0]
    # The same completions: sampled with the same per-row keys (each process its share of the
    # global rows), so the judge saw no new proof, and every step's rewards are equal to the bit.
    assert set(server.by_prompt) == judged_by_one
    assert all((tmp_path / f"cache.sqlite.process-{i}").exists() for i in (0, 1))
    for key in ("reward_mean", "reward_std", "success_rate", "completion_length_mean", "trained_fraction"):
        assert [m[key] for m in one] == [m[key] for m in two], key
    assert 0 < one[-1]["reward_std"]  # hash scores vary: the losses are not all zero
    # The losses differ only by float32 rounding: the processes pack their samples into other rows
    # than one process does, so the sums over tokens and rows run in another order, and the params
    # of later steps differ by as little (too little to change a sampled token: the rewards above
    # are equal). Measured: losses of 0.05-0.2 at most 1e-7 apart, and after 8 Adam updates of up
    # to lr = 3e-3 each, params at most 1.5e-6 apart (process 0 exported them); bounds leave 50x.
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a["loss"], b["loss"])
    exported = [SafetensorsFolder(tmp_path / run / "hf") for run in ("one", "two")]
    assert max(float(np.abs(np.asarray(exported[0].read(k)) - np.asarray(exported[1].read(k))).max())
               for k in exported[0].names()) <= 1e-4
    # Every process reads the whole prompt stream, so the two-process run goes on as one process,
    # from the same place in the data: its step 5 is the one-process run's step 5.
    with JudgeServer(default=("hash", 0.0)) as server:
        args = ["grpo", "--config", TINY, *_judge_args(server, tmp_path), *_SPREAD, "steps=5", "export_dtype=null"]
        for run in ("one", "two"):
            resumed = subprocess.run([sys.executable, "-m", "qed_jax.cli", *args, f"output_dir={tmp_path / run}",
                                      "--resume-with-changes"], cwd=REPO, env=cli_env(8), capture_output=True,
                                     text=True, timeout=300)
            assert resumed.returncode == 0 and "done at step 5:" in resumed.stdout, resumed.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5]
    for key in ("reward_mean", "reward_std", "completion_length_mean"):
        assert one[-1][key] == two[-1][key], key


# Process 1's grade cache fails at its first write (a full disk, an I/O error on its host).
CACHE_WRITE_FAILS = """
import sqlite3, sys
from qed_jax import judge
def put(self, key, grade):
    with self.failing_as_config_error():
        raise sqlite3.OperationalError("disk I/O error")
judge.GradeCache.put = put
from qed_jax.cli import main
sys.exit(main())
"""


@pytest.mark.slow  # two processes: about a minute on 2 cores
def test_a_grade_cache_failing_on_one_process_stops_both(tmp_path):
    """Each process grades its own share into its own cache: one that cannot write it stops, and
    the other, which graded its share, stops with it rather than wait for it in the step's gather."""
    with JudgeServer(default=("hash", 0.1)) as server:
        with processes(["grpo", "--config", TINY, *_judge_args(server, tmp_path), *_SPREAD, "steps=2",
                        f"output_dir={tmp_path / 'run'}"], count=2, devices=4, entry={1: ["-c", CACHE_WRITE_FAILS]},
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as procs:
            outputs = finish(procs, timeout=240)
    assert [p.returncode for p in procs] == [2, 2], [err[-2000:] for _, err in outputs]
    errors = [err.strip().splitlines()[-1] for _, err in outputs]
    assert errors[0] == ("qed-jax grpo: error: a judge call failed on another process (its log says why) (a rerun "
                         "resumes at step 1)")
    assert errors[1].startswith(f"qed-jax grpo: error: judge cache {tmp_path / 'cache.sqlite'}.process-1: disk I/O "
                                "error;"), errors[1]
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # step 1 was not applied


@pytest.mark.slow  # two processes: about a minute on 2 cores
def test_a_stop_signal_to_one_process_stops_both_after_the_same_step(tmp_path):
    """A preemption's SIGTERM reaches a pod's hosts at different moments: the processes agree after
    every step, so both write the same checkpoint and exit, and neither waits for the other."""
    with processes(["grpo", "--config", TINY, *_SPREAD, "steps=400", "checkpoint_every=1000", f"output_dir={tmp_path}"],
                   count=2, devices=4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as procs:
        assert_signal_writes_a_checkpoint(procs[1], tmp_path, steps=3)
        assert procs[0].wait(timeout=120) == 128 + signal.SIGTERM


@pytest.mark.slow  # two more 2-process runs
def test_two_processes_on_rc_states_sample_what_one_does(tmp_path):
    """Trajectories, state draws and rollouts of a problem depend on its index in the step, not on
    the process that runs it: per-state rewards and the trajectories' numbers are equal."""
    args = ["grpo", "--config", TINY_RC, "prompts_per_step=4", "steps=2", "export_dtype=null"]
    single = subprocess.run([sys.executable, "-m", "qed_jax.cli", *args, f"output_dir={tmp_path / 'one'}"],
                            cwd=REPO, env=cli_env(8), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    with processes([*args, f"output_dir={tmp_path / 'two'}"], count=2, devices=4, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True) as procs:
        _finish(procs)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    keys = ["reward_mean", "summary_length_mean", "summaries_cut", "summaries_empty", "trajectory_truncated_fraction",
            *(f"reward_state_{k}" for k in range(3))]
    for key in keys:
        assert np.allclose([m[key] for m in one], [m[key] for m in two], rtol=0, atol=0, equal_nan=True), key
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a["loss"], b["loss"])


def test_an_empty_rc_summarizer_path_is_no_summarizer_and_refuses_its_settings(tmp_path):
    """`path: ""` in a YAML file runs without a separate summarizer (open_summarizer reads it as
    none), so the settings only a separate one reads are refused as they are without a path."""
    from qed_jax.grpo import open_summarizer

    config = tmp_path / "rc.yaml"
    config.write_text(Path(TINY_RC).read_text().replace("    max_new_tokens: 12\n",
                                                         "    max_new_tokens: 12\n    path: \"\"\n"))
    assert open_summarizer(load_config(GRPOConfig, config)) is None
    with pytest.raises(ConfigError, match="rc.summarizer.temperature is for a separate summarizer"):
        load_config(GRPOConfig, config, ["rc.summarizer.temperature=0.3"])
