"""Spec files in editors and on pages: the Pygments lexer, the TextMate grammar, machine-readable
diagnostics and the language server. Every word list comes from `alignspec.dsl.vocab`."""
