"""Text normalisation: the canonical form (:func:`normalize`) that every judge rule matches against."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize"]


# --------------------------------------------------------------------------- normalisation

# Typographic quotes and apostrophes that models (and tokenizers) emit interchangeably with
# the ASCII ones; "I’m sorry" must match "i'm sorry".
_QUOTE_MAP = str.maketrans(
    {
        "\u2018": "'",  # left single quotation mark
        "\u2019": "'",  # right single quotation mark (the usual curly apostrophe)
        "\u201a": "'",
        "\u201b": "'",
        "\u02bc": "'",  # modifier letter apostrophe
        "\u2032": "'",  # prime
        "\u00b4": "'",  # acute accent used as apostrophe
        "`": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2033": '"',
    }
)
_WHITESPACE_RE = re.compile(r"\s+")
# Leading markdown / quoting noise before the first word: bullets, emphasis, headings,
# block quotes, quote marks, dashes. Chat models often open with '**' or '> '.
_LEADING_NOISE_RE = re.compile(r"^[\s\*\"'>#\-_~`\u2022\u00b7=+:|]+")
# A word of normalised text (inner apostrophes kept: "don't"); the degenerate rules and the
# causal judge's answer parser both split text with it.
_WORD_RE = re.compile(r"\w+(?:'\w+)*")


def normalize(text: str) -> str:
    """Return ``text`` in the canonical form the judge matches against.

    Lower-cases, maps curly/typographic apostrophes and quotes to ASCII ``'`` and ``"``,
    applies Unicode NFKC (full-width letters, ligatures), collapses all whitespace runs to
    one space, and strips leading markdown/quoting characters (``*``, ``"``, ``>``, ``#``,
    ``-``, ...), so ``'> **I’m  Sorry**'`` becomes ``"i'm sorry**"``.
    """
    text = unicodedata.normalize("NFKC", text).translate(_QUOTE_MAP).lower()
    text = _WHITESPACE_RE.sub(" ", text).strip()
    return _LEADING_NOISE_RE.sub("", text)
