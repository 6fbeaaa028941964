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

import bisect
import functools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

#: SQL texts longer than this are remembered one at a time (see :func:`per_text`).
LONGEST_REMEMBERED = 16 * 1024


def per_text(read: Callable[[str], Any]) -> Callable[[str], Any]:
    """Remember what ``read(sql)`` returns for the last 2048 texts of at most ``LONGEST_REMEMBERED`` characters.

    The memo keeps the texts themselves: a longer one is SQL made with its
    data inline (a bulk ``INSERT`` built as a string), new each time, and
    a flood of them would be kept whole, 2048 in each memo.  Of those,
    only the last is remembered: its execution reads it once.
    """
    remembered = functools.lru_cache(maxsize=2048)(read)
    last: list[tuple[str, Any] | None] = [None]

    @functools.wraps(read)
    def reading(sql: str) -> Any:
        if len(sql) <= LONGEST_REMEMBERED:
            return remembered(sql)
        held = last[0]
        if held is not None and held[0] == sql:
            return held[1]
        found = read(sql)
        last[0] = (sql, found)
        return found

    return reading


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


class Dialect(NamedTuple):
    """How a database reads what SQL text leaves open (see :func:`readings`)."""

    #: ``[...]`` quotes a name (SQLite, SQL Server), else it subscripts (PostgreSQL).
    brackets: bool = True
    #: A backslash escapes in every string (MySQL; PostgreSQL with
    #: ``standard_conforming_strings`` off), not only in ``E'...'``.
    backslashes: bool = False
    #: Comments nest (PostgreSQL).
    nested: bool = False
    #: A backtick quotes a name (SQLite, MySQL), else it is an operator (PostgreSQL).
    backticks: bool = True
    #: ``$tag$`` opens a dollar-quoted string (PostgreSQL), else ``$`` is part of a name or parameter (SQLite).
    dollars: bool = True


@per_text
def readings(sql: str) -> tuple[Cleaned, ...]:
    """Return every way ``sql`` may be read, each once: callers take what any of them finds.

    What the text alone does not settle, the database's dialect and
    settings do (see :class:`Dialect`); each choice the text raises
    doubles the readings.  Brackets and backticks are read both ways when
    what they would quote holds what could hide SQL from the other reading:
    a quote, a comment marker or a parenthesis (``ARRAY[(SELECT ...)]``).
    """
    choices = {
        "brackets": (True, False) if _may_hide(sql, "[", "]") else (True,),
        "backslashes": (False, True) if "\\" in sql else (False,),
        "nested": (False, True) if "/*" in sql else (False,),
        "backticks": (True, False) if _may_hide(sql, "`", "`") else (True,),
        "dollars": (True, False) if "$" in sql else (True,),
    }
    dialects = [Dialect()]
    for name, values in choices.items():
        dialects = [dialect._replace(**{name: value}) for dialect in dialects for value in values]
    return tuple(dict.fromkeys(clean(sql, dialect) for dialect in dialects))


def _may_hide(sql: str, opening: str, closing: str) -> bool:
    """Whether a span quoted by ``opening`` and ``closing`` holds what opens a string, comment or subquery.

    Each span is looked at once (split, not searched from every opening):
    text with many unclosed openings costs no more than other text.
    """
    if opening not in sql:
        return False
    if opening == closing:
        spans = sql.split(opening)[1::2]
    else:
        spans = [piece.split(closing, 1)[0] for piece in sql.split(opening)[1:]]
    return any(_OPENS.search(span) for span in spans)


_OPENS = re.compile(r"['\"`$(\[;]|--|/\*")
#: Where something other than plain SQL may begin.
_SPECIAL = re.compile(r"['\"`$\[]|--|/\*")
#: A dollar quote's opening and closing: ``$$`` or ``$tag$`` (a tag starts
#: with a letter, any alphabet's, or ``_``: ``$1`` is a parameter).
_DOLLAR = re.compile(r"\$(?:[^\W\d]\w*)?\$")


def clean(sql: str, dialect: Dialect = Dialect()) -> Cleaned:  # noqa: B008 - a NamedTuple: immutable
    """Return ``sql`` as :class:`Cleaned` text, read left to right as ``dialect`` reads it.

    A string, comment or quoted name left open runs to the end (the
    database refuses such SQL).  ``U&"..."`` is a quoted name and
    ``U&'...'`` a string (PostgreSQL's Unicode escapes).
    """
    out: list[str] = []
    quoted: list[str] = []
    dollars = _dollar_quotes(sql) if dialect.dollars and "$" in sql else {}
    at, end = 0, len(sql)
    while at < end:
        special = _SPECIAL.search(sql, at)
        if special is None:
            out.append(sql[at:])
            break
        start = special.start()
        out.append(sql[at:start])
        char = sql[start]
        unicode = char in "'\"" and sql[max(start - 2, 0) : start] in ("U&", "u&") and not _in_word(sql, start - 2)
        if unicode:
            out[-1] = out[-1][:-2]  # the U& of U&"..." or U&'...'
        if char == "'":
            prefixed = start > 0 and sql[start - 1] in "eE" and not _in_word(sql, start - 1)
            if prefixed:
                out[-1] = out[-1][:-1]  # the E of E'...'
            at = _string_end(sql, start, dialect.backslashes or prefixed)
            out.append("''")
        elif char == "$":
            close = _dollar_close(sql, start, dollars)
            if close < 0:  # a $ of a name or a parameter
                out.append("$")
                at = start + 1
            else:
                out.append("''")
                at = close
        elif char == "-":
            line_end = _LINE_END.search(sql, start)
            at = end if line_end is None else line_end.start()
            out.append(" ")
        elif char == "/":
            at = _comment_end(sql, start, dialect.nested)
            out.append(" ")
        elif (char == "[" and not dialect.brackets) or (char == "`" and not dialect.backticks):
            out.append(char)
            at = start + 1
        else:  # a quoted name: "...", `...` or [...]
            closing = "]" if char == "[" else char
            at, name = _quoted_end(sql, start, closing)
            quoted.append(_UNICODE_ESCAPE.sub(_unescaped, name) if unicode else name)
            out.append(f'"{len(quoted) - 1}"')
    return Cleaned("".join(out), tuple(quoted))


_LINE_END = re.compile(r"[\r\n]")
#: PostgreSQL's escapes in ``U&"..."``: ``\\``, ``\XXXX``, ``\+XXXXXX`` (a ``UESCAPE``
#: clause choosing another escape character: see ``statements.py``).
_UNICODE_ESCAPE = re.compile(r"\\(\\|[0-9A-Fa-f]{4}|\+[0-9A-Fa-f]{6})")


def _unescaped(match: re.Match[str]) -> str:
    code = match.group(1)
    return "\\" if code == "\\" else chr(int(code.lstrip("+"), 16))


def _dollar_quotes(sql: str) -> dict[str, list[int]]:
    """Where each ``$tag$`` of ``sql`` stands, in order: found once, so that an unclosed tag costs no scan of its own."""
    found: dict[str, list[int]] = {}
    for match in _DOLLAR.finditer(sql):
        found.setdefault(match.group(), []).append(match.start())
    return found


def _dollar_close(sql: str, start: int, dollars: dict[str, list[int]]) -> int:
    """The end of the dollar-quoted string opened at ``start``, or -1 when none opens there."""
    if _in_word(sql, start):
        return -1
    opening = _DOLLAR.match(sql, start)
    if opening is None:
        return -1
    tag = opening.group()
    places = dollars.get(tag, ())
    index = bisect.bisect_left(places, opening.end())
    return places[index] + len(tag) if index < len(places) else -1


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
