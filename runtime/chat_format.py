"""Chat formats: how a conversation becomes prompt text (docs/prompt_formats.md).

Two registered formats:

- `release` (the default): what the released NVLM-D `model.chat()` builds. Its config.json names the
  conversation template `"template": "chatml"`, defined in the release's `conversation.py`: an MPT-style
  template whose system turn is `<|im_start|>system\\n{system_message}` with the system message
  "Answer the questions.", whose roles are `<|im_start|>user\\n` and `<|im_start|>assistant\\n`, and whose
  separator `<|im_end|>` ends every turn with **no newline** after it. The model stops on that separator.
- `tokenizer`: the checkpoint's `tokenizer_config.json` `chat_template` (Qwen2.5's in the release, which
  vLLM's examples apply: a default "You are Qwen…" system turn and a newline after each turn), rendered
  with Jinja2 the way transformers' `apply_chat_template` does. The stop token is the tokenizer's
  `eos_token`.

A format is chosen per build (`nvlm-build engine --chat-format`, recorded in preprocess.json) and per
in-process command (`nvlm-build reference/llm/eval --chat-format`). NVLM-D was tuned on the release's
format; the other is there for clients that already speak the tokenizer's template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Sequence

from runtime.core.errors import InputError, TokenizerError

from .tokenizer import IM_END, IM_START, NVLMTokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def _check(messages: Sequence[Message]) -> None:
    for m in messages:
        if m.role not in ROLES:
            raise InputError(f"message role {m.role!r} is not one of {ROLES}")
        if IM_START in m.content or IM_END in m.content:
            raise InputError("message content must not contain the ChatML control tokens <|im_start|> / <|im_end|>")


# --------------------------------------------------------------------------- the release's template

# conversation.py, register_conv_template(Conversation(name='chatml', ...)) in the NVLM-D-72B release
RELEASE_SYSTEM_TEMPLATE = IM_START + "system\n{system_message}"
RELEASE_SYSTEM_MESSAGE = "Answer the questions."
RELEASE_ROLES = {"user": IM_START + "user\n", "assistant": IM_START + "assistant\n"}
RELEASE_SEPARATOR = IM_END


def render_release(messages: Sequence[Message], tokenizer: NVLMTokenizer | None = None,
                   add_generation_prompt: bool = True) -> str:
    """SeparatorStyle.MPT: system prompt + sep, then role + message + sep per turn, then the bare assistant
    role. A leading system message replaces the default one (chat() sets `template.system_message`)."""
    _check(messages)
    system = RELEASE_SYSTEM_MESSAGE
    if messages and messages[0].role == "system":
        system, messages = messages[0].content, messages[1:]
    if any(m.role == "system" for m in messages):
        raise InputError("the release's chat format has one system message, and it must come first")
    out = [RELEASE_SYSTEM_TEMPLATE.format(system_message=system), RELEASE_SEPARATOR]
    for m in messages:
        out += [RELEASE_ROLES[m.role], m.content, RELEASE_SEPARATOR]
    if add_generation_prompt:
        out.append(RELEASE_ROLES["assistant"])
    return "".join(out)


# --------------------------------------------------------------------------- the tokenizer's template


def _jinja_template(source: str):
    """Compiled like transformers' `_compile_jinja_template`: a sandbox, trim_blocks/lstrip_blocks, loop
    controls, `raise_exception` and a `tojson` that keeps non-ASCII."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_tokenizer(messages: Sequence[Message], tokenizer: NVLMTokenizer | None,
                     add_generation_prompt: bool = True) -> str:
    _check(messages)
    template = tokenizer.chat_template if tokenizer is not None else None
    if not template:
        where = tokenizer.source if tokenizer is not None else "the checkpoint"
        raise TokenizerError(f"{where}: tokenizer_config.json has no chat_template; use --chat-format release")
    from jinja2.exceptions import TemplateError

    try:
        return _jinja_template(template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt, tools=None)
    except TemplateError as e:
        raise TokenizerError(f"{tokenizer.source}: the tokenizer's chat_template failed: {e}") from None


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class ChatFormat:
    name: str
    render: Callable[..., str]  # (messages, tokenizer, add_generation_prompt) -> text
    stop: Callable[[NVLMTokenizer], str]  # the token that ends the model's turn
    summary: str

    def stop_id(self, tokenizer: NVLMTokenizer) -> int:
        token = self.stop(tokenizer)
        tid = tokenizer.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{tokenizer.source}: the {self.name} chat format stops on {token!r}, which the "
                                 "tokenizer does not have")
        return tid


CHAT_FORMATS = {f.name: f for f in (
    ChatFormat("release", render_release, lambda tok: RELEASE_SEPARATOR,
               "the release's model.chat(): conversation.py's chatml template, system 'Answer the questions.'"),
    ChatFormat("tokenizer", render_tokenizer, lambda tok: tok.eos_token or IM_END,
               "the tokenizer's chat_template (tokenizer_config.json), as transformers applies it"),
)}
DEFAULT_CHAT_FORMAT = "release"


def get_chat_format(name: str | ChatFormat | None) -> ChatFormat:
    if isinstance(name, ChatFormat):
        return name
    name = name or DEFAULT_CHAT_FORMAT
    if name not in CHAT_FORMATS:
        raise InputError(f"unknown chat format {name!r}; choose one of {', '.join(CHAT_FORMATS)}")
    return CHAT_FORMATS[name]


def stop_id(tokenizer: NVLMTokenizer) -> int:
    """The token that ends the model's turn in the tokenizer's chat format."""
    return get_chat_format(tokenizer.chat_format).stop_id(tokenizer)
