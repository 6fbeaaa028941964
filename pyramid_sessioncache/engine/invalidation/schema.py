"""What else a write changes, and what a read depends on: cascades, views, policies, from the schema.

A write to a table also changes, as far as a cache can tell, the tables
whose foreign keys to it ``CASCADE``, ``SET NULL`` or ``SET DEFAULT`` on
delete or update, the views that read it, and the tables whose
row-level security policies read it, transitively.  Those come from the
``MetaData`` of the tables this process maps, writes or reads and, on
PostgreSQL, from the database's own catalog (a schema built by migrations
may declare actions the models do not) and, on SQLite, from the
foreign keys of its main database.  A result that read a table depends on
the tables whose writes the ``MetaData``'s cascades carry into it too: the
process that writes them may not know those keys.  The tables the
triggers of a PostgreSQL or SQLite database write (by the DML their
source names, or every table when it cannot be told) are read from the
schema too.  Anything else is declared: ``SessionCache(writes_also=...)``,
the ``sessioncache.writes_also`` setting;
:meth:`~pyramid_sessioncache.SessionCache.publish` closes what they
declare over the same dependencies.

Some relations read tables the catalog cannot name: a view that calls a
function of the database's own (its body may read any table), a table
whose row-level security policy does, any SQLite view (its schema keeps
only its SQL) or virtual table (an FTS5 table's ``content='doc'`` shows
``doc``'s rows).  A result that read one of them
depends on :data:`~.reads.ANY_TABLE`, as SQL text does (:func:`depends_on`).
A SQLite view whose SQL calls a function run for its effect
(``last_insert_rowid()``) or reads a pragma is never stored, nor is a
pragma read (:func:`calls_effects`).
A function whose body writes may be called by a SELECT: such a statement
writes every table (:func:`calls_writers`), and so does one that calls it
unnamed, by what the catalog records: a write to a table whose default,
check, rule or policy calls it, an aggregate whose state or final function
it is, a cast, a value made of a domain whose check calls it (a column, an
argument, a cast of that type; every statement, for a cast applied implicitly).

Some relations show what no write publishes: a sequence, a view that locks
rows or calls a function run for its effect or showing live state
(``nextval()``, ``pg_cursor()``: ``pg_cursors``).  A statement that names
one is stored nowhere (:func:`calls_effects`).

The catalog of a database is read once, at the first write or miss that
needs it, and kept per database (:func:`~pyramid_sessioncache.engine.identity.database_identity`),
for every engine on it.  DDL run by any connection of the process
forgets every catalog: the DDL may have been run as another user, whose
engine names the database otherwise.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ... import _sqlalchemy
from ..._weak import members
from ..identity import database_identity
from ..keys import EFFECT_FUNCTIONS, EFFECT_SQL, LOCKING_SQL
from . import reads, sqltext

log = logging.getLogger(__name__)

#: Foreign-key actions by which the database writes the referring table.
_ACTIONS = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})

#: (parent, dependent, shows): a write to ``parent`` changes ``dependent``;
#: ``shows`` when ``dependent`` reads ``parent``'s rows.  A partition and
#: its parent (either way: a write to one changes what the other shows;
#: the parent shows the partition's rows), cascading foreign keys, views
#: over tables or views,
#: a view's tables (a write through an updatable view writes them), the
#: tables a row-level security policy reads, and the tables a rule on a
#: table names (``CREATE RULE ... ON INSERT TO t DO ALSO UPDATE u``: a
#: write to ``t`` may write them).  A materialized view changes when it is
#: refreshed, which is a write to it.
POSTGRESQL_DEPENDENTS = """
WITH inherits AS (
    SELECT p.relname AS parent, c.relname AS child
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_class p ON p.oid = i.inhparent
), views AS (
    SELECT t.relname AS base, v.relname AS view
    FROM pg_depend d
    JOIN pg_rewrite r ON r.oid = d.objid
    JOIN pg_class v ON v.oid = r.ev_class
    JOIN pg_class t ON t.oid = d.refobjid
    WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
      AND v.relkind = 'v' AND t.oid <> v.oid
), rules AS (
    SELECT v.relname AS ruled, t.relname AS named
    FROM pg_depend d
    JOIN pg_rewrite r ON r.oid = d.objid
    JOIN pg_class v ON v.oid = r.ev_class
    JOIN pg_class t ON t.oid = d.refobjid
    WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
      AND v.relkind NOT IN ('v', 'm') AND t.oid <> v.oid
), policies AS (
    SELECT t.relname AS base, c.relname AS policed
    FROM pg_depend d
    JOIN pg_policy p ON p.oid = d.objid
    JOIN pg_class c ON c.oid = p.polrelid
    JOIN pg_class t ON t.oid = d.refobjid
    WHERE d.classid = 'pg_policy'::regclass AND d.refclassid = 'pg_class'::regclass AND t.oid <> c.oid
)
SELECT parent, child, false FROM inherits
UNION SELECT child, parent, true FROM inherits
UNION SELECT base, view, true FROM views
UNION SELECT view, base, false FROM views
UNION SELECT base, policed, true FROM policies
UNION SELECT ruled, named, false FROM rules
UNION
SELECT p.relname, c.relname, false
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid
JOIN pg_class p ON p.oid = k.confrelid
WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
"""

#: The views and the tables with row-level security whose query or policy
#: calls a function or an operator of the database's own (outside
#: ``pg_catalog`` and ``information_schema``): its body may read any
#: table, which the catalog does not record.  A materialized view is not
#: one: what it shows changes when it is refreshed, a write to it.  And the
#: system catalog's own tables and views (``pg_class``, ``pg_tables``),
#: found first on every search path: a schema change writes them, and
#: bumps :data:`~.reads.ANY_TABLE` only; a view over the catalog's own
#: tables too, which ``pg_depend`` does not link to them (they are pinned,
#: below OID 12000: their numbers are found in the view's query tree).
POSTGRESQL_OPAQUE = """
WITH users AS (
    SELECT r.ev_class AS rel, d.refclassid, d.refobjid
    FROM pg_rewrite r
    JOIN pg_class v ON v.oid = r.ev_class
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
    WHERE v.relkind = 'v'
    UNION ALL
    SELECT p.polrelid, d.refclassid, d.refobjid
    FROM pg_policy p
    JOIN pg_class c ON c.oid = p.polrelid
    JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = p.oid
    WHERE c.relrowsecurity
)
SELECT DISTINCT c.relname
FROM users u
JOIN pg_class c ON c.oid = u.rel
LEFT JOIN pg_proc f ON u.refclassid = 'pg_proc'::regclass AND f.oid = u.refobjid
LEFT JOIN pg_operator o ON u.refclassid = 'pg_operator'::regclass AND o.oid = u.refobjid
JOIN pg_namespace n ON n.oid = coalesce(f.pronamespace, o.oprnamespace)
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
UNION
SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind IN ('r', 'v')
UNION
SELECT v.relname
FROM pg_rewrite r
JOIN pg_class v ON v.oid = r.ev_class
WHERE v.relkind = 'v' AND r.ev_action::text ~ ':relid ([0-9]{1,4}|1[01][0-9]{3})\\M'
"""

#: The functions and operators of the database's own (outside
#: ``pg_catalog`` and ``information_schema``, not of an extension, not
#: trigger functions): a statement that names one may read any table
#: through it, whether called as ``f(x)``, in attribute notation
#: (``person.f``) or as an operator (``a ### b``), and even when it
#: overloads a built-in's name (``date(integer)``).  With each, whether
#: its source changes a setting (or makes a temporary relation, which
#: shadows a table on its connection alone, as a ``search_path`` does), and
#: its source (with its arguments' defaults, which a call may evaluate, and
#: its arguments' and result's types, which a call casts to; an
#: operator's: its function's name; an aggregate's: the names of its state,
#: final and other functions, which it calls), to find
#: those that call one that does; and whether it can be called with one
#: argument, in attribute notation (``person.f`` calls ``f(person)``).
#: ``{source}``: what gives a function's source (see ``_routine_source()``).
POSTGRESQL_ROUTINES = """
SELECT p.proname, false,
       s.source ~* '(set_config|\\mset\\M|\\mreset\\M|\\mdiscard\\M|\\mtemp(orary)?\\M|\\mpg_temp)',
       concat_ws(' ', s.source, s.types), p.pronargs >= 1 AND p.pronargs - p.pronargdefaults <= 1
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
LEFT JOIN pg_aggregate a ON a.aggfnoid = p.oid
CROSS JOIN LATERAL (
    SELECT CASE WHEN a.aggfnoid IS NULL THEN concat_ws(' ', {source}, pg_get_expr(p.proargdefaults, 0))
           ELSE concat_ws(' ', a.aggtransfn, a.aggfinalfn, a.aggcombinefn, a.aggserialfn, a.aggdeserialfn,
                          a.aggmtransfn, a.aggminvtransfn, a.aggmfinalfn) END AS source,
           (SELECT string_agg(format_type(t, NULL), ' ')
            FROM unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]) || p.prorettype) t) AS types
) s
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND p.prorettype <> 'trigger'::regtype
  AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid AND e.deptype = 'e')
