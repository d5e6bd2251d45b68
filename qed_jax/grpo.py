"""GRPO with rubric rewards: sample G completions per prompt with the current policy, grade
them with the judge (reward = score / 7; no </think> → 0), centre rewards within each group,
and update with a clipped policy-gradient loss.

Pure functions first (advantages, log-probs, losses, aggregation); `train` is the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import ClassVar

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from qed_jax import checkpoint
from qed_jax.config import (MIN_TEMPERATURE, ConfigError, check_dtype, check_local_output_dir, check_sampling,
                            check_seed, hashed_seed, is_missing_local_path, json_values, not_found,
                            require_at_least_one, require_range)
from qed_jax.data import NAMED_ROWS, BadRow, order_seed, pack_sequences, read_rows, warn_left_out
from qed_jax.errors import CheckpointError, lost_process
from qed_jax.judge import (GUIDELINES_KEYS, MAX_SCORE, RUBRIC_KEYS, RULES, GradeItem, Judge, JudgeConfig,
                           JudgeUnavailable, RuleGrader, check_answer_format, check_template_fields,
                           load_judge_template, reason_counts, rejection_note, row_field)
from qed_jax.losses import token_logprobs, token_logprobs_and_entropy
from qed_jax.multihost import (agree_on_stop, final_stop_signal, gather, largest, per_process, process_rows,
                               process_share, sampler_weights, sampling_meshes, set_up_together)
from qed_jax.pretrained import loaded_from
from qed_jax.sampling import DEFAULT_BUCKETS, Sampler, SamplingParams, bucket_length
from qed_jax.sharding import DEFAULT_RULES, MeshConfig, check_mesh_sizes, make_mesh
from qed_jax.trainer import (MetricsLog, ModelSpec, OptimConfig, StopSignals, advance_schedule, check_finite,
                             check_rows_divide, check_run_config, data_parallel_size, data_record, decay_mask,
                             exit_or_export, init_opt_state, is_complete, make_optimizer, open_model, params_finite,
                             resolve_tokenizer, run_lock, start_or_resume)

log = logging.getLogger(__name__)

AGGREGATIONS = ("sample_sum", "token_mean", "seq_mean_token_mean")


# --------------------------------------------------------------------------------------------
# Pure math


def group_advantages(rewards, normalize_std: bool = False, eps: float = 1e-6, *, valid=None):
    """rewards [P, G] → advantages [P, G]: reward minus the mean of its group (÷ the group's
    std). With `valid` [P, G] (False for a failed grade), only valid rewards enter a group's
    statistics, and invalid entries get advantage 0."""
    valid = jnp.ones(rewards.shape, bool) if valid is None else valid
    count = jnp.maximum(valid.sum(axis=-1, keepdims=True), 1)
    # The mean as an offset from the group's lowest reward: a group of equal rewards then
    # centres to exactly 0 (a float32 sum over 16 copies of 6/7, divided by 16, is not 6/7).
    low = jnp.min(jnp.where(valid, rewards, jnp.inf), axis=-1, keepdims=True)
    low = jnp.where(jnp.isfinite(low), low, 0.0)
    mean = low + jnp.where(valid, rewards - low, 0.0).sum(axis=-1, keepdims=True) / count
    centred = jnp.where(valid, rewards - mean, 0.0)
    if normalize_std:
        std = jnp.sqrt(jnp.sum(centred ** 2, axis=-1, keepdims=True) / count)
        centred = centred / (std + eps)
    return centred


def trained_samples(valid, advantages, drop_zero_advantage_groups: bool):
    """[P, G] bool: the samples that enter the update. A failed grade never does; a group left
    with fewer than 2 graded samples has no baseline and contributes nothing; with
    `drop_zero_advantage_groups`, neither does a group whose advantages are all zero."""
    keep = valid & (valid.sum(axis=-1, keepdims=True) >= 2)
    if drop_zero_advantage_groups:
        keep = keep & (jnp.abs(advantages).max(axis=-1, keepdims=True) > 0)
    return keep


def clipped_policy_loss(logprobs, old_logprobs, advantages, eps_low: float, eps_high: float):
    """Per-token PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) and whether the clip
    was active. logprobs, old_logprobs and advantages (each token carries its sample's) [R, T]."""
    ratio = jnp.exp(logprobs - old_logprobs)
    adv = advantages
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def kl_k3(logprobs, ref_logprobs, mask=None):
    """The k3 estimator of KL(policy || reference) per token: e^(ref-lp) - (ref-lp) - 1; 0 where
    `mask` is 0. Masking before the exponential keeps an untrained token (a prompt's, whose old
    log-prob is stored as 0) from overflowing to inf, which times a mask of 0 is NaN, in the
    value and in the gradient."""
    delta = ref_logprobs - logprobs
    if mask is not None:
        delta = jnp.where(mask > 0, delta, 0.0)
    return jnp.exp(delta) - delta - 1.0


def aggregate(per_token, mask, mode: str, num_sequences, num_tokens, sample_lengths=None):
    """Reduce a per-token quantity [R, T] over the masked tokens. The denominators are totals over
    the whole update (all microbatches), so that summing microbatch results gives the full loss.
    sample_sum: token sum ÷ number of trained samples (the recipe's; constant when no grade fails);
    token_mean: token sum ÷ number of tokens; seq_mean_token_mean: mean over samples of each
    sample's token mean. `sample_lengths` [R, T] gives each token its sample's number of
    trained tokens (packed rows hold several samples); by default a row is one sample."""
    masked = per_token * mask
    if mode == "sample_sum":
        return jnp.sum(masked) / num_sequences
    if mode == "token_mean":
        return jnp.sum(masked) / jnp.maximum(num_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        if sample_lengths is None:
            sample_lengths = jnp.broadcast_to(jnp.sum(mask, axis=-1, keepdims=True), mask.shape)
        return jnp.sum(masked / jnp.maximum(sample_lengths, 1.0)) / num_sequences
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.8  # log-probs are taken at the sampling temperature
    # The ratio is clipped to [1 - clip_eps_low, 1 + clip_eps_high]. The recipe's 4 leaves the low
    # side unclipped (a ratio is positive): any clip_eps_low of 1 or more does the same.
    clip_eps_low: float = 4.0
    clip_eps_high: float = 4.0
    kl_coef: float = 0.0  # > 0 loads a frozen reference model
    entropy_coef: float = 1e-4
    aggregation: str = "sample_sum"

    def __post_init__(self):
        if not MIN_TEMPERATURE <= self.temperature < math.inf:
            raise ConfigError(f"loss.temperature must be a finite number of at least {MIN_TEMPERATURE:g} (rollouts "
                              f"sample at it, and log-probs divide by it), got {self.temperature}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"loss.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        for name in ("clip_eps_low", "clip_eps_high", "kl_coef", "entropy_coef"):
            require_range(getattr(self, name), f"loss.{name}", 0)


def sequence_logprobs(graphdef, params, tokens, temperature: float, positions=None, segment_ids=None,
                      with_entropy: bool = False):
    """Log-probs [R, L-1] of tokens[:, 1:] under log_softmax(logits / temperature) (and the
    entropy of each of those distributions), computed chunk by chunk from the hidden states.
    Packed rows pass their positions and segment ids."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(tokens, positions, segment_ids)[:, :-1]
    if with_entropy:
        return token_logprobs_and_entropy(hidden, model.head_weight(), tokens[:, 1:], temperature)
    return token_logprobs(hidden, model.head_weight(), tokens[:, 1:], temperature)


METRIC_SUMS = ("loss", "clip_fraction", "entropy", "approx_kl", "tokens")


def grpo_loss(graphdef, params, ref_params, micro, loss: LossConfig):
    """The loss of one micro-batch of packed rows [R, L] and its metrics (sums, to be added over
    micro-batches). micro: tokens, positions, segment_ids, mask (1 on trained completion
    tokens), old_logprobs (each at the token it scores), advantages and sample_lengths (per
    token, from its sample), and num_sequences / num_tokens (totals over the update)."""
    tokens, mask = micro["tokens"], micro["mask"][:, 1:].astype(jnp.float32)
    logprobs, entropy = sequence_logprobs(graphdef, params, tokens, loss.temperature, micro["positions"],
                                          micro["segment_ids"], with_entropy=True)
    old = micro["old_logprobs"][:, 1:]
    per_token, clipped = clipped_policy_loss(logprobs, old, micro["advantages"][:, 1:], loss.clip_eps_low,
                                             loss.clip_eps_high)
    agg = partial(aggregate, mask=mask, mode=loss.aggregation, num_sequences=micro["num_sequences"],
                  num_tokens=micro["num_tokens"], sample_lengths=micro["sample_lengths"][:, 1:])
    total = agg(per_token) - loss.entropy_coef * agg(entropy)
    if ref_params is not None:
        ref_logprobs = sequence_logprobs(graphdef, ref_params, tokens, loss.temperature, micro["positions"],
                                         micro["segment_ids"])
        total = total + loss.kl_coef * agg(kl_k3(logprobs, ref_logprobs, mask))
    token_sum = lambda x: jnp.sum(x * mask)  # noqa: E731
    metrics = {"loss": total, "clip_fraction": token_sum(clipped), "entropy": token_sum(entropy),
               # KL(old || policy): the tokens were drawn from the old policy, which k3 must be taken under.
               "approx_kl": token_sum(kl_k3(old, logprobs, mask)), "tokens": jnp.sum(mask)}
    return total, metrics


def accumulate_step(graphdef, loss: LossConfig, params, ref_params, grads, sums, micro):
    """Add one micro-batch's gradients and metric sums. Each micro-batch's loss is normalized by
    whole-update totals, so the sum over micro-batches is the update's gradient, whatever the
    number of micro-batches (which follows the packed rows and varies from step to step)."""
    (_, metrics), g = jax.value_and_grad(partial(grpo_loss, graphdef, loss=loss), has_aux=True)(
        params, ref_params, micro)
    return jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, metrics)


def apply_step(optimizer, params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"grad_norm": optax.tree.norm(grads), "params_finite": params_finite(params)}


# --------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class RLDataConfig:
    path: str = "configs/data/tiny_proofs.jsonl"  # .jsonl / .parquet, or a hub dataset name
    name: str | None = None
    split: str = "train"
    problem_field: str = "problem"
    rubric_field: str = "rubrics"  # absent in a row: "rubric" (or "rubrics"), else graded without a marking scheme
    # The policy's user message; the judge still sees the bare problem (and the rubric).
    task_template: str = "Generate a rigorous proof to the following question:\n\n{problem}"
    seed: int = 0

    def __post_init__(self):
        check_seed(self.seed, "data.seed")
        if "{problem}" not in self.task_template:
            raise ConfigError(f"data.task_template must contain {{problem}}, got {self.task_template!r}")
        if "{{problem}}" in self.task_template:  # the judge's and benchmark's spelling: the outer braces would stay
            raise ConfigError("data.task_template: {{problem}} has doubled braces; the task template writes its "
                              "placeholder with single ones ({problem})")

    def task(self, problem: str) -> str:
        return self.task_template.replace("{problem}", problem)


@dataclasses.dataclass(frozen=True)
class RolloutSamplingConfig:
    """How rollouts are sampled. GRPO samples the whole tempered distribution at
    `loss.temperature`: its loss scores tokens under log_softmax(logits / temperature), so top-k
    / top-p filtering would train on log-probs of a distribution it did not sample from."""

    dtype: str = "bfloat16"  # the sampler's copy of the weights
    # A different layout for sampling (default: the training mesh's). With several processes,
    # each samples on its own devices, laid out by this config (or the training one) over them.
    mesh: MeshConfig | None = None
    kv_cache_gib: float | None = None  # KV-cache budget per device; sets the wave size
    max_concurrent: int | None = None  # or the wave size directly (sequences decoded at once)
    top_p: float = 1.0  # must stay 1 (see above)
    top_k: int = 0  # must stay 0 (see above)

    def __post_init__(self):
        check_dtype(self.dtype, "sampling.dtype")
        if self.mesh is not None:
            check_mesh_sizes(self.mesh, "sampling.mesh")
        if self.top_k != 0 or self.top_p != 1.0:
            raise ConfigError(
                f"GRPO samples from the whole tempered distribution (sampling.top_k 0, sampling.top_p 1; got "
                f"top_k {self.top_k}, top_p {self.top_p}): its loss scores tokens under "
                "log_softmax(logits / temperature), and a filtered sampler would train on log-probs of a "
                "distribution it did not sample from")
        if self.kv_cache_gib is not None and self.max_concurrent is not None:
            raise ConfigError("set one of sampling.kv_cache_gib and sampling.max_concurrent, not both")
        require_range(self.kv_cache_gib, "sampling.kv_cache_gib", 0, low_open=True)
        require_at_least_one(self, ("max_concurrent",), "sampling.")


# For the settings an rc: section refuses, which earlier versions took and ignored.
RESUME_WITHOUT_IT = " (a run started with it goes on without it, given --resume-with-changes)"
# The summarizer's settings that only a separate one (rc.summarizer.path) reads.
SEPARATE_ONLY = ("dtype", "temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class RCSummarizerConfig:
    """Who writes RC training's summaries. `path` names a separate frozen model sampled with
    these settings (the recipe's: a non-thinking instruct model, at most 2,048 tokens,
    temperature 0.7, top-p 0.8, top-k 20); without a path the policy summarizes itself,
    thinking, within max_new_tokens, at the loss temperature and unfiltered."""

    path: str | None = None  # Hugging Face folder, Hub id or qed-jax checkpoint
    dtype: str = "bfloat16"
    max_new_tokens: int = 2048
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    thinking: bool = False

    def __post_init__(self):
        check_sampling(self, "rc.summarizer.")
        check_dtype(self.dtype, "rc.summarizer.dtype")
        if not self.path:  # the policy summarizes itself (open_summarizer reads "" as no path too)
            for field in dataclasses.fields(self):
                if field.name in SEPARATE_ONLY and getattr(self, field.name) != field.default:
                    raise ConfigError(f"rc.summarizer.{field.name} is for a separate summarizer (rc.summarizer.path): "
                                      "without one the policy summarizes itself, thinking, at the loss temperature "
                                      f"and unfiltered; set rc.summarizer.path, or leave it out{RESUME_WITHOUT_IT}")


@dataclasses.dataclass(frozen=True)
class RCTrainConfig:
    """Reasoning-cache states (the `rc:` section): per problem, a `turns`-turn trajectory of the
    current policy gives turns + 1 states (the empty summary, then the summary after each turn);
    `states_per_problem` of them are drawn without replacement, and a group of
    samples_per_prompt rollouts is sampled from each drawn state's reasoning prompt. Only those
    rollouts are trained; the grader sees the original problem. `max_prompt_length` bounds the
    reasoning prompt with the longest summary, so problems may take max_prompt_length -
    summary_tokens - the template's own tokens."""

    turns: int = 3
    states_per_problem: int = 2
    summary_tokens: int = 2048  # S: longer summaries are cut (and counted)
    reasoning_tokens: int | None = None  # H_R of each trajectory turn; default: max_new_tokens
    trajectory_batch: int | None = None  # problems per compiled trajectory call; default: all
    reasoning_template: str = "rc_reasoning"  # a file in configs/prompts/ (without .txt) or a path
    summarize_template: str = "rc_summarize"
    summarizer: RCSummarizerConfig = RCSummarizerConfig()

    def __post_init__(self):
        require_at_least_one(self, ("turns", "summary_tokens", "reasoning_tokens", "trajectory_batch"), "rc.")
        if not 1 <= self.states_per_problem <= self.turns + 1:
            raise ConfigError(f"rc.states_per_problem must be between 1 and rc.turns + 1 = {self.turns + 1} "
                              f"(states are drawn without replacement), got {self.states_per_problem}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    model: ModelSpec = ModelSpec()
    tokenizer: str | None = None  # default: model.path
    data: RLDataConfig = RLDataConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig(lr=1e-6, schedule="constant", warmup_ratio=0.0, weight_decay=0.01,
                                     grad_clip=0.3)
    loss: LossConfig = LossConfig()
    judge: JudgeConfig = JudgeConfig()
    reward_rule: str | None = None  # a rule grader instead of the judge (toy tasks)
    prompts_per_step: int = 64
    samples_per_prompt: int = 16
    max_prompt_length: int = 1024  # longer problems are skipped (counted)
    max_new_tokens: int = 49152
    sampling: RolloutSamplingConfig = RolloutSamplingConfig()
    rc: RCTrainConfig | None = None  # reasoning-cache states as the prompts (see RCTrainConfig)
    old_logprobs: str = "sampler"  # sampler | recompute
    normalize_std: bool = False
    drop_zero_advantage_groups: bool = False
    updates_per_step: int = 1  # passes over each step's samples
    minibatches: int = 1  # optimizer updates per pass
    # Each update's samples are packed first-fit into rows of train_length tokens (default:
    # max_prompt_length + max_new_tokens) and run micro_batch_rows rows at a time (gradient
    # accumulation; default: one row per data-parallel device).
    train_length: int | None = None
    micro_batch_rows: int | None = None
    steps: int = 150
    seed: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    output_dir: str = "runs/grpo"  # metrics, config, TensorBoard, the HF export (local)
    checkpoint_dir: str | None = None  # local path or gs://; default: output_dir/checkpoints
    export_dtype: str | None = "bfloat16"
    # Keys that an eval config has in its sampling section, and where this config has them.
    KEYS_ELSEWHERE: ClassVar[dict[str, str]] = {
        "sampling.temperature": "loss.temperature (rollouts are sampled at the loss's temperature)",
        "sampling.max_new_tokens": "max_new_tokens (at the top level)",
    }

    def __post_init__(self):
        check_seed(self.seed, "seed")
        check_mesh_sizes(self.mesh)
        check_local_output_dir(self.output_dir, "put the checkpoints there with checkpoint_dir")
        require_at_least_one(self, ("prompts_per_step", "samples_per_prompt", "max_prompt_length", "max_new_tokens",
                                    "updates_per_step", "minibatches", "train_length", "micro_batch_rows", "steps",
                                    "checkpoint_every", "keep_checkpoints"))
        check_dtype(self.export_dtype, "export_dtype")
        if self.reward_rule is not None and self.reward_rule not in RULES:
            raise ConfigError(f"unknown reward_rule {self.reward_rule!r}; choose one of: {', '.join(RULES)}, or null "
                              "(grade with the judge)")
        if self.old_logprobs not in ("sampler", "recompute"):
            raise ConfigError(f"old_logprobs must be sampler or recompute, got {self.old_logprobs!r}")
        if self.samples_per_prompt == 1:
            raise ConfigError("samples_per_prompt must be at least 2: a rollout's advantage is its reward minus its "
                              "group's mean, so groups of one train nothing")
        if self.samples_per_step % self.minibatches:
            raise ConfigError(f"samples per step ({self.samples_per_step}) must be divisible by "
                              f"minibatches ({self.minibatches})")
        if self.max_prompt_length > DEFAULT_BUCKETS[-1]:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) is longer than the sampler's longest "
                              f"prompt bucket ({DEFAULT_BUCKETS[-1]} tokens): lower it")
        if self.rc is not None and self.data.task_template != RLDataConfig.task_template:
            raise ConfigError("data.task_template is not used with an rc: section: the bare problem goes into the "
                              "PROBLEM section of rc.reasoning_template, whose own text asks for the proof; change "
                              f"that template instead{RESUME_WITHOUT_IT}")
        if self.rc is not None and self.max_prompt_length <= self.rc.summary_tokens:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be longer than rc.summary_tokens "
                              f"({self.rc.summary_tokens}): the reasoning prompt holds the problem beside the summary; "
                              "an rc: section (or any rc.* key) takes the section's defaults for the keys it does not "
                              "set: lower rc.summary_tokens or raise max_prompt_length")
        if self.row_length < self.max_prompt_length + self.max_new_tokens:
            raise ConfigError(f"train_length ({self.train_length}) must hold the longest sequence: "
                              f"max_prompt_length + max_new_tokens = {self.max_prompt_length + self.max_new_tokens}")

    @property
    def row_length(self) -> int:
        return self.train_length or self.max_prompt_length + self.max_new_tokens

    @property
    def groups_per_step(self) -> int:
        """GRPO groups per step: one per problem, or one per drawn RC state."""
        return self.prompts_per_step * (self.rc.states_per_problem if self.rc else 1)

    @property
    def samples_per_step(self) -> int:
        return self.groups_per_step * self.samples_per_prompt

    @property
    def optimizer_updates(self) -> int:
        """All optimizer updates of the run: what the learning-rate schedule counts."""
        return self.steps * self.updates_per_step * self.minibatches

    def derived(self) -> dict:
        return {
            "samples_per_step": self.samples_per_step,
            "samples_per_update": self.samples_per_step // self.minibatches,
            "optimizer_updates_per_step": self.updates_per_step * self.minibatches,
            "optimizer_updates": self.optimizer_updates,
            "loss_normalizer": {"sample_sum": f"trained samples per update (at most "
                                              f"{self.samples_per_step // self.minibatches})",
                                "token_mean": "completion tokens per update",
                                "seq_mean_token_mean": "trained samples per update (of per-sample token means)",
                                }[self.loss.aggregation],
            "train_length": self.row_length,
            "reference_model": self.loss.kl_coef > 0,
            "model": self.model.describe(),
            "task_template": self.data.task_template if self.rc is None else None,
            "rc": None if self.rc is None else {
                "states": self.rc.turns + 1, "groups_per_step": self.groups_per_step,
                "reasoning_tokens": self.rc.reasoning_tokens or self.max_new_tokens,
                "summarizer": self.rc.summarizer.path or "the policy"},
            "grader": f"rule {self.reward_rule}" if self.reward_rule else f"judge {self.judge.model} at {self.judge.base_url}",
        }


# --------------------------------------------------------------------------------------------
# The loop


def prompt_batches(prompts: list[dict], per_step: int, data_seed: int) -> grain.DatasetIterator:
    """Each step's prompts, forever; a checkpoint holds the position. Every epoch reshuffles the
    prompts and cuts them into steps of `per_step`, leaving out the epoch's last len % per_step
    (other ones each epoch), so that no step holds a problem twice: a step across two epochs
    could have held the same problem at the end of one and the start of the next. With fewer
    prompts than a step takes, each step runs on through the reshuffled epochs."""
    count = len(prompts)
    shuffled = grain.MapDataset.source(prompts).shuffle(seed=order_seed(data_seed)).repeat()
    steps_per_epoch = count // per_step

    def step_prompts(step: int) -> list[dict]:
        if steps_per_epoch:
            epoch, index = divmod(step, steps_per_epoch)
            start = epoch * count + index * per_step
        else:
            start = step * per_step
        return [shuffled[start + i] for i in range(per_step)]

    return iter(grain.MapDataset.range(sys.maxsize).map(step_prompts).to_iter_dataset())


def load_prompts(config: GRPOConfig, tokenizer) -> list[dict]:
    """Rows → {problem, rubric, prompt_ids} (the task template as a chat prompt), or with RC
    {problem, rubric, problem_ids} (the problem's own tokens, which go into the reasoning
    prompt by the RC token contract). Rows without a problem or too long are skipped."""
    from qed_jax.tokenizer import chat_prompt

    limit = problem_token_limit(config, tokenizer)
    rows = read_rows(config.data.path, config.data.name, config.data.split, "data.path")
    # The rubric under the configured key, else under the other one the judge accepts.
    rubric_keys = (config.data.rubric_field, *(k for k in RUBRIC_KEYS if k != config.data.rubric_field))
    prompts, skipped, too_long = [], [], []  # the rows left out: (where, why)
    check_problem_field(config.data, rows)
    for where, row in rows:
        problem = row.get(config.data.problem_field) if isinstance(row, dict) else None
        try:
            if isinstance(row, BadRow):
                raise ConfigError(row.reason)
            if not isinstance(row, dict):
                raise ConfigError(f"not a JSON object of named fields: {json.dumps(row)[:60]}")
            if not isinstance(problem, str) or not problem.strip():
                raise ConfigError(f"field {config.data.problem_field!r} is missing, empty or not text")
            rubric = row_field(row, "rubric", rubric_keys, where)
        except ConfigError as e:
            skipped.append((where, str(e).removeprefix(f"{where}: ")))
            continue
        if config.rc is None:
            field, ids = "prompt_ids", chat_prompt(tokenizer, [{"role": "user", "content": config.data.task(problem)}])
        else:
            field, ids = "problem_ids", tokenizer(problem, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            too_long.append((where, f"{len(ids)} tokens, over the {limit} a problem may take (max_prompt_length)"))
            continue
        prompts.append({"problem": problem, "rubric": rubric[1] if rubric else None, field: ids})
    warn_left_out(config.data.path, "skipped", skipped[:NAMED_ROWS], len(skipped))
    warn_left_out(config.data.path, "dropped", too_long[:NAMED_ROWS], len(too_long))
    with_rubric = sum(p["rubric"] is not None for p in prompts)
    log.info("%s: %d prompts, %d with a marking scheme (%d rows skipped as malformed, %d longer than %d tokens)",
             config.data.path, len(prompts), with_rubric, len(skipped), len(too_long), limit)
    if prompts and not with_rubric and config.reward_rule is None:
        check_rubric_field(config.data, [row for _, row in rows])
    if not rows:
        raise ConfigError(f"{config.data.path}: no problems to train on (it holds no rows)")
    if not prompts:
        fix = [f"{len(too_long)} longer than {limit} tokens: raise max_prompt_length"] if too_long else []
        fix += [f"{len(skipped)} malformed (the warnings above name them)"] if skipped else []
        raise ConfigError(f"{config.data.path}: no usable prompts among its {len(rows)} rows ({'; '.join(fix)})")
    return prompts


def check_problem_field(data: RLDataConfig, rows: list) -> None:
    """Refuse rows none of which has the problem field: most likely the problems are under
    another name, which `data.problem_field` should give (rather than one line per row)."""
    objects = [row for _, row in rows if isinstance(row, dict) and not isinstance(row, BadRow)]
    if objects and not any(data.problem_field in row for row in objects):
        raise ConfigError(f"{data.path}: no row has the field {data.problem_field!r} (data.problem_field); set "
                          f"data.problem_field to the field that holds the problems (the first row has: "
                          f"{', '.join(map(repr, list(objects[0])[:10]))})")


def check_rubric_field(data: RLDataConfig, rows: list) -> None:
    """No prompt has a marking scheme for the judge: refuse when `data.rubric_field` was set to
    a field no row has, else warn (the judge grades without one), naming the grading guidelines
    the rows have instead, if any: GRPO's judge template reads a rubric, not guidelines."""
    keys = dict.fromkeys((data.rubric_field, *RUBRIC_KEYS))
    guidelines = [key for key in GUIDELINES_KEYS if any(isinstance(row, dict) and key in row for row in rows)]
    missing = (f"{data.path}: no row has a marking scheme under {' or '.join(map(repr, keys))} (data.rubric_field)"
               + (f"; its rows have {', '.join(map(repr, guidelines))}, grading guidelines that GRPO does not show "
                  "the judge" if guidelines else ""))
    if data.rubric_field != RLDataConfig.rubric_field:
        raise ConfigError(f"{missing}: set data.rubric_field to the field that holds them")
    log.warning("%s, so the judge grades every completion without one; map one with data.rubric_field=FIELD", missing)


def problem_token_limit(config: GRPOConfig, tokenizer) -> int:
    """The most tokens a problem may take: max_prompt_length, less with RC the summary's and the
    reasoning template's own (a ConfigError when that leaves none)."""
    if config.rc is None:
        return config.max_prompt_length
    template = rc_template_tokens(config.rc, tokenizer)
    limit = config.max_prompt_length - config.rc.summary_tokens - template
    if limit < 1:
        raise ConfigError(f"max_prompt_length ({config.max_prompt_length}) leaves no room for a problem next to "
                          f"rc.summary_tokens ({config.rc.summary_tokens}) and the reasoning template's own "
                          f"{template} tokens: raise it")
    return limit


def rc_template_tokens(rc: RCTrainConfig, tokenizer) -> int:
    """The RC reasoning prompt's own tokens (its template's literal pieces, chat wrappers included)."""
    from qed_jax.reasoning_cache import REASONING_SLOTS, load_rc_template, tokenize_template

    return tokenize_template(tokenizer, load_rc_template(rc.reasoning_template), REASONING_SLOTS).literal_tokens


def open_summarizer(config: GRPOConfig):
    """A separate RC summarizer (rc.summarizer.path), checked on this host without touching a
    device (see `pretrained.open_pretrained`): (load(mesh, dtype=...) → its model, its tokenizer);
    None when the policy summarizes."""
    from qed_jax.pretrained import open_pretrained
    from qed_jax.tokenizer import load_tokenizer

    path = config.rc.summarizer.path if config.rc else None
    if not path:
        return None
    if is_missing_local_path(path):
        raise not_found("rc.summarizer.path", path)
    return open_pretrained(path), load_tokenizer(path)


class RCRollouts:
    """The `rc:` section at work: each step, a trajectory of the current policy per problem, its
    states, the drawn ones, and their reasoning prompts, from which the GRPO groups are sampled.
    The trajectory runs on the sampling mesh with the sampler's copy of the weights."""

    def __init__(self, config: GRPOConfig, sampling_model, tokenizer, mesh, summarizer_source=None):
        """summarizer_source: `open_summarizer`'s, for a separate summarizer."""
        from qed_jax.reasoning_cache import RCParams, ReasoningCache, Summarizer

        rc = self.config = config.rc
        summarizer = None
        if summarizer_source is not None:
            s = rc.summarizer
            load, summarizer_tokenizer = summarizer_source
            summarizer = Summarizer(load(mesh, dtype=s.dtype), SamplingParams(s.max_new_tokens, s.temperature,
                                                                              s.top_k, s.top_p),
                                    thinking=s.thinking, tokenizer=summarizer_tokenizer)
        # One problem buffer for every step, the prompt bucket that holds the longest problem
        # `load_prompts` keeps (at most what `qed-jax plan` sizes): no step compiles the loop again.
        limit = problem_token_limit(config, tokenizer)
        params = RCParams(turns=rc.turns, reasoning_tokens=rc.reasoning_tokens or config.max_new_tokens,
                          summary_tokens=rc.summary_tokens, temperature=config.loss.temperature,
                          summarizer_tokens=rc.summarizer.max_new_tokens, summarize_last=True, no_summary=None,
                          problem_tokens=bucket_length(limit) if limit <= DEFAULT_BUCKETS[-1] else limit,
                          max_turns=rc.turns, batch_size=rc.trajectory_batch,
                          reasoning_template=rc.reasoning_template, summarize_template=rc.summarize_template)
        self.cache = ReasoningCache(sampling_model, tokenizer, params, summarizer, mesh=mesh)

    def group_rows(self, rows: list[dict], key, seed: tuple[int, ...], group_size: int, first_problem: int = 0
                   ) -> tuple[list[dict], dict[str, np.ndarray]]:
        """Rows of problems → one row per rollout ({**problem row, prompt_ids, state}), groups of
        `group_size` in a row, `states_per_problem` groups per problem; and per-turn numbers of
        the trajectories [problems x turns]. Problem i of the call is the step's problem
        `first_problem + i`: its trajectory's randomness and its state draw (seeded by `seed` and
        that index) are the same however the step's problems are split over processes."""
        from qed_jax.reasoning_cache import draw_states, state_prompt_ids, training_states

        trajectories = self.cache.run_ids([r["problem_ids"] for r in rows], key=key,
                                       row_ids=range(first_problem, first_problem + len(rows)))
        self.cache.release()  # the rollouts need that memory
        group_rows = []
        for i, (row, turns) in enumerate(zip(rows, trajectories)):
            states = training_states([t.summary_ids for t in turns])
            rng = np.random.default_rng([*seed, first_problem + i])
            for k in draw_states(rng, len(states), self.config.states_per_problem):
                prompt_ids = state_prompt_ids(self.cache.prompts, row["problem_ids"], states[k])
                group_rows += [{**row, "prompt_ids": prompt_ids, "state": k}] * group_size
        turns = [t for ts in trajectories for t in ts]
        return group_rows, {"summary_length": np.array([len(t.summary_ids) for t in turns], np.int32),
                            "summary_cut": np.array([t.summary_cut for t in turns]),
                            "turn_truncated": np.array([t.finish_reason == "length" for t in turns])}


def rc_metrics(stats: dict[str, np.ndarray], trajectory_stats: dict[str, np.ndarray], num_states: int) -> dict:
    """RC numbers of a step: the mean graded reward of the rollouts drawn on each state index
    (`reward_state_k`; NaN where none was drawn), from per-sample `stats` (state, reward, valid);
    and the trajectories' summary lengths, cut and empty summaries and truncated turns."""
    out = {}
    for k in range(num_states):
        graded = stats["reward"][(stats["state"] == k) & stats["valid"]]
        out[f"reward_state_{k}"] = float(graded.mean()) if graded.size else math.nan
    return {**out, "summary_length_mean": float(trajectory_stats["summary_length"].mean()),
            "summaries_cut": int(trajectory_stats["summary_cut"].sum()),
            "summaries_empty": int((trajectory_stats["summary_length"] == 0).sum()),
            "trajectory_truncated_fraction": float(trajectory_stats["turn_truncated"].mean())}


def rollout_sequences(prompt_rows, completions, advantages, old_logprobs_from_sampler: bool) -> list[dict]:
    """One sample → 1-D arrays over its prompt + completion tokens: mask (1 on the completion),
    old log-probs (each at the token it scores), its advantage and its completion length on
    every token (what packing needs to keep samples apart inside a row)."""
    sequences = []
    for row, c, advantage in zip(prompt_rows, completions, advantages):
        p, n = len(row["prompt_ids"]), len(c.tokens)
        old = np.zeros(p + n, np.float32)
        if old_logprobs_from_sampler:
            old[p:] = c.logprobs
        sequences.append({
            "tokens": np.asarray(row["prompt_ids"] + c.tokens, np.int32),
            "mask": np.concatenate([np.zeros(p, np.float32), np.ones(n, np.float32)]),
            "old_logprobs": old,
            "advantages": np.full(p + n, advantage, np.float32),
            "sample_lengths": np.full(p + n, n, np.float32),
        })
    return sequences


def pad_rows(rows: dict, count: int) -> dict:
    """Packed rows [R, L] → [count, L]: empty rows (segment 0, nothing trained) after them."""
    return {k: np.concatenate([v, np.zeros((count - len(v), *v.shape[1:]), v.dtype)]) for k, v in rows.items()}


def micro_batches(rows: dict, rows_per_micro: int):
    """Packed rows [R, L] → micro-batches of `rows_per_micro` rows, the last filled with empty
    rows."""
    rows = pad_rows(rows, -(-len(rows["tokens"]) // rows_per_micro) * rows_per_micro)
    for i in range(0, len(rows["tokens"]), rows_per_micro):
        yield {k: v[i:i + rows_per_micro] for k, v in rows.items()}


class Learner:
    """The jitted update on packed rows: gradient accumulation one micro-batch at a time (rows
    sharded over the data-parallel axes), then one optimizer step. Each process passes its own
    rows, `rows_per_micro` of them per micro-batch (its share of the global micro-batch), and
    every process the same number of rows."""

    def __init__(self, graphdef, optimizer, loss: LossConfig, mesh, params, opt_state, rows_per_micro: int):
        self.mesh, self.rows_per_micro = mesh, rows_per_micro
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        self.zeros = jax.jit(lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
                             out_shardings=param_shardings)
        self.accumulate = jax.jit(partial(accumulate_step, graphdef, loss), donate_argnums=(2, 3))
        self.apply = jax.jit(partial(apply_step, optimizer), donate_argnums=(0, 1),
                             out_shardings=(param_shardings, jax.tree.map(lambda x: x.sharding, opt_state), None))
        self.rows = NamedSharding(mesh, PartitionSpec(DEFAULT_RULES["batch"]))
        self.logprobs = jax.jit(partial(sequence_logprobs, graphdef, temperature=loss.temperature),
                                out_shardings=self.rows)

    def put(self, micro: dict) -> dict:
        """This process's rows of a micro-batch → the global micro-batch, sharded over rows."""
        return {k: jax.make_array_from_process_local_data(self.rows, v, (len(v) * jax.process_count(), *v.shape[1:]))
                for k, v in micro.items()}

    def recompute_old_logprobs(self, params, rows: dict) -> None:
        """Old log-probs from the current params, micro-batch by micro-batch, into `rows`."""
        with jax.set_mesh(self.mesh):  # attention kernels find the mesh here
            out = [process_rows(self.logprobs(params, m["tokens"], positions=m["positions"],
                                              segment_ids=m["segment_ids"]))
                   for m in map(self.put, micro_batches(rows, self.rows_per_micro))]
        rows["old_logprobs"][:, 1:] = np.concatenate(out)[:len(rows["tokens"])] * rows["mask"][:, 1:]

    def update(self, params, opt_state, ref_params, rows: dict, num_sequences: float, num_tokens: float):
        """One optimizer update on `rows`; num_sequences and num_tokens (trained samples and
        completion tokens) count the whole update, all processes' rows together."""
        totals = {"num_sequences": np.float32(num_sequences), "num_tokens": np.float32(num_tokens)}
        with jax.set_mesh(self.mesh):  # attention kernels find the mesh here
            grads = self.zeros(params)
            sums = {k: jnp.float32(0) for k in METRIC_SUMS}
            for micro in micro_batches(rows, self.rows_per_micro):
                grads, sums = self.accumulate(params, ref_params, grads, sums, {**self.put(micro), **totals})
            params, opt_state, applied = self.apply(params, opt_state, grads)
        sums = jax.device_get(sums)
        n = max(float(sums.pop("tokens")), 1.0)
        loss = float(sums.pop("loss"))
        token_means = {k: float(v) / n for k, v in sums.items()}
        return params, opt_state, {"loss": loss, **{k: float(v) for k, v in jax.device_get(applied).items()},
                                   **token_means}


def update_samples(num_samples: int, minibatches: int, first_sample: int = 0) -> list[np.ndarray]:
    """The samples (indices into this process's `num_samples`) of each of a step's optimizer
    updates: the step's sample j (j = first_sample + i here) goes to update j mod minibatches.
    Striding rather than cutting blocks gives every process an equal part of every update, and
    every update the same samples whatever the number of processes."""
    step_index = first_sample + np.arange(num_samples)
    return [np.flatnonzero(step_index % minibatches == m) for m in range(minibatches)]


def update_totals(num_sequences: int, rows: dict) -> tuple[int, int, int, int]:
    """(trained samples, completion tokens, packed rows, most packed rows on one process) of one
    update, over all processes (rows' first token is never scored, as in the loss)."""
    local = np.array([num_sequences, np.count_nonzero(rows["mask"][:, 1:]), len(rows["tokens"])], np.int32)
    every = gather(local).reshape(-1, 3)
    return int(every[:, 0].sum()), int(every[:, 1].sum()), int(every[:, 2].sum()), int(every[:, 2].max())


def run_updates(learner: Learner, params, opt_state, ref_params, sequences: list[dict], trained: np.ndarray,
                config: GRPOConfig, first_sample: int = 0):
    """`updates_per_step` passes of `minibatches` optimizer updates over one step's samples (this
    process's: the step's samples from `first_sample` on). The samples not trained (`trained` [S]
    False) are filtered out before packing, so they count in no denominator; each process packs
    its samples of an update into rows of `train_length` tokens and pads them with empty rows to
    the most any process packed, so that all feed the same global micro-batches."""
    updates = []
    for m, samples in enumerate(update_samples(len(sequences), config.minibatches, first_sample)):
        kept = [sequences[i] for i in samples if trained[i]]
        # With no sample here, still the fields and dtypes of packed rows, none of them.
        rows = pack_sequences(kept or sequences[:1], config.row_length)
        rows = rows if kept else {k: v[:0] for k, v in rows.items()}
        num_sequences, num_tokens, packed_rows, most_rows = update_totals(len(kept), rows)
        if not num_sequences:
            log.warning("update %d of this step has no trained samples; skipped", m + 1)
            updates.append(None)
            continue
        rows = pad_rows(rows, most_rows)
        if config.old_logprobs == "recompute":
            learner.recompute_old_logprobs(params, rows)
        updates.append((rows, num_sequences, num_tokens, packed_rows))
    history = []
    for _ in range(config.updates_per_step):
        for update in updates:
            if update is None:  # its place in the learning-rate schedule passes all the same
                opt_state = advance_schedule(opt_state)
                continue
            rows, num_sequences, num_tokens, packed_rows = update
            params, opt_state, metrics = learner.update(params, opt_state, ref_params, rows, num_sequences, num_tokens)
            history.append({**metrics, "packed_rows": packed_rows})
    if not history:
        return params, opt_state, {}
    return params, opt_state, {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def sample_stats(grades, completions, valid, trained) -> dict[str, np.ndarray]:
    """The per-sample numbers [S] a step's metrics are made of; with several processes, each
    computes its own and `gather` joins them, so that every metric covers the whole step."""
    return {
        "reward": np.array([g.reward for g in grades], np.float32),
        "valid": np.asarray(valid).reshape(-1), "trained": np.asarray(trained).reshape(-1),
        "success": np.array([g.score == MAX_SCORE for g in grades]),
        "failed": np.array([g.failed for g in grades]),
        "judged": np.array([g.attempts > 0 and not g.cached for g in grades]),  # a cache hit's latency is old
        "sent": np.array([g.sent for g in grades]),
        "latency_s": np.array([g.latency_s for g in grades], np.float32),
        "length": np.array([len(c.tokens) for c in completions], np.int32),
        "truncated": np.array([c.finish_reason == "length" for c in completions]),
    }


def rollout_metrics(stats: dict[str, np.ndarray]) -> dict:
    """Rewards and success over graded samples only; a failed grade is counted, not scored."""
    valid = stats["valid"]
    graded = stats["reward"][valid]
    return {
        "reward_mean": float(graded.mean()) if graded.size else math.nan,
        "reward_std": float(graded.std()) if graded.size else math.nan,
        "success_rate": float(stats["success"][valid].mean()) if graded.size else math.nan,
        "completion_length_mean": float(stats["length"].mean()), "completion_length_max": int(stats["length"].max()),
        "truncated_fraction": float(stats["truncated"].mean()),
        "judge_failed": int(stats["failed"].sum()),
        "graded_fraction": float(valid.mean()),
        "trained_fraction": float(stats["trained"].mean()),
        "judge_latency_s": float(stats["latency_s"][stats["judged"]].mean()) if stats["judged"].any() else 0.0,
    }


def check_failures(stats: dict[str, np.ndarray], grades, config: GRPOConfig, step: int) -> None:
    """Stop the run, before anything of this step is applied, when the judge failed on
    more than `judge.max_failed_fraction` of the completions the step sent it (those scored 0
    unsent, without </think>, do not count: a young policy's step may send only a few), `stats`
    being all processes'; the reasons named are those of this process's `grades`. Every process
    decides alike."""
    failed, total = int(stats["failed"].sum()), int(stats["sent"].sum())
    if total == 0 or failed / total <= config.judge.max_failed_fraction:  # 29 of 100 at 0.29 passes
        return
    reasons = reason_counts(Counter(g.reason for g in grades if g.failed))
    where = f" on process {jax.process_index()}" if jax.process_count() > 1 else ""
    raise JudgeUnavailable(
        f"step {step}: the judge at {config.judge.base_url} failed on {failed} of the {total} completions sent to it "
        f"(judge.max_failed_fraction is {config.judge.max_failed_fraction}); reasons{where}: {reasons or 'none'}"
        ". Nothing of this step was applied; the steps before it are saved, its graded completions cached"
        + rejection_note((g.reason, g.raw) for g in grades if g.failed))


@contextlib.contextmanager
def keeping_finished_steps(ckpts, step: int, start: int, params, opt_state, data, step_start, seed: int):
    """When grading stops the run in the middle of step `step` + 1 (the judge cannot be reached,
    refuses the key or failed on too much of the step; the grade cache cannot be written), first
    save step `step`, the last one finished, with the data position `step_start` it left off at:
    a rerun then resumes at the step that failed, as after a stop signal, not at the last regular
    checkpoint. Every process raises there alike (`on_every_process`, `check_failures`), so every
    process saves alike; not when another process is gone (nothing to save with). The judge's and
    the config's errors say where the rerun resumes, or that the save failed too."""
    try:
        yield
    except Exception as e:
        if lost_process(e):
            raise
        note = f"a rerun resumes at step {step + 1}"
        if step > start:  # else the newest checkpoint is already this one
            data.set_state(step_start)
            try:
                ckpts.save(step, params, opt_state, data, step_meta(step, seed))
                ckpts.wait()
            except CheckpointError as failed:
                note = f"saving step {step} failed too: {failed}"
        if type(e) in (JudgeUnavailable, ConfigError):
            raise type(e)(f"{e} ({note})") from e
        raise


def step_meta(step: int, seed: int) -> dict:
    return {"step": step, "seed": seed}


def on_every_process(judge_call):
    """judge_call()'s result; an error on every process when it raised on any (its judge
    unreachable or refusing the key: JudgeUnavailable; its grade cache unwritable: ConfigError;
    anything else), so that all stop alike and none waits for the others in the step's gather."""
    error = result = None
    try:
        result = judge_call()
    except Exception as e:
        error = e
    worst = largest(0 if error is None else 1 if isinstance(error, JudgeUnavailable) else 2)
    if error is not None:
        raise error
    if worst == 1:
        raise JudgeUnavailable("the judge failed on another process; its log says why")
    if worst == 2:
        raise ConfigError("a judge call failed on another process (its log says why)")
    return result


def process_judge(judge: JudgeConfig) -> JudgeConfig:
    """This process's judge: with several processes, each grades its own completions through its
    own client (`judge.concurrency` requests each) and its own grade cache, `cache_path` +
    `.process-N`. A restart repeats the same data order, sampling keys and params, so process N
    samples and grades the same completions again and finds them in its own file; no file is
    shared between hosts, which have no common filesystem on a TPU pod. The cache must outlive
    the restart: a path on the worker's disk survives a crash, not a recreated slice."""
    if jax.process_count() == 1 or not judge.cache_path:
        return judge
    return dataclasses.replace(judge, cache_path=f"{judge.cache_path}.process-{jax.process_index()}")


def check_judge_template(config: GRPOConfig) -> None:
    """Refuse a judge template that grades against a field GRPO does not pass the judge: each
    prompt's rubric is all it passes. With a reward rule, warn of judge settings given for nothing."""
    if not config.reward_rule:
        template = load_judge_template(config.judge.template)
        check_template_fields(template, config.judge.template, "rubric", "GRPO")
        check_answer_format(template, config.judge.template, config.judge.answer_format)
        return
    defaults = JudgeConfig()
    given = [f"judge.{f.name}" for f in dataclasses.fields(JudgeConfig)
             if getattr(config.judge, f.name) != getattr(defaults, f.name)]
    if given:
        log.warning("reward_rule %s grades the rollouts, so %s %s not used; set reward_rule=null to grade with the "
                    "judge", config.reward_rule, ", ".join(given), "is" if len(given) == 1 else "are")


def train(config: GRPOConfig, resume_with_changes: bool = False) -> dict:
    """Run GRPO, resuming from the newest intact checkpoint in the run's directory. With several
    processes (one per host), each samples, grades and packs its share of every step's prompts
    on its own devices, and the update runs on the global mesh over all of them."""
    with run_lock(Path(config.output_dir)):  # a second job on the same output_dir fails here
        return _train(config, resume_with_changes)


def training_meshes(config: GRPOConfig):
    """The training mesh of `config` over the devices here, the rows of its micro-batches, and
    the sampler's layout (default: the training mesh's): (mesh, rows_per_micro, sampling_mesh,
    stacked_mesh), refused (ConfigError) where any of them does not split over the devices."""
    mesh = make_mesh(config.mesh)
    rows_per_micro = config.micro_batch_rows or data_parallel_size(mesh)
    check_rows_divide(rows_per_micro, mesh, "micro_batch_rows")
    sampling_mesh, stacked_mesh = sampling_meshes(config.sampling.mesh or config.mesh,
                                                  "sampling.mesh" if config.sampling.mesh else "mesh")
    sampling_ways = data_parallel_size(sampling_mesh)
    max_concurrent = config.sampling.max_concurrent
    if max_concurrent and max_concurrent % sampling_ways:  # as Sampler does
        raise ConfigError(f"sampling.max_concurrent must be a multiple of the sampling mesh's {sampling_ways} "
                          f"batch shards, so rows split evenly; got {max_concurrent}")
    return mesh, rows_per_micro, sampling_mesh, stacked_mesh


def _train(config: GRPOConfig, resume_with_changes: bool) -> dict:
    from qed_jax.tokenizer import check_vocab, load_tokenizer, stop_ids

    out = Path(config.output_dir)
    check_run_config(out, config, resume_with_changes, refuse=False, kind_only=True)  # another command's run?
    with set_up_together("GRPO's setup (config, model, tokenizer, prompts)"):
        mesh, rows_per_micro, sampling_mesh, stacked_mesh = training_meshes(config)
        load_model = open_model(config.model, config.seed)  # its files are checked now, read after
        checkpoints = config.checkpoint_dir or out / "checkpoints"
        checkpoint.check_folder(checkpoints)  # now, not after the model loads or at the first save
        summarizer_source = open_summarizer(config)  # so are a separate RC summarizer's
        tokenizer_path = resolve_tokenizer(config.tokenizer, config.model)
        tokenizer = load_tokenizer(tokenizer_path, "tokenizer")
        prompts = load_prompts(config, tokenizer)
        problems = per_process(config.prompts_per_step, "prompts_per_step")  # this process's, per step
        P = problems * (config.rc.states_per_problem if config.rc else 1)  # its GRPO groups per step
        G = config.samples_per_prompt
        first_sample = jax.process_index() * P * G  # this process's first sample of every step
        check_judge_template(config)
        grader = RuleGrader(config.reward_rule) if config.reward_rule else Judge(process_judge(config.judge))

    model = load_model(mesh)
    model_source = loaded_from(model)  # its generation config goes with the export
    check_vocab(tokenizer, model.config.vocab_size)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    ref_params = jax.tree.map(jnp.copy, params) if config.loss.kl_coef > 0 else None
    optimizer = make_optimizer(config.optim, config.optimizer_updates, decay_mask(model))
    opt_state = init_opt_state(optimizer, params, mesh)
    learner = Learner(graphdef, optimizer, config.loss, mesh, params, opt_state,
                      per_process(rows_per_micro, "micro_batch_rows (default: the data-parallel devices)"))

    sampling_config = model.config.replace(param_dtype=config.sampling.dtype, dtype=config.sampling.dtype)
    # The sampler's structure only; its weights are the trained params, cast to the sampling
    # dtype and laid out on the sampling mesh, before each step.
    sampling_model = nnx.eval_shape(lambda: type(model)(sampling_config, rngs=nnx.Rngs(0)))
    to_sampler = sampler_weights(params, sampling_model, config.sampling.dtype, sampling_mesh, stacked_mesh)
    sampler = Sampler(sampling_model, mesh=sampling_mesh, max_concurrent=config.sampling.max_concurrent,
                      kv_cache_gib=config.sampling.kv_cache_gib)
    rc_rollouts = (RCRollouts(config, sampling_model, tokenizer, sampling_mesh, summarizer_source)
                   if config.rc else None)
    sampling = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.loss.temperature)
    stops = stop_ids(tokenizer)

    data = prompt_batches(prompts, config.prompts_per_step, config.data.seed)
    ckpts = checkpoint.TrainCheckpoints(checkpoints, model.config,
                                        config.keep_checkpoints, assets_from=tokenizer_path,
                                        run={"trainer": "grpo", "data": data_record(config.data.path, prompts),
                                             "config": json_values(config)}, shared_data=True)
    # Find out now, not after a step's sampling, and before the run directory records this config
    # (a run the judge stopped before its first step is not one a fixed command must continue);
    # a run with only its export left grades nothing.
    judge_checked = isinstance(grader, Judge) and (ckpts.latest_step() or 0) < config.steps
    if judge_checked:
        on_every_process(grader.check_reachable)
    params, opt_state, start = start_or_resume(out, config, ckpts, params, opt_state, data, config.steps,
                                               resume_with_changes)
    metrics_log = MetricsLog(out, start)
    if is_complete(out, start, config.steps, config.export_dtype):
        ckpts.close()
        metrics_log.close()
        grader.close()
        return {**reward_summary(metrics_log.history), "output_dir": str(out), "step": start, "start_step": start,
                "complete": True, "process": jax.process_index()}
    if isinstance(grader, Judge) and start < config.steps and not judge_checked:  # the last step was unreadable
        on_every_process(grader.check_reachable)
    log.info("GRPO: %s", json.dumps(config.derived()))
    # Streams of their own: not the keys a preset model's init drew from seed, nor each other's.
    rollout_key, trajectory_key = (jax.random.key(hashed_seed(stream, config.seed))
                                   for stream in ("rollouts", "rc trajectories"))
    progress = tqdm(total=config.steps, initial=start, desc="grpo", unit="step", disable=jax.process_index() != 0)
    step, stopping = start, False
    with StopSignals() as stop:
        try:
            while step < config.steps and not stopping:
                step_start = data.get_state()  # where this step's prompts begin, should it not finish
                rows = process_share(next(data))  # every process reads the whole batch
                t0 = time.perf_counter()
                weights = to_sampler(params)  # the sampler always samples the current policy
                sampler.update_weights(weights)
                if rc_rollouts is None:
                    group_rows = [row for row in rows for _ in range(G)]
                else:  # the same step draws the same states and trajectories after a restart
                    rc_rollouts.cache.update_weights(weights)
                    group_rows, trajectory_stats = rc_rollouts.group_rows(
                        rows, jax.random.fold_in(trajectory_key, step), (config.seed, step), G,
                        first_problem=jax.process_index() * problems)
                    trajectory_stats = gather(trajectory_stats)
                    trajectory_s = time.perf_counter() - t0
                    t0 = time.perf_counter()  # sample_s counts the rollouts alone
                completions = sampler.generate_ids([r["prompt_ids"] for r in group_rows], sampling,
                                                   jax.random.fold_in(rollout_key, step), stops,
                                                   row_ids=range(first_sample, first_sample + len(group_rows)))
                sampler.release()  # the update needs that memory: weights come back next step
                del weights
                texts = [tokenizer.decode(c.text_tokens) for c in completions]
                t1 = time.perf_counter()
                items = [GradeItem(problem=r["problem"], completion=t, rubric=r["rubric"])
                         for r, t in zip(group_rows, texts)]
                with keeping_finished_steps(ckpts, step, start, params, opt_state, data, step_start, config.seed):
                    grades = on_every_process(lambda: grader.grade_batch(items))
                    t2 = time.perf_counter()
                    rewards = np.array([g.reward for g in grades], np.float32).reshape(P, G)
                    valid = np.array([not g.failed for g in grades]).reshape(P, G)
                    advantages = np.asarray(group_advantages(jnp.asarray(rewards), config.normalize_std,
                                                             valid=jnp.asarray(valid)))
                    trained = np.asarray(trained_samples(jnp.asarray(valid), jnp.asarray(advantages),
                                                         config.drop_zero_advantage_groups))
                    stats = sample_stats(grades, completions, valid, trained)
                    if rc_rollouts is not None:
                        stats["state"] = np.array([r["state"] for r in group_rows], np.int32)
                    stats = gather(stats)  # the whole step's
                    check_failures(stats, grades, config, step + 1)
                sequences = rollout_sequences(group_rows, completions, advantages.reshape(-1),
                                              config.old_logprobs == "sampler")
                params, opt_state, train_metrics = run_updates(learner, params, opt_state, ref_params, sequences,
                                                               trained.reshape(-1), config, first_sample)
                t3 = time.perf_counter()
                step += 1
                metrics = {**rollout_metrics(stats), "sample_s": t1 - t0, "judge_s": t2 - t1, "train_s": t3 - t2,
                           **train_metrics}
                if rc_rollouts is not None:
                    metrics.update(rc_metrics(stats, trajectory_stats, config.rc.turns + 1),
                                   trajectory_s=trajectory_s)
                metrics_log.write(step, metrics)
                check_finite(step, metrics, ckpts)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", refresh=False)
                progress.update()
                stopping = agree_on_stop(stop)
                if step % config.checkpoint_every == 0 or step == config.steps or stopping:
                    ckpts.save(step, params, opt_state, data, step_meta(step, config.seed))
        finally:
            progress.close()
            ckpts.close()
            metrics_log.close()
            grader.close()
        stopped_by = final_stop_signal(stop)
    exit_or_export(stopped_by, step, nnx.merge(graphdef, params), out, config.export_dtype, tokenizer_path,
                   model_source)
    return {**reward_summary(metrics_log.history), "output_dir": str(out), "step": step, "start_step": start,
            "complete": False, "process": jax.process_index()}


def summary(result: dict, best: bool = True) -> str:
    """A run's rewards (`reward_summary`), for its closing line. A run found complete in
    checkpoints that another run directory logged has none here."""
    if not result["reward_last_steps"]:
        return "no reward logged in this run directory (it was trained where its checkpoints were written)"
    text = f"reward mean {result['reward_last_mean']:.4f} over the last {result['reward_last_steps']} steps"
    return text + (f", best {result['reward_best']:.4f} at step {result['reward_best_step']}" if best else "")


def reward_summary(history: list[dict], last: int = 10) -> dict:
    """The mean reward over the last `last` logged steps and the best step's, for the run's
    closing line (one step's reward alone is too noisy to summarize a run)."""
    rewards = [(row["step"], row["reward_mean"]) for row in history if math.isfinite(row.get("reward_mean", math.nan))]
    if not rewards:
        return {"reward_last_mean": math.nan, "reward_last_steps": 0, "reward_best": math.nan, "reward_best_step": None}
    tail = [r for _, r in rewards[-last:]]
    best_step, best = max(rewards, key=lambda sr: sr[1])
    return {"reward_last_mean": float(np.mean(tail)), "reward_last_steps": len(tail), "reward_best": best,
            "reward_best_step": best_step}
