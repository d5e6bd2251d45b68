"""Rows per second of SFT's data preparation (`data.tokenize_sft`: the chat template, the
tokenizer, the loss mask and the checks on the answer's text) with a tokenizer of Qwen's size:
151,643 words and the chat's special tokens (a word-level model built here, as no hub is
reachable), on rows of the recipe's shape (a problem, a long reasoning, a proof). Writes JSON.

    python bench/sft_data.py --out bench/results/sft_data.json

Per-row costs that grow with the vocabulary (a lookup that copies it whole) show here and not
with the tiny tokenizer the tests use. Preparing FineProofs-SFT's 7,777 rows takes about
7,777 x the time per row, on every process, before the first step of every start or resume.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

QWEN_WORDS = 151_643


def qwen_sized_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qed_jax.tokenizer import THINKING_CHAT_TEMPLATE

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(QWEN_WORDS)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                "<think>", "</think>"]})
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50, help="rows timed (default: %(default)s)")
    parser.add_argument("--reasoning-words", type=int, default=3000, help="words of each row's reasoning "
                        "(default: %(default)s; the proof is a third of it)")
    parser.add_argument("--out", default="bench/results/sft_data.json", help="JSON written (default: %(default)s)")
    args = parser.parse_args()

    from qed_jax.data import sft_messages, tokenize_sft

    tokenizer = qwen_sized_tokenizer()
    words = args.reasoning_words
    rows = [{"problem": " ".join(f"w{(7 * i + j) % QWEN_WORDS}" for j in range(100)),
             "reasoning_content": " ".join(f"w{(13 * i + j) % QWEN_WORDS}" for j in range(words)),
             "proof": " ".join(f"w{(17 * i + j) % QWEN_WORDS}" for j in range(words // 3))} for i in range(args.rows)]
    tokenize_sft(tokenizer, sft_messages(rows[0]))  # warm: the template compiled, caches filled
    start, start_cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(tokenize_sft(tokenizer, sft_messages(row))[0]) for row in rows)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    result = {"benchmark": "sft_data", "rows": args.rows, "tokens": tokens, "vocabulary": len(tokenizer),
              "ms_per_row": 1000 * wall / args.rows, "cpu_ms_per_row": 1000 * cpu / args.rows,
              "rows_per_s": args.rows / wall, "load_average": os.getloadavg(), "machine": platform.processor()
              or platform.machine()}
    print(f"tokenize_sft: {result['ms_per_row']:.1f} ms per row ({result['cpu_ms_per_row']:.1f} ms CPU), "
          f"{tokens / args.rows:.0f} tokens a row, vocabulary {len(tokenizer)}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
