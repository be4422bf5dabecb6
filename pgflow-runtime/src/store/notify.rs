//! The one NOTIFY policy: workers LISTEN on [`CHANNEL`]; whoever makes tasks due
//! notifies it with the queue's name as payload, **inside the transaction that
//! inserted them**, so the notification is delivered at commit and never before the
//! tasks are visible. Postgres folds identical notifications of one transaction.
//! The start statement does it in a CTE of its own (`notify_queue!`); the flush and
//! repairs call [`queues`]. Notifying is an optimization: pollers find due tasks
//! within the poll interval anyway.

use sqlx::PgConnection;

/// The channel of notifications that tasks are ready: the payload is the queue.
pub(crate) const CHANNEL: &str = "pgflow_tasks";

/// The expression that notifies queue `$q` (an SQL expression over a text value),
/// for statements that notify in a CTE of their own.
macro_rules! notify_queue {
    ($q:literal) => {
        concat!("pg_notify('pgflow_tasks', ", $q, ")")
    };
}
pub(crate) use notify_queue;

/// Notifies each of `queues` (within the caller's transaction).
pub(crate) async fn queues(conn: &mut PgConnection, queues: &[&str]) -> Result<(), sqlx::Error> {
    if queues.is_empty() {
        return Ok(());
    }
    sqlx::query(concat!(
        "SELECT ",
        notify_queue!("q"),
        " FROM unnest($1::text[]) AS q"
    ))
    .bind(queues)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_expression_names_the_channel() {
        assert!(notify_queue!("x").contains(super::CHANNEL));
    }
}
