"""Chat formats from GGUF metadata (``tokenizer.chat_template``) and their rendering, against llama.cpp's rules.

The conversation and the expected renderings of Gemma and ChatML are llama.cpp's own test data
(tests/test-chat-template.cpp in llama.cpp 0c1e570: the "google/gemma-7b-it" and "teknium/OpenHermes-2.5-Mistral-7B"
cases, ``expected_output`` = its built-in renderer, src/llama-chat.cpp). The format is recognised from the template
text as ``llm_chat_detect_template`` does; a file without a template falls back on the vocabulary's turn markers.
"""

from __future__ import annotations

import pytest

from sparkinfer_cute.errors import GGUFError
from sparkinfer_cute.gguf import GGUFFile
from sparkinfer_cute.tokenizer import Tokenizer

from . import gemma4_tiny
from .qwen_tiny import write_tiny_qwen_gguf

# llama.cpp tests/test-chat-template.cpp: `conversation`
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
# ... its template strings for the two built-in formats we share
GEMMA_7B_IT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# ... and its expected_output (llama.cpp's built-in renderer) for them
GEMMA_EXPECTED = (
    "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\nHi there"
    "<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\nI am an assistant"
    "<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n")
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
    "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n"
    "<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n"
    "<|im_start|>assistant\n")
# formats llama.cpp tells apart from ChatML by a marker (llm_chat_detect_template), and one with no shared marker
PHI4_TEMPLATE = "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
LLAMA3_TEMPLATE = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
GEMMA4_TEMPLATE = "{{- '<|turn>' + role + '\\n' -}}{{- '<turn|>\\n' -}}"


def _with_template(path, template):
    md = dict(GGUFFile(path).metadata)
    if template is None:
        md.pop("tokenizer.chat_template", None)
    else:
        md["tokenizer.chat_template"] = template
    return Tokenizer(md, source=str(path))


@pytest.fixture(scope="module")
def gemma_path(gemma3_path):
    return gemma3_path


@pytest.fixture(scope="module", params=["qwen2", "qwen35"])
def qwen_path(request, tmp_path_factory):
    return request.param, write_tiny_qwen_gguf(tmp_path_factory.mktemp("tpl") / f"q_{request.param}.gguf",
                                               pre=request.param)


def test_gemma3_template_from_metadata_renders_like_llamacpp(gemma_path):
    tok = _with_template(gemma_path, GEMMA_7B_IT_TEMPLATE)
    assert tok.chat_family == "gemma" and not tok.chat_template_guessed
    assert tok.apply_chat_template(CONVERSATION) == GEMMA_EXPECTED


def test_gemma3_without_template_is_guessed(gemma_path):
    """The packaged 270M file has no template (a base model): the Gemma turns come from its vocabulary."""
    tok = Tokenizer.from_gguf(gemma_path)
    assert tok.chat_template is None and tok.chat_template_guessed and tok.chat_family == "gemma"
    assert tok.apply_chat_template(CONVERSATION) == GEMMA_EXPECTED


def test_qwen_template_from_metadata_renders_like_llamacpp(qwen_path):
    """ChatML as llama.cpp renders it; Qwen3 with thinking on adds nothing, Qwen3.5 opens the think block, and with
    thinking off (our default) both close an empty one (the Qwen3 / Qwen3.5 templates' enable_thinking=false)."""
    pre, path = qwen_path
    tok = _with_template(path, CHATML_TEMPLATE)
    assert tok.chat_family == ("qwen35" if pre == "qwen35" else "qwen3")
    thinking = tok.apply_chat_template(CONVERSATION, enable_thinking=True)
    assert thinking == CHATML_EXPECTED + ("<think>\n" if pre == "qwen35" else "")
    assert tok.apply_chat_template(CONVERSATION) == CHATML_EXPECTED + "<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == (
        CHATML_EXPECTED[: -len("<|im_start|>assistant\n")])


def test_qwen_earlier_reasoning_is_dropped(qwen_path):
    """The Qwen3 templates keep only the answer of an assistant turn that precedes the last user turn."""
    _, path = qwen_path
    tok = Tokenizer.from_gguf(path)
    msgs = [{"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nlet me see\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"}]
    s = tok.apply_chat_template(msgs, enable_thinking=True)
    assert "<|im_start|>assistant\nA1<|im_end|>\n" in s and "let me see" not in s


def test_gemma4_template_from_metadata(tmp_path):
    path = gemma4_tiny.write_tiny_gemma4_gguf(tmp_path / "g4.gguf")
    tok = _with_template(path, GEMMA4_TEMPLATE)
    assert tok.chat_family == "gemma4" and not tok.chat_template_guessed
    assert tok.apply_chat_template(CONVERSATION[1:2]).startswith("<|turn>user\nHello<turn|>\n<|turn>model\n")


@pytest.mark.parametrize("template", [PHI4_TEMPLATE, LLAMA3_TEMPLATE], ids=["phi4", "llama3"])
def test_unsupported_template_is_a_clear_error(qwen_path, template):
    _, path = qwen_path
    tok = _with_template(path, template)
    with pytest.raises(GGUFError, match="not a format we render"):
        tok.chat_family


def test_gemma_template_wins_over_vocabulary(qwen_path):
    """The template decides, not the vocabulary: a ChatML vocabulary whose file declares Gemma turns is Gemma."""
    _, path = qwen_path
    assert _with_template(path, GEMMA_7B_IT_TEMPLATE).chat_family == "gemma"
