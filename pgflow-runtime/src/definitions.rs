//! Registering workflow definitions in `pgflow.workflows`.
//!
//! At start every linked `(name, version)` is inserted with its step table
//! ([`WorkflowDef::describe`]). If a row already exists and differs, start is refused
//! with the first differences, so a changed workflow must get a new version (runs in
//! flight keep the step table they started with).

use pgflow::WorkflowDef;
use serde_json::Value;
use sqlx::PgPool;

use crate::Error;

/// Inserts each definition (one round trip) and compares the stored ones.
pub(crate) async fn register(pool: &PgPool, defs: &[&'static WorkflowDef]) -> Result<(), Error> {
    if defs.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = defs.iter().map(|d| d.name()).collect();
    let versions: Vec<i32> = defs.iter().map(|d| version_i32(d.version())).collect();
    let described: Vec<Value> = defs.iter().map(|d| d.describe()).collect();
    let texts: Vec<String> = described.iter().map(Value::to_string).collect();
    // ON CONFLICT DO NOTHING keeps the first registration; the SELECT returns what is
    // stored now for every (name, version) we link, ours or an earlier one.
    let stored: Vec<(String, i32, String)> = sqlx::query_as(
        "WITH mine AS (
             SELECT * FROM unnest($1::text[], $2::int[], $3::text[]) AS m(name, version, definition)
         ), ins AS (
             INSERT INTO pgflow.workflows (name, version, definition)
             SELECT name, version, definition::jsonb FROM mine
             ON CONFLICT (name, version) DO NOTHING
         )
         SELECT w.name, w.version, w.definition::text
         FROM pgflow.workflows w JOIN mine m USING (name, version)",
    )
    .bind(&names)
    .bind(&versions)
    .bind(&texts)
    .fetch_all(pool)
    .await?;
    for (name, version, text) in stored {
        let Some(i) = defs
            .iter()
            .position(|d| d.name() == name && version_i32(d.version()) == version)
        else {
            continue;
        };
        let stored: Value = serde_json::from_str(&text).map_err(|e| Error::DefinitionChanged {
            workflow: name.clone(),
            version: defs[i].version(),
            difference: format!("the stored definition is not readable: {e}"),
        })?;
        let mut diffs = Vec::new();
        diff("", &stored, &described[i], &mut diffs);
        if !diffs.is_empty() {
            let shown = diffs.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
            let more = diffs.len().saturating_sub(5);
            return Err(Error::DefinitionChanged {
                workflow: name,
                version: defs[i].version(),
                difference: if more > 0 {
                    format!("{shown}; and {more} more")
                } else {
                    shown
                },
            });
        }
    }
    Ok(())
}

pub(crate) fn version_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// Lists the paths where `old` and `new` differ: `steps[1].timeout_ms: 30000 -> 10000`.
fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(
                    &p,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            out.push(format!(
                "{path}: {} entries -> {} entries",
                a.len(),
                b.len()
            ));
        }
        _ if old != new => out.push(format!("{path}: {old} -> {new}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_names_each_changed_path() {
        let old = json!({"steps": [{"name": "a", "timeout_ms": 30000}], "queue": "q"});
        let new = json!({"steps": [{"name": "a", "timeout_ms": 10000}], "queue": "q"});
        let mut out = Vec::new();
        diff("", &old, &new, &mut out);
        assert_eq!(out, ["steps[0].timeout_ms: 30000 -> 10000"]);
        let new = json!({"steps": [], "queue": "r"});
        let mut out = Vec::new();
        diff("", &old, &new, &mut out);
        assert_eq!(
            out,
            ["queue: \"q\" -> \"r\"", "steps: 1 entries -> 0 entries"]
        );
    }
}
