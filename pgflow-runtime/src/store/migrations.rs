//! Applying the schema migrations with their history kept in the `pgflow` schema
//! (`pgflow._sqlx_migrations`), apart from the application's own `_sqlx_migrations`:
//! an application that runs sqlx migrations in the same database sees nothing of
//! pgflow's, and pgflow nothing of its, in whichever order they run.
//!
//! sqlx's migrator names its table without a schema, so it runs on a connection of
//! its own whose `search_path` is `pgflow` (every migration names its objects with
//! the schema). A database migrated before this (pgflow's history in the table on the
//! default search path, usually `public._sqlx_migrations`) is adopted once: the rows
//! that are pgflow's — same version and checksum — move to `pgflow._sqlx_migrations`.

use std::collections::HashSet;

use sqlx::migrate::Migrate;
use sqlx::{Connection, PgConnection, PgPool};

use crate::MIGRATOR;

/// Advisory lock key that serializes pgflow's migrations ("pgflowm" in ASCII).
const MIGRATE_LOCK: i64 = 0x0070_6766_6c6f_776d;

/// Applies the migrations not applied yet; returns the versions applied before.
pub(crate) async fn run(pool: &PgPool) -> Result<HashSet<i64>, crate::Error> {
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let result = run_on(&mut conn).await;
    let _ = conn.close().await;
    result
}

async fn run_on(conn: &mut PgConnection) -> Result<HashSet<i64>, crate::Error> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *conn)
        .await?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS pgflow")
        .execute(&mut *conn)
        .await?;
    // Where an earlier version kept the history: the table the default search
    // path finds, unless it is already ours.
    let (fresh, legacy): (bool, Option<String>) = sqlx::query_as(
        "SELECT to_regclass('pgflow._sqlx_migrations') IS NULL,
                (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = to_regclass('_sqlx_migrations'))",
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("SET search_path TO pgflow")
        .execute(&mut *conn)
        .await?;
    conn.ensure_migrations_table().await?;
    if let (true, Some(legacy)) = (fresh, legacy) {
        if legacy != "pgflow._sqlx_migrations" {
            adopt(conn, &legacy).await?;
        }
    }
    let before: HashSet<i64> = conn
        .list_applied_migrations()
        .await?
        .into_iter()
        .map(|m| m.version)
        .collect();
    MIGRATOR.run_direct(&mut *conn).await?;
    Ok(before)
}

/// Moves pgflow's rows (same version and checksum as ours) from `legacy` to
/// `pgflow._sqlx_migrations`.
async fn adopt(conn: &mut PgConnection, legacy: &str) -> Result<(), crate::Error> {
    let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let checksums: Vec<Vec<u8>> = MIGRATOR.iter().map(|m| m.checksum.to_vec()).collect();
    // An identifier cannot be a bind parameter: `legacy` is built by the server
    // with `quote_ident`.
    let sql = format!(
        "WITH moved AS (
             DELETE FROM {legacy} l
             USING unnest($1::bigint[], $2::bytea[]) AS m(version, checksum)
             WHERE l.version = m.version AND l.checksum = m.checksum
             RETURNING l.version, l.description, l.installed_on, l.success, l.checksum,
                       l.execution_time
         )
         INSERT INTO pgflow._sqlx_migrations
             (version, description, installed_on, success, checksum, execution_time)
         SELECT * FROM moved
         ON CONFLICT (version) DO NOTHING"
    );
    let moved = sqlx::query(&sql)
        .bind(&versions)
        .bind(&checksums)
        .execute(&mut *conn)
        .await?;
    if moved.rows_affected() > 0 {
        tracing::info!(
            from = legacy,
            migrations = moved.rows_affected(),
            "pgflow: moved pgflow's migration history into pgflow._sqlx_migrations"
        );
    }
    Ok(())
}
