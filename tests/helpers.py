"""Builders for offline test fixtures (tiny random transformers Qwen3 models) and for running
`qed-jax` commands in subprocesses (one process or a loopback jax.distributed cluster)."""

import contextlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

TINY_HF = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
    rope_theta=1e6, max_position_embeddings=512,
)


def make_hf_model(path: Path, seed: int = 0, dtype: str = "float32", **overrides):
    """Save a random Qwen3ForCausalLM (norm weights perturbed too) to `path`; returns the model."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kwargs = {**TINY_HF, **overrides}
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


CORPUS = [
    "Let n be a positive integer. Prove that n^2 + n is even.",
    "Proof. Either n is even or n + 1 is even, so n(n + 1) is divisible by 2.",
    "Suppose for contradiction that sqrt(2) = p / q in lowest terms; then p^2 = 2 q^2.",
    "By the AM-GM inequality, (a + b) / 2 >= sqrt(ab) for all non-negative reals a and b.",
    "We induct on k. The base case k = 1 holds. Assume the claim for k; we show it for k + 1.",
    "Therefore the triangle ABC is isosceles, and the angle bisector meets BC at its midpoint.",
]


def make_tokenizer(vocab_size: int = 320):
    from qed_jax.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS * 4, vocab_size=vocab_size)


def make_hf_model_with_tokenizer(path: Path, seed: int = 0, **overrides):
    """A random model whose folder also holds a tiny tokenizer (vocab within the model's)."""
    tokenizer = make_tokenizer()
    model = make_hf_model(path, seed=seed, **overrides)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def cli_env(devices: int) -> dict:
    """Environment for a `qed-jax` subprocess on `devices` CPU devices."""
    import os

    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu"}


def cli_with_file_size_limit(args: list[str], limit: int) -> list[str]:
    """`python -m qed_jax.cli ARGS` whose every written file stops at `limit` bytes, as a full disk
    stops a write part-way (Python ignores SIGXFSZ, so the write fails with EFBIG). The limit is
    set by the child Python before it execs the command, not by a preexec_fn that forks the
    multithreaded test process. The command writes no compilation cache: JAX writes its entries
    in place, and the worker's cache (inherited through `cli_env`) would keep truncated ones, which
    every later process in that worker would warn about and compile again."""
    import sys

    return [sys.executable, *file_size_limited_entry(limit), *args]


def file_size_limited_entry(limit: int) -> list[str]:
    """The interpreter arguments of `cli_with_file_size_limit` that start the CLI (for `processes`'
    `entry`)."""
    setup = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), "
             "resource.RLIM_INFINITY)); os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'; "
             "os.execv(sys.executable, [sys.executable, '-m', 'qed_jax.cli', *sys.argv[2:]])")
    return ["-c", setup, str(limit)]


def coordinator_port() -> int:
    """A free port for the jax.distributed coordinator, below the ephemeral range: a port that
    bind(0) hands out is ephemeral, so any outgoing connection (gloo's, an HTTP client's) may take
    it before the coordinator binds it, and then the coordinator fails while the other processes
    wait for it."""
    import random
    import socket

    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        first_ephemeral = 32768
    for _ in range(100):
        port = random.randrange(max(1024, first_ephemeral - 10000), first_ephemeral)
        with socket.socket(socket.AF_INET6) as s:  # the coordinator listens on [::]
            try:
                s.bind(("::", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port below {first_ephemeral}")


@contextlib.contextmanager
def processes(args: list[str], count: int, devices: int, entry: dict[int, list[str]] | None = None, **popen):
    """`count` processes of `qed-jax ARGS` joined into one jax.distributed cluster on the loopback
    interface (process i gets --process-id i), each on `devices` CPU devices; yields their Popen
    objects in process order, and kills those still running at the end (a failed test leaves
    none behind). `entry` replaces the interpreter arguments that start the CLI (`-m
    qed_jax.cli`) for the processes it names, e.g. with `-c CODE` that patches a step first."""
    import subprocess
    import sys

    port = coordinator_port()
    entry = entry or {}
    procs = [subprocess.Popen([sys.executable, *entry.get(i, ["-m", "qed_jax.cli"]), *args,
                               "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", str(count), "--process-id", str(i)],
                              cwd=REPO, env=cli_env(devices), **popen)
             for i in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def finish(procs, timeout: float = 300) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process (started with text pipes) once all have exited; if one
    is still running after `timeout` seconds, all are killed and the assertion shows where each
    was (the other processes often wait for a dead one)."""
    import subprocess
    import time

    deadline = time.monotonic() + timeout
    try:
        return [p.communicate(timeout=max(deadline - time.monotonic(), 0)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [f"process {i} (exit {p.wait()}): {p.communicate()[1][-2000:]}" for i, p in enumerate(procs)]
        raise AssertionError(f"still running after {timeout} s:\n" + "\n".join(tails)) from None


def read_metrics(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def logged_steps(run_dir) -> int:
    """The steps a running trainer has logged: whole lines only (it may be writing one)."""
    metrics = Path(run_dir, "metrics.jsonl")
    return metrics.read_text().count("\n") if metrics.exists() else 0


def wait_for_steps(run_dir, steps: int, timeout: float = 120) -> None:
    """Until a running trainer has logged `steps` steps (or the timeout passes)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if logged_steps(run_dir) >= steps:
            return
        time.sleep(0.05)


def assert_signal_writes_a_checkpoint(proc, run_dir, steps: int, signum=None) -> None:
    """Send a trainer SIGTERM (a preemption; or `signum`, e.g. SIGINT for Ctrl-C) after `steps`
    logged steps: it exits 128 + signal, and its newest checkpoint is the last step it logged."""
    import signal

    signum = signum or signal.SIGTERM
    wait_for_steps(run_dir, steps)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum
    saved = sorted(int(p.name) for p in Path(run_dir, "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == len(read_metrics(run_dir)) >= steps


def drew_a_sample(run_dir, judged: bool = False) -> None:
    """Append a sample record to an eval run's log, as its first drawn sample would (a run that
    drew nothing begins anew under any config); `judged`: and the judge's grade of it (until the
    judge has graded one, its request settings may change)."""
    import json

    records = [{"type": "sample", "problem_id": "PB-Basic-001", "sample": 0, "completion": "x",
                "completion_tokens": 1, "truncated": False}]
    if judged:
        records.append({"type": "grade", "problem_id": "PB-Basic-001", "sample": 0, "score": 3, "reason": "ok",
                        "decided_by": "judge", "judge_reply": "<points>3 out of 7</points>"})
    with open(Path(run_dir) / "samples.jsonl", "a") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))


def score_grader(folder) -> str:
    """The IMO-ProofBench grader asking for <score>N</score>, the tag tests/judge_server.py replies
    with (judge.answer_format=score), written into `folder`; its path."""
    path = Path(folder) / "score_grader.txt"
    text = (REPO / "configs/prompts/imo_proofbench_grader.txt").read_text()
    path.write_text(text.replace("<points>N out of 7</points>", "<score>N</score>"))
    return str(path)
