//! Windows of the runtime's limits, `pgflow.limit_windows` (see `crate::limits`):
//! reserving an attempt's weight before it starts, settling it when its claim ends.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// One limit an attempt counts against.
#[derive(Debug, Clone)]
pub(crate) struct Want<'a> {
    pub(crate) name: &'a str,
    pub(crate) key: &'a str,
    pub(crate) period_secs: i64,
    pub(crate) amount: i64,
    pub(crate) max: i64,
    pub(crate) unit: &'static str,
}

/// The first window with no room.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Full {
    pub(crate) name: String,
    pub(crate) key: String,
    pub(crate) used: i64,
    pub(crate) reserved: i64,
    pub(crate) amount: i64,
    pub(crate) max: i64,
    pub(crate) window_end: DateTime<Utc>,
}

/// Reserves `wants` in the current windows, all or nothing, for the attempt of task
/// `task_id` claimed with `token` (the holds are written on the task row, fenced on
/// the token). `Ok(None)`: reserved (or the claim is gone); `Ok(Some(..))`: a window
/// has no room.
pub(crate) async fn reserve(
    conn: &mut PgConnection,
    (task_id, token): (i64, i64),
    wants: &[Want<'_>],
) -> Result<Option<Full>, sqlx::Error> {
    let names: Vec<&str> = wants.iter().map(|w| w.name).collect();
    let keys: Vec<&str> = wants.iter().map(|w| w.key).collect();
    let periods: Vec<i64> = wants.iter().map(|w| w.period_secs).collect();
    let amounts: Vec<i64> = wants.iter().map(|w| w.amount).collect();
    let maxes: Vec<i64> = wants.iter().map(|w| w.max).collect();
    let units: Vec<&str> = wants.iter().map(|w| w.unit).collect();
    // The current windows, computed once (a boundary may pass between statements),
    // and their rows (a statement of its own: the next one locks them).
    let windows: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "WITH w AS (
             SELECT h.name, h.key, h.ord,
                    to_timestamp(floor(extract(epoch FROM now()) / h.period) * h.period) AS win
             FROM unnest($1::text[], $2::text[], $3::bigint[])
                  WITH ORDINALITY AS h(name, key, period, ord)
         ), ins AS (
             INSERT INTO pgflow.limit_windows (name, key, window_start)
             SELECT name, key, win FROM w ORDER BY name, key
             ON CONFLICT DO NOTHING
         )
         SELECT win FROM w ORDER BY ord",
    )
    .bind(&names)
    .bind(&keys)
    .bind(&periods)
    .fetch_all(&mut *conn)
    .await?;
    let full: Option<Full> = sqlx::query_as(
        "WITH h AS (
             SELECT * FROM unnest($3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[],
                                  $8::text[], $9::timestamptz[])
                 AS h(name, key, period, amount, max, unit, win)
         ), t AS (
             SELECT id FROM pgflow.tasks WHERE id = $1 AND claim_token = $2 FOR UPDATE
         ), w AS MATERIALIZED (
             -- the windows, locked (in name and key order): their latest counts
             SELECT x.name, x.key, x.window_start, x.used, x.reserved, h.amount, h.max,
                    h.unit, h.period
             FROM pgflow.limit_windows x
             JOIN h ON x.name = h.name AND x.key = h.key AND x.window_start = h.win
             ORDER BY x.name, x.key
             FOR UPDATE OF x
         ), fits AS MATERIALIZED (
             SELECT COALESCE(bool_and(used + reserved + amount <= max), true) AS ok FROM w
         ), upd AS (
             UPDATE pgflow.limit_windows x SET reserved = x.reserved + w.amount
             FROM w
             WHERE x.name = w.name AND x.key = w.key AND x.window_start = w.window_start
               AND (SELECT ok FROM fits) AND EXISTS (SELECT 1 FROM t)
         ), held AS (
             UPDATE pgflow.tasks SET limit_holds = (
                 SELECT jsonb_agg(jsonb_build_object('name', w.name, 'key', w.key,
                                                     'window', w.window_start,
                                                     'amount', w.amount, 'unit', w.unit))
                 FROM w)
             WHERE id IN (SELECT id FROM t) AND (SELECT ok FROM fits)
         )
         SELECT w.name, w.key, w.used, w.reserved, w.amount, w.max,
                w.window_start + interval '1 second' * w.period AS window_end
         FROM w
         WHERE NOT (SELECT ok FROM fits) AND EXISTS (SELECT 1 FROM t)
           AND w.used + w.reserved + w.amount > w.max
         ORDER BY w.name, w.key
         LIMIT 1",
    )
    .bind(task_id)
    .bind(token)
    .bind(&names)
    .bind(&keys)
    .bind(&periods)
    .bind(&amounts)
    .bind(&maxes)
    .bind(&units)
    .bind(&windows)
    .fetch_optional(conn)
    .await?;
    Ok(full)
}

/// A hold as written on a task row.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct Hold {
    pub(crate) name: String,
    pub(crate) key: String,
    pub(crate) window: DateTime<Utc>,
    pub(crate) amount: i64,
    pub(crate) unit: String,
}

/// Parses a task row's `limit_holds`.
pub(crate) fn holds(json: Option<&str>) -> Vec<Hold> {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

/// Settles holds: each window's reservation goes, and what the attempt used (by the
/// hold's unit) is counted.
pub(crate) async fn settle(
    conn: &mut PgConnection,
    settled: &[(Hold, i64)],
) -> Result<(), sqlx::Error> {
    if settled.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = settled.iter().map(|(h, _)| h.name.as_str()).collect();
    let keys: Vec<&str> = settled.iter().map(|(h, _)| h.key.as_str()).collect();
    let windows: Vec<DateTime<Utc>> = settled.iter().map(|(h, _)| h.window).collect();
    let amounts: Vec<i64> = settled.iter().map(|(h, _)| h.amount).collect();
    let used: Vec<i64> = settled.iter().map(|(_, u)| *u).collect();
    sqlx::query(
        "WITH s AS (
             SELECT name, key, win, sum(amount)::bigint AS amount, sum(used)::bigint AS used
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], $5::bigint[])
                  AS s(name, key, win, amount, used)
             GROUP BY name, key, win
         )
         , locked AS (
             -- in name and key order, as `reserve` locks them
             SELECT x.name, x.key, x.window_start FROM pgflow.limit_windows x
             JOIN s ON x.name = s.name AND x.key = s.key AND x.window_start = s.win
             ORDER BY x.name, x.key
             FOR UPDATE OF x
         )
         UPDATE pgflow.limit_windows x
         SET reserved = GREATEST(x.reserved - s.amount, 0), used = x.used + s.used
         FROM s JOIN locked l ON l.name = s.name AND l.key = s.key AND l.window_start = s.win
         WHERE x.name = s.name AND x.key = s.key AND x.window_start = s.win",
    )
    .bind(&names)
    .bind(&keys)
    .bind(&windows)
    .bind(&amounts)
    .bind(&used)
    .execute(conn)
    .await?;
    Ok(())
}
