//! Workflows served by the `worker` example and driven by the process tests and the
//! chaos program.
//!
//! [`ProcChain3`] is a three-step chain whose steps can sleep (to be in flight when a
//! worker is killed) and can log every execution to `pgflow_test.executions`, so a
//! test can tell executions (at least once) from completions (exactly once).

use std::time::Duration;

use pgflow::{StepContext, StepError, workflow};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The input of [`ProcChain3`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The number the chain adds to.
    pub n: u64,
    /// How long each step sleeps, in ms.
    pub sleep_ms: u64,
}

/// Shared data: when present, every step execution is logged to
/// `pgflow_test.executions` (see [`EXECUTIONS_DDL`]).
#[derive(Debug, Clone)]
pub struct ExecLog(pub PgPool);

/// Creates the execution log table.
pub const EXECUTIONS_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS pgflow_test;
CREATE TABLE IF NOT EXISTS pgflow_test.executions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      bigint  NOT NULL,
    step        text    NOT NULL,
    attempt     integer NOT NULL,
    instance_id text    NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pgflow_test.counter (
    id integer PRIMARY KEY,
    n  bigint  NOT NULL
);
INSERT INTO pgflow_test.counter (id, n) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS pgflow_test.bumps (
    run_id      bigint  NOT NULL,
    instance_id text    NOT NULL
)";

async fn step_body(job: &Job, ctx: &StepContext) -> Result<(), StepError> {
    if let Ok(ExecLog(pool)) = ctx.data::<ExecLog>() {
        let instance = std::env::var("INSTANCE_ID").unwrap_or_default();
        sqlx::query(
            "INSERT INTO pgflow_test.executions (run_id, step, attempt, instance_id)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(ctx.run_id().0)
        .bind(ctx.step())
        .bind(i32::try_from(ctx.attempt()).unwrap_or(i32::MAX))
        .bind(instance)
        .execute(pool)
        .await?;
    }
    if job.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    }
    Ok(())
}

/// Three steps adding one each; the output names the total.
pub struct ProcChain3;

#[workflow(name = "proc_chain3", backoff = "200ms", max_attempts = 5)]
impl ProcChain3 {
    #[step]
    async fn first(job: Job, ctx: &StepContext) -> Result<Job, StepError> {
        step_body(&job, ctx).await?;
        Ok(Job {
            n: job.n + 1,
            ..job
        })
    }

    #[step]
    async fn second(job: Job, ctx: &StepContext) -> Result<Job, StepError> {
        step_body(&job, ctx).await?;
        Ok(Job {
            n: job.n + 1,
            ..job
        })
    }

    #[step]
    async fn third(job: Job, ctx: &StepContext) -> Result<String, StepError> {
        step_body(&job, ctx).await?;
        Ok(format!("n={}", job.n + 1))
    }
}

/// The output [`ProcChain3`] returns for `n`.
pub fn expected_output(n: u64) -> String {
    format!("n={}", n + 3)
}

/// Waits for the signal `approval` (a number added to the job's) after one step;
/// driven across a SIGKILL of the worker that would run it.
pub struct ProcApproval;

#[workflow(name = "proc_approval", backoff = "200ms", max_attempts = 5)]
impl ProcApproval {
    #[step]
    async fn prepare(job: Job, ctx: &StepContext) -> Result<Job, StepError> {
        step_body(&job, ctx).await?;
        Ok(job)
    }

    #[step(signal = approval)]
    async fn apply(prepare: Job, approval: u64, ctx: &StepContext) -> Result<String, StepError> {
        step_body(&prepare, ctx).await?;
        Ok(format!("n={} approved={approval}", prepare.n))
    }
}

/// Runs three [`ProcChain3`] child runs (a map over subflows) and joins their
/// outputs; driven across a SIGKILL of the worker running the children.
pub struct ProcDelegate;

#[workflow(name = "proc_delegate", backoff = "200ms", max_attempts = 5)]
impl ProcDelegate {
    #[step]
    async fn split(job: Job) -> Result<Vec<Job>, StepError> {
        Ok((0..3)
            .map(|k| Job {
                n: job.n * 10 + k,
                ..job.clone()
            })
            .collect())
    }

    #[step(map)]
    async fn delegate(part: Job) -> Result<pgflow::Subflow<ProcChain3>, StepError> {
        Ok(pgflow::Subflow::new(part))
    }

    #[step]
    async fn join(delegate: Vec<String>) -> Result<String, StepError> {
        Ok(delegate.join(","))
    }
}

/// The output [`ProcDelegate`] returns for `n`.
pub fn expected_delegate_output(n: u64) -> String {
    (0..3)
        .map(|k| expected_output(n * 10 + k))
        .collect::<Vec<_>>()
        .join(",")
}

/// Increments `pgflow_test.counter` in a transactional step (and records which run
/// did, in `pgflow_test.bumps`): across kills of the workers, the counter ends equal
/// to the number of runs, exactly.
pub struct ProcCounter;

#[workflow(name = "proc_counter", backoff = "200ms", max_attempts = 5)]
impl ProcCounter {
    #[step]
    async fn bump(
        job: Job,
        tx: &mut sqlx::PgConnection,
        ctx: &StepContext,
    ) -> Result<u64, StepError> {
        // work first, then the writes: the counter row is locked until the commit
        if job.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
        }
        sqlx::query("INSERT INTO pgflow_test.bumps (run_id, instance_id) VALUES ($1, $2)")
            .bind(ctx.run_id().0)
            .bind(std::env::var("INSTANCE_ID").unwrap_or_default())
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE pgflow_test.counter SET n = n + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        Ok(job.n)
    }
}

/// A tenant's call, logged with its start and end (`pgflow_test.calls`), counted
/// against the request rate `proc_rate` (see [`limits`]): driven by three workers
/// with a key limit, to check that neither the key limit nor the rate is exceeded
/// across processes.
pub struct ProcLimited;

/// Creates the call log of [`ProcLimited`].
pub const CALLS_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS pgflow_test;
CREATE TABLE IF NOT EXISTS pgflow_test.calls (
    run_id      bigint      NOT NULL,
    tenant      text        NOT NULL,
    instance_id text        NOT NULL,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz NOT NULL
)";

#[workflow(name = "proc_limited", queue = "limited_calls", key = Self::tenant)]
impl ProcLimited {
    #[step(limits = ["proc_rate"])]
    async fn call(input: (String, u64), ctx: &StepContext) -> Result<u64, StepError> {
        let started = chrono::Utc::now();
        tokio::time::sleep(Duration::from_millis(input.1)).await;
        if let Ok(ExecLog(pool)) = ctx.data::<ExecLog>() {
            sqlx::query(
                "INSERT INTO pgflow_test.calls (run_id, tenant, instance_id, started_at, ended_at)
                 VALUES ($1, $2, $3, $4, now())",
            )
            .bind(ctx.run_id().0)
            .bind(&input.0)
            .bind(std::env::var("INSTANCE_ID").unwrap_or_default())
            .bind(started)
            .execute(pool)
            .await?;
        }
        Ok(input.1)
    }

    fn tenant(input: &(String, u64)) -> &str {
        &input.0
    }
}

/// The limits of this module's workflows, for every runtime that serves them:
/// `proc_rate`, 40 calls per 2-second window over all tenants.
pub fn limits(builder: pgflow_runtime::RuntimeBuilder) -> pgflow_runtime::RuntimeBuilder {
    builder.limit(pgflow_runtime::Limit::requests("proc_rate", 40).per(Duration::from_secs(2)))
}