UNION
SELECT o.oprname, true, false, o.oprcode::text, false
FROM pg_operator o
JOIN pg_namespace n ON n.oid = o.oprnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_operator'::regclass AND e.objid = o.oid AND e.deptype = 'e')
"""

#: The functions of the database's own that the objects of ``users`` (a
#: relation, and the catalog row of what calls: ``classid``, ``objid``)
#: call, directly or as an operator's function: the end of the two queries below.
_CALLED_BY_USERS = """
JOIN pg_depend d ON d.classid = u.classid AND d.objid = u.objid
LEFT JOIN pg_operator o ON d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid
JOIN pg_proc f ON f.oid = CASE WHEN d.refclassid = 'pg_proc'::regclass THEN d.refobjid ELSE o.oprcode END
JOIN pg_namespace n ON n.oid = coalesce(o.oprnamespace, f.pronamespace)
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"""

#: The views and the functions of the database's own their query calls,
#: directly or as an operator's function: a view over a function that
#: writes writes when it is read.  And so does a table with row-level
#: security whose policy calls one (``USING (audit() > 0)``).
POSTGRESQL_VIEW_ROUTINES = (
    """
WITH users AS (
    SELECT r.ev_class AS rel, 'pg_rewrite'::regclass AS classid, r.oid AS objid
    FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class
    WHERE v.relkind = 'v'
    UNION ALL
    SELECT p.polrelid, 'pg_policy'::regclass, p.oid
    FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
    WHERE c.relrowsecurity
)
SELECT DISTINCT c.relname, f.proname
FROM users u
JOIN pg_class c ON c.oid = u.rel
"""
    + _CALLED_BY_USERS
)

#: The tables (and views) and the functions of the database's own a write
#: to each may call, directly or as an operator's function, which its
#: statement does not name: its columns' defaults (generated columns too),
#: its checks, its rules (``DO ALSO SELECT f()``), its row-level security
#: policies, its triggers' ``WHEN`` conditions and its indexes' expressions
#: (an immutable function may call one that writes).  An ``INSERT`` of the ORM calls a default that writes
#: another table.  (Its columns' types: :data:`POSTGRESQL_TYPE_ROUTINES`.)
POSTGRESQL_WRITE_ROUTINES = (
    """
WITH users AS (
    SELECT adrelid AS rel, 'pg_attrdef'::regclass AS classid, oid AS objid FROM pg_attrdef
    UNION ALL
    SELECT conrelid, 'pg_constraint'::regclass, oid FROM pg_constraint WHERE contype = 'c' AND conrelid <> 0
    UNION ALL
    SELECT ev_class, 'pg_rewrite'::regclass, oid FROM pg_rewrite WHERE rulename <> '_RETURN'
    UNION ALL
    SELECT polrelid, 'pg_policy'::regclass, oid FROM pg_policy
    UNION ALL
    SELECT tgrelid, 'pg_trigger'::regclass, oid FROM pg_trigger WHERE NOT tgisinternal AND tgenabled <> 'D'
    UNION ALL
    SELECT indrelid, 'pg_class'::regclass, indexrelid FROM pg_index
)
SELECT DISTINCT c.relname, f.proname
FROM users u
JOIN pg_class c ON c.oid = u.rel
"""
    + _CALLED_BY_USERS
    + """ AND c.relkind IN ('r', 'p', 'f', 'v')
"""
)

#: The types a value of which calls functions of the database's own as it is
#: made (cast or coerced to it: ``1::checked``, an argument, a column
#: written): a domain's default and checks, directly or as operators' functions,
#: and a domain over such a type, an array of one, a composite type with
#: an attribute of one.  Each type's name and each function's.
POSTGRESQL_TYPE_ROUTINES = """
WITH RECURSIVE calls (type, routine) AS (
    SELECT u.type, f.proname
    FROM (
        SELECT t.oid AS type, 'pg_type'::regclass AS classid, t.oid AS objid FROM pg_type t WHERE t.typtype = 'd'
        UNION ALL
        SELECT k.contypid, 'pg_constraint'::regclass, k.oid FROM pg_constraint k WHERE k.contypid <> 0
    ) u
    JOIN pg_depend d ON d.classid = u.classid AND d.objid = u.objid
    LEFT JOIN pg_operator o ON d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid
    JOIN pg_proc f ON f.oid = CASE WHEN d.refclassid = 'pg_proc'::regclass THEN d.refobjid ELSE o.oprcode END
    JOIN pg_namespace n ON n.oid = coalesce(o.oprnamespace, f.pronamespace)
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
    UNION
    SELECT t.oid, c.routine
    FROM calls c
    JOIN pg_type t ON (t.typtype = 'd' AND t.typbasetype = c.type) OR t.typelem = c.type
      OR t.typrelid IN (
        SELECT a.attrelid FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid
        WHERE a.atttypid = c.type AND r.relkind = 'c'
      )
)
SELECT DISTINCT t.typname, c.routine FROM calls c JOIN pg_type t ON t.oid = c.type
"""

#: The tables (and views) and the types of their columns that are not the
#: system's: a write to one makes values of the type (see
#: :data:`POSTGRESQL_TYPE_ROUTINES`).
POSTGRESQL_COLUMN_TYPES = """
SELECT DISTINCT c.relname, t.typname
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'f', 'v')
  AND t.typnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
