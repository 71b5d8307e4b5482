-- The pgflow_instances table: one row per worker instance.
--
-- Applied by pgflow_observe's create_table() (and `pgflow-observe migrate`)
-- inside one transaction, under an advisory lock, so it is safe to run again
-- and from several processes at once. {table} is replaced by the quoted
-- schema-qualified name before it runs.
--
-- The first seven columns are those of the original ex_pgflow migration, in
-- the same order and with the same meaning, so that a mixed fleet can share
-- one table. Every added column is nullable or has a default.
--
-- Indexes: none but the primary key, on purpose. A heartbeat rewrites load,
-- last_heartbeat and clock_skew every few seconds for every instance. When no
-- index covers a column an UPDATE changes, and the page has room, Postgres
-- makes it a HOT (heap-only tuple) update: the new row version goes on the
-- same page and no index is touched. The original design indexed
-- last_heartbeat, which forced a new entry in that index on every beat of
-- every instance, bloating it and defeating HOT. The table holds one row per
-- instance (hundreds at most), so listing and sweeping scan it in
-- microseconds without an index. The fillfactor leaves room on each page for
-- the new versions HOT needs.

create table if not exists {table} (
    instance_id text primary key,
    hostname text,
    pid text,
    status text,
    load integer default 0,
    last_heartbeat timestamptz,
    created_at timestamptz default now()
) with (fillfactor = 50);

alter table {table} set (fillfactor = 50);

-- When this instance process started (database clock).
alter table {table} add column if not exists started_at timestamptz;
-- How many tasks the executor runs at once, when it says.
alter table {table} add column if not exists capacity integer;
-- Free-form facts the application chose to publish.
alter table {table} add column if not exists metadata jsonb not null default '{{}}';
alter table {table} add column if not exists library_version text;
-- A random value per process start: tells a restart from a duplicate.
alter table {table} add column if not exists process_token text;
-- The operator's pause: set by pause, cleared only by resume. Kept apart from
-- status (what the instance reports) so that it survives restarts and sweeps.
alter table {table} add column if not exists pause_requested_at timestamptz;
-- When the instance applied the pause it was asked for (null when running).
alter table {table} add column if not exists pause_acknowledged_at timestamptz;
-- Client clock minus database clock at the last heartbeat, in seconds.
alter table {table} add column if not exists clock_skew double precision;
