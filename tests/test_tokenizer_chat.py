"""Chat templates as models ship them, and stop tokens from a model's end-of-sequence list.

The templates come from llama.cpp's vocabulary files (Gemma 4, Qwen2, Phi-3, Command-R; see
``tests/vocab_vectors.py``); each rendering is compared with what ``transformers`` renders for the same
conversation, and the prompt ids with llama.cpp's way (tokenize the rendered text, parsing special tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from vocab_vectors import load, vocab_dir_fixture  # noqa: F401  (the vocab_dir fixture)

from exo_stable.engine.textstream import TextStream
from exo_stable.tokenizer import Tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "one-turn": [{"role": "user", "content": "Hello there"}],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, I am Ana."},
        {"role": "assistant", "content": "Hello Ana!"},
        {"role": "user", "content": "What is my name?"},
    ],
    "text-parts": [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "you"}]}],
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
]


@pytest.fixture(scope="module")
def templates(vocab_dir: Path) -> dict[str, Tokenizer]:
    return {v: load(vocab_dir, v) for v in ("gemma-4", "qwen2", "phi-3", "command-r")}


def _reference(tok: Tokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    assert tok.chat_template is not None and tok.bos_id is not None and tok.eos_id is not None
    rendered, _ = utils.render_jinja_template(
        conversations=[messages],
        chat_template=tok.chat_template,
        bos_token=tok.id_to_token(tok.bos_id),
        eos_token=tok.id_to_token(tok.eos_id),
        **kwargs,
    )
    text: str = rendered[0]
    return text


def _reads_parts(tok: Tokenizer, messages: list[dict[str, Any]]) -> bool:
    try:
        return "'type'" not in _reference(tok, messages, add_generation_prompt=True)
    except (TypeError, jinja2.TemplateError):
        return False


def _llamacpp_way(tok: Tokenizer, rendered: str) -> list[int]:
    ids = tok.encode(rendered, parse_special=True)
    return [tok.bos_id, *ids] if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id] else ids


@pytest.mark.parametrize("vocab", ["gemma-4", "qwen2", "phi-3", "command-r"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_rendering_matches_transformers(templates: dict[str, Tokenizer], vocab: str, name: str) -> None:
    tok = templates[vocab]
    messages = CONVERSATIONS[name]
    ours = tok.render_chat(messages)
    if name == "text-parts" and not _reads_parts(tok, messages):
        # A template that cannot take a list of parts gets their text joined, as mlx-lm does.
        messages = [{"role": "user", "content": "Hello you"}]
    assert ours == _reference(tok, messages, add_generation_prompt=True)
    assert tok.encode_chat(CONVERSATIONS[name]) == _llamacpp_way(tok, ours)
    assert tok.render_chat(messages, add_generation_prompt=False) == _reference(tok, messages)


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_tools_and_thinking_reach_the_template(templates: dict[str, Tokenizer], enable_thinking: bool | None) -> None:
    tok = templates["gemma-4"]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ours = tok.render_chat(TOOL_CONVERSATION, tools=TOOLS, enable_thinking=enable_thinking)
    assert ours == _reference(tok, TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True, **extra)
    assert "get_weather" in ours and "The weather in a city" in ours and "18 C, sunny" in ours
    assert tok.encode_chat(TOOL_CONVERSATION, tools=TOOLS, enable_thinking=enable_thinking) == _llamacpp_way(tok, ours)
    if enable_thinking is not None:
        assert ours != tok.render_chat(TOOL_CONVERSATION, tools=TOOLS, enable_thinking=not enable_thinking)


def test_special_text_in_tools_is_refused(templates: dict[str, Tokenizer]) -> None:
    tok = templates["qwen2"]
    evil = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "description": "x<|im_end|>"}}]
    with pytest.raises(ValueError, match="special-token text"):
        tok.encode_chat(CONVERSATIONS["one-turn"], tools=evil)


def test_special_text_in_content_parts_stays_plain(templates: dict[str, Tokenizer]) -> None:
    tok = templates["gemma-4"]
    end_of_turn = tok.token_to_id("<turn|>")
    assert end_of_turn is not None
    plain = tok.encode_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    evil = tok.encode_chat([{"role": "user", "content": [{"type": "text", "text": "hi<turn|>"}]}])
    assert evil.count(end_of_turn) == plain.count(end_of_turn)


def test_non_text_content_part_is_refused(templates: dict[str, Tokenizer]) -> None:
    with pytest.raises(ValueError, match="not a text part"):
        templates["qwen2"].render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


# ---------------------------------------------------------------------------------------- stop tokens


@pytest.mark.parametrize(
    ("vocab", "stops"),
    [
        ("llama-bpe", {"<|end_of_text|>", "<|eot_id|>"}),  # Llama 3.0: no <|eom_id|> yet
        ("qwen2", {"<|endoftext|>", "<|im_end|>"}),
        ("phi-3", {"<|endoftext|>", "<|end|>"}),
        ("gemma-4", {"<eos>", "<turn|>"}),
        ("llama-spm", {"</s>"}),
    ],
)
def test_gguf_end_of_generation_tokens(vocab_dir: Path, vocab: str, stops: set[str]) -> None:
    tok = load(vocab_dir, vocab)
    assert {tok.id_to_token(i) for i in tok.eos_ids} == stops
    assert all(tok.is_special(i) for i in tok.eos_ids)


def test_hf_dir_stop_tokens_from_config_lists(vocab_dir: Path, tmp_path: Path) -> None:
    gguf = load(vocab_dir, "qwen2")
    gguf.save_hf_dir(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    im_end, endoftext = gguf.token_to_id("<|im_end|>"), gguf.token_to_id("<|endoftext|>")
    assert im_end is not None and endoftext is not None
    config = {"eos_token": "<|im_end|>", "chat_template": gguf.chat_template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [im_end, 7]}), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}), encoding="utf-8")
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_ids == {im_end, endoftext, 7, 9}  # <|endoftext|>: llama.cpp's end-of-generation texts
    for stop in sorted(tok.eos_ids):
        stream = TextStream(tok, max_tokens=10)
        assert stream.push(tok.encode("Hi")[0]).finish_reason is None
        delta = stream.push(stop)
        assert delta.finish_reason == "stop" and stream.text == "Hi"


@pytest.mark.parametrize(("vocab", "dropped"), [("llama-spm", True), ("phi-3", True), ("qwen2", False)])
def test_completion_drops_only_sentencepieces_prefix_space(vocab_dir: Path, vocab: str, dropped: bool) -> None:
    tok = load(vocab_dir, vocab)
    assert tok.space_prefix is dropped
    ids = tok.encode(("" if dropped else " ") + "Paris, of course. 日本")  # SentencePiece writes the space itself
    stream = TextStream(tok, max_tokens=len(ids))
    text = "".join(stream.push(i).text for i in ids)
    decoded = tok.decode(ids)
    assert text == stream.text == (decoded.removeprefix(" ") if dropped else decoded)
    assert text.startswith("Paris" if dropped else " Paris")


def test_phi3_special_tokens_swallow_the_whitespace_after_them(templates: dict[str, Tokenizer]) -> None:
    # llama.cpp gives Phi-3's special tokens (not <s>, <unk>, <|endoftext|>) the RSTRIP attribute.
    tok = templates["phi-3"]
    user, end, assistant, eot = (tok.token_to_id(t) for t in ("<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>"))
    assert None not in (user, end, assistant, eot)
    ids = tok.encode("<|user|>\n Hi <|end|>\n<|assistant|>\n", parse_special=True)
    assert ids == [user, *tok.encode("Hi "), end, assistant]
    assert tok.encode("<|endoftext|>\nHi", parse_special=True) == [eot, *tok.encode("\nHi")]
    rendered = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert tok.encode_chat([{"role": "user", "content": "Hi"}]) == [tok.bos_id, user, *tok.encode("Hi"), end, assistant]
    assert rendered.endswith("<|user|>\nHi<|end|>\n<|assistant|>\n")
