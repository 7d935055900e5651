"""Character-level tokenizer for the built-in arithmetic task.

One token per character of a fixed alphabet (digits, ``+ - * = ( ) ?``, space, lowercase
letters, newline) plus the special tokens ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>`` (any
character outside the alphabet). Encoding with ``add_special_tokens=True`` prepends
``<bos>``. The tokenizer is a ``transformers.PreTrainedTokenizerFast`` so it saves and loads
through ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any user tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
ALPHABET = string.digits + "+-*=()?" + " " + string.ascii_lowercase + "\n"


def char_vocab() -> dict[str, int]:
    """The token -> id table: special tokens first, then the alphabet in a fixed order."""
    symbols = list(SPECIAL_TOKENS) + list(ALPHABET)
    return {s: i for i, s in enumerate(symbols)}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the char-level tokenizer (left padding; pad/bos/eos/unk set)."""
    vocab = char_vocab()
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every single character (newline included) becomes its own piece.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join pieces without separators
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
