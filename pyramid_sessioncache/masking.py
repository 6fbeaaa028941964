"""How values appear in error messages: secrets masked, URL passwords hidden.

Every message of the package that shows an option's value builds it with
:func:`shown`.  A value is masked when its option's name looks like a
secret's (``secret``, ``password``, ``passwd``, ``pwd``, ``token``, a
``key`` suffix, and their misspellings: ``secrett``, ``pasword``), because
a mistyped secret is still a secret; only its type and length are shown.
Any other text has the password of every URL in it hidden
(``redis://:***@host``, ``postgresql://scott:***@db``), and the values of
secret-looking query parameters (``?password=***``).

Log lines do not use this module: they show labels and keys with ``%r``,
so that a newline in a label cannot start a forged line.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

#: Pieces of an option name that mark its value as secret.  Generous on
#: purpose: masking a harmless value costs a little help, showing a secret
#: cannot be undone.
_SECRET_PIECES = ("sec", "cret", "pas", "pw", "word", "tok", "cred", "auth", "priv", "salt", "sig")
#: Words a misspelled secret option is close to.
_SECRET_WORDS = ("secret", "password", "passwd", "passphrase", "token", "credential", "apikey")
#: Names that end like a secret's but hold none: a readable key label,
#: Beaker's key length.
_NOT_SECRET = frozenset({"cache_key", "key_length"})

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
#: A URL: up to a space, or to the next URL of a list (``a://...;b://...``,
#: as memcached and Redis cluster URLs are given).
_URL = re.compile(rf"(?P<scheme>{_SCHEME})(?P<rest>(?:(?![;,]\s*{_SCHEME})\S)*)")
_QUERY_PARAMETER = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")
MASK = "***"


def is_secret_name(name: str) -> bool:
    """Whether the option called ``name`` (a dotted setting or a plain name) may hold a secret.

    Only the last dotted part counts, so a region called ``tokens`` does not
    mask its ``expire``.
    """
    word = str(name).rpartition(".")[2].lower()
    if word in _NOT_SECRET:
        return False
    if word.endswith("key") or any(piece in word for piece in _SECRET_PIECES):
        return True
    return any(difflib.get_close_matches(part, _SECRET_WORDS, n=1, cutoff=0.75) for part in re.split(r"[_\-]", word))


def hide_url_passwords(text: str) -> str:
    """Return ``text`` with the password of every URL in it, and secret-looking query values, replaced by ``***``."""
    text = _URL.sub(_hide_userinfo, text)
    return _QUERY_PARAMETER.sub(_hide_parameter, text)


def _hide_userinfo(match: re.Match[str]) -> str:
    # Up to the last "@": a password may hold "@", "/" or "?" that its
    # owner forgot to escape; hiding too much is better than too little.
    userinfo, at, host = match["rest"].rpartition("@")
    if not at or ":" not in userinfo:
        return match[0]
    user = userinfo.partition(":")[0]
    return f"{match['scheme']}{user}:{MASK}@{host}"


def _hide_parameter(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]):
        return match[0]
    return f"{match['sep']}{match['name']}={MASK}"


def hidden(value: Any) -> str:
    """How a secret ``value`` is shown: its type and length, never its text."""
    if isinstance(value, (str, bytes)):
        return f"<hidden {type(value).__name__} of {len(value)} characters>"
    return f"<hidden {type(value).__name__}>"


def shown(name: str, value: Any) -> str:
    """Return how the value of the option ``name`` may appear in a message.

    ``repr(value)``, with URL passwords hidden; for a secret-looking name,
    :func:`hidden`.  ``None`` (a missing value) is shown as ``None``.
    """
    if value is None:
        return "None"
    if is_secret_name(name):
        return hidden(value)
    if isinstance(value, str):
        return repr(hide_url_passwords(value))
    return hide_url_passwords(repr(value))
