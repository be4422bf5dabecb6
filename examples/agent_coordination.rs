//! Route messages between agents registered in a table: validate sender, recipient
//! and capability (invalid = permanent error with a clear message), deliver, open an
//! assignment for tasks only (a conditional step), and record the coordination.
//!
//! ```text
//! cargo run --example agent_coordination -- [--n 40]
//! ```
//!
//! It checks its own results and ends with `agent_coordination: OK` (exit 0) or what
//! was wrong (exit 1).

use pgflow_runtime::{Error, Runtime};
use pgflow_suite::agents::{AgentCoordination, MessageKind, Receipt, demo_messages, setup};

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
