"""Conversations as training tokens with an assistant-only loss mask (SFT on ``messages``).

``assistant_tokens(fmt, messages, train_from=0)`` renders a whole conversation through the
tokenizer's chat template once and returns ``(ids, mask, prompt_len)``: ``mask[k]`` is 1 on
the tokens of every assistant message at index >= ``train_from`` and 0 on everything else
(system and user turns, the template's role headers, earlier assistant turns of a
prompt-completion conversation). ``prompt_len`` is the number of tokens before the first
trained token.

How the assistant spans are found (as TRL's ``assistant_only_loss`` does with
``return_assistant_tokens_mask``, but without needing ``{% generation %}`` markers in the
template): for assistant message ``i`` the template is rendered for ``messages[:i]`` with
``add_generation_prompt=True`` (where the assistant's text starts) and for
``messages[:i + 1]`` (where its turn ends, end-of-turn tokens included). Both renderings
must be prefixes of the whole conversation's text; a template that renders earlier turns
differently once later turns exist (e.g. one that drops earlier reasoning) cannot be masked
this way and is a ``RunError``. Character spans become token positions through the fast
tokenizer's offsets, or else by tokenizing each prefix (which must then tokenize to a prefix
of the whole).

Without a chat template there is no rendering of roles: a ``messages`` row is then a
``RunError`` (the same rule as a conversational prompt, runtime/data/prompts.py).
"""

from __future__ import annotations

from ..errors import RunError
from .prompts import TEMPLATE_HINT


def _render(fmt, messages, gen: bool) -> str:
    if not messages:
        return ""
    try:
        out = fmt.tokenizer.apply_chat_template(list(messages), add_generation_prompt=gen, tokenize=False,
                                                **fmt.kwargs)
    except Exception as e:  # jinja errors, raise_exception(...) in the template
        raise RunError(f"the chat template of the tokenizer in {fmt.source} failed on a conversation: "
                       f"{type(e).__name__}: {e}") from e
    return out if isinstance(out, str) else out[0]


def char_spans(fmt, messages, train_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's rendered text and the character spans of its trained assistant turns."""
    full = _render(fmt, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        before = _render(fmt, messages[:i], True)
        start = len(before)
        upto = _render(fmt, messages[:i + 1], False)
        if not full.startswith(before) or not full.startswith(upto) or len(upto) < start:
            raise RunError(f"the chat template of the tokenizer in {fmt.source} renders the turns before assistant "
                           f"message {i} differently when later turns follow, so the assistant's tokens cannot be "
                           "found by rendering prefixes",
                           hint="use a chat template whose rendering of a conversation extends the rendering of "
                                "its beginning (or set chat_template to such a Jinja file)")
        spans.append((start, len(upto)))
    return full, spans


def assistant_tokens(fmt, messages, train_from: int = 0) -> tuple[list[int], list[int], int]:
    """``(ids, mask, prompt_len)`` of a conversation (see the module docstring)."""
    if not fmt.templated:
        raise RunError(f"a messages conversation needs a chat template, but {fmt.why_raw()}", hint=TEMPLATE_HINT)
    full, spans = char_spans(fmt, messages, train_from)
    if not spans:
        raise RunError("a conversation has no assistant message to train on",
                       hint="SFT on messages trains on the assistant turns; give at least one")
    tok = fmt.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [0] * len(ids)
        for k, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and any(s <= a < e for s, e in spans):
                mask[k] = 1
    else:
        ids = list(tok(full, add_special_tokens=False)["input_ids"])
        mask = [0] * len(ids)
        for s, e in spans:
            lo, hi = _prefix_len(tok, full, s, ids), _prefix_len(tok, full, e, ids)
            for k in range(lo, hi):
                mask[k] = 1
    if 1 not in mask:
        raise RunError("a conversation's assistant turns are empty after tokenization")
    return ids, mask, mask.index(1)


def _prefix_len(tok, full: str, at: int, ids: list[int]) -> int:
    head = list(tok(full[:at], add_special_tokens=False)["input_ids"])
    if ids[:len(head)] != head:
        raise RunError("the tokenizer splits the conversation's text differently at a turn boundary, so the "
                       "assistant's tokens cannot be found", hint="use a fast tokenizer (offsets mapping)")
    return len(head)
