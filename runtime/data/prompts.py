"""Prompts as the policy sees them: raw text, or rendered by the tokenizer's chat template.

A data row's prompt is a plain string or, as in TRL's conversational format, a list of
messages ``[{"role": "user", "content": "..."}, ...]``. ``PromptFormat`` turns either
into the text and token ids the model is given, following the run's ``chat_template``
setting (runtime/config.py):

- ``auto`` (default): the tokenizer's chat template when it has one
  (``tokenizer.chat_template`` is set), else the raw text. The built-in char tokenizer has
  none, so the built-in task is unchanged;
- ``on``: the chat template, which the tokenizer must have;
- ``off``: the raw text;
- the path of a Jinja file: that template, set on the tokenizer (so the final model is saved
  with it) in place of its own.

``chat_template_kwargs`` are passed to every ``apply_chat_template`` call (template variables
such as ``enable_thinking``).

With a template, the prompt (a plain string becomes one user message) is rendered with
``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` and tokenized
with ``add_special_tokens=False`` (the template writes BOS and the like itself). Without
one, the string is tokenized as before, with the tokenizer's special tokens; a
conversational prompt then has no text form and is an error. Completions are never
templated: they are tokenized as they are, followed by EOS (``token_rows.tok_completion``).
"""

from __future__ import annotations

import json

from ..errors import RunError

MODES = ("auto", "on", "off")
MAX_RENDER_CHARS = 4 << 20  # a rendered prompt past this is a runaway template (nested loops), not a prompt
MAX_RENDER_SECONDS = 60.0
TEMPLATE_HINT = ("give the tokenizer a chat template (tokenizer.chat_template = '...'; "
                 "tokenizer.save_pretrained(dir)), or write the prompts as plain text")


def is_conversation(prompt) -> bool:
    """Whether ``prompt`` is a list of messages (not a plain string)."""
    return isinstance(prompt, (list, tuple))


def check_messages(value, where: str) -> list[dict]:
    """``value`` as a list of ``{"role": str, "content": str}`` messages (other keys kept,
    keys whose value is None dropped: columnar formats fill a key one message lacks with
    null). Raises ``RunError`` starting with ``where`` for anything else."""
    if not value:
        raise RunError(f"{where} is an empty list of messages")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise RunError(f"{where}: message {k} is a {type(m).__name__}, not a mapping",
                           hint='a conversational prompt is a list of {"role": ..., "content": ...} messages')
        missing = [key for key in ("role", "content") if not isinstance(m.get(key), str)]
        if missing:
            raise RunError(f"{where}: message {k} has no text {' or '.join(repr(x) for x in missing)} "
                           f"(it has {', '.join(sorted(k2 for k2, v in m.items() if v is not None)) or 'nothing'})",
                           hint='a conversational prompt is a list of {"role": ..., "content": ...} messages')
        out.append({key: v for key, v in m.items() if v is not None})
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def bound_template(tokenizer) -> None:
    """Cap what the tokenizer's chat template may render: its output at ``MAX_RENDER_CHARS``
    characters, its time at ``MAX_RENDER_SECONDS`` (checked as it writes). A model's own template
    is code from its repository: nested loops rendered until memory ran out. transformers
    compiles a template once (cached by its text); its ``render`` becomes a streaming one that
    stops there (the error surfaces as the template's failure on a prompt)."""
    import time
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        compiled = _compile_jinja_template(template)
    except Exception:  # noqa: BLE001  (a template that does not compile: its own error comes on use)
        return
    if getattr(compiled, "_alignspec_bounded", False):
        return

    def render(*args, **kwargs) -> str:
        out, n, t0 = [], 0, time.monotonic()
        for piece in compiled.generate(*args, **kwargs):
            out.append(piece)
            n += len(piece)
            if n > MAX_RENDER_CHARS:
                raise RuntimeError(f"its output passed {MAX_RENDER_CHARS:,} characters (a runaway loop?)")
            if len(out) % 4096 == 0 and time.monotonic() - t0 > MAX_RENDER_SECONDS:
                raise RuntimeError(f"it rendered for over {MAX_RENDER_SECONDS:g} s (a runaway loop?)")
        return "".join(out)

    compiled.render = render
    compiled._alignspec_bounded = True


