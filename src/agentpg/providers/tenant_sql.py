"""SQL installed into every tenant database: the machinery that keeps grants the boundary.

Runs as the provider's admin (a superuser) inside the new database. Everything lives in schema
``agentpg_internal``, which no tenant role can use. Two pieces:

* ``agentpg_internal.agent_grants`` records, per agent role, what it may do; the control plane changes it
  only through ``agentpg_internal.set_agent_grants(...)``, which also re-grants every existing object.
* the event trigger ``agentpg_adopt`` runs after every CREATE in schema ``public``: it hands the new object to
  the NOLOGIN owner role and grants it to every agent whose permissions allow it. That is how a table agent
  A creates is at once usable by agent B (the design's "customers" example), while nobody but the owner
  role owns anything.

The function bodies are static text: names and values reach them as bound parameters or from the config
table, never by formatting.
"""

from __future__ import annotations

#: The attributes every tenant role is (re)created with: none of the powers that would cross a tenant boundary.
ROLE_ATTRIBUTES = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS NOREPLICATION INHERIT"

BOOTSTRAP = r"""
CREATE SCHEMA IF NOT EXISTS agentpg_internal;
REVOKE ALL ON SCHEMA agentpg_internal FROM PUBLIC;

CREATE TABLE IF NOT EXISTS agentpg_internal.config (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- Transactions in which adopt_new_objects is changing objects itself: the DDL it runs fires the event
-- trigger again, and those nested runs must not refuse the half-adopted state. No tenant role can write here.
CREATE UNLOGGED TABLE IF NOT EXISTS agentpg_internal.adopting (xid xid8 PRIMARY KEY);

CREATE TABLE IF NOT EXISTS agentpg_internal.agent_grants (
    role_name name PRIMARY KEY,
    can_read boolean NOT NULL,
    can_write boolean NOT NULL,
    can_create boolean NOT NULL,
    can_drop boolean NOT NULL,
    allowed_tables text[]
);

-- True while the database is read-only (its user is over budget): nobody but the admin may write.
CREATE OR REPLACE FUNCTION agentpg_internal.read_only() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce((SELECT value = 'on' FROM agentpg_internal.config WHERE key = 'read_only'), false);
$fn$;

-- Grants on one relation for one agent, from its row in agent_grants.
CREATE OR REPLACE FUNCTION agentpg_internal.grant_relation(rel regclass, g agentpg_internal.agent_grants)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    kind "char";
    relname name;
BEGIN
    IF agentpg_internal.read_only() THEN
        g.can_write := false;
    END IF;
    SELECT c.relkind, c.relname INTO kind, relname FROM pg_class c WHERE c.oid = rel;
    IF kind = 'S' THEN  -- a serial/identity column's sequence is allowed with its table
        relname := coalesce((SELECT t.relname FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid
                             WHERE d.classid = 'pg_class'::regclass AND d.objid = rel
                               AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                             LIMIT 1), relname);
    END IF;
    EXECUTE format('REVOKE ALL ON %s FROM %I', rel, g.role_name);
    IF g.allowed_tables IS NOT NULL AND NOT (relname = ANY (g.allowed_tables)) THEN
        RETURN;
    END IF;
    IF kind = 'S' THEN
        IF g.can_write THEN
            EXECUTE format('GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO %I', rel, g.role_name);
        ELSIF g.can_read THEN
            EXECUTE format('GRANT SELECT ON SEQUENCE %s TO %I', rel, g.role_name);
        END IF;
        RETURN;
    END IF;
    IF g.can_read THEN
        EXECUTE format('GRANT SELECT ON %s TO %I', rel, g.role_name);
    END IF;
    IF g.can_write AND kind IN ('r', 'p', 'v', 'f') THEN
        EXECUTE format('GRANT INSERT, UPDATE, DELETE ON %s TO %I', rel, g.role_name);
        -- No TRIGGER: a trigger one agent attaches would run its code with the rights of every other agent
        -- that writes to the table.
        IF kind IN ('r', 'p') THEN
            EXECUTE format('GRANT TRUNCATE, REFERENCES ON %s TO %I', rel, g.role_name);
        END IF;
    END IF;
END
$fn$;

-- Make one agent's rights exactly these, on the schema and on every existing relation.
CREATE OR REPLACE FUNCTION agentpg_internal.set_agent_grants(
    p_role name, p_read boolean, p_write boolean, p_create boolean, p_drop boolean, p_tables text[])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    g agentpg_internal.agent_grants;
    owner_role name := (SELECT value FROM agentpg_internal.config WHERE key = 'owner_role');
    rel regclass;
BEGIN
    INSERT INTO agentpg_internal.agent_grants AS a VALUES (p_role, p_read, p_write, p_create, p_drop, p_tables)
    ON CONFLICT (role_name) DO UPDATE
        SET can_read = p_read, can_write = p_write, can_create = p_create, can_drop = p_drop,
            allowed_tables = p_tables
    RETURNING * INTO g;
    PERFORM agentpg_internal.lock_down_shared();  -- agents are granted into the shared database only
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), p_role);
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', p_role);
    IF agentpg_internal.read_only() THEN  -- over budget: the row keeps the wishes, the grants say no
        p_create := false;
        p_drop := false;
    END IF;
    IF p_create THEN
        EXECUTE format('GRANT CREATE ON SCHEMA public TO %I', p_role);
    ELSE
        EXECUTE format('REVOKE CREATE ON SCHEMA public FROM %I', p_role);
    END IF;
    -- Only an owner may DROP or ALTER in Postgres, so the right to drop is membership in the owner role.
    IF p_drop AND current_setting('server_version_num')::int >= 160000 THEN
        -- Inherit the owner's rights, but never SET ROLE to it.
        EXECUTE format('GRANT %I TO %I WITH INHERIT TRUE, SET FALSE', owner_role, p_role);
    ELSIF p_drop THEN
        EXECUTE format('GRANT %I TO %I', owner_role, p_role);
    ELSE
        EXECUTE format('REVOKE %I FROM %I', owner_role, p_role);
    END IF;
    FOR rel IN
        SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    LOOP
        PERFORM agentpg_internal.grant_relation(rel, g);
    END LOOP;
END
$fn$;

-- Turn writes off (or back on) for every role of this database, at the grant level.
-- Full-rights roles (the login role, agents allowed to drop) hold their rights through membership in the
-- owner role, which no grant can narrow; while read-only they lose that membership and get SELECT only.
CREATE OR REPLACE FUNCTION agentpg_internal.set_read_only(p_on boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    owner_role name := (SELECT value FROM agentpg_internal.config WHERE key = 'owner_role');
    login_role name := (SELECT value FROM agentpg_internal.config WHERE key = 'login_role');
    g agentpg_internal.agent_grants;
    member name;
BEGIN
    INSERT INTO agentpg_internal.config VALUES ('read_only', CASE WHEN p_on THEN 'on' ELSE 'off' END)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
    IF p_on THEN
        FOR member IN
            SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member
            WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = owner_role)
              AND m.member <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
        LOOP
            EXECUTE format('REVOKE %I FROM %I', owner_role, member);
        END LOOP;
        IF login_role IS NOT NULL THEN
            INSERT INTO agentpg_internal.agent_grants VALUES (login_role, true, false, false, true, NULL)
            ON CONFLICT (role_name) DO NOTHING;
        END IF;
    END IF;
    FOR g IN SELECT * FROM agentpg_internal.agent_grants LOOP
        PERFORM agentpg_internal.set_agent_grants(g.role_name, g.can_read, g.can_write, g.can_create,
                                                  g.can_drop, g.allowed_tables);
    END LOOP;
    IF NOT p_on AND login_role IS NOT NULL THEN
        -- Back to normal: the login role is a full member again, not an agent.
        DELETE FROM agentpg_internal.agent_grants WHERE role_name = login_role;
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', login_role);
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM %I', login_role);
        EXECUTE format('GRANT %I TO %I', owner_role, login_role);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION agentpg_internal.forget_agent(p_role name)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $fn$
    DELETE FROM agentpg_internal.agent_grants WHERE role_name = p_role;
$fn$;

-- After any DDL: give new objects in public to the owner role and grant them to the agents.
CREATE OR REPLACE FUNCTION agentpg_internal.adopt_new_objects()
RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    obj record;
    other record;
    kind text;
    ident text;
    g agentpg_internal.agent_grants;
    owner_role name := (SELECT value FROM agentpg_internal.config WHERE key = 'owner_role');
    owner_oid oid;
BEGIN
    SELECT oid INTO owner_oid FROM pg_roles WHERE rolname = owner_role;
    IF owner_oid IS NULL THEN
        RETURN;
    END IF;
    -- The lock every grant change in this database holds (providers/base.py GRANTS_LOCK_KEY): a table created
    -- while an agent's permissions change gets the new permissions, not the old ones.
    PERFORM pg_advisory_xact_lock(7018706570400915822);
    IF EXISTS (SELECT 1 FROM agentpg_internal.adopting WHERE xid = pg_current_xact_id()) THEN
        RETURN;  -- fired by our own ALTERs below
    END IF;
    INSERT INTO agentpg_internal.adopting VALUES (pg_current_xact_id());
    FOR obj IN
        SELECT * FROM pg_event_trigger_ddl_commands()
        -- An extension's objects stay its installer's (agentpg's admin): they are trusted code, which the
        -- owner role (and so an agent allowed to drop) must not be able to replace.
        WHERE schema_name = 'public' AND NOT in_extension AND command_tag IN (
            'CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'CREATE VIEW', 'CREATE MATERIALIZED VIEW',
            'CREATE SEQUENCE', 'CREATE FOREIGN TABLE', 'CREATE FUNCTION', 'CREATE PROCEDURE',
            'CREATE AGGREGATE', 'CREATE TYPE', 'CREATE DOMAIN')
    LOOP
        IF obj.classid = 'pg_class'::regclass THEN
            -- A sequence owned by a column moves with its table; changing it alone is an error. (Only a
            -- sequence: a partition depends on its parent the same way, and must be adopted too.)
            CONTINUE WHEN (SELECT relkind FROM pg_class WHERE oid = obj.objid) = 'S' AND EXISTS (
                SELECT 1 FROM pg_depend d
                WHERE d.classid = 'pg_class'::regclass AND d.objid = obj.objid
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'));
            CONTINUE WHEN (SELECT relkind FROM pg_class WHERE oid = obj.objid) NOT IN ('r','p','v','m','f','S');
            -- A view owned by the owner role would otherwise read its tables with the owner's rights: any
            -- agent could read or write a table it may not touch through a view it created.
            IF (SELECT relkind FROM pg_class WHERE oid = obj.objid) = 'v'
               AND current_setting('server_version_num')::int >= 150000 THEN
                EXECUTE format('ALTER VIEW %s SET (security_invoker = true)', obj.objid::regclass);
            END IF;
            -- In the shared database a view is the author's code run by its readers. nextval() is the one
            -- side effect left to it there (setval and the other channels are revoked; defaults need
            -- nextval): a reader who may see a secret would advance the author's sequence by it.
            IF (SELECT relkind FROM pg_class WHERE oid = obj.objid) = 'v'
               AND coalesce((SELECT value FROM agentpg_internal.config WHERE key = 'shared'), 'off') = 'on'
               AND EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = obj.objid
                             AND r.ev_action::text ~ (
                                 ':funcid (' || 'pg_catalog.nextval(regclass)'::regprocedure::oid
                                 || '|' || 'pg_catalog.setval(regclass,bigint)'::regprocedure::oid
                                 || '|' || 'pg_catalog.setval(regclass,bigint,boolean)'::regprocedure::oid
                                 || ')[^0-9]')) THEN
                RAISE EXCEPTION 'a view in the shared global database cannot call nextval() or setval()'
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'Its readers would change your sequence as they read; select currval() or '
                                 'the column instead.';
            END IF;
            IF (SELECT relowner FROM pg_class WHERE oid = obj.objid) <> owner_oid THEN
                EXECUTE format('ALTER TABLE %s OWNER TO %I', obj.objid::regclass, owner_role);
            END IF;
            FOR g IN SELECT * FROM agentpg_internal.agent_grants LOOP
                PERFORM agentpg_internal.grant_relation(obj.objid::regclass, g);
            END LOOP;
            -- Sequences behind serial/identity columns: writers need them for their defaults.
            FOR g IN SELECT * FROM agentpg_internal.agent_grants LOOP
                PERFORM agentpg_internal.grant_relation(d.objid::regclass, g)
                FROM pg_depend d
                WHERE d.refobjid = obj.objid AND d.classid = 'pg_class'::regclass
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                  -- An index on an expression (an EXCLUDE constraint's too) depends on its table the same way.
                  AND (SELECT relkind FROM pg_class WHERE oid = d.objid) = 'S';
            END LOOP;
        ELSIF obj.classid = 'pg_proc'::regclass THEN
            -- Handed to the owner role, a SECURITY DEFINER routine would run with the owner's rights.
            IF (SELECT prosecdef FROM pg_proc WHERE oid = obj.objid) THEN
                RAISE EXCEPTION 'SECURITY DEFINER functions and procedures are not allowed here'
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'Create it without SECURITY DEFINER (SECURITY INVOKER is the default).';
            END IF;
            IF (SELECT proowner FROM pg_proc WHERE oid = obj.objid) <> owner_oid THEN
                EXECUTE format('ALTER ROUTINE %s OWNER TO %I', obj.objid::regprocedure, owner_role);
            END IF;
        ELSIF obj.classid = 'pg_type'::regclass THEN
            IF (SELECT typowner FROM pg_type WHERE oid = obj.objid) <> owner_oid THEN
                EXECUTE format('ALTER TYPE %s OWNER TO %I', obj.objid::regtype, owner_role);
            END IF;
        END IF;
    END LOOP;
    -- Every other object with an owner goes to the owner role too, including what a command makes on the
    -- side (an operator class's family, a commutator's shell operator). Left to its author, an agent's role
    -- would own something that DROP OWNED (its workspace's deletion) drops, taking with it what depends on
    -- it (a table's generated column), or fails on; and as its owner it could write to the catalog
    -- (COMMENT) while the database is read-only.
    FOR other IN
        SELECT o.cls, o.oid FROM (
            SELECT 'pg_ts_config'::regclass, oid, cfgowner FROM pg_ts_config
            WHERE cfgnamespace = 'public'::regnamespace
            UNION ALL SELECT 'pg_ts_dict'::regclass, oid, dictowner FROM pg_ts_dict
            WHERE dictnamespace = 'public'::regnamespace
            UNION ALL SELECT 'pg_collation'::regclass, oid, collowner FROM pg_collation
            WHERE collnamespace = 'public'::regnamespace
            UNION ALL SELECT 'pg_statistic_ext'::regclass, oid, stxowner FROM pg_statistic_ext
            WHERE stxnamespace = 'public'::regnamespace
            UNION ALL SELECT 'pg_operator'::regclass, oid, oprowner FROM pg_operator
            WHERE oprnamespace = 'public'::regnamespace
            UNION ALL SELECT 'pg_opclass'::regclass, oid, opcowner FROM pg_opclass
            WHERE opcnamespace = 'public'::regnamespace
            UNION ALL SELECT 'pg_opfamily'::regclass, oid, opfowner FROM pg_opfamily
            WHERE opfnamespace = 'public'::regnamespace
            UNION ALL SELECT 'pg_conversion'::regclass, oid, conowner FROM pg_conversion
            WHERE connamespace = 'public'::regnamespace) o(cls, oid, owner)
        WHERE o.owner <> owner_oid
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = o.cls AND d.objid = o.oid AND d.deptype = 'e')
    LOOP
        SELECT i.type, i.identity INTO kind, ident FROM pg_identify_object(other.cls, other.oid, 0) i;
        EXECUTE format('ALTER %s %s OWNER TO %I',
                       CASE kind WHEN 'statistics object' THEN 'STATISTICS' ELSE upper(kind) END, ident, owner_role);
    END LOOP;
    DELETE FROM agentpg_internal.adopting WHERE xid = pg_current_xact_id();
    -- Everything in public belongs to the owner role: a co-owner (an agent allowed to drop) could otherwise
    -- take a table for itself (ALTER ... OWNER TO CURRENT_USER), hand it out, and drop it with its role.
    IF session_user IN (SELECT role_name FROM agentpg_internal.agent_grants)
       OR session_user IN (SELECT value FROM agentpg_internal.config WHERE key IN ('owner_role', 'login_role'))
    THEN
        IF (SELECT nspowner FROM pg_namespace WHERE nspname = 'public') <> owner_oid
           OR EXISTS (SELECT 1 FROM pg_class c
                      WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r','p','v','m','f','S')
                        AND c.relowner <> owner_oid
                        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                          AND d.objid = c.oid AND d.deptype = 'e'))
           OR EXISTS (SELECT 1 FROM pg_type t
                      WHERE t.typnamespace = 'public'::regnamespace AND t.typowner <> owner_oid
                        AND t.typtype IN ('c', 'd', 'e', 'r', 'm') AND t.typrelid = 0
                        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                                          AND d.objid = t.oid AND d.deptype = 'e'))
        THEN
            RAISE EXCEPTION 'objects here belong to the database''s owner role; their ownership cannot change'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Object ownership is managed by agentpg.';
        END IF;
    END IF;
    -- ALTER VIEW ... SET (security_invoker = false) or RESET, as a statement or from a function's EXECUTE:
    -- the view would read its tables with the owner role's rights. Every view in public stays an invoker's.
    IF current_setting('server_version_num')::int >= 150000 AND EXISTS (
        SELECT 1 FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'v'
          AND NOT EXISTS (SELECT 1 FROM pg_options_to_table(c.reloptions) o
                          WHERE o.option_name = 'security_invoker'
                            AND lower(o.option_value) IN ('true', 'on', 'yes', '1')))
    THEN
        RAISE EXCEPTION 'views here must stay security_invoker = true'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A view reads its tables with the rights of whoever queries it; that cannot be changed.';
    END IF;
END
$fn$;

-- Before any DDL: in the shared (global) database, no tenant role may define code that another principal
-- (another agent, the owner role through ANALYZE/autovacuum/REFRESH, the platform's readers) would run:
-- functions, procedures, triggers, rules, operators, aggregates, casts, and REFRESH of a materialized view
-- (its query would run as the owner role; creating one runs it as its author, which is fine). Revoking the
-- languages already stops CREATE FUNCTION and DO where agentpg's admin may revoke; this also covers servers
-- where it may not (Neon), and gives a message that says why.
CREATE OR REPLACE FUNCTION agentpg_internal.guard_ddl()
RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF coalesce((SELECT value FROM agentpg_internal.config WHERE key = 'shared'), 'off') <> 'on' THEN
        RETURN;
    END IF;
    IF NOT (session_user IN (SELECT role_name FROM agentpg_internal.agent_grants)
            OR session_user IN (SELECT value FROM agentpg_internal.config
                                WHERE key IN ('owner_role', 'login_role'))) THEN
        RETURN;  -- agentpg's own admin
    END IF;
    IF EXISTS (SELECT 1 FROM agentpg_internal.adopting WHERE xid = pg_current_xact_id()) THEN
        RETURN;  -- adopt_new_objects granting a new table to the agents
    END IF;
    IF tg_tag IN ('CREATE FUNCTION', 'CREATE PROCEDURE', 'ALTER FUNCTION', 'ALTER PROCEDURE', 'ALTER ROUTINE',
                  'CREATE TRIGGER', 'ALTER TRIGGER', 'CREATE RULE', 'CREATE OPERATOR', 'ALTER OPERATOR',
                  'CREATE OPERATOR CLASS', 'CREATE OPERATOR FAMILY', 'ALTER OPERATOR FAMILY',
                  'CREATE AGGREGATE', 'ALTER AGGREGATE', 'CREATE CAST', 'REFRESH MATERIALIZED VIEW',
                  'CREATE TRANSFORM', 'CREATE LANGUAGE',
                  'CREATE CONVERSION', 'CREATE TEXT SEARCH PARSER', 'CREATE TEXT SEARCH TEMPLATE',
                  'CREATE ACCESS METHOD', 'CREATE EVENT TRIGGER') THEN
        RAISE EXCEPTION '% is not allowed in the shared global database', tg_tag
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Code defined here would run with the rights of other agents or of the owner; '
                         'use plain SQL, or put functions in your agent database.';
    END IF;
    -- CREATE TABLE AS, SELECT INTO and a materialized view store the rows of their query: a write, which an
    -- agent that may create tables but not write (or any agent while the database is read-only) may not do.
    IF tg_tag IN ('CREATE TABLE AS', 'SELECT INTO', 'CREATE MATERIALIZED VIEW') AND EXISTS (
        SELECT 1 FROM agentpg_internal.agent_grants WHERE role_name = session_user AND NOT can_write) THEN
        RAISE EXCEPTION '% stores rows, and this agent may not write in the shared global database', tg_tag
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Create the table with CREATE TABLE; an agent allowed to write can fill it.';
    END IF;
    -- Who may read and write what is each agent's permissions (agentpg_internal.set_agent_grants); a
    -- co-owner's GRANT would outlive them (to PUBLIC, or to an agent whose permissions say no).
    IF tg_tag IN ('GRANT', 'REVOKE', 'ALTER DEFAULT PRIVILEGES') THEN
        RAISE EXCEPTION '% is not allowed in the shared global database', tg_tag
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Privileges here follow each agent''s permissions, which the user sets through agentpg.';
    END IF;
END
$fn$;

-- Make this database the shared one (called when its first agent is granted in): take away the code
-- languages and the built-ins that run SQL text with the caller's rights or carry data between sessions.
CREATE OR REPLACE FUNCTION agentpg_internal.lock_down_shared()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF coalesce((SELECT value FROM agentpg_internal.config WHERE key = 'shared'), 'off') = 'on' THEN
        RETURN;
    END IF;
    INSERT INTO agentpg_internal.config VALUES ('shared', 'on')
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
    PERFORM agentpg_internal.revoke_shared_builtins();
END
$fn$;

-- The lock-down's revokes, idempotent: also run again by reconcile --upgrade and after a restore, so a shared
-- database made by an earlier agentpg gets what was added to this list since.
CREATE OR REPLACE FUNCTION agentpg_internal.revoke_shared_builtins()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    f regprocedure;
    v regclass;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RETURN;  -- a managed admin (Neon) may not revoke built-ins: the event trigger still guards DDL
    END IF;
    REVOKE USAGE ON LANGUAGE sql, plpgsql FROM PUBLIC;
    -- Each table's and index's cumulative statistics (scans, tuples read, blocks hit): a view an agent wrote,
    -- read by another agent or the platform, could scan the author's own tables as many times as a secret
    -- value says, and the author read the count back. The system views read them with their owner's
    -- rights, so the views go as well as the functions.
    FOR v IN
        SELECT c.oid FROM pg_class c
        WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'v'
          AND c.relname ~ '^pg_stat(io)?_(all|user|sys|xact_all|xact_user|xact_sys)_(tables|indexes|sequences)$'
           OR c.relnamespace = 'pg_catalog'::regnamespace AND c.relname IN ('pg_stat_user_functions',
                                                                           'pg_stat_xact_user_functions')
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM PUBLIC', v);
    END LOOP;
    FOR f IN
        SELECT p.oid FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace
          AND (p.proname IN (
                  -- run SQL text (or read a whole table, schema, database) with the caller's rights
                  'query_to_xml', 'query_to_xmlschema', 'query_to_xml_and_xmlschema',
                  'cursor_to_xml', 'cursor_to_xmlschema', 'table_to_xml', 'table_to_xmlschema',
                  'table_to_xml_and_xmlschema', 'schema_to_xml', 'schema_to_xmlschema',
                  'schema_to_xml_and_xmlschema', 'database_to_xml', 'database_to_xmlschema',
                  'database_to_xml_and_xmlschema', 'ts_stat', 'ts_rewrite',
                  -- carry data between sessions or roles: settings others can see, notifications, locks,
                  -- large objects (which also store data without any table grant), sequence resets
                  'set_config', 'pg_notify', 'setval')
               OR p.proname ~ '^(pg_advisory_|pg_try_advisory_)'
               OR p.proname ~ '^lo_' OR p.proname IN ('loread', 'lowrite')
               -- per-object statistics (see the views above)
               OR p.proname ~ ('^pg_stat_get_(numscans|lastscan|tuples_|live_tuples|dead_tuples|'
                               'mod_since_analyze|ins_since_vacuum|blocks_|last_|vacuum_count|'
                               'autovacuum_count|analyze_count|autoanalyze_count|total_|function_|xact_)'))
    LOOP
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$fn$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA agentpg_internal FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA agentpg_internal FROM PUBLIC;

-- Tenants do not see each other: other databases, roles, sessions (with their application_name, a channel
-- between tenants), locks and statistics. System views live in each database's own pg_catalog, so this is
-- per database. A managed admin (Neon: one server per database, nobody else to see) may not, and need not.
DO $hide$
DECLARE
    target text;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN;
    END IF;
    FOR target IN
        SELECT pg_catalog.format('TABLE %s', c.oid::regclass) FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relname IN (
            'pg_stat_activity', 'pg_stat_database', 'pg_stat_database_conflicts', 'pg_locks',
            'pg_prepared_xacts', 'pg_stat_ssl', 'pg_stat_gssapi', 'pg_stat_subscription',
            'pg_stat_subscription_stats', 'pg_replication_slots', 'pg_stat_replication_slots',
            'pg_replication_origin_status', 'pg_stat_progress_analyze', 'pg_stat_progress_vacuum',
            'pg_stat_progress_cluster', 'pg_stat_progress_create_index', 'pg_stat_progress_basebackup',
            'pg_stat_progress_copy', 'pg_database', 'pg_roles', 'pg_user', 'pg_group', 'pg_auth_members',
            'pg_db_role_setting', 'pg_shdescription', 'pg_shseclabel', 'pg_shdepend', 'pg_seclabels')
        UNION ALL
        SELECT pg_catalog.format('FUNCTION %s', p.oid::regprocedure) FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace
          AND (p.proname ~ '^pg_stat_get_(activity|backend_|db_|progress_info|subscription|replication_slot)'
               OR p.proname IN ('pg_lock_status', 'pg_blocking_pids', 'pg_safe_snapshot_blocking_pids',
                                'pg_isolation_test_session_is_blocked', 'pg_prepared_xact',
                                'pg_get_replication_slots', 'pg_tablespace_databases',
                                -- name any object by its oid, a database's ACL (who may connect) included
                                'pg_identify_object', 'pg_identify_object_as_address', 'pg_describe_object',
                                'pg_get_acl',
                                -- writes any amount to the server's WAL (so to every backup), even in a
                                -- READ ONLY transaction, and no grant, budget or storage limit counts it
                                'pg_logical_emit_message')
               -- by oid, its "permission denied for database <name>" names another tenant's database
               OR p.oid = 'pg_catalog.pg_database_size(oid)'::regprocedure)
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM PUBLIC', target);
    END LOOP;
END
$hide$;

DROP EVENT TRIGGER IF EXISTS agentpg_adopt;
CREATE EVENT TRIGGER agentpg_adopt ON ddl_command_end EXECUTE FUNCTION agentpg_internal.adopt_new_objects();
DROP EVENT TRIGGER IF EXISTS agentpg_guard;
CREATE EVENT TRIGGER agentpg_guard ON ddl_command_start EXECUTE FUNCTION agentpg_internal.guard_ddl();
"""
