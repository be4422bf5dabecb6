//! Helpers shared by the example programs.

use sqlx::{Connection, PgConnection};

/// `DATABASE_URL`, or the local server's `postgres` database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Drops and creates database `name` on the server of [`database_url`]; returns its
/// URL. For programs that want a clean slate (the bench, the chaos program).
///
/// # Errors
///
/// When the server cannot be reached or refuses.
pub async fn fresh_database(
    name: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let base = database_url();
    let mut conn = PgConnection::connect(&base).await?;
    // Identifiers cannot be bound; quote it.
    let ident = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::query(&format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {ident}"))
        .execute(&mut conn)
        .await?;
    let (prefix, _) = base
        .rsplit_once('/')
        .ok_or("DATABASE_URL has no database name")?;
    Ok(format!("{prefix}/{name}"))
}
