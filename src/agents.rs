//! The agent-coordination workflow: route a message between agents registered in a
//! table, validating sender, recipient and capability; deliver it to the recipient's
//! inbox; when it is a task, open an assignment (a conditional step); record the
//! coordination.
//!
//! Tables live in schema `agents_demo` ([`setup`] creates them and registers a few
//! agents). An unknown or inactive agent, or a recipient without the capability the
//! message needs, is a permanent error with a message that says which. Every write
//! is idempotent per message id, so a retried step does not deliver twice.

use pgflow::{StepContext, StepError, workflow};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// What a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Work to do: opens an assignment.
    Task,
    /// A question.
    Query,
    /// For information.
    Notice,
}

impl MessageKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Query => "query",
            Self::Notice => "notice",
        }
    }
}

/// A message between two agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentMessage {
    /// Unique per message: makes delivery idempotent.
    pub message_id: String,
    /// The sending agent.
    pub from: String,
    /// The receiving agent.
    pub to: String,
    /// What it asks for.
    pub kind: MessageKind,
    /// The capability the recipient needs (`plan`, `code`, `review`, ..).
    pub capability: String,
    /// The text.
    pub body: String,
}

/// A message that passed validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validated {
    /// The message.
    pub message: AgentMessage,
    /// The recipient's capabilities.
    pub recipient_capabilities: Vec<String>,
}

/// A delivered message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivered {
    /// The inbox row.
    pub inbox_id: i64,
    /// The message.
    pub message: AgentMessage,
}

/// An assignment opened for a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The assignment row.
    pub assignment_id: i64,
    /// Who must do it.
    pub assignee: String,
}

/// What the coordination produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The inbox row.
    pub inbox_id: i64,
    /// The assignment, for a task.
    pub assignment_id: Option<i64>,
    /// The log row.
    pub log_id: i64,
}

const DDL: &str = "
CREATE SCHEMA IF NOT EXISTS agents_demo;
CREATE TABLE IF NOT EXISTS agents_demo.agents (
    name         text    PRIMARY KEY,
    capabilities text[]  NOT NULL,
    active       boolean NOT NULL DEFAULT true
);
CREATE TABLE IF NOT EXISTS agents_demo.inbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text   NOT NULL UNIQUE,
    recipient  text   NOT NULL,
    sender     text   NOT NULL,
    kind       text   NOT NULL,
    body       text   NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS agents_demo.assignments (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text   NOT NULL UNIQUE,
    assignee   text   NOT NULL,
    capability text   NOT NULL,
    status     text   NOT NULL DEFAULT 'open'
);
CREATE TABLE IF NOT EXISTS agents_demo.coordination_log (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    text   NOT NULL UNIQUE,
    sender        text   NOT NULL,
    recipient     text   NOT NULL,
    kind          text   NOT NULL,
    assignment_id bigint,
    run_id        bigint NOT NULL,
    at            timestamptz NOT NULL DEFAULT now()
)";

/// Creates the tables and registers the demo agents (idempotent).
///
/// # Errors
///
/// Database errors.
pub async fn setup(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(DDL).execute(pool).await?;
    sqlx::query(
        "INSERT INTO agents_demo.agents (name, capabilities, active)
         SELECT name, string_to_array(caps, ','), active
         FROM unnest($1::text[], $2::text[], $3::bool[]) AS a(name, caps, active)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(["planner", "coder", "reviewer", "retired"])
    .bind(["plan,review", "code,test", "review", "code"])
    .bind([true, true, true, false])
    .execute(pool)
    .await?;
    Ok(())
}

/// Validates, delivers, assigns tasks, records.
pub struct AgentCoordination;

#[workflow(
    name = "agent_coordination",
    queue = "agents",
    max_attempts = 3,
    backoff = "100ms"
)]
impl AgentCoordination {
    #[step]
    async fn validate(message: AgentMessage, ctx: &StepContext) -> Result<Validated, StepError> {
        let pool = ctx.data::<PgPool>()?;
        let agents: Vec<(String, Vec<String>, bool)> = sqlx::query_as(
            "SELECT name, capabilities, active FROM agents_demo.agents WHERE name = ANY($1)",
        )
        .bind([&message.from, &message.to])
        .fetch_all(pool)
        .await?;
        let find = |name: &str, role: &str| {
            let a = agents.iter().find(|a| a.0 == name).ok_or_else(|| {
                StepError::permanent(format!(
                    "unknown {role} `{name}`: no such agent is registered"
                ))
            })?;
            if !a.2 {
                return Err(StepError::permanent(format!(
                    "{role} `{name}` is not active"
                )));
            }
            Ok(a)
        };
        find(&message.from, "sender")?;
        let recipient = find(&message.to, "recipient")?;
        if message.from == message.to {
            return Err(StepError::permanent(format!(
                "agent `{}` cannot message itself",
                message.from
            )));
        }
        if !recipient.1.contains(&message.capability) {
            return Err(StepError::permanent(format!(
                "recipient `{}` lacks capability `{}` (it has: {})",
                message.to,
                message.capability,
                recipient.1.join(", ")
            )));
        }
        let recipient_capabilities = recipient.1.clone();
        Ok(Validated {
            message,
            recipient_capabilities,
        })
    }

