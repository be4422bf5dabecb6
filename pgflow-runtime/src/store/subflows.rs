//! Subflows: child runs started by a step returning `Subflow<W>`, and the parent
//! task that waits for each.
//!
//! **Start** (in the flush that applies the step's completion): the child run is
//! inserted with the idempotency key [`child_key`] (the parent's run, step and
//! element), so a step that runs again (a lost claim, a retried run) finds the child
//! it already started instead of starting a second one; the parent's task is put back
//! and [`link`]ed to the child: parked (out of the claim's index, due `infinity`)
//! while the child runs, due now if it already finished.
//!
//! **Wake**: the transaction that finishes, fails or cancels a child makes its
//! parent's task due ([`wake_parents`]); the re-claimed task completes the parent's
//! step from the child's stored output, or fails it with the child's error.
//!
//! **No lost wake-up.** `link` reads the child's status `FOR SHARE`, and a child's
//! status changes (`UPDATE`, which conflicts with it) before its wake-up runs in the
//! same transaction. So either the child's transaction committed before `link` read
//! it (the task is made due at once), or it waits for the link's commit and its
//! wake-up then sees the linked, parked task. A task re-parked while its child still
//! runs takes that lock before the fence locks its own row ([`lock_children`]), the
//! order the child's transaction takes them in (its run, then the parent's task).

use sqlx::PgConnection;

/// The idempotency key of the child run started by `step` (an index) of run
/// `run_id`, for `element` of a map step: `subflow:7:2:0`, `subflow:7:2`.
pub(crate) fn child_key(run_id: i64, step: i16, element: Option<i32>) -> String {
    match element {
        Some(e) => format!("{CHILD_KEY_PREFIX}{run_id}:{step}:{e}"),
        None => format!("{CHILD_KEY_PREFIX}{run_id}:{step}"),
    }
}

/// The prefix of [`child_key`]s, reserved: a start given such a key is refused.
const CHILD_KEY_PREFIX: &str = "subflow:";

/// Refuses an idempotency key a start was given that could be taken for a child
/// run's ([`child_key`]).
pub(crate) fn check_user_key(workflow: &str, key: Option<&str>) -> Result<(), crate::Error> {
    match key {
        Some(k) if k.starts_with(CHILD_KEY_PREFIX) => Err(crate::Error::InvalidInput {
            workflow: workflow.to_owned(),
            message: format!(
                "idempotency keys starting with `{CHILD_KEY_PREFIX}` are reserved for child runs (subflows): {k:?}"
            ),
        }),
        _ => Ok(()),
    }
}

/// Locks the runs `ids` (the children of tasks about to be re-parked) `FOR SHARE`,
/// in id order, before the fence locks the tasks (see the module docs).
pub(crate) async fn lock_children(conn: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT 1 FROM pgflow.runs WHERE id = ANY ($1) ORDER BY id FOR SHARE")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Parent tasks to link to their children, as bind arrays.
#[derive(Debug, Default)]
pub(crate) struct Links<'a> {
    pub(crate) task_ids: Vec<i64>,
    /// The child's id when known (a task re-parked), else NULL: found by key.
    pub(crate) child_ids: Vec<Option<i64>>,
    pub(crate) workflows: Vec<&'a str>,
    pub(crate) keys: Vec<String>,
}

impl Links<'_> {
    pub(crate) fn is_empty(&self) -> bool {
        self.task_ids.is_empty()
    }
}

