"""Chat prompts as token ids, with message text that can never become a control token.

A rendered chat template is one string: `<|im_start|>user\\nHi<|im_end|>`. Encoding it
whole turns a `<|im_start|>` the *user* typed into the real control token, and the
message can forge a role. `encode_chat` keeps the template's own markers special and
tokenizes the messages' text with special-token parsing off (llama.cpp's
`parse_special=false`):

1. render once with each string `content` replaced by a marker (`\\ue000<i>\\ue001`, private
   use characters), which gives the template's own text around each message;
2. render again with the real contents and check that it is exactly that template text
   with each content (or, for templates that `| trim` it, the stripped content) in the
   marker's place; a template that transforms content any other way is refused;
3. encode: special-token text inside the template's own pieces becomes control tokens;
   everything between them (template text and message text together, as `tokenizers`
   would split it) is encoded with special-token parsing off.

`parse_special=True` (the caller means the special text in its messages) encodes the
rendered string whole, as `apply_chat_template(tokenize=True)` does.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxrt.errors import TemplateError

from .tokenizer import render_chat

_MARK = re.compile("\ue000(\\d+)\ue001")


def encode_chat(tokenizer: Any, template: str, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, parse_special: bool = False,
                **extra: Any) -> list[int]:
    """The prompt ids of `messages` under `template` (ValueError on a bad message list or
    a template error). The template spells its own BOS, so none is added."""
    messages = [dict(m) for m in messages]
    kwargs = dict(add_generation_prompt=add_generation_prompt,
                  bos_token=getattr(tokenizer, "bos_token", None) or "",
                  eos_token=getattr(tokenizer, "eos_token", None) or "", **extra)
    text = render_chat(template, messages, **kwargs)
    if parse_special:
        return tokenizer.encode(text, add_special_tokens=False)
    contents = {}
    marked = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str):
            contents[i] = content
            m = dict(m, content=f"\ue000{i}\ue001")
        marked.append(m)
    pieces = _MARK.split(render_chat(template, marked, **kwargs))
    # pieces: template text, message index, template text, message index, ...
    parts: list[tuple[str, bool]] = []   # (text, is template text)
    at = 0
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if not text.startswith(piece, at):
                raise _refuse()
            parts.append((piece, True))
            at += len(piece)
            continue
        content = contents[int(piece)]
        nxt = pieces[k + 1]
        for candidate in (content, content.strip()):
            end = at + len(candidate)
            if text.startswith(candidate, at) and text.startswith(nxt, end) and (
                    k + 2 < len(pieces) or end + len(nxt) == len(text)):
                parts.append((candidate, False))
                at = end
                break
        else:
            raise _refuse()
    if at != len(text):
        raise _refuse()
    return _encode_parts(tokenizer, parts)


def _refuse() -> TemplateError:
    # the template's doing (model-file input), not a bug: a TemplateError, one line
    return TemplateError("the chat template transforms message content in a way jaxrt "
                         "cannot trace, so it cannot keep special-token text in messages "
                         "from becoming control tokens")


@functools.lru_cache(maxsize=8)
def _splitter(specials: tuple[str, ...]) -> "re.Pattern | None":
    return re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None


def _encode_parts(tokenizer: Any, parts: list[tuple[str, bool]]) -> list[int]:
    """Template pieces are split at the special tokens they spell; the text between
    (template and message text alike) is encoded as plain text."""
    split = _splitter(tuple(getattr(tokenizer, "special_tokens", ())))
    encode = getattr(tokenizer, "encode_text", None)
    ids: list[int] = []
    plain = ""
    for text, is_template in parts:
        if not is_template or split is None:
            plain += text
            continue
        for j, chunk in enumerate(split.split(text)):
            if j % 2 == 0:
                plain += chunk
                continue
            if plain:
                ids += (encode(plain, add_special_tokens=False) if encode is not None
                        else tokenizer.encode(plain))
                plain = ""
            ids.append(tokenizer.token_to_id(chunk))
    if plain:
        ids += (encode(plain, add_special_tokens=False) if encode is not None
                else tokenizer.encode(plain))
    return ids
