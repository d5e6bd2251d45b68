"""Tokenizers: the checkpoint's own (Hugging Face), Qwen chat formatting, special and stop ids.

`train_bpe_tokenizer` makes a small byte-level BPE with the Qwen special tokens and a
Thinking-style chat template, for tests and the tiny CPU configs (no hub access needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qed_jax.config import ConfigError, is_missing_local_path, not_found
from qed_jax.errors import first_line

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
THINK_END = "</think>"
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Our wording of the Qwen3 Thinking chat format: turns are <|im_start|>role\n...<|im_end|>\n;
# an assistant turn with `reasoning_content` writes it inside <think>...</think> before the
# answer; the generation prompt opens the assistant turn with <think>\n.
THINKING_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') %}"
    "{{- '<think>\n' + message['reasoning_content'].strip('\n') + '\n</think>\n\n' + message['content'].lstrip('\n') }}"
    "{%- else %}"
    "{{- message['content'] }}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}"
)


def load_tokenizer(path: str | Path, setting: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer shipped with a model folder or qed-jax checkpoint (or a hub id). `setting`:
    the config key that names a tokenizer's folder, which a folder without one is told to set."""
    name = str(path)
    folder = Path(name).expanduser()
    if is_missing_local_path(name):
        raise not_found("tokenizer", name)
    if folder.is_file():
        raise ConfigError(f"tokenizer {name} is a file: name the folder that holds tokenizer.json")
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if folder.is_dir() and not any((folder / f).exists() for f in files):
        raise ConfigError(f"tokenizer {name}: the folder holds no tokenizer ({', '.join(files)})"
                          + (f"; name the folder of the model's tokenizer with {setting}=PATH" if setting else ""))
    try:
        return AutoTokenizer.from_pretrained(str(folder) if folder.is_dir() else name)
    except OSError as e:  # a Hub id that cannot be reached or is not there, a file that cannot be read
        raise ConfigError(f"tokenizer {name}: {first_line(e)}") from None
    except Exception as e:  # a damaged file: not JSON, a field missing, bytes that are not UTF-8
        raise ConfigError(f"tokenizer {name}: its files cannot be read ({type(e).__name__}: {first_line(e)}); "
                          "they are damaged or incomplete: copy or export the tokenizer again") from None


def check_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int, model: str = "the model") -> None:
    """ConfigError when the tokenizer makes ids that `model` has no embedding for."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but {model}'s vocab_size is {vocab_size}, so "
                          "its last ids have no embedding; use the tokenizer saved with this model")


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token`, None where the tokenizer has no such token. (Not `get_vocab()`, which
    builds a dict of the whole vocabulary: ~80 ms for Qwen's, per row where a row calls it.)"""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return found


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a turn: <|im_end|>, <|endoftext|> and the tokenizer's eos, where present."""
    ids = {i for i in (token_id(tokenizer, t) for t in STOP_TOKENS) if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError("the tokenizer has none of <|im_end|>, <|endoftext|> or an eos token, so generation would "
                          "never stop: use the model's own tokenizer (or, from Python, pass stop_ids)")
    return sorted(ids)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False,
                **options) -> str:
    """`messages` as the tokenizer's chat template writes them (`options` reach the template,
    e.g. enable_thinking). A ConfigError when the tokenizer has none (a base model's); a
    ValueError when the template refuses the conversation (its raise_exception: e.g. no user
    turn), which a caller reading many rows may skip."""
    if not tokenizer.chat_template:
        raise ConfigError(f"the tokenizer {tokenizer.name_or_path or ''} has no chat template (a base model's?): "
                          "use the tokenizer of a chat model")
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **options)
    except TemplateSyntaxError as e:  # the template itself, whatever the conversation
        raise ConfigError(f"the chat template of the tokenizer {tokenizer.name_or_path or ''} is not valid "
                          f"Jinja (line {e.lineno}: {e.message})") from None
    except TemplateError as e:
        raise ValueError(f"the chat template refuses this conversation ({e})") from None


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on `texts` with the Qwen special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    return tokenizer