class PromptFormat:
    """How prompts become model input for one tokenizer (see the module docstring).

    ``templated`` says whether the chat template is applied; ``source`` (the model
    directory) names the tokenizer in error messages.
    """

    def __init__(self, tokenizer, mode: str = "auto", source=None, kwargs: dict | None = None,
                 max_length: int | None = None, say=None):
        self.max_length, self.say = max_length, say  # max_prompt_length (see ``fit``)
        self.truncated: set = set()                   # the distinct prompts cut so far (hashes)
        if mode not in MODES:
            mode = self._template_file(tokenizer, mode)
        self.tokenizer = tokenizer
        self.kwargs = dict(kwargs or {})
        self.source = str(source) if source is not None else "the model directory"
        has = has_chat_template(tokenizer)
        if mode == "on" and not has:
            raise RunError(f"chat_template: on, but the tokenizer in {self.source} has no chat template",
                           hint="give the tokenizer one (tokenizer.chat_template = '...'; "
                                "tokenizer.save_pretrained(dir)), or set chat_template: auto or off")
        self.mode = mode
        self.templated = has and mode != "off"
        if self.templated:
            bound_template(tokenizer)

    @staticmethod
    def _template_file(tokenizer, path: str) -> str:
        """Set the Jinja template in the file ``path`` on ``tokenizer``; the mode is then ``on``."""
        import os
        from pathlib import Path
        p = Path(os.path.expanduser(path))
        try:
            tokenizer.chat_template = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RunError(f"chat_template: {path!r} is not auto, on or off, and cannot be read as a template "
                           f"file ({getattr(e, 'strerror', None) or e})",
                           hint="give auto, on, off or the path of a Jinja chat template") from None
        return "on"

    @classmethod
    def raw(cls, tokenizer) -> PromptFormat:
        """Plain text, the tokenizer's special tokens added (the behaviour without templates)."""
        return cls(tokenizer, "off")

    @property
    def add_special_tokens(self) -> bool:
        """Tokenizer flag for a prompt's text: a rendered template holds its special tokens."""
        return not self.templated

    def why_raw(self) -> str:
        """Why prompts are not templated (for error messages)."""
        if self.mode == "off":
            return "chat_template is off"
        return f"the tokenizer in {self.source} has no chat template"

    def text(self, prompt) -> str:
        """The text the model is given for ``prompt`` (a string or a list of messages)."""
        if not self.templated:
            if is_conversation(prompt):
                raise RunError(f"a prompt is a list of messages, but {self.why_raw()}", hint=TEMPLATE_HINT)
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                     **self.kwargs)
        except Exception as e:  # jinja errors, raise_exception(...) in the template
            shown = json.dumps(messages, ensure_ascii=False)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            raise RunError(f"the chat template of the tokenizer in {self.source} failed on the prompt {shown}: "
                           f"{type(e).__name__}: {e}",
                           hint="fix the prompt's messages, or set chat_template: off for plain-text prompts") from e
        if not isinstance(out, str):  # some versions return a list for a batch
            out = out[0]
        return out

    def fit(self, ids: list[int]) -> list[int]:
        """``ids`` cut from the left to ``max_length`` tokens when that is set (the run's
        ``max_prompt_length``, as TRL cuts prompts); each distinct cut prompt is counted in
        ``truncated``, and the first one is said."""
        if not self.max_length or len(ids) <= self.max_length:
            return ids
        if not self.truncated and self.say is not None:
            self.say(f"[yellow]a prompt of {len(ids)} tokens is longer than max_prompt_length {self.max_length}: "
                     "truncated from the left (the distinct prompts cut so far are the metric "
                     "data/truncated_prompts)[/yellow]")
        self.truncated.add(hash(tuple(ids)))
        return ids[len(ids) - self.max_length:]

    def ids(self, prompt, fit: bool = True) -> list[int]:
        """Token ids of ``prompt`` as the policy sees it (cut to ``max_length`` unless ``fit`` is false)."""
        ids = list(self.tokenizer(self.text(prompt), add_special_tokens=self.add_special_tokens)["input_ids"])
        return self.fit(ids) if fit else ids

    def encode(self, prompts):
        """Left-padded ``BatchEncoding`` (``input_ids``, ``attention_mask``; torch tensors)."""
        if self.max_length:
            return self._encode_ids([self.ids(p) for p in prompts])
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            return tok([self.text(p) for p in prompts], padding=True, return_tensors="pt",
                       add_special_tokens=self.add_special_tokens)
        finally:
            tok.padding_side = old

    def _encode_ids(self, rows: list[list[int]]) -> dict:
        from .token_rows import left_pad
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = left_pad(rows, pad)
        return {"input_ids": ids, "attention_mask": mask}

    def check_records(self, records: list[dict], data) -> None:
        """Fail before training when a row's prompt is conversational but there is no
        template (naming the data file and the row), or the template fails on the first row."""
        if not records:
            return
        if not self.templated:
            for i, r in enumerate(records):
                if is_conversation(r.get("prompt")):
                    raise RunError(f"{data}: row {i}'s prompt is a list of messages, but {self.why_raw()}",
                                   hint=TEMPLATE_HINT)
            return
        self.text(records[0]["prompt"])
