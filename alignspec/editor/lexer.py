"""A Pygments lexer for spec files, registered as the `pygments.lexers` entry point `alignspec`.

`pygmentize -l alignspec algorithms/grpo.align` and any Pygments user (MkDocs, Sphinx, rich)
highlight `.align` text with it. The word lists are built when this module is imported from
`alignspec.dsl.vocab` (the grammar and the checker's tables), so a new built-in function or
quantity is highlighted without touching this file.

Token kinds: header and statement keywords (Keyword), section keywords (Keyword.Namespace),
parameter types (Keyword.Type), true/false (Keyword.Constant), and/or/not (Operator.Word),
the spec's own name and its base (Name.Class), imported libraries (Name.Namespace), `def`
names (Name.Function), built-in functions (Name.Builtin), runtime quantities and the
`prompt`/`response` arguments (Name.Builtin.Pseudo), roles in `h[chosen]` (Name.Attribute),
parameters where declared and wherever this file reads them (Name.Constant), statement targets
(Name.Variable), numbers, strings (a parameter's doc string is String.Doc) and comments.
"""

from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, include, words
from pygments.token import (Comment, Keyword, Name, Number, Operator, Punctuation, String, Text,
                            Whitespace)

from alignspec.dsl import vocab

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_END = r"(?![A-Za-z0-9_])"
_ITEM_START = words(vocab.SECTION_WORDS + ("algorithm", "library", "import", "data", "def"), suffix=_END).get()


class AlignspecLexer(RegexLexer):
    """Spec files of alignspec (`.align`): declarative post-training algorithms."""

    name = "alignspec"
    aliases = ["alignspec", "align"]
    filenames = ["*.align"]
    mimetypes = ["text/x-alignspec"]

    tokens = {
        "root": [
            (r"^(params)" + _END, Keyword.Namespace, "params"),
            (words(vocab.SECTION_WORDS, prefix=r"^", suffix=_END), Keyword.Namespace),
            (r"^(algorithm)(\s+)(" + _NAME + r")(?:(\s+)(extends)(\s+)(" + _NAME + r"))?",
             bygroups(Keyword.Declaration, Whitespace, Name.Class, Whitespace, Keyword.Declaration, Whitespace,
                      Name.Class)),
            (r"^(library)(\s+)(" + _NAME + r")", bygroups(Keyword.Declaration, Whitespace, Name.Namespace)),
            (r"^(import)(\s+)(" + _NAME + r")", bygroups(Keyword.Namespace, Whitespace, Name.Namespace)),
            (r"^(data)(\s+)(" + _NAME + r")", bygroups(Keyword.Declaration, Whitespace, Keyword.Type)),
            (r"^(def)(\s+)(" + _NAME + r")", bygroups(Keyword.Declaration, Whitespace, Name.Function)),
            (r"(minimize)(\s+)(" + _NAME + r")(\s*)(=)(?!=)",
             bygroups(Keyword, Whitespace, Name.Variable, Whitespace, Operator)),
            (r"^([\t ]+)(" + _NAME + r")(?=\s*=(?!=))", bygroups(Whitespace, Name.Variable)),
            include("expression"),
        ],
        "params": [
            (r"^(?=" + _ITEM_START + r")", Text, "#pop"),
            (r"^([\t ]+)(" + _NAME + r")(\s*)(:)(\s*)(" + _NAME + r")",
             bygroups(Whitespace, Name.Constant, Whitespace, Punctuation, Whitespace, Keyword.Type)),
            (r"^([\t ]+)(" + _NAME + r")", bygroups(Whitespace, Name.Constant)),
            (r'"[^"\n]*"', String.Doc),
            include("expression"),
        ],
        "expression": [
            (r"[\t \f]+", Whitespace),
            (r"\n", Whitespace),
            (r"#.*?$", Comment.Single),
            (r'"[^"\n]*"', String.Double),
            (r"(\d+\.\d*|\.\d+|\d+)[eE][-+]?\d+", Number.Float),
            (r"\d+\.\d*|\.\d+", Number.Float),
            (r"\d+", Number.Integer),
            (words(vocab.CONSTANTS, suffix=_END), Keyword.Constant),
            (words(vocab.OPERATOR_WORDS, suffix=_END), Operator.Word),
            (r"(\[)(\s*)(" + _NAME + r")(\s*)(\])",  # h[chosen]: a role of each group
             bygroups(Punctuation, Whitespace, Name.Attribute, Whitespace, Punctuation)),
            (words(vocab.FUNCTION_WORDS, suffix=r"(?=\s*\()"), Name.Builtin),  # before keywords: where(...)
            (words(vocab.KEYWORDS, suffix=_END), Keyword),
            (words(vocab.SCOPES, suffix=_END), Keyword),
            (words(vocab.QUANTITY_WORDS + vocab.PSEUDO_WORDS, suffix=_END), Name.Builtin.Pseudo),
            (r"(" + _NAME + r")(?=\s*\()", Name.Function),
            (_NAME, Name),
            (r"\*\*|<=|>=|==|!=|[-+*/<>=]", Operator),
            (r"[()\[\],:]", Punctuation),
        ],
    }

    def get_tokens_unprocessed(self, text, stack=("root",)):
        """Names that this file declares as parameters are Name.Constant wherever they are read."""
        tokens = list(super().get_tokens_unprocessed(text, stack))
        params = {value for _, tok, value in tokens if tok is Name.Constant}
        for index, tok, value in tokens:
            if not value:  # the zero-width match that leaves the params state
                continue
            yield index, (Name.Constant if tok is Name and value in params else tok), value
