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

/// The URL of the database `options` point at (no password: the local server trusts).
/// Tests use it to hand their `#[sqlx::test]` database to a child process.
pub fn url_of(options: &sqlx::postgres::PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

/// The path of example `name` built next to the running test binary
/// (`target/<profile>/examples/<name>`; `cargo test` builds the examples).
///
/// # Panics
///
/// When the binary is missing, with the command that builds it.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it, or run `cargo build --example {name}`",
        bin.display()
    );
    bin
}

/// Waits until run `run_id` has no claimed task left: the attempts still in flight
/// when it failed or was cancelled have landed (tests read its tables after this).
///
/// # Panics
///
/// After 10 s, or on a database error.
pub async fn wait_no_claims(pool: &sqlx::PgPool, run_id: i64) {
    for _ in 0..500 {
        let claimed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow.tasks WHERE run_id = $1 AND claimed_by IS NOT NULL",
        )
        .bind(run_id)
        .fetch_one(pool)
        .await
        .expect("count the run's claimed tasks");
        if claimed == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("run {run_id} still has claimed tasks after 10 s");
}

/// Waits (up to 30 s) for run `id` to finish and returns its outcome, as
/// `RunHandle::wait` does.
///
/// # Errors
///
/// The run's failure, as `RunHandle::wait` reports it.
///
/// # Panics
///
/// When the run is not finished after 30 s.
pub async fn settle<O: serde::de::DeserializeOwned>(
    rt: &pgflow_runtime::Runtime,
    id: pgflow::RunId,
) -> Result<O, pgflow_runtime::Error> {
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        rt.handle::<O>(id, true).wait(),
    )
    .await
    .expect("the run did not finish within 30 s")
}

/// A runtime that serves no queue (it only starts and reads runs), with the instance
/// id `producer`.
///
/// # Panics
///
/// When it cannot start.
pub async fn producer(pool: &sqlx::PgPool) -> pgflow_runtime::Runtime {
    pgflow_runtime::Runtime::builder()
        .pool(pool.clone())
        .instance_id("producer")
        .start()
        .await
        .expect("the producer starts")
}

/// Serves `router` on a free loopback port until the process ends; returns its
/// base URL (`http://127.0.0.1:PORT`).
///
/// # Panics
///
/// When no port can be bound.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}

/// The stored status of run `id` (`running`, `succeeded`, ..).
///
/// # Panics
///
/// When it cannot be read.
pub async fn status_of(pool: &sqlx::PgPool, id: pgflow::RunId) -> String {
    pgflow_runtime::admin::run_detail(pool, id)
        .await
        .expect("the run")
        .run
        .status
}

/// Waits until none of `ids` is running (polling the database).
///
/// # Panics
///
/// When one still runs after 10 s.
pub async fn wait_finished(pool: &sqlx::PgPool, ids: &[pgflow::RunId]) {
    for _ in 0..500 {
        let mut done = true;
        for id in ids {
            done &= status_of(pool, *id).await != "running";
        }
        if done {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("runs did not finish within 10 s");
}