"""

#: The casts whose function is of the database's own (not an
#: extension's): the type each casts to, whether it is applied only when a
#: statement says so (``1::money_t``, ``CAST(x AS money_t)``, ``money_t(x)``:
#: it names the type), and its function.  An implicit or assignment cast
#: is applied where no statement names it.
POSTGRESQL_CASTS = """
SELECT t.typname, k.castcontext = 'e', f.proname
FROM pg_cast k
JOIN pg_proc f ON f.oid = k.castfunc
JOIN pg_namespace n ON n.oid = f.pronamespace
JOIN pg_type t ON t.oid = k.casttarget
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_cast'::regclass AND e.objid = k.oid AND e.deptype = 'e')
"""

#: PostgreSQL's own functions that return what no committed write changes:
#: the connection's own objects and state (its cursors, prepared statements,
#: memory, channels listened to, address), the server's live state (locks,
#: activity, statistics counters, replication, WAL positions, files), and
#: ``cursor_to_xml()``, which fetches from a cursor.  A statement that calls
#: one is answered by no cache (:func:`calls_effects`), and neither is a read
#: of a view that calls one, or one of
#: :data:`~pyramid_sessioncache.engine.keys.EFFECT_FUNCTIONS` (``nextval()``,
#: ``pg_backend_pid()``): see :data:`POSTGRESQL_NEVER_CACHED`.
POSTGRESQL_STATE_FUNCTIONS = frozenset(
    {"pg_cursor", "pg_prepared_statement", "pg_prepared_xact", "pg_lock_status", "pg_blocking_pids",
     "pg_safe_snapshot_blocking_pids", "pg_get_backend_memory_contexts", "pg_get_shmem_allocations",
     "pg_get_replication_slots", "pg_hba_file_rules", "pg_ident_file_mappings", "pg_listening_channels",
     "pg_notification_queue_usage", "pg_trigger_depth", "pg_sequence_last_value",
     "pg_xact_status", "txid_status", "pg_xact_commit_timestamp", "txid_current_snapshot",
     "txid_current_if_assigned", "pg_current_xact_id_if_assigned", "pg_is_in_recovery",
     "pg_is_wal_replay_paused", "pg_get_wal_replay_pause_state", "pg_postmaster_start_time",
     "pg_conf_load_time", "inet_client_addr", "inet_client_port", "inet_server_addr", "inet_server_port",
     "cursor_to_xml", "cursor_to_xmlschema"}
)  # fmt: skip
#: Prefixes of the names of more of them: statistics (``pg_stat_get_activity()``),
#: settings shown (``pg_show_all_settings()``), WAL positions, files listed or read.
_STATE_PREFIXES = ("pg_stat_", "pg_show_", "pg_current_", "pg_last_", "pg_ls_", "pg_read_")

#: PostgreSQL's own functions that run a query given as a string
#: (``ts_stat('SELECT ... FROM doc')``) or read the tables, schemas or
#: database named by their arguments: a view that calls one reads tables
#: the catalog cannot name (:data:`~.reads.ANY_TABLE`).
POSTGRESQL_QUERY_FUNCTIONS = frozenset(
    {"ts_stat", "ts_rewrite", "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "table_to_xml",
     "table_to_xmlschema", "table_to_xml_and_xmlschema", "schema_to_xml", "schema_to_xmlschema",
     "schema_to_xml_and_xmlschema", "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema"}
)  # fmt: skip


def _function_names(names: Iterable[str], prefixes: Iterable[str] = ()) -> str:
    """Alternatives of a regular expression (PostgreSQL's and Python's): a name of ``names``, or one starting with a prefix."""
    words = sorted(name.lower() for name in names if re.fullmatch(r"\w+", name))
    words += [prefix + r"\w*" for prefix in prefixes if re.fullmatch(r"\w+", prefix)]
    return "|".join(words)


#: The relations whose reads a cache may never answer, with what makes each
#: one so (NULL, or the name of PostgreSQL's own function it calls): the
#: sequences (``SELECT last_value FROM person_id_seq``: ``nextval()``,
#: ``setval()``, an INSERT's serial default advance one outside any
#: transaction, and no write is published for it); the views whose query
#: takes row locks (``FOR UPDATE``, ``FOR SHARE``, in a subquery too: a
#: read must take them every time); and the views, and the tables whose
#: row-level security policy reads, whose query calls PostgreSQL's own
#: function ``{names}`` names (see :data:`POSTGRESQL_STATE_FUNCTIONS`, and
#: :data:`POSTGRESQL_QUERY_FUNCTIONS`, which make a view read any table):
#: ``pg_cursors``, a view over ``nextval()``.  The calls of pinned functions
#: are not in ``pg_depend``: their numbers are found in the query tree.
POSTGRESQL_NEVER_CACHED = """
SELECT c.relname, NULL FROM pg_class c WHERE c.relkind = 'S'
UNION
SELECT v.relname, NULL
FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class
WHERE v.relkind = 'v' AND r.ev_type = '1' AND strpos(r.ev_action::text, '{{ROWMARKCLAUSE') > 0
UNION
SELECT c.relname, f.proname
FROM (
    SELECT r.ev_class AS rel, r.ev_action::text AS tree
    FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class
    WHERE v.relkind = 'v' AND r.ev_type = '1'
    UNION ALL
    SELECT p.polrelid, p.polqual::text
    FROM pg_policy p JOIN pg_class t ON t.oid = p.polrelid
    WHERE t.relrowsecurity AND p.polqual IS NOT NULL
) u
JOIN pg_class c ON c.oid = u.rel
CROSS JOIN LATERAL regexp_matches(u.tree, ':(?:funcid|aggfnoid|winfnoid|opfuncid) ([0-9]+)', 'g') m
JOIN pg_proc f ON f.oid = m[1]::oid
WHERE f.pronamespace = 'pg_catalog'::regnamespace AND f.proname ~ '{names}'
"""

#: What SQLite's schema says of foreign keys whose actions write the
#: referring table: (parent, dependent), as for PostgreSQL's catalog.  A
#: schema made by SQL (a migration) may declare actions the models do not.
SQLITE_DEPENDENTS = """
SELECT k."table", m.name
FROM {schema}.sqlite_master m JOIN pragma_foreign_key_list(m.name, {name}) k
WHERE m.type = 'table' AND m.sql NOT LIKE 'CREATE VIRTUAL %'
  AND (k.on_delete IN ('CASCADE', 'SET NULL', 'SET DEFAULT') OR k.on_update IN ('CASCADE', 'SET NULL', 'SET DEFAULT'))
