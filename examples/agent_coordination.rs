//! Route messages between agents registered in a table: validate sender, recipient
//! and capability (invalid = permanent error with a clear message), deliver, open an
//! assignment for tasks only (a conditional step), and record the coordination.
//! Then an assignment that needs a human approval (a signal with a timeout): one is
//! approved from the CLI (`pgflow signal <run> approval '{..}'`, when the `pgflow`
//! binary is built next to this one; else through `admin::signal`, what the CLI
//! calls), one is never answered and expires. Last, a lead agent that delegates: it
//! splits a goal into topics and runs one sub-agent workflow per topic as a child run
//! (a map step over `Subflow<SubAgent>`), then merges their summaries; the example
//! checks the tree of runs (`pgflow run <lead>` shows it).
//!
//! ```text
//! cargo run --example agent_coordination -- [--n 40]
//! ```
//!
//! It checks its own results and ends with `agent_coordination: OK` (exit 0) or what
//! was wrong (exit 1).

use std::time::Duration;

use pgflow::{StepError, Subflow, workflow};
use pgflow_runtime::{Error, Runtime};
use pgflow_suite::agents::{AgentCoordination, MessageKind, Receipt, demo_messages, setup};
use serde::{Deserialize, Serialize};

/// A human's answer to an assignment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approval {
    /// Who answered.
    pub by: String,
    /// Whether the assignment may go ahead.
    pub approved: bool,
}

/// An assignment that waits for a human approval, at most 3 seconds here.
pub struct ApprovedAssignment;

#[workflow(name = "agent_approved_assignment", queue = "agents")]
impl ApprovedAssignment {
    #[step(signal = approval, signal_timeout = "3s")]
    async fn decide(task: String, approval: Option<Approval>) -> Result<String, StepError> {
        Ok(match approval {
            Some(a) if a.approved => format!("{task}: approved by {}", a.by),
            Some(a) => format!("{task}: rejected by {}", a.by),
            None => format!("{task}: expired without an answer"),
        })
    }
}

/// A sub-agent: researches one topic and summarizes it.
pub struct SubAgent;

#[workflow(name = "agent_sub_agent", queue = "agents")]
impl SubAgent {
    #[step]
    async fn gather(topic: String) -> Result<Vec<String>, StepError> {
        Ok((1..=3).map(|i| format!("{topic} note {i}")).collect())
    }

    #[step]
    async fn summarize(gather: Vec<String>) -> Result<String, StepError> {
        Ok(format!("{} ({} notes)", gather[0], gather.len()))
    }
}

/// A lead agent: one sub-agent run per topic of its goal, then a report.
pub struct LeadAgent;

#[workflow(name = "agent_lead", queue = "agents")]
impl LeadAgent {
    #[step]
    async fn plan(goal: String) -> Result<Vec<String>, StepError> {
        Ok(goal.split(',').map(|t| t.trim().to_owned()).collect())
    }

    #[step(map)]
    async fn delegate(topic: String) -> Result<Subflow<SubAgent>, StepError> {
        Ok(Subflow::new(topic))
    }

    #[step]
    async fn report(delegate: Vec<String>) -> Result<String, StepError> {
        Ok(delegate.join("; "))
    }
}

/// The lead agent's run and its tree of sub-agent runs.
async fn delegation(
    rt: &Runtime,
    pool: &sqlx::PgPool,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut problems = Vec::new();
    let lead = rt
        .start::<LeadAgent>("pricing, churn, onboarding".to_owned())
        .await?;
    let report = tokio::time::timeout(Duration::from_secs(30), lead.wait()).await??;
    let expected = "pricing note 1 (3 notes); churn note 1 (3 notes); onboarding note 1 (3 notes)";
    if report != expected {
        problems.push(format!("delegation: expected `{expected}`, got `{report}`"));
    }
    let detail = pgflow_runtime::admin::run_detail(pool, lead.id()).await?;
    let children: Vec<(String, Option<i32>, String)> = detail
        .subflows
        .iter()
        .map(|c| (c.workflow.clone(), c.parent.element, c.status.clone()))
        .collect();
    let want: Vec<(String, Option<i32>, String)> = (0..3)
        .map(|e| {
            (
                "agent_sub_agent".to_owned(),
                Some(e),
                "succeeded".to_owned(),
            )
        })
        .collect();
    if children != want {
        problems.push(format!("delegation: child runs {children:?}"));
    }
    println!(
        "delegation: run {} ran {} sub-agents as child runs (`pgflow run {}` shows the tree)",
        lead.id(),
        children.len(),
        lead.id()
    );
    Ok(problems)
}