/// Links each task to its child (by id, else by the child's workflow and key, index
/// `runs_idempotency_key`): parked and due `infinity` while the child and the task's
/// own run are running, else unparked and due now (its claim then completes the step
/// from the child, or drops the task of a run that ended). Both runs are read under a
/// share lock, so a run failed or cancelled meanwhile is seen, and one failed or
/// cancelled after the commit finds the parked task (see `runs::cancel`). Returns the queues of tasks made due. A task whose child is
/// not found stays as the fence put it back (due, unparked): its step runs again and
/// starts the child.
pub(crate) async fn link(
    conn: &mut PgConnection,
    links: &Links<'_>,
) -> Result<Vec<String>, sqlx::Error> {
    if links.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "WITH u AS (
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[])
                 AS u(task_id, child_id, workflow, key)
         ), c AS (
             SELECT u.task_id, r.id, r.status = 'running' AND p.status = 'running' AS waits
             FROM u
             JOIN pgflow.tasks t ON t.id = u.task_id
             JOIN pgflow.runs p ON p.id = t.run_id
             JOIN pgflow.runs r
               ON r.id = COALESCE(u.child_id,
                                  (SELECT k.id FROM pgflow.runs k
                                   WHERE k.workflow = u.workflow AND k.idempotency_key = u.key
                                     AND k.parent_run_id = t.run_id))
             ORDER BY r.id
             FOR SHARE OF r, p
         )
         UPDATE pgflow.tasks t
         SET child_run_id = c.id,
             parked = c.waits,
             run_at = CASE WHEN c.waits THEN 'infinity' ELSE now() END
         FROM c
         WHERE t.id = c.task_id
         RETURNING CASE WHEN NOT t.parked THEN t.queue END",
    )
    .bind(&links.task_ids)
    .bind(&links.child_ids)
    .bind(&links.workflows)
    .bind(&links.keys)
    .fetch_all(conn)
    .await
    .map(|queues: Vec<Option<String>>| queues.into_iter().flatten().collect())
}

/// Makes the tasks waiting for the runs `children` (which just finished, failed or
/// were cancelled) due now (index `tasks_child_run_id`). Returns their queues. A
/// task claimed at the moment is left alone: its claim reads the child's status when
/// it parks again (see the module docs).
pub(crate) async fn wake_parents(
    conn: &mut PgConnection,
    children: &[i64],
) -> Result<Vec<String>, sqlx::Error> {
    if children.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "UPDATE pgflow.tasks t SET parked = false, run_at = now()
         WHERE t.child_run_id = ANY ($1) AND t.claimed_by IS NULL
         RETURNING t.queue",
    )
    .bind(children)
    .fetch_all(conn)
    .await
}

/// A child run, as tools show it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ChildRow {
    pub(crate) id: i64,
    pub(crate) workflow: String,
    pub(crate) version: i32,
    pub(crate) status: String,
    pub(crate) parent_run_id: i64,
    pub(crate) parent_step: Option<String>,
    pub(crate) depth: i32,
    pub(crate) parent_element: Option<i32>,
}

/// Every descendant of run `id` (children, their children, ..), parents before
/// children, siblings by element then id (index `runs_parent_run_id`); at most
/// `limit`.
pub(crate) async fn descendants(
    conn: &mut PgConnection,
    id: i64,
    limit: i64,
) -> Result<Vec<ChildRow>, sqlx::Error> {
    sqlx::query_as(
        "WITH RECURSIVE tree AS (
             SELECT r.id, r.workflow, r.version, r.status, r.parent_run_id, r.parent_step,
                    r.parent_element, ARRAY[r.id] AS ids,
                    ARRAY[COALESCE(r.parent_element, -1)::bigint, r.id] AS sort
             FROM pgflow.runs r WHERE r.parent_run_id = $1
             UNION ALL
             SELECT r.id, r.workflow, r.version, r.status, r.parent_run_id, r.parent_step,
                    r.parent_element, t.ids || r.id,
                    t.sort || ARRAY[COALESCE(r.parent_element, -1)::bigint, r.id]
             FROM pgflow.runs r JOIN tree t ON r.parent_run_id = t.id
             WHERE NOT r.id = ANY (t.ids)
         )
         SELECT id, workflow, version, status, parent_run_id, parent_step, parent_element,
                cardinality(ids) AS depth
         FROM tree ORDER BY sort LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::child_key;

    #[test]
    fn keys_name_the_run_step_and_element() {
        assert_eq!(child_key(7, 2, Some(0)), "subflow:7:2:0");
        assert_eq!(child_key(7, 2, None), "subflow:7:2");
    }
}