"""

#: The dialects whose catalog is read.
_CATALOGED = frozenset({"postgresql", "sqlite"})

#: The enabled triggers (not those behind foreign keys) whose function is
#: of the database's own (outside ``pg_catalog`` and
#: ``information_schema``, not an extension's, as for
#: :data:`POSTGRESQL_ROUTINES`): the relation each is on, and its
#: function's language and source.  What the function writes, the
#: database writes because of a write to the relation (see
#: ``_trigger_writes()``).  And the enabled event triggers, with no
#: relation: what their function writes, a schema change writes (which
#: writes :data:`~.reads.ANY_TABLE`: a DDL audit log), and so does
#: ``REFRESH MATERIALIZED VIEW``, which fires them too (a write to the
#: view): with each materialized view as the relation.
POSTGRESQL_TRIGGERS = """
SELECT c.relname, l.lanname, coalesce(p.prosrc, '')
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid AND e.deptype = 'e')
UNION ALL
SELECT m.relname, l.lanname, coalesce(p.prosrc, '')
FROM pg_event_trigger t
CROSS JOIN (SELECT NULL::name UNION ALL SELECT relname FROM pg_class WHERE relkind = 'm') m (relname)
JOIN pg_proc p ON p.oid = t.evtfoid
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE t.evtenabled <> 'D' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid AND e.deptype = 'e')
"""

#: SQLite's views and virtual tables, with their SQL: its schema does not
#: say what a view reads (its SQL does, which is not read for tables here),
#: nor what a virtual table shows (an FTS5 table with ``content='doc'``
#: shows the rows of ``doc``; another module may read anything), so a
#: result that read one depends on every table, as SQL text does.  A view
#: whose SQL calls a function of :data:`~pyramid_sessioncache.engine.keys.EFFECT_FUNCTIONS`
#: (``last_insert_rowid()``: what its connection did) or reads a pragma
#: is never stored (see :func:`calls_effects`).
SQLITE_OPAQUE = (
    "SELECT name, type, coalesce(sql, '') FROM {schema}.sqlite_master"
    " WHERE type = 'view' OR (type = 'table' AND sql LIKE 'CREATE VIRTUAL %')"
)

#: SQLite's triggers: the table or view each is on, and its SQL.
SQLITE_TRIGGERS = "SELECT tbl_name, sql FROM {schema}.sqlite_master WHERE type = 'trigger'"

#: The databases a SQLite connection sees: ``main``, ``temp`` (its
#: temporary triggers and views, kept in ``temp.sqlite_master``) and those
#: attached; each query above is run on the schema of each.
SQLITE_DATABASES = "PRAGMA database_list"

#: Databases whose catalog is kept at most; past it, the oldest read is read again when needed.
_MAX_CATALOGS = 64


def closure(tables: Iterable[str], *edges: Mapping[str, Iterable[str]]) -> frozenset[str]:
    """Return ``tables`` and everything the ``edges`` (each: name -> dependents) reach from them."""
    found = set(tables)
    todo = list(found)
    while todo:
        table = todo.pop()
        for each in edges:
            for dependent in each.get(table, ()):
                if dependent not in found:
                    found.add(dependent)
                    todo.append(dependent)
    return frozenset(found)


def metadata_edges(metadatas: Iterable[Any]) -> dict[str, set[str]]:
    """Return parent -> dependents for the cascading foreign keys of the tables of ``metadatas``."""
    edges: dict[str, set[str]] = {}
    for metadata in metadatas:
        for table in list(metadata.tables.values()):
            for key in list(table.foreign_keys):
                actions = {(key.ondelete or "").upper(), (key.onupdate or "").upper()}
                if actions & _ACTIONS:
                    # The referred table by name: resolving key.column raises
                    # for a table that is not in the MetaData.
                    parent = reads.version_name(key.target_fullname.rpartition(".")[0])
                    edges.setdefault(parent, set()).add(reads.version_name(table))
    return edges


class Catalog:
    """What a PostgreSQL database's catalog says, in version names.

    ``edges``: a write to a relation changes these others.
    ``opaque``: relations that read tables the catalog cannot name,
    and those that show their rows (views over them, their parents);
    on SQLite, every view.
    ``routines``: what finds, in SQL, the name of a function or an
    operator of the database's own (:data:`POSTGRESQL_ROUTINES`), or None;
    ``setters`` and ``writers``: a call of one that changes a setting, or
    that writes (or of one that calls such a function; for ``writers``, a
    view over one named too); ``effects``: a call of one run for what it
    does (it calls ``nextval()``, ``currval()``, an advisory lock..., or
    locks rows), of PostgreSQL's own of :data:`POSTGRESQL_STATE_FUNCTIONS`,
    or a relation named whose reads no cache answers
    (:data:`POSTGRESQL_NEVER_CACHED`: a sequence, ``pg_cursors``).
    ``version``: on SQLite, each database of the connection it was read
    on, its file and its ``schema_version``, when it was read; or None.
    :meth:`calls` remembers what each pattern found in a SQL text.
    """

    def __init__(
        self,
        edges: dict[str, set[str]],
        opaque: frozenset[str],
        routines: re.Pattern[str] | None = None,
        setters: re.Pattern[str] | None = None,
        writers: re.Pattern[str] | None = None,
        effects: Any = None,  # a pattern, or several (_Either)
        version: tuple[tuple[str, str, int], ...] | None = None,
    ) -> None:
        self.version = version
        #: Whether it was read as committed now (not in a transaction's older snapshot): kept only then.
        self.current = True
        self.edges = edges
        self.opaque = opaque
        self.routines = routines
        self.setters = setters
        self.writers = writers
        self.effects = effects
        self._found: dict[tuple[str, str], bool] = {}

    def calls(self, pattern: str, sql: str) -> bool:
        """Whether ``pattern`` (``routines``, ``setters``, ``writers`` or ``effects``) finds a call in ``sql``.

        Remembered per SQL text, which repeats (SQLAlchemy compiles a
        statement once), for this catalog only: a schema changed is a new
        catalog.  Every statement of every engine asks, and with thousands
        of functions one search costs milliseconds.  Long texts (a batch of
        rows inserted in one statement) are searched every time, so that
        what is remembered stays small.
        """
        found = self._found.get((pattern, sql))
        if found is None:
            searched = getattr(self, pattern)
            if searched is None:
                return False
            found = searched.search(_COLUMN_LISTS.sub(" ", sql) if pattern == "writers" else sql) is not None
            if len(sql) <= _FOUND_TEXT:
                if len(self._found) >= _FOUND_SIZE:
                    self._found.clear()
                self._found[(pattern, sql)] = found
        return found


#: How many (pattern, SQL text) answers a catalog remembers, and for texts
#: of at most how many characters (see ``Catalog.calls()``): a few MB at most.
_FOUND_SIZE = 2000
_FOUND_TEXT = 2000

_NO_CATALOG = Catalog({}, frozenset())
#: How many times a catalog is read again when a migration committed while it was read.
_READS = 3


class _Schema:
    """The dependents known in this process: from ``MetaData``, and per PostgreSQL or SQLite database."""

    def __init__(self) -> None:
        #: (tables per MetaData, parent -> dependents, dependent -> parents) of the cascading foreign keys.
        self._mapped: tuple[tuple[int, ...], dict[str, set[str]], dict[str, set[str]]] = ((), {}, {})
        #: database identity (PostgreSQL), or it and the files a SQLite connection
        #: attached under each name -> its catalog, oldest read first.
        self._catalogs: dict[Any, Catalog] = {}
        #: MetaData of the tables compiled statements wrote or read (Core tables too).
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()
        #: How many times every catalog was forgotten: a SQLite connection's, held
        #: in its ``info`` with the count of when it was read, is read again too.
        self._forgotten = 0
        #: The catalogs SQLite connections hold, their own ones too, and the
        #: last ones read (their connections may be closed since: a pool
        #: disposed after a fork): what a declared write is closed over (see known_edges()).
        self._held: weakref.WeakSet[Catalog] = weakref.WeakSet()
        self._read_last: deque[Catalog] = deque(maxlen=_MAX_CATALOGS)

    def note(self, metadata: Any) -> None:
        self._seen.add(metadata)

    def mapped_edges(self) -> dict[str, set[str]]:
        return self._mapped_graph()[1]

    def cascading_into(self) -> dict[str, set[str]]:
        """Dependent -> the tables whose writes its cascading foreign keys carry into it."""
        return self._mapped_graph()[2]

    def _mapped_graph(self) -> tuple[tuple[int, ...], dict[str, set[str]], dict[str, set[str]]]:
        metadatas = list({id(m): m for m in [*_sqlalchemy.mapped_metadata(), *members(self._seen)]}.values())
        seen = tuple(len(metadata.tables) for metadata in metadatas)  # new tables mean new edges
        if seen != self._mapped[0]:
            edges = metadata_edges(metadatas)
            parents: dict[str, set[str]] = {}
            for parent, dependents in edges.items():
                for dependent in dependents:
                    parents.setdefault(dependent, set()).add(parent)
            self._mapped = (seen, edges, parents)
        return self._mapped

    def catalog(self, conn: Any) -> Catalog:
        if conn.dialect.name not in _CATALOGED:
            return _NO_CATALOG
        if conn.info.get(_CHANGING):
            # Its transaction changed the schema: what it reads of the catalog
            # is its own until it ends (others see the catalog as committed).
            own = conn.info.get(_OWN_CATALOG)
            if own is None:
                own = conn.info[_OWN_CATALOG] = self._read_catalog(conn)
            return own
        if conn.dialect.name == "sqlite":
            held = conn.info.get(_SQLITE_CATALOG)
            if held is None or held[0] != self._forgotten:
                self.read_if_changed(conn)
                held = conn.info[_SQLITE_CATALOG]
            return held[1]
        database = database_identity(conn)
        kept = self._catalogs.get(database)
        if kept is not None:
            return kept
        for _ in range(_READS):
            forgotten = self._forgotten
            found = self._read_catalog(conn)
            if self._forgotten != forgotten:
                continue  # a migration committed while it was read (forget() at its commit): again
            if found.current:  # what it read holds for every connection
                self._keep(database, found)
            break
        return found

    def read_if_changed(self, conn: Any) -> None:
        """Check the schema of SQLite's ``conn`` (``schema_version``), and read what changed.

        What a connection sees is its own: the databases it attached, and
        its temporary triggers and views (``temp``), which no other
        connection has.  A connection with no temporary objects shares the
        catalog of the others that attached the same files under the same
        names; one with them, or with a database in memory or in a
        temporary file (no file: ``ATTACH ':memory:'``, each connection's
        own), reads its own.
        """
        version = sqlite_schema_version(conn)
        held = conn.info.get(_SQLITE_CATALOG)
        if held is not None and held[0] == self._forgotten and held[1].version == version:
            return
        layout = (database_identity(conn), tuple((name, file) for name, file, _ in version))
        shared = all(file and name != "temp" for name, file, _ in version)
        found = self._catalogs.get(layout) if shared else None
        if found is None or found.version != version:
            found = _Schema._read_sqlite_catalog(conn, version)
            if shared:
                self._keep(layout, found)
        conn.info[_SQLITE_CATALOG] = (self._forgotten, found)
        if found not in self._held:
            self._held.add(found)
            self._read_last.append(found)

    def _keep(self, key: Any, catalog: Catalog) -> None:
        self._catalogs.pop(key, None)
        while len(self._catalogs) >= _MAX_CATALOGS:
            del self._catalogs[next(iter(self._catalogs))]
        self._catalogs[key] = catalog

    def known_edges(self) -> list[Mapping[str, Iterable[str]]]:
        # A catalog a connection holds alone (its temporary objects) counts too,
        # even once that connection is closed: its main database's triggers are
        # every connection's.
        known = [*list(self._catalogs.values()), *members(self._held), *list(self._read_last)]
        catalogs = {id(catalog): catalog for catalog in known}
        return [self.mapped_edges(), *(catalog.edges for catalog in catalogs.values())]

    def forget(self) -> None:
        self._catalogs.clear()
        self._forgotten += 1  # and those connections hold (SQLite's)

    @staticmethod
    def _read_catalog(conn: Any) -> Catalog:
        """Read the catalog of ``conn``'s database: as its own transaction sees it, if it changed the schema; else as committed now.

        On PostgreSQL, a query of the catalog in ``conn``'s transaction
        would read its snapshot: at ``REPEATABLE READ`` one older than a
        migration committed since, whose triggers fire all the same.  So it
        is read on a connection of its own, made for it (outside the pool,
        which may have none to spare) and closed.  If none can be made, it
        is read on ``conn`` and used for that once (``Catalog.current``).
        """
        if conn.dialect.name == "sqlite":
            return _Schema._read_sqlite_catalog(conn)
        if conn.info.get(_CHANGING):
            return _Schema._read_postgresql_catalog(conn, conn.connection.dbapi_connection)
        try:
            own = _sqlalchemy.raw_connect(conn.engine)
        except Exception:
            log.warning("could not connect to read the catalog of %r; read in the transaction", conn, exc_info=True)
            catalog = _Schema._read_postgresql_catalog(conn, conn.connection.dbapi_connection)
            catalog.current = False
            return catalog
        try:
            return _Schema._read_postgresql_catalog(conn, own)
        finally:
            own.close()

    @staticmethod
    def _read_postgresql_catalog(conn: Any, dbapi_connection: Any) -> Catalog:
        """Read the catalog of PostgreSQL's ``conn`` on ``dbapi_connection`` (its own, or one made for it)."""
        edges: dict[str, set[str]] = {}
        shows: dict[str, set[str]] = {}
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(POSTGRESQL_DEPENDENTS)
            for parent, dependent, shown in cursor.fetchall():
                parent, dependent = reads.version_name(parent), reads.version_name(dependent)
                edges.setdefault(parent, set()).add(dependent)
                if shown:
                    shows.setdefault(parent, set()).add(dependent)
            cursor.execute(POSTGRESQL_OPAQUE)
            opaque = closure((reads.version_name(name) for (name,) in cursor.fetchall()), shows)
            cursor.execute(POSTGRESQL_ROUTINES.format(source=_routine_source(conn)))
            rows = [_Routine(*row) for row in cursor.fetchall()]
            cursor.execute(POSTGRESQL_VIEW_ROUTINES)
            view_routines = cursor.fetchall()
            cursor.execute(POSTGRESQL_WRITE_ROUTINES)
            write_routines = cursor.fetchall()
            cursor.execute(POSTGRESQL_CASTS)
            casts = cursor.fetchall()
            cursor.execute(POSTGRESQL_TYPE_ROUTINES)
            type_routines = cursor.fetchall()
            cursor.execute(POSTGRESQL_COLUMN_TYPES)
            column_types = cursor.fetchall()
            cursor.execute(POSTGRESQL_TRIGGERS)
            triggers = cursor.fetchall()
            cursor.execute(POSTGRESQL_NEVER_CACHED.format(names=_NEVER_CACHED_CALLS))
            never_cached = cursor.fetchall()
        finally:
            cursor.close()
        # A view that runs a query given as a string (ts_stat()) reads any table.
        opaque |= closure(
            (reads.version_name(name) for name, called in never_cached if called in POSTGRESQL_QUERY_FUNCTIONS), shows
        )
        routines = _routines_pattern([row.called for row in rows])
        setters = _calling(rows, {row.called for row in rows if row.sets})
        # Those that call a function of keys.EFFECT_FUNCTIONS (nextval(), currval(), a lock), or
        # that lock rows, or read a relation no cache answers for: run for what they do.
        effects, never = _effects(
            rows,
            view_routines,
            shows,
            {name for name, called in never_cached if called not in POSTGRESQL_QUERY_FUNCTIONS},
        )
        # A statement that names the type calls the function: a domain's check, an explicit cast.
        named_types = type_routines + [(name, called) for name, explicit, called in casts if explicit]
        writers, views = _writers(rows, view_routines, shows, named_types)
        attributes = {row.name for row in rows if row.attribute}
        calls_writers = _routines_pattern(writers, called=True, views=views, attributes=attributes)
        writing = {name for name, operator in writers if not operator}
        if any(called in writing for _, explicit, called in casts if not explicit):
            # Applied where no statement names it (an INSERT of an integer into
            # a column of the type, a function's argument): every statement may.
            log.warning(
                "%r has an implicit or assignment cast whose function writes: every statement on it "
                "counts as a write to every table, and none of its reads is served from a shared region",
                database_identity(conn),
            )
            calls_writers = _EVERY_STATEMENT
        # A write to a table whose default, check, rule or policy calls one, or
        # that makes a value of a type whose check does: what it writes is not read here.
        writing_types = {name for name, called in type_routines if called in writing}
        calling = {table for table, called in write_routines if called in writing}
        calling |= {table for table, name in column_types if name in writing_types}
        for table in calling:
            edges.setdefault(reads.version_name(table), set()).add(reads.ALL_TABLES)
        for table, language, source in triggers:
            if language != "plpgsql" or (calls_writers is not None and calls_writers.search(source)):
                # C, another language, a call of a function that writes, a read of a view that calls one.
                written = frozenset({reads.ALL_TABLES})
            else:
                written = _trigger_writes(
                    _PLPGSQL_INTO.sub(lambda into: into.group(0) if into.group(1) else " ", source)
                )
            edges.setdefault(reads.ANY_TABLE if table is None else reads.version_name(table), set()).update(written)
        return Catalog(
            edges,
            opaque,
            routines,
            _routines_pattern(setters),
            calls_writers,
            _Either(_routines_pattern(effects, called=True, attributes=attributes), _STATE_CALLS, _Words(never)),
        )

    @staticmethod
    def _read_sqlite_catalog(conn: Any, version: tuple[tuple[str, str, int], ...] | None = None) -> Catalog:
        from .statements import trigger_tables  # it imports reads, which imports this module

        edges: dict[str, set[str]] = {}
        if version is None:
            version = sqlite_schema_version(conn)  # first: a change made while reading is seen next time
        cursor = conn.connection.dbapi_connection.cursor()
        view_sql: dict[str, str] = {}
        try:
            found: set[str] = set()
            for name, _ in _sqlite_databases(cursor):  # main, temp, attached: a write to any runs their triggers
                quoted = {"schema": _sqlite_name(name), "name": "'" + name.replace("'", "''") + "'"}
                cursor.execute(SQLITE_DEPENDENTS.format(**quoted))
                for parent, dependent in cursor.fetchall():
                    edges.setdefault(reads.version_name(parent), set()).add(reads.version_name(dependent))
                cursor.execute(SQLITE_TRIGGERS.format(**quoted))
                for table, sql in cursor.fetchall():
                    written = {reads.version_name(name) for name in trigger_tables(sql or "")}
                    edges.setdefault(reads.version_name(table), set()).update(written)
                cursor.execute(SQLITE_OPAQUE.format(**quoted))
                for relation, kind, sql in cursor.fetchall():
                    found.add(reads.version_name(relation))
                    if kind == "view":
                        view_sql[reads.version_name(relation)] = sql
            views = frozenset(found)
        finally:
            cursor.close()
        return Catalog(edges, views, effects=_sqlite_effect_views(view_sql), version=version)


