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
    """Return every way ``sql`` may be read, each once: callers take what any of them finds.

    What the text alone does not settle, the database's dialect and
    settings do: square brackets quote a name (SQLite, SQL Server) or
    subscript (PostgreSQL); a backslash escapes a quote (MySQL, PostgreSQL
    with ``standard_conforming_strings`` off) or is a character; ``/*``
    inside a comment nests (PostgreSQL) or not.  Each choice the text
    raises doubles the readings.  Brackets are read both ways when one
    holds what could hide SQL from the other reading: a quote, a comment
    marker or a parenthesis (``ARRAY[(SELECT ...)]``).
    """
    found: dict[Cleaned, None] = {}
    both = any(_OPENS.search(span) for span in _BRACKETED.findall(sql))
    for brackets in (True, False) if both else (True,):
        for backslashes in (False, True) if "\\" in sql else (False,):
            for nested in (False, True) if "/*" in sql else (False,):
                found.setdefault(clean(sql, brackets, backslashes, nested))
    return tuple(found)


_BRACKETED = re.compile(r"\[[^\]]*\]")
_OPENS = re.compile(r"['\"`$(]|--|/\*")
#: Where something other than plain SQL may begin.
_SPECIAL = re.compile(r"['\"`$\[]|--|/\*")
#: A dollar quote's opening: ``$$`` or ``$tag$`` (a tag never starts with a digit: ``$1`` is a parameter).
_DOLLAR = re.compile(r"\$(?:[A-Za-z_]\w*)?\$")


def clean(sql: str, brackets: bool = True, backslashes: bool = False, nested: bool = False) -> Cleaned:
    """Return ``sql`` as :class:`Cleaned` text, read left to right.

    ``brackets``: whether ``[...]`` quotes a name; ``backslashes``:
    whether a backslash escapes in every string (it always does in
    PostgreSQL's ``E'...'``); ``nested``: whether comments nest.  A
    string, comment or quoted name left open runs to the end (the
    database refuses such SQL).
    """
    out: list[str] = []
    quoted: list[str] = []
    at, end = 0, len(sql)
    while at < end:
        special = _SPECIAL.search(sql, at)
        if special is None:
            out.append(sql[at:])
            break
        start = special.start()
        out.append(sql[at:start])
        char = sql[start]
        if char == "'":
            prefixed = start > 0 and sql[start - 1] in "eE" and not _in_word(sql, start - 1)
            if prefixed:
                out[-1] = out[-1][:-1]  # the E of E'...'
            at = _string_end(sql, start, backslashes or prefixed)
            out.append("''")
        elif char == "$":
            dollar = None if _in_word(sql, start) else _DOLLAR.match(sql, start)
            tag = "" if dollar is None else dollar.group()
            close = sql.find(tag, start + len(tag)) if tag else -1
            if close < 0:  # a $ of a name or a parameter
                out.append("$")
                at = start + 1
            else:
                out.append("''")
                at = close + len(tag)
        elif char == "-":
            line_end = sql.find("\n", start)
            at = end if line_end < 0 else line_end
            out.append(" ")
        elif char == "/":
            at = _comment_end(sql, start, nested)
            out.append(" ")
        elif char == "[" and not brackets:
            out.append("[")
            at = start + 1
        else:  # a quoted name: "...", `...` or [...]
            closing = "]" if char == "[" else char
            at, name = _quoted_end(sql, start, closing)
            quoted.append(name)
            out.append(f'"{len(quoted) - 1}"')
    return Cleaned("".join(out), tuple(quoted))


def _in_word(sql: str, index: int) -> bool:
    """Whether the character before ``index`` continues a word (a name may hold ``$``)."""
    return index > 0 and (sql[index - 1].isalnum() or sql[index - 1] in "_$")


def _string_end(sql: str, start: int, backslashes: bool) -> int:
    at = start + 1
    while at < len(sql):
        char = sql[at]
        if backslashes and char == "\\":
            at += 2
        elif char == "'":
            if sql.startswith("''", at):
                at += 2
            else:
                return at + 1
        else:
            at += 1
    return len(sql)


def _comment_end(sql: str, start: int, nested: bool) -> int:
    depth, at = 0, start
    while at < len(sql):
        if sql.startswith("/*", at):
            depth = depth + 1 if nested or depth == 0 else depth
            at += 2
        elif sql.startswith("*/", at):
            depth -= 1
            at += 2
            if depth == 0:
                return at
        else:
            at += 1
    return len(sql)


def _quoted_end(sql: str, start: int, closing: str) -> tuple[int, str]:
    """The end of the quoted name at ``start``, and the name (a doubled closing quote is one, except in brackets)."""
    parts: list[str] = []
    at = start + 1
    while True:
        close = sql.find(closing, at)
        if close < 0:
            parts.append(sql[at:])
            return len(sql), "".join(parts)
        parts.append(sql[at:close])
        if closing != "]" and sql.startswith(closing * 2, close):
            parts.append(closing)
            at = close + 2
        else:
            return close + 1, "".join(parts)