/// Approves run `id` with the `pgflow` CLI when it is built next to this example
/// (`target/<profile>/pgflow`), else through `admin::signal`. Returns what it used.
async fn approve(
    pool: &sqlx::PgPool,
    id: pgflow::RunId,
) -> Result<&'static str, Box<dyn std::error::Error>> {
    let payload = r#"{"by": "ada", "approved": true}"#;
    let cli = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("pgflow"))
        .filter(|p| p.exists());
    if let Some(cli) = cli {
        let out = std::process::Command::new(cli)
            .env("DATABASE_URL", pgflow_suite::support::database_url())
            .args(["signal", &id.0.to_string(), "approval", payload])
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "pgflow signal failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        print!("pgflow signal: {}", String::from_utf8_lossy(&out.stdout));
        return Ok("the pgflow CLI");
    }
    let outcome =
        pgflow_runtime::admin::signal(pool, id, "approval", serde_json::from_str(payload)?).await?;
    println!("admin::signal: {outcome}");
    Ok("admin::signal")
}

/// One approved assignment and one that expires.
async fn approvals(
    rt: &Runtime,
    pool: &sqlx::PgPool,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut problems = Vec::new();
    let approved = rt
        .start::<ApprovedAssignment>("review PR 7".to_owned())
        .await?;
    let expires = rt
        .start::<ApprovedAssignment>("review PR 8".to_owned())
        .await?;
    let via = approve(pool, approved.id()).await?;
    for (run, expected) in [
        (&approved, "review PR 7: approved by ada"),
        (&expires, "review PR 8: expired without an answer"),
    ] {
        let out = tokio::time::timeout(Duration::from_secs(30), run.wait()).await??;
        if out != expected {
            problems.push(format!("approval: expected `{expected}`, got `{out}`"));
        }
    }
    println!("approvals: 1 approved (via {via}), 1 expired");
    Ok(problems)
}

async fn run(n: usize) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let url = pgflow_suite::support::database_url();
    let pool = sqlx::PgPool::connect(&url).await?;
    setup(&pool).await?;
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("agents", 16)
        .instance_id(format!("agents-example-{}", std::process::id()))
        .data(pool.clone())
        .start()
        .await?;
    let tag = format!("ex{}", std::process::id());
    let batch = demo_messages(n, &tag);
    let ids = rt
        .start_many::<AgentCoordination>(batch.iter().map(|(m, _)| m.clone()))
        .await?;
    let mut problems = Vec::new();
    let (mut delivered, mut assigned, mut refused) = (0, 0, 0);
    for (id, (msg, invalid)) in ids.iter().zip(&batch) {
        let result = rt.handle::<Receipt>(*id, true).wait().await;
        match (result, invalid) {
            (Ok(receipt), None) => {
                delivered += 1;
                let is_task = msg.kind == MessageKind::Task;
                if receipt.assignment_id.is_some() != is_task {
                    problems.push(format!(
                        "{}: assignment {:?} for a {:?}",
                        msg.message_id, receipt.assignment_id, msg.kind
                    ));
                }
                if is_task {
                    assigned += 1;
                } else {
                    // the conditional step is recorded as skipped, with its reason
                    let status: String = sqlx::query_scalar(
                        "SELECT status FROM pgflow.step_states WHERE run_id = $1 AND step = 2",
                    )
                    .bind(id.0)
                    .fetch_one(&pool)
                    .await?;
                    if status != "skipped" {
                        problems.push(format!(
                            "{}: assign is {status}, not skipped",
                            msg.message_id
                        ));
                    }
                }
            }
            (Err(Error::Run(e)), Some(expected)) => {
                refused += 1;
                let permanent_once =
                    e.history().len() == 1 && e.history()[0].kind == pgflow::ErrorKind::Permanent;
                if !e.to_string().contains(expected) || !permanent_once {
                    problems.push(format!(
                        "{}: expected a permanent `{expected}`, got {e}",
                        msg.message_id
                    ));
                }
            }
            (other, _) => problems.push(format!("{}: unexpected {other:?}", msg.message_id)),
        }
    }
    let (inbox, assignments, log): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM agents_demo.inbox WHERE message_id LIKE $1),
                (SELECT count(*) FROM agents_demo.assignments WHERE message_id LIKE $1),
                (SELECT count(*) FROM agents_demo.coordination_log WHERE message_id LIKE $1)",
    )
    .bind(format!("{tag}-%"))
    .fetch_one(&pool)
    .await?;
    println!(
        "{} messages: {delivered} delivered ({assigned} tasks assigned), {refused} refused",
        batch.len()
    );
    println!("tables: inbox {inbox}, assignments {assignments}, coordination_log {log}");
    if (inbox, assignments, log) != (delivered, assigned, delivered) {
        problems.push("the tables do not match the results".into());
    }
    problems.extend(approvals(&rt, &pool).await?);
    problems.extend(delegation(&rt, &pool).await?);
    rt.shutdown().await?;
    Ok(problems)
}

#[tokio::main]
async fn main() {
    let mut n = 40;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--n", Some(v)) => n = v,
            _ => {
                eprintln!("usage: agent_coordination [--n N]");
                std::process::exit(2);
            }
        }
    }
    match run(n).await {
        Ok(p) if p.is_empty() => println!("agent_coordination: OK"),
        Ok(p) => {
            for p in p {
                eprintln!("agent_coordination: {p}");
            }
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("agent_coordination failed: {e}");
            std::process::exit(1);
        }
    }
}