def _routine_source(conn: Any) -> str:
    """The SQL that gives the source of the function ``p`` (``pg_proc``) on PostgreSQL's ``conn``.

    ``prosrc``; but a body in SQL's standard form (``BEGIN ATOMIC ...
    END``, ``RETURN ...``: PostgreSQL 14 and later) leaves it empty: that
    body as the server prints it.
    """
    if (conn.dialect.server_version_info or (0,)) >= (14,):
        return "CASE WHEN p.prosqlbody IS NULL THEN coalesce(p.prosrc, '') ELSE pg_get_function_sqlbody(p.oid) END"
    return "coalesce(p.prosrc, '')"


def _sqlite_effect_views(view_sql: Mapping[str, str]) -> re.Pattern[str] | None:
    """What finds, in SQL, the name of a SQLite view that must never be stored, or None.

    A view whose SQL calls a function of :data:`~pyramid_sessioncache.engine.keys.EFFECT_FUNCTIONS`
    (``last_insert_rowid()``, ``changes()``: what its connection did) or
    reads a pragma (:data:`_SQLITE_PRAGMA`), and a view whose SQL names
    such a view, at any depth (a name spelt like one, in a string, costs
    a query run, never a stale row).
    """
    found = {view for view, sql in view_sql.items() if EFFECT_SQL.search(sql) or _sqlite_reads_pragmas(sql)}
    while found:
        naming = _routines_pattern([], views=found)
        if naming is None:
            return None
        more = {view for view, sql in view_sql.items() if view not in found and naming.search(sql)}
        if not more:
            return naming
        found |= more
    return None


