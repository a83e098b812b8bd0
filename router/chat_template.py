"""Chat messages to a prompt: validation of OpenAI messages and the tokenizer's chat template.

Messages are checked and reduced to what a chat template reads (`role`, `content` as text,
optionally `name`) before rendering, so that the template sees plain strings. The template
is the tokenizer's own (`chat_template` in tokenizer_config.json), rendered by
transformers' `apply_chat_template` with the generation prompt added. A tokenizer without
one, or a template that refuses the messages (many raise on roles that do not alternate),
is a 422 that says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import jinja2

from shardgen.router.tokenization import Tokenizer
from shardgen.router.validation import ValidationError, _quoted

# Roles a template receives; OpenAI's `developer` is the newer name of `system`.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Message fields that OpenAI clients send back with an earlier answer; accepted when empty.
_EMPTY_OK = {"tool_calls", "function_call", "refusal", "audio", "annotations",
             "reasoning_content"}
# Messages longer than this (characters in all) are rendered on a worker thread.
_INLINE_RENDER_MAX_CHARS = 16_384

Message = dict[str, str]


def _content_text(where: str, content: object) -> str:
    """A message's content as text: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError(f"`{where}.content` must be a string or a list of text parts, "
                              f"got {_quoted(content)}")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        text = part.get("text") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(text, str):
            raise ValidationError(f"`{where}.content[{index}]` must be "
                                  f"{{\"type\": \"text\", \"text\": string}} (this server "
                                  f"serves text-only models), got {_quoted(part)}")
        texts.append(text)
    return "".join(texts)


def _message(index: int, raw: object) -> Message:
    where = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        raise ValidationError(f"`{where}` must be an object with `role` and `content`, "
                              f"got {_quoted(raw)}")
    role = raw.get("role")
    if role not in _ROLES:
        raise ValidationError(f"`{where}.role` must be one of {', '.join(_ROLES)} (tools are "
                              f"not supported), got {_quoted(role)}")
    message = {"role": _ROLES[role], "content": _content_text(where, raw.get("content"))}
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise ValidationError(f"`{where}.name` must be a string, got {_quoted(name)}")
        message["name"] = name
    for key, value in raw.items():
        if key in ("role", "content", "name") or value in (None, [], {}, ""):
            continue
        supported = "is not supported" if key in _EMPTY_OK else "is not a known message field"
        raise ValidationError(f"`{where}.{key}` {supported} (got {_quoted(value)})")
    return message


def parse_messages(raw: object) -> list[Message]:
    """Validate OpenAI chat messages; returns them as a template reads them."""
    if not isinstance(raw, list) or not raw:
        raise ValidationError(f"`messages` must be a non-empty list of messages, "
                              f"got {_quoted(raw)}")
    return [_message(index, message) for index, message in enumerate(raw)]


def check_no_control_tokens(tokenizer: Tokenizer, messages: Sequence[Message]) -> None:
    """Refuse message text that spells a special token (422).

    The rendered template is encoded with its special-token strings parsed, since its turn
    markers must become control tokens; a message that wrote one would forge a turn. The
    router's --parse-special-tokens allows that, as for TGI prompts; by default it is a 422.
    """
    specials = [token for token in tokenizer.hf.convert_ids_to_tokens(sorted(
        tokenizer.special_ids)) if token]
    for index, message in enumerate(messages):
        found = next((token for token in specials if token in message["content"]), None)
        if found is not None:
            raise ValidationError(
                f"`messages[{index}].content` contains the special token {found!r}, which "
                f"would act as a control token of the chat template; this server does not "
                f"parse special tokens in client text (--parse-special-tokens)")


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer.hf, "chat_template", None))


def _render_sync(tokenizer: Tokenizer, messages: Sequence[Message]) -> str:
    try:
        text = tokenizer.hf.apply_chat_template(list(messages), tokenize=False,
                                                add_generation_prompt=True)
    except jinja2.TemplateError as error:
        raise ValidationError(f"the model's chat template refused the messages: {error}"
                              ) from error
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


async def render_chat(tokenizer: Tokenizer, messages: Sequence[Message]) -> str:
    """The prompt for messages, ending with the assistant's turn (add_generation_prompt).

    Raises ValidationError when the tokenizer has no chat template or the template
    raises on these messages.
    """
    if not has_chat_template(tokenizer):
        raise ValidationError(
            "this model's tokenizer has no chat template (`chat_template` in "
            "tokenizer_config.json), so /v1/chat/completions cannot build a prompt; "
            "send a plain prompt to /v1/completions or /generate instead")
    if sum(len(m["content"]) for m in messages) <= _INLINE_RENDER_MAX_CHARS:
        return _render_sync(tokenizer, messages)
    return await asyncio.to_thread(_render_sync, tokenizer, messages)
