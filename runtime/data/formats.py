"""TRL's data set formats, one row at a time, as the records the samplers read.

``to_record(row, kind, fields, where)`` renames the user's fields to ours (``fields``: our
name -> theirs) and turns a row of any of TRL's formats, standard (text) or conversational
(lists of ``{"role", "content"}`` messages), into the record a spec's ``data`` kind needs:

===============  ==============================================================  ===========================
kind             accepted rows                                                   record
===============  ==============================================================  ===========================
prompts          ``prompt``; or ``messages`` (the conversation up to its last     ``prompt``
                 assistant turn is the prompt)
demonstrations   ``prompt`` + ``response`` or ``completion`` (TRL's               ``prompt``, ``response``
                 prompt-completion); ``messages`` (language modeling, loss on     (+ ``messages``,
                 every assistant turn); a conversational completion (assistant    ``train_from``; or
                 messages) with a conversational prompt is rendered like          ``lm_text``)
                 ``messages``, loss on the completion's turns; ``text`` alone
                 (standard language modeling: every token but the first trained)
pairs            ``prompt`` + ``chosen`` + ``rejected`` (explicit prompt); or     ``prompt``, ``chosen``,
                 ``chosen`` + ``rejected`` only (implicit prompt: the shared      ``rejected``
                 message prefix, or for text the longest common prefix, as TRL's
                 ``extract_prompt``)
unpaired         ``prompt`` + ``completion`` + ``label`` (TRL's unpaired           ``prompt``, ``completion``,
                 preference)                                                      ``label``
===============  ==============================================================  ===========================

A row's other fields are kept (reward functions get them as keyword arguments). Every error
is a ``RunError`` that starts with ``where`` (the file and row).
"""

from __future__ import annotations

from ..errors import RunError
from .prompts import check_messages, is_conversation

REQUIRED = {"prompts": ["prompt"], "demonstrations": ["prompt", "response"],
            "pairs": ["prompt", "chosen", "rejected"], "unpaired": ["prompt", "completion", "label"]}
COMPLETIONS = ("response", "chosen", "rejected", "completion")


def kind_of(required) -> str:
    """The data kind whose required fields are ``required`` (the loader's older argument)."""
    req = set(required)
    for kind in ("unpaired", "pairs", "demonstrations"):
        if set(REQUIRED[kind]) <= req:
            return kind
    return "prompts"


def _is_empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict)):
        return len(value) == 0
    return False


def completion_text(value, where: str) -> str:
    """A conversational completion (TRL's format: one assistant message) as its text."""
    msgs = check_messages(value, where)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in msgs)
        raise RunError(f"{where} is a list of {len(msgs)} message(s) ({roles}); a completion is text or "
                       "one assistant message", hint="put the conversation so far in the prompt")
    return msgs[0]["content"]


def extract_prompt(chosen, rejected) -> tuple:
    """TRL's ``extract_prompt``: (prompt, chosen, rejected) with the shared beginning of
    ``chosen`` and ``rejected`` as the prompt (messages: the common message prefix; text: the
    longest common prefix, a space before the split point left with the completions)."""
    idx = 0
    n = min(len(chosen), len(rejected))
    while idx < n and chosen[idx] == rejected[idx]:
        idx += 1
    if isinstance(chosen, str) and 0 < idx < n and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _missing(row: dict, name: str, src: str, where: str, hint_fields: str):
    via = f" (our '{name}')" if src != name else ""
    present = sorted(k for k, v in row.items() if v is not None)
    return RunError(f"{where} has no field '{src}'{via} (missing or null); the row has fields: "
                    f"{', '.join(present) or '(none)'}", hint=hint_fields)