#: A pragma in SQLite's SQL, read with its strings and quoted names set
#: aside: a ``PRAGMA`` statement, or a pragma read as a table
#: (``FROM pragma_user_version``, ``pragma_table_info(...)``).  A column
#: named ``pragma`` or ``pragma_level`` is none.
_SQLITE_PRAGMA = re.compile(
    r"(?:^|;)\s*pragma\b|\b(?:from|join)\s+(?:[\w\"]+\s*\.\s*)?pragma_\w+|\bpragma_\w+\s*\(", re.I
)


@sqltext.per_text
def _sqlite_reads_pragmas(sql: str) -> bool:
    """Whether SQLite's ``sql`` reads (or sets) a pragma: see :func:`calls_effects`."""
    if "pragma" not in sql.lower():
        return False
    return any(_SQLITE_PRAGMA.search(reading.text) for reading in sqltext.readings(sql))


def _sqlite_calls_effects(conn: Any, sql: str) -> bool:
    """:func:`calls_effects` on SQLite: a pragma read, or a read of a view the catalog says never to store.

    A pragma's value is never stored: it may change by what publishes no
    write (``PRAGMA user_version = 7`` on another connection, a file's page
    count after any write, ``VACUUM``), and some are the connection's own
    (``data_version``, ``foreign_keys``), which another must not be served.
    Running one again costs little; telling which of some eighty pragmas
    persist in the file, and which are the connection's, would be a list to
    keep true with every SQLite release.  A setting pragma stays a
    connection setting (``connection_state.py``), not a write.
    """
    if _sqlite_reads_pragmas(sql):
        return True
    try:
        return _schema.catalog(conn).calls("effects", sql)
    except Exception:  # its schema cannot be read: store nothing
        log.debug("could not read the schema of %r; storing nothing", conn, exc_info=True)
        return True


def sqlite_schema_version(conn: Any) -> tuple[tuple[str, str, int], ...]:
    """SQLite's count of the changes made to the schema of each database ``conn`` sees, with its file.

    ``(name, file, schema_version)`` for ``main``, ``temp`` when the
    connection has one (its temporary objects) and each attached
    database: another process may change main's and the attached ones'.
    """
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        found = []
        for name, file in _sqlite_databases(cursor):
            cursor.execute(f"PRAGMA {_sqlite_name(name)}.schema_version")
            found.append((name, file, cursor.fetchone()[0]))
        return tuple(found)
    finally:
        cursor.close()


def _sqlite_databases(cursor: Any) -> list[tuple[str, str]]:
    """The databases a SQLite connection sees, main, temp and the attached ones: each one's name and file."""
    cursor.execute(SQLITE_DATABASES)
    return [(name, file) for _, name, file in cursor.fetchall()]


def _sqlite_name(name: str) -> str:
    """``name`` quoted as a SQLite identifier."""
    return '"' + name.replace('"', '""') + '"'


_schema = _Schema()


def read_catalog(conn: Any) -> None:
    """Read the catalog of ``conn``'s database now, unless it is known: a schema change is about to run."""
    _schema.catalog(conn)


def transaction_begins(conn: Any) -> None:
    """A transaction begins on ``conn``: on SQLite, read its schema now if it is not known or has changed.

    Another process may have changed it (a migration run as a command of
    its own): SQLite counts the changes (``schema_version``).  Read now,
    before the transaction takes any lock: read at a write, inside a
    transaction that wrote an attached database only, it would keep the
    main database's file locked until the transaction ends, and no other
    connection could commit there meanwhile.
    """
    if conn.dialect.name != "sqlite" or conn.info.get(_CHANGING):
        return
    try:
        _schema.read_if_changed(conn)
    except Exception:  # read when next needed, as before
        log.debug("could not read the schema of %r as its transaction began", conn, exc_info=True)


def also_written(conn: Any, tables: frozenset[str]) -> frozenset[str]:
    """Return ``tables`` written on ``conn`` and what the database changes because of them."""
    if reads.ALL_TABLES in tables:
        return tables
    found = closure(tables, _schema.mapped_edges())
    catalog = _schema.catalog(conn).edges
    if catalog:
        found = closure(found, catalog, _schema.mapped_edges())
    return frozenset({reads.ALL_TABLES}) if reads.ALL_TABLES in found else found


def committed_writes(conn: Any, tables: Iterable[str]) -> frozenset[str]:
    """Return ``tables``, just committed on ``conn``, and what the database changed because of them, as it is now.

    On SQLite the schema is read as a transaction begins (SQLAlchemy's
    begin), and SQLite's own transaction begins at the first write: a
    trigger another process created in between fired, unknown when the
    writes were marked.  Read once the commit has released every lock
    (read inside the transaction, ``schema_version`` took a shared lock
    on ``main`` that made the COMMIT of a write through an ATTACHed name
    of the same file fail); every table when it cannot be read.
    """
    tables = frozenset(tables)
    if not tables or conn.dialect.name != "sqlite" or reads.ALL_TABLES in tables:
        return tables
    try:
        _schema.read_if_changed(conn)
        return also_written(conn, tables)
    except Exception:
        log.warning(
            "could not read the schema of %r after a commit; counting a write to every table", conn, exc_info=True
        )
        return frozenset({reads.ALL_TABLES})


def also_changed(tables: frozenset[str], declared: Mapping[str, Iterable[str]]) -> frozenset[str]:
    """Return ``tables`` and what they change, by ``declared`` dependencies and every schema known.

    For :meth:`~pyramid_sessioncache.SessionCache.publish`: a table a
    trigger writes (declared) has cascades and views of its own, and a
    declared table may be reached through a cascade.  The catalogs of
    every database the process has read count: version names are shared
    between databases, so a dependency of one costs the others misses,
    never stale data.
    """
    if reads.ALL_TABLES in tables:
        return tables
    return closure(tables, declared, *_schema.known_edges())


