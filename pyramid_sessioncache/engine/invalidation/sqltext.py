"""Reading SQL text: strings, comments and quoted identifiers told apart from the SQL around them.

Both sides of invalidation read SQL given as text: ``statements.py`` for
the tables it writes, ``reads.py`` for a fragment that may read tables
nobody named.  Either must see the SQL as the database does: a quote or
``--`` inside a string, a comment or a quoted identifier (``"owner's
name"``, ```a--b```, ``[x/*y]``) opens nothing, and a word inside any of
them (``'delete'``, ``"update"``) is no keyword.  :func:`clean` reads the
text once, left to right, and hands back SQL in which each of them is a
neutral token.

Square brackets quote a name in SQLite and SQL Server, and subscript an
array or a ``jsonb`` value in PostgreSQL (``data['a]']``): the text does
not say which, so :func:`readings` gives both readings, and callers take
what either finds (a write, a table read).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

# Left to right: a quote inside a comment opens no string, a comment marker
# inside a string or a quoted identifier opens no comment, and so on.
_NOISE = re.compile(
    r"(?P<string>[eE]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\$(?P<tag>\w*)\$.*?\$(?P=tag)\$)"
    r"|(?P<comment>--[^\n]*|/\*.*?\*/)"
    r'|(?P<quoted>"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\])',
    re.S,
)
# The same, square brackets being SQL (PostgreSQL's subscripts).
_NOISE_WITHOUT_BRACKETS = re.compile(_NOISE.pattern.replace(r"|\[[^\]]*\]", ""), re.S)
#: A name in :attr:`Cleaned.text`: a word, or a quoted identifier's token.
NAME = r'(?:"\d+"|[\w$]+)'
#: A name with its schema (and database) before it.
QUALIFIED = rf"{NAME}(?:\s*\.\s*{NAME})*"


class Cleaned(NamedTuple):
    """SQL text with its strings as ``''``, its comments as a space and each quoted identifier as ``"N"``.

    ``quoted[N]`` is the name the ``N``-th quoted identifier spells, its
    quotes removed (``"a""b"`` is ``a"b``).
    """

    text: str
    quoted: tuple[str, ...]

    def name(self, token: str) -> str:
        """The name a token of :attr:`text` that matched :data:`NAME` spells."""
        if token.startswith('"'):
            return self.quoted[int(token[1:-1])]
        return token

    def names(self, qualified: str) -> list[str]:
        """The names a :data:`QUALIFIED` match spells, schema first."""
        return [self.name(token) for token in re.findall(NAME, qualified)]

    def statements(self) -> list[str]:
        """The statements of :attr:`text`: a ``;`` in a string, a comment or a name separates nothing."""
        parts = (part.strip() for part in self.text.split(";"))
        return [part for part in parts if part]


@lru_cache(maxsize=2048)
def readings(sql: str) -> tuple[Cleaned, ...]:
    """Return the ways ``sql`` may be read: :func:`clean`'s, and one where square brackets are SQL.

    The second only when a bracketed span holds a quote or a comment
    marker: otherwise both readings see the same strings and comments.
    """
    if not any(_OPENS.search(span) for span in _BRACKETED.findall(sql)):
        return (clean(sql),)
    return clean(sql), clean(sql, brackets=False)


_BRACKETED = re.compile(r"\[[^\]]*\]")
_OPENS = re.compile(r"['\"`$]|--|/\*")


def clean(sql: str, brackets: bool = True) -> Cleaned:
    """Return ``sql`` as :class:`Cleaned` text; ``brackets``: whether ``[...]`` quotes a name."""
    quoted: list[str] = []

    def token(match: re.Match[str]) -> str:
        if match.group("string"):
            return "''"
        found = match.group("quoted")
        if not found:
            return " "
        quote = found[0]
        inner = found[1:-1]
        if quote in '"`':
            inner = inner.replace(quote * 2, quote)
        quoted.append(inner)
        return f'"{len(quoted) - 1}"'

    noise = _NOISE if brackets else _NOISE_WITHOUT_BRACKETS
    return Cleaned(noise.sub(token, sql), tuple(quoted))