def to_record(row: dict, kind: str, fields: dict | None, where: str) -> dict:
    """Our record for one data row (see the module docstring)."""
    fields = fields or {}
    rec = dict(row)
    for ours, theirs in fields.items():
        if theirs in row:
            rec[ours] = row[theirs]
    has = {name for name in ("prompt", "messages", *COMPLETIONS, "label")
           if rec.get(name) is not None}  # columnar formats fill a missing key with null
    req = REQUIRED[kind]
    hint = f"map a field with fields={{'<ours>': '<their field>'}} (our fields for {kind}: {', '.join(req)})"
    if kind in ("prompts", "demonstrations") and "messages" in has and "prompt" not in has:
        return _from_messages(rec, kind, where)
    if kind == "demonstrations" and "prompt" not in has and "response" not in has and "completion" not in has \
            and isinstance(rec.get("text"), str):   # TRL's standard language modeling: every token trained
        if not rec["text"].strip():
            raise RunError(f"{where} has an empty text")
        rec["prompt"], rec["response"], rec["lm_text"] = "", rec["text"], True
        return rec
    if kind == "demonstrations" and "response" not in has and "completion" in has:
        rec["response"] = rec["completion"]          # TRL's prompt-completion
        has.add("response")
    if kind == "pairs" and "prompt" not in has and {"chosen", "rejected"} <= has:
        _implicit_prompt(rec, where)
        has.add("prompt")
    for name in req:
        if name not in has:
            src = fields.get(name, name)
            if kind == "demonstrations" and name == "prompt":
                hint = "SFT rows are prompt + completion (or response), messages, or text"
            raise _missing(row, name, src, where, hint)
    for name in ("prompt", *COMPLETIONS):
        if name in req and not isinstance(rec[name], (str, list, tuple)):
            value = rec[name]
            raise RunError(f"{where}'s {name} is a {type(value).__name__} ({str(value)[:40]!r}), not text",
                           hint=f"{name} must be a string, or a list of {{'role', 'content'}} messages")
    if _is_empty(rec["prompt"]):
        raise RunError(f"{where} has an empty prompt")
    if is_conversation(rec["prompt"]):
        rec["prompt"] = check_messages(rec["prompt"], f"{where}'s prompt")
    if kind == "demonstrations" and is_conversation(rec["response"]) and is_conversation(rec["prompt"]):
        done = check_messages(rec["response"], f"{where}'s response")
        if any(m["role"] != "assistant" for m in done):
            roles = ", ".join(m["role"] for m in done)
            raise RunError(f"{where}'s completion has messages of roles {roles}; a completion holds assistant "
                           "messages", hint="put the conversation so far in the prompt")
        rec["messages"], rec["train_from"] = rec["prompt"] + done, len(rec["prompt"])
        rec["response"] = "\n".join(m["content"] for m in done)
        return rec
    for name in COMPLETIONS:
        if name in req and is_conversation(rec[name]):
            rec[name] = completion_text(rec[name], f"{where}'s {name}")
    if kind == "pairs":  # as the implicit-prompt form: a pair with nothing to prefer has no gradient
        for name in ("chosen", "rejected"):
            if _is_empty(rec[name]):
                raise RunError(f"{where} has an empty {name}", hint="a pair is two different, non-empty completions")
        if rec["chosen"] == rec["rejected"]:
            raise RunError(f"{where}: chosen and rejected are equal", hint="a pair is two different completions")
    return rec


def _implicit_prompt(rec: dict, where: str) -> None:
    chosen, rejected = rec["chosen"], rec["rejected"]
    conv = is_conversation(chosen), is_conversation(rejected)
    if conv[0] != conv[1]:
        raise RunError(f"{where}: chosen and rejected must both be text or both be messages to share a prompt")
    if conv[0]:
        chosen = check_messages(chosen, f"{where}'s chosen")
        rejected = check_messages(rejected, f"{where}'s rejected")
    prompt, c, r = extract_prompt(chosen, rejected)
    if _is_empty(prompt):
        raise RunError(f"{where} has no prompt field and its chosen and rejected share no beginning "
                       "(an implicit prompt is their common prefix)",
                       hint="add a prompt field, or map one with fields={'prompt': '<their field>'}")
    if not c or not r:
        raise RunError(f"{where}: chosen and rejected are equal after their shared prompt")
    rec["prompt"], rec["chosen"], rec["rejected"] = prompt, c, r


def _from_messages(rec: dict, kind: str, where: str) -> dict:
    msgs = rec["messages"]
    if not is_conversation(msgs):
        raise RunError(f"{where}'s messages is a {type(msgs).__name__}, not a list of messages",
                       hint='messages is a list of {"role": ..., "content": ...}')
    msgs = check_messages(msgs, f"{where}'s messages")
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if kind == "prompts":  # the conversation before its last assistant turn (all of it without one)
        rec["messages"], rec["prompt"] = msgs, (msgs[:last] if last else msgs)
        return rec
    if last is None:
        raise RunError(f"{where}'s messages have no assistant message "
                       f"(roles: {', '.join(m['role'] for m in msgs)})",
                       hint="SFT on messages trains on the assistant turns")
    if last == 0:
        raise RunError(f"{where}'s messages start with the assistant; the conversation needs a turn before it")
    rec["messages"], rec["prompt"] = msgs, msgs[:last]
    if kind == "demonstrations":
        rec["response"], rec["train_from"] = msgs[last]["content"], 0
    return rec