def cascading_into(tables: frozenset[str]) -> frozenset[str]:
    """Return ``tables`` and those whose writes the cascading foreign keys of the ``MetaData`` known carry into them."""
    return closure(tables, _schema.cascading_into())


def depends_on(conn: Any, tables: frozenset[str]) -> frozenset[str]:
    """Return what a result that read ``tables`` on ``conn`` depends on.

    ``tables``, the tables whose writes a cascading foreign key of the
    ``MetaData`` known here carries into them (transitively), and
    :data:`~.reads.ANY_TABLE` when one of them reads tables the catalog
    cannot name (a view calling a function of the database's own, a table
    whose row-level security policy does, a view on SQLite): every
    committed write bumps it, as for SQL text.  The process that writes
    the parent may not know the foreign key (a script that maps the parent
    alone, while the database's schema does not declare it): the reader,
    which read the referring table, does.
    """
    tables = cascading_into(tables)
    if conn.dialect.name == "sqlite" and not conn.info.get(_CHANGING):
        # A view another process created since the transaction began (as it
        # began, the schema was read) is one too.
        try:
            _schema.read_if_changed(conn)
        except Exception:
            log.debug("could not read the schema of %r; depending on every table", conn, exc_info=True)
            return tables | {reads.ANY_TABLE}
    opaque = _schema.catalog(conn).opaque
    if opaque and not opaque.isdisjoint(tables):
        return tables | {reads.ANY_TABLE}
    return tables


#: What a routine's source may write by: DML (in SQL run from a string too), a procedure called,
#: a schema change (a partition dropped or detached takes its rows from its parent; a policy, a grant).
_WRITES = re.compile(
    r"\b(?:insert|update|delete|merge|truncate|copy|call|refresh|create|alter|drop|grant|revoke)\b", re.I
)
#: A temporary relation made (and dropped at commit), which shows on its connection
#: alone (its connection is keyed apart: see :data:`POSTGRESQL_ROUTINES`).
_TEMPORARY = re.compile(r"\bcreate\s+(?:(?:local|global)\s+)?temp(?:orary)?\b|\bon\s+commit\s+drop\b", re.I)
#: SQL run from a string that does not start as a ``SELECT`` written out
#: (``EXECUTE q``, ``EXECUTE format('%s', q)``): what it writes is the
#: caller's to say.  ``EXECUTE format('SELECT count(*) FROM %I', t)`` is a
#: dynamic read, which must not make every call write every table.
_DYNAMIC = re.compile(r"\bexecute\b(?!\s*\(*\s*(?:format\s*\(\s*)?(?:E?'|\$\w*\$)\s*\(*\s*select\b)", re.I)
#: A locking read, which writes nothing.
_LOCKS = re.compile(r"\bfor\s+(?:no\s+key\s+)?update\b", re.I)


#: PL/pgSQL's ``SELECT ... INTO`` (``RETURNING ... INTO``, ``FETCH ... INTO``)
#: sets variables, where SQL's creates a table: only ``INSERT INTO`` and
#: ``MERGE INTO`` write.
_PLPGSQL_INTO = re.compile(r"\b(?:(insert|merge)\s+)?into\b", re.I)


def _trigger_writes(source: str) -> frozenset[str]:
    """The tables a trigger function's source (PL/pgSQL) writes, by its DML.

    :data:`~.reads.ALL_TABLES` when it may write tables it does not name
    (``EXECUTE`` of a string, a procedure called, a write word not read).
    """
    from .statements import fragment_tables  # it imports reads, which imports this module

    return frozenset(reads.version_name(name) for name in fragment_tables(source))


def _writes(source: str) -> bool:
    """Whether a routine's ``source`` may write."""
    return (
        _WRITES.search(_TEMPORARY.sub(" ", _LOCKS.sub(" ", source))) is not None or _DYNAMIC.search(source) is not None
    )


class _Routine(NamedTuple):
    """A row of :data:`POSTGRESQL_ROUTINES`."""

    name: str
    operator: bool
    #: Whether its source changes a setting.
    sets: bool
    source: str
    #: Whether it can be called in attribute notation (``person.f``).
    attribute: bool

    @property
    def called(self) -> tuple[str, bool]:
        """How a statement calls it: by its name, or by its symbols."""
        return self.name, self.operator


