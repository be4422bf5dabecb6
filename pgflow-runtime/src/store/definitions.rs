//! The stored step tables, `pgflow.workflows`: one row per registered `(name,
//! version)` with its [`Definition`] as JSON, written at start and read by tools.

use pgflow::Definition;
use sqlx::PgExecutor;

/// A stored definition as text.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredRow {
    pub(crate) name: String,
    pub(crate) version: i32,
    pub(crate) definition: String,
}

/// Inserts each `(name, version, definition)` not stored yet (one round trip; the
/// first registration is kept) and returns what is stored now for each of them,
/// ours or an earlier one (primary key).
pub(crate) async fn register(
    db: impl PgExecutor<'_>,
    names: &[&str],
    versions: &[i32],
    definitions: &[String],
) -> Result<Vec<StoredRow>, sqlx::Error> {
    sqlx::query_as(
        "WITH mine AS (
             SELECT * FROM unnest($1::text[], $2::int[], $3::text[]) AS m(name, version, definition)
         ), ins AS (
             INSERT INTO pgflow.workflows (name, version, definition)
             SELECT name, version, definition::jsonb FROM mine
             ON CONFLICT (name, version) DO NOTHING
         )
         SELECT w.name, w.version, w.definition::text AS definition
         FROM pgflow.workflows w JOIN mine m USING (name, version)",
    )
    .bind(names)
    .bind(versions)
    .bind(definitions)
    .fetch_all(db)
    .await
}

/// The stored definition of `workflow` at `version`, as text (primary key).
pub(crate) async fn load(
    db: impl PgExecutor<'_>,
    workflow: &str,
    version: i32,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT definition::text FROM pgflow.workflows WHERE name = $1 AND version = $2",
    )
    .bind(workflow)
    .bind(version)
    .fetch_optional(db)
    .await
}

/// Parses a stored definition.
pub(crate) fn parse(text: &str) -> Result<Definition, serde_json::Error> {
    serde_json::from_str(text)
}