    #[step]
    async fn deliver(validated: Validated, ctx: &StepContext) -> Result<Delivered, StepError> {
        let pool = ctx.data::<PgPool>()?;
        let m = validated.message;
        let inbox_id: i64 = sqlx::query_scalar(
            "WITH ins AS (
                 INSERT INTO agents_demo.inbox (message_id, recipient, sender, kind, body)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (message_id) DO NOTHING RETURNING id
             )
             SELECT id FROM ins UNION ALL
             SELECT id FROM agents_demo.inbox WHERE message_id = $1
             LIMIT 1",
        )
        .bind(&m.message_id)
        .bind(&m.to)
        .bind(&m.from)
        .bind(m.kind.as_str())
        .bind(&m.body)
        .fetch_one(pool)
        .await?;
        Ok(Delivered {
            inbox_id,
            message: m,
        })
    }

    /// Only tasks open an assignment; for queries and notices this step is skipped.
    #[step(depends_on = [deliver], when = Self::is_task)]
    async fn assign(deliver: Delivered, ctx: &StepContext) -> Result<Assignment, StepError> {
        let pool = ctx.data::<PgPool>()?;
        let m = deliver.message;
        let assignment_id: i64 = sqlx::query_scalar(
            "WITH ins AS (
                 INSERT INTO agents_demo.assignments (message_id, assignee, capability)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (message_id) DO NOTHING RETURNING id
             )
             SELECT id FROM ins UNION ALL
             SELECT id FROM agents_demo.assignments WHERE message_id = $1
             LIMIT 1",
        )
        .bind(&m.message_id)
        .bind(&m.to)
        .bind(&m.capability)
        .fetch_one(pool)
        .await?;
        Ok(Assignment {
            assignment_id,
            assignee: m.to,
        })
    }

    #[step(depends_on = [deliver, assign])]
    async fn record(
        deliver: Delivered,
        assign: Option<Assignment>,
        ctx: &StepContext,
    ) -> Result<Receipt, StepError> {
        let pool = ctx.data::<PgPool>()?;
        let m = &deliver.message;
        let assignment_id = assign.map(|a| a.assignment_id);
        let log_id: i64 = sqlx::query_scalar(
            "WITH ins AS (
                 INSERT INTO agents_demo.coordination_log
                     (message_id, sender, recipient, kind, assignment_id, run_id)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (message_id) DO NOTHING RETURNING id
             )
             SELECT id FROM ins UNION ALL
             SELECT id FROM agents_demo.coordination_log WHERE message_id = $1
             LIMIT 1",
        )
        .bind(&m.message_id)
        .bind(&m.from)
        .bind(&m.to)
        .bind(m.kind.as_str())
        .bind(assignment_id)
        .bind(ctx.run_id().0)
        .fetch_one(pool)
        .await?;
        Ok(Receipt {
            inbox_id: deliver.inbox_id,
            assignment_id,
            log_id,
        })
    }

    fn is_task(deliver: &Delivered) -> bool {
        deliver.message.kind == MessageKind::Task
    }
}

/// `n` messages for the examples: tasks, queries and notices between the demo
/// agents of [`setup`], ids `{tag}-{i}`; three in eight are invalid, each paired
/// with the words its error must contain.
pub fn demo_messages(n: usize, tag: &str) -> Vec<(AgentMessage, Option<&'static str>)> {
    (0..n)
        .map(|i| {
            let (from, to, kind, capability, invalid) = match i % 8 {
                0 | 4 => ("planner", "coder", MessageKind::Task, "code", None),
                1 => ("coder", "reviewer", MessageKind::Query, "review", None),
                2 => ("reviewer", "planner", MessageKind::Notice, "plan", None),
                3 => (
                    "planner",
                    "ghost",
                    MessageKind::Task,
                    "code",
                    Some("unknown recipient `ghost`"),
                ),
                5 => (
                    "coder",
                    "planner",
                    MessageKind::Task,
                    "code",
                    Some("lacks capability `code`"),
                ),
                6 => ("planner", "reviewer", MessageKind::Task, "review", None),
                _ => (
                    "retired",
                    "coder",
                    MessageKind::Query,
                    "test",
                    Some("sender `retired` is not active"),
                ),
            };
            (
                AgentMessage {
                    message_id: format!("{tag}-{i}"),
                    from: from.into(),
                    to: to.into(),
                    kind,
                    capability: capability.into(),
                    body: format!("message {i}"),
                },
                invalid,
            )
        })
        .collect()
}
