//! [`start`]: starting a run by workflow name from the stored definition, for tools
//! that link none of the workflows (the `pgflow start` command).

use serde::Serialize;
use sqlx::PgPool;

use crate::Error;
use crate::admin::runs::load_definition;
use crate::store::runs;

/// What [`start`] did.
#[derive(Debug, Clone, Serialize)]
pub struct StartReport {
    /// The run.
    pub id: i64,
    /// Its workflow.
    pub workflow: String,
    /// The version it runs.
    pub version: i32,
    /// False when the idempotency key matched an earlier run, which `id` is.
    pub created: bool,
}

/// Starts a run of `workflow` (at `version`, else the highest stored one) with a
/// JSON `input`, from the step table stored in `pgflow.workflows`. Without the Rust
/// types at hand the input is not checked here: a step that cannot read it fails
/// permanently, naming the serde path. A runtime's `start_by_name` checks first.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
/// let r = pgflow_runtime::admin::start(&pool, "llm_request", None, serde_json::json!({"prompt": "hi"}), None).await?;
/// println!("run {} of {} v{}", r.id, r.workflow, r.version);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::Definition`] when no definition of the workflow is stored;
/// [`Error::MissingDefinition`] for a version that is not; database errors.
pub async fn start(
    pool: &PgPool,
    workflow: &str,
    version: Option<i32>,
    input: serde_json::Value,
    idempotency_key: Option<String>,
) -> Result<StartReport, Error> {
    crate::store::subflows::check_user_key(workflow, idempotency_key.as_deref())?;
    let mut tx = pool.begin().await?;
    let version = match version {
        Some(v) => v,
        None => runs::latest_stored_version(&mut *tx, workflow)
            .await?
            .ok_or_else(|| Error::Definition {
                workflow: workflow.to_owned(),
                version: 0,
                message: "no definition of it is stored: start a runtime that links it once \
                          (it stores its definition at start)"
                    .to_owned(),
            })?,
    };
    let (def, plan) = load_definition(&mut tx, workflow, version).await?;
    let mut new = runs::NewRuns::default();
    new.push(
        input.to_string(),
        runs::RunOptions {
            idempotency_key: idempotency_key.clone(),
            ..runs::RunOptions::default()
        },
    );
    let ids = runs::start(&mut tx, &runs::Shape::of_stored(&def, version, &plan), &new).await?;
    let (id, created) = match (ids.first(), idempotency_key) {
        (Some(&id), _) => (id, true),
        (None, Some(key)) => {
            let id = runs::by_idempotency_key(&mut tx, workflow, &key)
                .await?
                .ok_or_else(|| {
                    Error::Database(sqlx::Error::Protocol(format!(
                        "idempotency key {key:?} conflicted but no run holds it"
                    )))
                })?;
            (id, false)
        }
        (None, None) => {
            return Err(Error::Database(sqlx::Error::Protocol(
                "the run was not inserted".to_owned(),
            )));
        }
    };
    tx.commit().await?;
    Ok(StartReport {
        id,
        workflow: workflow.to_owned(),
        version,
        created,
    })
}
