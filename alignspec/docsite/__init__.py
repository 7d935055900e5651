"""The documentation site's generated pages (reference.py) and the MkDocs hooks that add them
(mkdocs_hooks.py). They sit above the CLI, whose commands they document; nothing imports them
but MkDocs."""