def _calling(rows: list[_Routine], found: set[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The routines ``found`` among ``rows``, and those that call one of them (at any depth)."""
    found = set(found)
    more = found
    while True:
        # Only those found last are looked for: a source calling one found
        # before was found then (looking for every one found, a chain of
        # routines calling each other cost its length times the catalog).
        # An operator by its symbols: ``a ### b`` calls its function.
        calls = _routines_pattern(list(more))
        if calls is None:
            return sorted(found)
        more = {row.called for row in rows if row.called not in found and calls.search(row.source)}
        if not more:
            return sorted(found)
        found |= more


def _writers(
    rows: list[_Routine],
    view_routines: list[tuple[str, str]],
    shows: Mapping[str, Iterable[str]],
    types: Sequence[tuple[str, str]] = (),
) -> tuple[list[tuple[str, bool]], frozenset[str]]:
    """The routines among ``rows`` that write, and the names that call one: relations whose read writes, types.

    A view over a function that writes writes when it is read (a table whose
    policy calls one too: ``view_routines``), and so does a view over such
    a view; so does a value made of a type (a cast to it, an argument of
    it) whose check or cast function writes (``types``: each type's name and
    function's); a routine that reads such a view or makes such a value
    writes too, and so does one that calls such a routine, at any depth.
    """
    found = {row.called for row in rows if _writes(row.source)}
    while True:
        writers = _calling(rows, found)
        writing = {name for name, operator in writers if not operator}
        views = closure((reads.version_name(view) for view, called in view_routines if called in writing), shows)
        views |= {reads.version_name(name) for name, called in types if called in writing}
        reading = _routines_pattern([], views=views)
        more = {row.called for row in rows if reading is not None and reading.search(row.source)}
        if more <= set(writers):
            return writers, views
        found = set(writers) | more


def _effects(
    rows: list[_Routine],
    view_routines: list[tuple[str, str]],
    shows: Mapping[str, Iterable[str]],
    relations: Iterable[str],
) -> tuple[list[tuple[str, bool]], frozenset[str]]:
    """The routines among ``rows`` run for their effect, and the relations a read of which is one (version names).

    A routine whose source calls a function of
    :data:`~pyramid_sessioncache.engine.keys.EFFECT_FUNCTIONS` or of
    :data:`POSTGRESQL_STATE_FUNCTIONS`, or locks rows (``FOR UPDATE``: a
    read must take its locks every time), or reads one of ``relations``
    (found by :data:`POSTGRESQL_NEVER_CACHED`); a view over such a routine
    (or a table whose policy calls one: ``view_routines``), and what shows
    its rows (a view over it: ``shows``); a routine that calls or reads
    one of those, at any depth.
    """
    found = {
        row.called
        for row in rows
        if EFFECT_SQL.search(row.source) or LOCKING_SQL.search(row.source) or _STATE_CALLS.search(row.source)
    }
    never = frozenset(reads.version_name(name) for name in relations)
    while True:
        effects = _calling(rows, found)
        calling = {name for name, operator in effects if not operator}
        never = closure(
            never | {reads.version_name(view) for view, called in view_routines if called in calling}, shows
        )
        reading = _Words(never)
        more = {row.called for row in rows if reading.search(row.source)}
        if more <= set(effects):
            return effects, never
        found = set(effects) | more


class _Words:
    """Finds, in SQL text, one of ``names`` (relations, in version names) as a word, in any case.

    By a set of names rather than one pattern: a database has a sequence
    per serial column, and a pattern of thousands of names costs each
    search milliseconds.  A name that is no plain word (a quoted ``"a b"``)
    is found by a pattern.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(name.lower() for name in names)
        odd = sorted((name for name in self.names if not _WORD.fullmatch(name)), key=len, reverse=True)
        self.odd = re.compile("|".join(rf"(?<![\w$]){re.escape(name)}(?![\w$])" for name in odd), re.I) if odd else None

    def search(self, text: str) -> Any:
        if self.names:
            for word in _WORD.findall(text):
                if word.lower() in self.names:
                    return word
        return None if self.odd is None else self.odd.search(text)


#: A word of SQL text, as a name is spelt unquoted (or quoted, without its quotes).
_WORD = re.compile(r"[^\W\d][\w$]*")


class _Either:
    """Finds in a text what any of ``searchers`` (each with a ``search()``, or None) finds."""

    def __init__(self, *searchers: Any) -> None:
        self.searchers = [searcher for searcher in searchers if searcher is not None]

    def search(self, text: str) -> Any:
        for searcher in self.searchers:
            found = searcher.search(text)
            if found:
                return found
        return None


#: What :data:`POSTGRESQL_NEVER_CACHED` looks for among the functions a view calls.
_NEVER_CACHED_CALLS = (
    "^(?:"
    + _function_names(EFFECT_FUNCTIONS | POSTGRESQL_STATE_FUNCTIONS | POSTGRESQL_QUERY_FUNCTIONS, _STATE_PREFIXES)
    + ")$"
)
#: A call of a function of :data:`POSTGRESQL_STATE_FUNCTIONS` in SQL text, its name quoted or not.
_STATE_CALLS = re.compile(
    r'(?<![\w$])"?(?:' + _function_names(POSTGRESQL_STATE_FUNCTIONS, _STATE_PREFIXES) + r')"?\s*\(', re.I
)


def _routines_pattern(
    rows: list[tuple[str, bool]], called: bool = False, views: Iterable[str] = (), attributes: Iterable[str] = ()
) -> re.Pattern[str] | None:
    # A function by its name as a word (any case: unquoted names fold), an
    # operator by its symbols; the longest first.  ``called``: a function
    # only by its name before "(", quoted or not (a column spelt like it
    # calls nothing), or, if it is one of ``attributes``, after "." (``p.f``,
    # ``(p)."f"``: attribute notation).  ``views``: relations found by their name as a word.
    names = sorted({name for name, operator in rows if not operator}, key=len, reverse=True)
    operators = sorted({name for name, operator in rows if operator}, key=len, reverse=True)
    end = r'"?\s*\(' if called else r"(?![\w$])"
    parts = [rf"(?<![\w$]){re.escape(name)}{end}" for name in names] + [re.escape(op) for op in operators]
    if called:
        attributes = set(attributes)
        parts += [rf'\.\s*"?{re.escape(name)}"?(?![\w$])' for name in names if name in attributes]
    parts += [rf"(?<![\w$]){re.escape(view)}(?![\w$])" for view in sorted(views, key=len, reverse=True)]
    return re.compile("|".join(parts), re.I) if parts else None


def calls_routines(conn: Any, sql: str) -> bool:
    """Whether ``sql``, run on ``conn``, may call a function or an operator of the database's own.

    Such a result depends on every table (:data:`~.reads.ANY_TABLE`): the
    catalog records what a function's body reads no more than SQL text
    does.  Only PostgreSQL's catalog is read; a name merely spelt like one
    (a column, a string) costs misses, never stale rows.
    """
    if conn.dialect.name != "postgresql":
        return False
    return _schema.catalog(conn).calls("routines", sql)


def calls_writers(conn: Any, sql: str) -> bool:
    """Whether ``sql``, run on ``conn``, may call a function of the database's own that writes.

    What its body writes is not read here (SQL run from a string, a
    procedure): such a statement, a SELECT or DML, writes every table.  An
    INSERT's column list is no call: ``INSERT INTO audit (note)`` calls no
    function ``audit()``.  A read of a view whose query calls one (an
    audit-on-read view) calls it too.
    """
    if conn.dialect.name != "postgresql":
        return False
    # SQL that calls nothing may still read a view over a writer (or make a
    # value of a type whose check writes): the catalog is read for it too,
    # once per database and schema change (a migration makes every catalog
    # be read again: the first statement after it may be such a read).
    return _schema.catalog(conn).calls("writers", sql)


#: What every statement matches: a cast applied where no statement names it calls a function that writes.
_EVERY_STATEMENT = re.compile("")

#: The table an INSERT names, before its column list.
_COLUMN_LISTS = re.compile(r'\binto\s+[\w$."]+\s*\(', re.I)


def calls_effects(conn: Any, sql: str) -> bool:
    """Whether ``sql``, run on ``conn``, may do what a hit would not, or read what no write publishes.

    Call a function of the database's own that calls a function of
    :data:`~pyramid_sessioncache.engine.keys.EFFECT_FUNCTIONS` (``nextval()``,
    ``currval()``, an advisory lock), which a statement naming them runs
    uncached for, or that locks rows; call one of PostgreSQL's own of
    :data:`POSTGRESQL_STATE_FUNCTIONS` (``pg_cursor()``); or read a
    relation of :data:`POSTGRESQL_NEVER_CACHED` (a sequence, a view over
    ``nextval()`` or ``pg_backend_pid()``, ``pg_cursors``, a view defined
    ``FOR UPDATE``), by its name as a word.  Such a statement writes
    nothing, but its result is stored nowhere either.  On SQLite, a read
    of a view whose SQL calls one (``last_insert_rowid()``), and any pragma
    read (see ``_sqlite_calls_effects()``).
    """
    if conn.dialect.name == "sqlite":
        return _sqlite_calls_effects(conn, sql)
    if conn.dialect.name != "postgresql":
        return False
    return _schema.catalog(conn).calls("effects", sql)


def calls_setters(conn: Any, sql: str) -> bool:
    """Whether ``sql``, run on ``conn``, may call a function of the database's own that changes a setting."""
    if conn.dialect.name != "postgresql":
        return False
    return _schema.catalog(conn).calls("setters", sql)


def note(table: Any) -> None:
    """Know the foreign keys of the ``MetaData`` of ``table``, a table written or read (mapped or not)."""
    metadata = getattr(table, "metadata", None)
    if metadata is not None:
        _schema.note(metadata)


#: ``Connection.info`` keys: the connection's open transaction changed the
#: schema, and the catalog as that transaction sees it.
_CHANGING = "sessioncache.schema_changing"
_OWN_CATALOG = "sessioncache.own_catalog"
#: ``Connection.info`` key (kept with the DBAPI connection): the catalog of a
#: SQLite connection as last checked, and ``_Schema._forgotten`` then.
_SQLITE_CATALOG = "sessioncache.sqlite_catalog"


def schema_changed(conn: Any, in_transaction: bool) -> None:
    """DDL ran on ``conn``: every catalog is read again; ``conn``'s own until its transaction ends.

    Read inside a transaction that changed the schema, the catalog shows
    what is not committed, and may never be (a migration rolled back): it
    is not kept for the connections of others.
    """
    _schema.forget()
    conn.info.pop(_OWN_CATALOG, None)
    if in_transaction and conn.dialect.name in _CATALOGED:
        conn.info[_CHANGING] = True


def schema_settled(conn_info: dict, ended: bool) -> None:
    """A transaction (``ended``) or a savepoint of a connection that changed the schema committed or rolled back."""
    if conn_info.get(_CHANGING):
        conn_info.pop(_OWN_CATALOG, None)
        if ended:
            del conn_info[_CHANGING]
            _schema.forget()  # committed: read as others see it now


def forget_catalog(engine: Any = None) -> None:
    """Read the catalogs again when next needed (after a migration, say).

    Every database's, whatever ``engine`` (kept for callers that name
    the engine that ran the DDL): the engine that ran it may name its
    database otherwise than the engines that read it (another user), and
    DDL is rare enough that reading a catalog again costs nothing that
    matters.
    """
    _schema.forget()
