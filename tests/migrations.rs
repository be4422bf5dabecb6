//! pgflow's migrations next to an application's own sqlx migrations in one
//! database: in either order, with either version style, neither sees the other's
//! history.

use std::path::PathBuf;

use sqlx::PgPool;
use sqlx::migrate::Migrator;

/// An application's migrations: a sequential version (`1`, which pgflow's first
/// migration also has) and a timestamp one.
async fn app_migrator() -> Migrator {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("pgflow-app-migrations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("1_app_users.sql"),
        "CREATE TABLE app_users (id bigint PRIMARY KEY);",
    )
    .unwrap();
    std::fs::write(
        dir.join("20260101000000_app_orders.sql"),
        "CREATE TABLE app_orders (id bigint PRIMARY KEY);",
    )
    .unwrap();
    Migrator::new(dir.as_path()).await.unwrap()
}

async fn pgflow_history(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM pgflow._sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn app_history(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM public._sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn ours() -> Vec<i64> {
    pgflow_runtime::MIGRATOR.iter().map(|m| m.version).collect()
}

#[sqlx::test(migrations = false)]
async fn the_application_first_then_pgflow(pool: PgPool) {
    let app = app_migrator().await;
    app.run(&pool).await.unwrap();
    pgflow_runtime::migrate(&pool).await.unwrap();
    // the application's migrator still finds only its own history
    app.run(&pool).await.unwrap();
    pgflow_runtime::migrate(&pool).await.unwrap();
    assert_eq!(app_history(&pool).await, [1, 20260101000000]);
    assert_eq!(pgflow_history(&pool).await, ours());
    let rt = pgflow_runtime::Runtime::builder()
        .pool(pool.clone())
        .start()
        .await
        .unwrap();
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn pgflow_first_then_the_application(pool: PgPool) {
    let rt = pgflow_runtime::Runtime::builder()
        .pool(pool.clone())
        .start()
        .await
        .unwrap();
    rt.shutdown().await.unwrap();
    let app = app_migrator().await;
    app.run(&pool).await.unwrap();
    pgflow_runtime::migrate(&pool).await.unwrap();
    assert_eq!(app_history(&pool).await, [1, 20260101000000]);
    assert_eq!(pgflow_history(&pool).await, ours());
    // `pgflow migrate` reports nothing new
    let report = pgflow_runtime::admin::migrate(&pool).await.unwrap();
    assert!(report.applied.is_empty());
    assert_eq!(report.already_applied, ours().len());
}

#[sqlx::test(migrations = false)]
async fn a_history_kept_by_an_earlier_version_is_adopted(pool: PgPool) {
    // Earlier versions ran the migrator as it is: history in public._sqlx_migrations.
    pgflow_runtime::MIGRATOR.run(&pool).await.unwrap();
    pgflow_runtime::migrate(&pool).await.unwrap();
    assert_eq!(pgflow_history(&pool).await, ours());
    assert!(
        app_history(&pool).await.is_empty(),
        "pgflow's rows moved out"
    );
    // and the application can now use its own history, version 1 included
    let app = app_migrator().await;
    app.run(&pool).await.unwrap();
    assert_eq!(app_history(&pool).await, [1, 20260101000000]);
}
