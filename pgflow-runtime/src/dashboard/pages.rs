//! The dashboard's pages and actions. Each page reads through the admin API (or
//! `store::dashboard`) and writes HTML with [`super::html`]; a request with
//! `X-Pgflow-Fragment: 1` (the live update) gets only the page's live region.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{Duration as ChronoDuration, Utc};
use pgflow::RunId;
use serde::Deserialize;

use super::graph::{self, Node};
use super::html::{badge, cents, duration, esc, json_block, page, time, url_enc};
use super::{Ctx, Shared};
use crate::admin::{self, RunFilter};
use crate::store::dashboard as q;
use crate::{Error, RunStatus};

/// Runs per page of the run list.
const PAGE: u32 = 50;
/// The most bytes of one input or output a page shows.
const SHOW_BYTES: usize = 64 * 1024;

/// The page, or only its live region for a live update.
fn render(
    s: &Shared,
    headers: &HeaderMap,
    id: &str,
    title: &str,
    controls: &str,
    body: &str,
) -> Response {
    if headers.contains_key("x-pgflow-fragment") {
        return Html(body.to_owned()).into_response();
    }
    Html(page(&s.base, id, title, s.read_only, controls, body)).into_response()
}

/// A database error as a page (the message escaped; never a panic).
fn failed(e: &Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Html(format!(
            "<!doctype html><title>pgflow: error</title><p>The dashboard could not read the \
             database: {}</p>",
            esc(&e.to_string())
        )),
    )
        .into_response()
}

pub(crate) async fn not_found(State(s): Ctx, headers: HeaderMap) -> Response {
    let mut r = render(
        &s,
        &headers,
        "none",
        "Not found",
        "",
        "<h1>Not found</h1><p>No such page.</p>",
    );
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

// ---- overview ----

pub(crate) async fn overview(State(s): Ctx, headers: HeaderMap) -> Response {
    let status = match crate::admin::status::read(
        &s.pool,
        crate::admin::status::Parts {
            instances: true,
            queues: true,
            runs: true,
            ..Default::default()
        },
    )
    .await
    {
        Ok(st) => st,
        Err(e) => return failed(&e),
    };
    let minutes = match q::per_minute(&s.pool, 60, 50_000).await {
        Ok(m) => m,
        Err(e) => return failed(&Error::from(e)),
    };
    let mut b = String::new();
    let sum = |f: fn(&admin::WorkflowRuns) -> i64| status.runs.iter().map(f).sum::<i64>();
    let online = status
        .instances
        .iter()
        .filter(|i| i.status == "online")
        .count();
    let depth: i64 = status.queues.iter().map(|q| q.available).sum();
    let _ = write!(
        b,
        "<h1>Overview</h1><div class=\"cards\">\
         <div class=\"card\" id=\"card-running\"><div class=\"v\">{}</div><div class=\"k\">runs running</div></div>\
         <div class=\"card\"><div class=\"v\">{}</div><div class=\"k\">succeeded</div></div>\
         <div class=\"card\"><div class=\"v\">{}</div><div class=\"k\">failed</div></div>\
         <div class=\"card\"><div class=\"v\">{depth}</div><div class=\"k\">tasks due</div></div>\
         <div class=\"card\"><div class=\"v\">{online}</div><div class=\"k\">instances online</div></div></div>",
        sum(|w| w.running),
        sum(|w| w.succeeded),
        sum(|w| w.failed),
    );
    // the last 60 minutes, all workflows: finished per minute (succeeded/failed)
    let now = Utc::now();
    let mut per_min: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    let mut per_flow: BTreeMap<&str, Vec<&q::MinuteRow>> = BTreeMap::new();
    for m in &minutes {
        let ago = (now - m.minute).num_minutes().clamp(0, 60);
        let e = per_min.entry(ago).or_default();
        e.0 += m.succeeded;
        e.1 += m.failed;
        per_flow.entry(m.workflow.as_str()).or_default().push(m);
    }
    b.push_str("<h2>Runs finished per minute, last hour</h2><div class=\"chart-wrap\">");
    b.push_str(&bars(&per_min));
    b.push_str("</div><h2>Per workflow, last hour</h2>");
    b.push_str(
        "<table id=\"per-workflow\"><thead><tr><th>workflow</th><th class=\"num\">succeeded</th>\
         <th class=\"num\">failed</th><th class=\"num\">worst p95 / min</th><th>p95 per minute</th>\
         <th class=\"num\">cost</th><th>cost per minute</th></tr></thead><tbody>",
    );
    for (flow, rows) in &per_flow {
        let ok: i64 = rows.iter().map(|r| r.succeeded).sum();
        let bad: i64 = rows.iter().map(|r| r.failed).sum();
        let worst = rows.iter().filter_map(|r| r.p95_ms).max();
        let cost: i64 = rows.iter().map(|r| r.cost_cents).sum();
        let series = |f: fn(&q::MinuteRow) -> Option<i64>| {
            let mut v = vec![None; 61];
            for r in rows {
                let ago = (now - r.minute).num_minutes().clamp(0, 60);
                v[usize::try_from(60 - ago).unwrap_or(0)] = f(r);
            }
            sparkline(&v)
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"{base}runs?workflow={}\">{}</a></td><td class=\"num\">{ok}</td>\
             <td class=\"num\">{bad}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            url_enc(flow),
            esc(flow),
            worst.map(duration).unwrap_or_default(),
            series(|r| r.p95_ms),
            cents(cost),
            series(|r| Some(r.cost_cents)),
            base = s.base,
        );
    }
    if per_flow.is_empty() {
        b.push_str(
            "<tr><td colspan=\"7\" class=\"muted\">No run finished in the last hour.</td></tr>",
        );
    }
    b.push_str("</tbody></table><p class=\"muted\">From the newest 50,000 runs.</p>");
    render(&s, &headers, "overview", "Overview", "", &b)
}

/// A bar chart of runs finished per minute (`minutes ago -> (succeeded, failed)`).
fn bars(per_min: &BTreeMap<i64, (i64, i64)>) -> String {
    let (w, h, bw) = (61 * 12 + 40, 140_i64, 10_i64);
    let max = per_min
        .values()
        .map(|(a, b)| a + b)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out = format!(
        "<svg class=\"chart\" id=\"throughput\" width=\"{w}\" height=\"{}\" viewBox=\"0 0 {w} {}\">",
        h + 20,
        h + 20
    );
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"36\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\"/>\
         <text x=\"0\" y=\"10\">{max}/min</text><text x=\"36\" y=\"{}\">60 min ago</text>\
         <text x=\"{}\" y=\"{}\">now</text>",
        h + 14,
        w - 24,
        h + 14
    );
    for (ago, (ok, bad)) in per_min {
        let x = 40 + (60 - ago) * 12;
        let hok = ok * (h - 4) / max;
        let hbad = bad * (h - 4) / max;
        let _ = write!(
            out,
            "<rect class=\"ok\" x=\"{x}\" y=\"{}\" width=\"{bw}\" height=\"{hok}\"><title>{ok} succeeded</title></rect>\
             <rect class=\"bad\" x=\"{x}\" y=\"{}\" width=\"{bw}\" height=\"{hbad}\"><title>{bad} failed</title></rect>",
            h - hok,
            h - hok - hbad
        );
    }
    out.push_str("</svg>");
    out
}

/// A small line of `values` (gaps where `None`).
fn sparkline(values: &[Option<i64>]) -> String {
    let max = values.iter().flatten().copied().max().unwrap_or(0).max(1);
    let (w, h) = (180_i64, 24_i64);
    let n = i64::try_from(values.len().max(2) - 1).unwrap_or(1);
    let mut out = format!("<svg class=\"spark\" width=\"{w}\" height=\"{h}\">");
    // runs of consecutive points: a line each, a dot for a lone point
    let mut run: Vec<(i64, i64)> = Vec::new();
    let flush = |out: &mut String, run: &mut Vec<(i64, i64)>| {
        match run.as_slice() {
            [] => {}
            [(x, y)] => {
                let _ = write!(out, "<circle cx=\"{x}\" cy=\"{y}\" r=\"2\"/>");
            }
            points => {
                let pts: Vec<String> = points.iter().map(|(x, y)| format!("{x},{y}")).collect();
                let _ = write!(out, "<polyline points=\"{}\"/>", pts.join(" "));
            }
        }
        run.clear();
    };
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => {
                let x = i64::try_from(i).unwrap_or(0) * w / n;
                run.push((x, h - 2 - v * (h - 4) / max));
            }
            None => flush(&mut out, &mut run),
        }
    }
    flush(&mut out, &mut run);
    out.push_str("</svg>");
    out
}

// ---- runs ----

/// The run list's filters, as the form sends them (empty = any).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RunsQuery {
    #[serde(default)]
    workflow: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    before: String,
}

impl RunsQuery {
    /// The query string of these filters (without `before`).
    fn to_query(&self) -> String {
        [
            ("workflow", &self.workflow),
            ("version", &self.version),
            ("status", &self.status),
            ("key", &self.key),
            ("q", &self.q),
            ("since", &self.since),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", url_enc(v)))
        .collect::<Vec<_>>()
        .join("&")
    }
}

/// The time windows of the `since` filter: (value, label, minutes).
const SINCE: [(&str, &str, i64); 5] = [
    ("15m", "last 15 minutes", 15),
    ("1h", "last hour", 60),
    ("24h", "last 24 hours", 1_440),
    ("7d", "last 7 days", 10_080),
    ("", "any time", 0),
];

pub(crate) async fn runs(
    State(s): Ctx,
    headers: HeaderMap,
    Query(f): Query<RunsQuery>,
) -> Response {
    let mut notes = Vec::new();
    let status = match f.status.as_str() {
        "" => None,
        st => match st.parse::<RunStatus>() {
            Ok(st) => Some(st),
            Err(_) => {
                notes.push(format!("unknown status {st:?}: ignored"));
                None
            }
        },
    };
    let version = match f.version.trim() {
        "" => None,
        v => match v.parse::<i32>() {
            Ok(v) => Some(v),
            Err(_) => {
                notes.push(format!("version {v:?} is not a number: ignored"));
                None
            }
        },
    };
    let since = SINCE
        .iter()
        .find(|(v, _, _)| *v == f.since && !v.is_empty())
        .map(|(_, _, min)| Utc::now() - ChronoDuration::minutes(*min));
    let filter = RunFilter {
        workflow: Some(f.workflow.trim().to_owned()).filter(|w| !w.is_empty()),
        version,
        status,
        key: Some(f.key.trim().to_owned()).filter(|k| !k.is_empty()),
        before: f.before.trim().parse().ok(),
        since,
        search: Some(f.q.trim().to_owned()).filter(|q| !q.is_empty()),
        limit: PAGE,
    };
    let list = match admin::list_runs(&s.pool, &filter).await {
        Ok(l) => l,
        Err(e) => return failed(&e),
    };
    let workflows = crate::admin::status::read(
        &s.pool,
        crate::admin::status::Parts {
            runs: true,
            ..Default::default()
        },
    )
    .await
    .map(|st| st.runs.into_iter().map(|w| w.workflow).collect::<Vec<_>>())
    .unwrap_or_default();
    // the filters (outside the live region: typing is not interrupted)
    let mut c = String::from("<h1>Runs</h1><form class=\"filters\" id=\"filters\" method=\"get\">");
    c.push_str("<label>workflow<select name=\"workflow\" id=\"f-workflow\"><option value=\"\">any</option>");
    for w in &workflows {
        let sel = if *w == f.workflow { " selected" } else { "" };
        let _ = write!(c, "<option{sel} value=\"{}\">{}</option>", esc(w), esc(w));
    }
    c.push_str("</select></label><label>status<select name=\"status\" id=\"f-status\"><option value=\"\">any</option>");
    for st in ["running", "succeeded", "failed", "cancelled"] {
        let sel = if st == f.status { " selected" } else { "" };
        let _ = write!(c, "<option{sel}>{st}</option>");
    }
    let _ = write!(
        c,
        "</select></label><label>version<input name=\"version\" id=\"f-version\" size=\"4\" value=\"{}\"></label>\
         <label>key<input name=\"key\" id=\"f-key\" size=\"12\" value=\"{}\"></label>\
         <label>started<select name=\"since\" id=\"f-since\">",
        esc(&f.version),
        esc(&f.key)
    );
    for (v, label, _) in SINCE {
        let sel = if v == f.since { " selected" } else { "" };
        let _ = write!(c, "<option{sel} value=\"{v}\">{label}</option>");
    }
    let _ = write!(
        c,
        "</select></label><label>run id or idempotency key<input name=\"q\" id=\"f-q\" size=\"18\" value=\"{}\"></label>\
         <button type=\"submit\" id=\"apply\">Filter</button> <a href=\"{}runs\">clear</a></form>",
        esc(&f.q),
        s.base
    );
    for n in &notes {
        let _ = write!(c, "<div class=\"notice\">{}</div>", esc(n));
    }
    let mut b = String::from(
        "<table id=\"runs\"><thead><tr><th>id</th><th>workflow</th><th>status</th><th>key</th>\
         <th>started</th><th class=\"num\">duration</th><th class=\"num\">cost</th><th>error</th></tr></thead><tbody>",
    );
    for r in &list {
        let _ = write!(
            b,
            "<tr class=\"run\" data-id=\"{id}\" data-status=\"{}\"><td><a href=\"{base}runs/{id}\">{id}</a></td>\
             <td>{} <span class=\"muted\">v{}</span></td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"error\">{}</td></tr>",
            esc(&r.status),
            esc(&r.workflow),
            r.version,
            badge(&r.status),
            esc(r.key.as_deref().unwrap_or("")),
            time(&r.created_at),
            r.duration_ms.map(duration).unwrap_or_default(),
            cents(r.cost_cents),
            esc(&one_line(
                r.last_error.as_deref().or(r.error.as_deref()).unwrap_or(""),
                140
            )),
            id = r.id,
            base = s.base,
        );
    }
    if list.is_empty() {
        b.push_str("<tr><td colspan=\"8\" class=\"muted\" id=\"no-runs\">No runs match.</td></tr>");
    }
    b.push_str("</tbody></table>");
    if list.len() == PAGE as usize {
        if let Some(last) = list.last() {
            let q = f.to_query();
            let sep = if q.is_empty() { "" } else { "&" };
            let _ = write!(
                b,
                "<p><a id=\"older\" href=\"{}runs?{q}{sep}before={}\">Older runs →</a></p>",
                s.base, last.id
            );
        }
    }
    render(&s, &headers, "runs", "Runs", &c, &b)
}

/// `s` on one line, cut at `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let line: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    if line.chars().count() > max {
        line.chars().take(max).chain(['…']).collect()
    } else {
        line
    }
}

// ---- one run ----

pub(crate) async fn run(State(s): Ctx, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return not_found(State(s), headers).await;
    };
    let d = match admin::run_detail(&s.pool, RunId(id)).await {
        Ok(d) => d,
        Err(Error::RunNotFound(_)) => return not_found(State(s), headers).await,
        Err(e) => return failed(&e),
    };
    let usage = q::run_usage(&s.pool, id).await.unwrap_or_default();
    let r = &d.run;
    let base = &s.base;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Run {id} <span class=\"muted\">{} v{}</span> <span id=\"run-status\">{}</span></h1>",
        esc(&r.workflow),
        r.version,
        badge(&r.status)
    );
    if !s.read_only {
        b.push_str("<div class=\"actions\">");
        if r.status == "running" {
            let _ = write!(
                b,
                "<form method=\"post\" action=\"{base}runs/{id}/cancel\" id=\"cancel\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button class=\"danger\" id=\"cancel-button\" type=\"submit\">Cancel run</button></form>",
                s.csrf
            );
        }
        if r.status == "running" {
            let _ = write!(
                b,
                "<form method=\"post\" action=\"{base}runs/{id}/signal\" id=\"signal\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <input name=\"name\" id=\"signal-name\" placeholder=\"signal name\" size=\"14\" required>\
                 <input name=\"payload\" id=\"signal-payload\" placeholder=\"JSON payload\" size=\"24\">\
                 <button id=\"signal-button\" type=\"submit\">Send signal</button></form>",
                s.csrf
            );
        }
        if !d.steps.is_empty() {
            let _ = write!(
                b,
                "<form method=\"post\" action=\"{base}runs/{id}/fork\" id=\"fork\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <select name=\"from\" id=\"fork-from\">",
                s.csrf
            );
            for st in &d.steps {
                let _ = write!(
                    b,
                    "<option value=\"{}\">{}</option>",
                    esc(&st.name),
                    esc(&st.name)
                );
            }
            b.push_str(
                "</select><button id=\"fork-button\" type=\"submit\">Fork: run again from this step</button></form>",
            );
        }
        if r.status == "failed" || r.status == "cancelled" {
            let _ = write!(
                b,
                "<form method=\"post\" action=\"{base}runs/{id}/retry\" id=\"retry\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button id=\"retry-button\" type=\"submit\">Retry from the failed step</button></form>",
                s.csrf
            );
        }
        b.push_str("</div>");
    }
    let _ = write!(
        b,
        "<table class=\"facts\" id=\"facts\"><tbody>\
         <tr><th>started</th><td>{}</td><th>due</th><td>{}</td><th>finished</th><td>{}</td></tr>\
         <tr><th>duration</th><td>{}</td><th>cost</th><td>{}</td><th>tokens in / out</th><td>{} / {}</td></tr>\
         <tr><th>key</th><td>{}</td><th>idempotency key</th><td>{}</td><th>instance</th><td>{}</td></tr>\
         </tbody></table>",
        time(&r.created_at),
        time(&r.run_at),
        r.completed_at.as_ref().map(time).unwrap_or_default(),
        r.duration_ms.map(duration).unwrap_or_default(),
        cents(r.cost_cents),
        r.tokens.0,
        r.tokens.1,
        esc(r.key.as_deref().unwrap_or("")),
        esc(r.idempotency_key.as_deref().unwrap_or("")),
        esc(r.instance_id.as_deref().unwrap_or("")),
    );
    if let Some(p) = &d.parent {
        let _ = write!(
            b,
            "<p>Child of run <a href=\"{base}runs/{}\">{}</a>, step {}.</p>",
            p.run_id,
            p.run_id,
            esc(&p.step)
        );
    }
    if let Some(from) = d.forked_from {
        let _ = write!(
            b,
            "<p>Forked from run <a href=\"{base}runs/{from}\">{from}</a> at {}.</p>",
            esc(d.forked_at.as_deref().unwrap_or(""))
        );
    }
    // the graph
    let notes: Vec<Option<String>> = d
        .steps
        .iter()
        .map(|st| {
            st.elements
                .as_ref()
                .map(|e| format!("{}/{} elements", e.completed, e.total.unwrap_or(0)))
                .or_else(|| {
                    st.attempts
                        .filter(|a| *a > 1)
                        .map(|a| format!("{a} attempts"))
                })
        })
        .collect();
    let nodes: Vec<Node<'_>> = d
        .steps
        .iter()
        .zip(notes)
        .map(|(st, note)| Node {
            name: &st.name,
            parents: &st.parents,
            state: st.status.as_str(),
            duration_ms: st.duration_ms,
            note,
        })
        .collect();
    b.push_str("<h2>Steps</h2><div class=\"graph-wrap\">");
    b.push_str(&graph::svg(&nodes));
    b.push_str("</div>");
    b.push_str(&timeline(&d));
    b.push_str(
        "<table id=\"steps\"><thead><tr><th>step</th><th>state</th><th class=\"num\">attempts</th>\
         <th class=\"num\">waited</th><th class=\"num\">ran</th><th>started</th><th>instance</th>\
         <th>errors (oldest first)</th></tr></thead><tbody>",
    );
    for st in &d.steps {
        let mut errors = String::new();
        for e in &st.errors {
            let _ = write!(errors, "<div>{}</div>", esc(&e.to_string()));
        }
        if let Some(reason) = &st.reason {
            let _ = write!(errors, "<div class=\"muted\">{}</div>", esc(reason));
        }
        if let Some(e) = &st.elements {
            let _ = write!(
                errors,
                "<div class=\"muted\">elements: {} done, {} running, {} queued of {}{}</div>",
                e.completed,
                e.running,
                e.queued,
                e.total.map_or_else(|| "?".to_owned(), |t| t.to_string()),
                e.failed
                    .map(|f| format!("; element {f} failed"))
                    .unwrap_or_default()
            );
        }
        let _ = write!(
            b,
            "<tr data-step=\"{}\"><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"error\">{errors}</td></tr>",
            esc(&st.name),
            esc(&st.name),
            badge(st.status.as_str()),
            st.attempts.map(|a| a.to_string()).unwrap_or_default(),
            st.wait_ms.map(duration).unwrap_or_default(),
            st.duration_ms.map(duration).unwrap_or_default(),
            st.started_at.as_ref().map(time).unwrap_or_default(),
            esc(st.instance_id.as_deref().unwrap_or("")),
        );
    }
    b.push_str("</tbody></table>");
    if !d.subflows.is_empty() {
        b.push_str("<h2>Subflows</h2><table id=\"subflows\"><thead><tr><th>run</th><th>workflow</th><th>status</th><th>started by</th></tr></thead><tbody>");
        for c in &d.subflows {
            let _ = write!(
                b,
                "<tr><td>{}<a href=\"{base}runs/{id}\">{id}</a></td><td>{} v{}</td><td>{}</td><td>run {} step {}</td></tr>",
                "&nbsp;&nbsp;".repeat(usize::try_from(c.depth.max(1) - 1).unwrap_or(0)),
                esc(&c.workflow),
                c.version,
                badge(&c.status),
                c.parent.run_id,
                esc(&c.parent.step),
                id = c.id,
            );
        }
        b.push_str("</tbody></table>");
    }
    if !usage.is_empty() {
        b.push_str("<h2>Usage</h2><table id=\"usage\"><thead><tr><th>model</th><th class=\"num\">calls</th><th class=\"num\">tokens in</th><th class=\"num\">tokens out</th><th class=\"num\">cost</th></tr></thead><tbody>");
        for u in &usage {
            let _ = write!(
                b,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&u.model),
                u.calls,
                u.tokens_in,
                u.tokens_out,
                cents(u.cost_cents)
            );
        }
        b.push_str("</tbody></table>");
    }
    // each step's stored output, and the signals the run accepted
    match admin::export(&s.pool, RunId(id)).await {
        Ok(rec) => {
            let outputs: Vec<_> = rec
                .steps
                .iter()
                .filter_map(|st| Some((&st.name, st.output.as_ref()?)))
                .collect();
            if !outputs.is_empty() {
                b.push_str("<h2>Step outputs</h2><div id=\"step-outputs\">");
                for (i, (name, out)) in outputs.iter().enumerate() {
                    let _ = write!(
                        b,
                        "<details data-step=\"{}\"><summary>{}</summary>{}</details>",
                        esc(name),
                        esc(name),
                        json_block(&format!("step-output-{i}"), out, SHOW_BYTES)
                    );
                }
                b.push_str("</div>");
            }
            if !rec.signals.is_empty() {
                b.push_str("<h2>Signals</h2><table id=\"signals\"><thead><tr><th>name</th><th>payload</th></tr></thead><tbody>");
                for sig in &rec.signals {
                    let payload = serde_json::to_string(&sig.payload).unwrap_or_default();
                    let _ = write!(
                        b,
                        "<tr><td>{}</td><td><code>{}</code></td></tr>",
                        esc(&sig.name),
                        esc(&one_line(&payload, 300))
                    );
                }
                b.push_str("</tbody></table>");
            }
        }
        Err(e) => {
            let _ = write!(
                b,
                "<p class=\"muted\">Step outputs unavailable: {}</p>",
                esc(&e.to_string())
            );
        }
    }
    b.push_str("<div class=\"grid2\"><div><h2>Input</h2>");
    b.push_str(&json_block("input", &d.input, SHOW_BYTES));
    b.push_str("</div><div><h2>Output</h2>");
    match (&d.output, &d.error_detail) {
        (Some(out), _) => b.push_str(&json_block("output", out, SHOW_BYTES)),
        (None, Some(err)) => b.push_str(&json_block("error", err, SHOW_BYTES)),
        (None, None) => b.push_str("<p class=\"muted\">None yet.</p>"),
    }
    b.push_str("</div></div>");
    if !d.forks.is_empty() {
        b.push_str("<p>Forks: ");
        for f in &d.forks {
            let _ = write!(b, "<a href=\"{base}runs/{f}\">{f}</a> ");
        }
        b.push_str("</p>");
    }
    render(&s, &headers, "run", &format!("Run {id}"), "", &b)
}

/// The steps on a time axis: each step's wait (light) and run (dark) from the
/// run's start.
fn timeline(d: &admin::RunDetail) -> String {
    let t0 = d.run.created_at;
    let spans: Vec<(&str, i64, i64, i64)> = d
        .steps
        .iter()
        .filter_map(|st| {
            let start = (st.started_at? - t0).num_milliseconds().max(0);
            let wait = st.wait_ms.unwrap_or(0).clamp(0, start);
            Some((
                st.name.as_str(),
                start - wait,
                wait,
                st.duration_ms.unwrap_or(0).max(0),
            ))
        })
        .collect();
    if spans.is_empty() {
        return String::new();
    }
    let end = spans
        .iter()
        .map(|s| s.1 + s.2 + s.3)
        .max()
        .unwrap_or(1)
        .max(1);
    let (label_w, w, row) = (160_i64, 600_i64, 18_i64);
    let h = row * i64::try_from(spans.len()).unwrap_or(0) + 20;
    let mut out = format!(
        "<h2>Timeline</h2><div class=\"chart-wrap\"><svg class=\"timeline\" id=\"timeline\" width=\"{}\" height=\"{h}\">",
        label_w + w + 80
    );
    for (i, (name, from, wait, ran)) in spans.iter().enumerate() {
        let y = i64::try_from(i).unwrap_or(0) * row;
        let x = label_w + from * w / end;
        let ww = (wait * w / end).max(1);
        let rw = (ran * w / end).max(1);
        let _ = write!(
            out,
            "<text x=\"0\" y=\"{}\">{}</text><rect class=\"wait\" x=\"{x}\" y=\"{}\" width=\"{ww}\" height=\"12\"><title>waited {}</title></rect>\
             <rect class=\"bar\" x=\"{}\" y=\"{}\" width=\"{rw}\" height=\"12\"><title>ran {}</title></rect>",
            y + 12,
            esc(name),
            y + 2,
            duration(*wait),
            x + ww,
            y + 2,
            duration(*ran)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{label_w}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\">{}</text></svg></div>",
        h - 2,
        label_w + w - 20,
        h - 2,
        duration(end)
    );
    out
}

/// An action's form: the CSRF token, and for fork and signal their fields.
#[derive(Debug, Deserialize)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: String,
    /// fork: the step to run again from.
    #[serde(default)]
    from: String,
    /// signal: its name and JSON payload.
    #[serde(default)]
    name: String,
    #[serde(default)]
    payload: String,
}

/// Runs an action after its checks (not read-only, the form's CSRF token), then
/// shows the run it names (the same run, or a fork).
async fn action<F, Fut>(s: &Arc<Shared>, id: &str, form: &ActionForm, act: F) -> Response
where
    F: FnOnce(RunId) -> Fut,
    Fut: std::future::Future<Output = Result<i64, Error>>,
{
    if s.read_only {
        return (StatusCode::FORBIDDEN, "pgflow dashboard: read-only").into_response();
    }
    if !super::same(&form.csrf, &s.csrf) {
        return (
            StatusCode::FORBIDDEN,
            "pgflow dashboard: the form is stale or forged (CSRF token)",
        )
            .into_response();
    }
    let Ok(n) = id.parse::<i64>() else {
        return (StatusCode::NOT_FOUND, "no such run").into_response();
    };
    match act(RunId(n)).await {
        Ok(show) => Redirect::to(&format!("{}runs/{show}", s.base)).into_response(),
        // what the operator asked for cannot be done: said plainly
        Err(
            e @ (Error::RunNotFound(_)
            | Error::RunNotRunning { .. }
            | Error::NotRunning { .. }
            | Error::NotFailed { .. }
            | Error::UnknownStep { .. }
            | Error::UnknownSignal { .. }
            | Error::Incompatible { .. }
            | Error::InvalidInput { .. }
            | Error::MissingDefinition { .. }),
        ) => (
            StatusCode::CONFLICT,
            Html(format!(
                "<!doctype html><title>pgflow</title><p>{}</p><p><a href=\"{}runs/{n}\">Back to run {n}</a></p>",
                esc(&e.to_string()),
                s.base
            )),
        )
            .into_response(),
        Err(e) => failed(&e),
    }
}

pub(crate) async fn cancel(
    State(s): Ctx,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    let pool = s.pool.clone();
    action(&s, &id, &form, |run| async move {
        admin::cancel(&pool, run).await.map(|_| run.0)
    })
    .await
}

pub(crate) async fn retry(
    State(s): Ctx,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    let pool = s.pool.clone();
    action(&s, &id, &form, |run| async move {
        admin::retry(&pool, run).await.map(|_| run.0)
    })
    .await
}

/// Forks the run from the form's step: shows the new run.
pub(crate) async fn fork(
    State(s): Ctx,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    let pool = s.pool.clone();
    let from = form.from.clone();
    action(&s, &id, &form, |run| async move {
        admin::fork(&pool, run, &from, admin::ForkOptions::default())
            .await
            .map(|f| f.id)
    })
    .await
}

/// Sends the form's signal (its payload JSON; empty is `null`) to the run.
pub(crate) async fn signal(
    State(s): Ctx,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    let text = form.payload.trim();
    let payload = if text.is_empty() {
        Ok(serde_json::Value::Null)
    } else {
        serde_json::from_str::<serde_json::Value>(text)
    };
    let payload = match payload {
        Ok(p) => p,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Html(format!(
                    "<!doctype html><title>pgflow</title><p>The payload is not JSON: {}</p>",
                    esc(&e.to_string())
                )),
            )
                .into_response();
        }
    };
    let pool = s.pool.clone();
    let name = form.name.trim().to_owned();
    action(&s, &id, &form, |run| async move {
        admin::signal(&pool, run, &name, payload)
            .await
            .map(|_| run.0)
    })
    .await
}

// ---- queues, instances, workflows, schedules ----

pub(crate) async fn queues(State(s): Ctx, headers: HeaderMap) -> Response {
    let (status, oldest) = match (
        crate::admin::status::read(
            &s.pool,
            crate::admin::status::Parts {
                queues: true,
                ..Default::default()
            },
        )
        .await,
        crate::store::tasks::oldest_due(&s.pool).await,
    ) {
        (Ok(st), Ok(o)) => (st, o),
        (Err(e), _) => return failed(&e),
        (_, Err(e)) => return failed(&Error::from(e)),
    };
    let mut b = String::from(
        "<h1>Queues</h1><table id=\"queues\"><thead><tr><th>queue</th><th class=\"num\">due</th>\
         <th class=\"num\">oldest due waited</th><th class=\"num\">running</th><th class=\"num\">scheduled</th>\
         <th class=\"num\">awaiting signal</th><th class=\"num\">awaiting subflow</th></tr></thead><tbody>",
    );
    for qd in &status.queues {
        let age = oldest
            .iter()
            .find(|(q, _)| *q == qd.queue)
            .map(|(_, ms)| *ms);
        let _ = write!(
            b,
            "<tr data-queue=\"{}\"><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&qd.queue),
            esc(&qd.queue),
            qd.available,
            age.map(duration).unwrap_or_default(),
            qd.running,
            qd.scheduled,
            qd.awaiting_signal,
            qd.awaiting_subflow
        );
    }
    if status.queues.is_empty() {
        b.push_str("<tr><td colspan=\"7\" class=\"muted\">No tasks queued.</td></tr>");
    }
    b.push_str("</tbody></table>");
    render(&s, &headers, "queues", "Queues", "", &b)
}

pub(crate) async fn instances(State(s): Ctx, headers: HeaderMap) -> Response {
    let status = match crate::admin::status::read(
        &s.pool,
        crate::admin::status::Parts {
            instances: true,
            ..Default::default()
        },
    )
    .await
    {
        Ok(st) => st,
        Err(e) => return failed(&e),
    };
    let mut b = String::from(
        "<h1>Instances</h1><table id=\"instances\"><thead><tr><th>instance</th><th>status</th><th>host</th>\
         <th class=\"num\">pid</th><th class=\"num\">load</th><th>queues</th><th>started</th><th>last heartbeat</th></tr></thead><tbody>",
    );
    for i in &status.instances {
        let _ = write!(
            b,
            "<tr data-instance=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{} / {}</td><td>{}</td><td>{}</td><td>{} ago</td></tr>",
            esc(&i.id),
            esc(&i.id),
            badge(&i.status),
            esc(&i.host),
            i.pid,
            i.load,
            i.capacity,
            esc(&i.queues.to_string()),
            time(&i.started_at),
            duration(i.idle_ms)
        );
    }
    if status.instances.is_empty() {
        b.push_str("<tr><td colspan=\"8\" class=\"muted\">No instance has registered.</td></tr>");
    }
    b.push_str("</tbody></table>");
    render(&s, &headers, "instances", "Instances", "", &b)
}

pub(crate) async fn workflows(State(s): Ctx, headers: HeaderMap) -> Response {
    let status = match crate::admin::status::read(
        &s.pool,
        crate::admin::status::Parts {
            versions: true,
            ..Default::default()
        },
    )
    .await
    {
        Ok(st) => st,
        Err(e) => return failed(&e),
    };
    let base = &s.base;
    let mut b = String::from("<h1>Workflows</h1>");
    if !status.unserved.is_empty() {
        b.push_str(
            "<div class=\"notice\" id=\"unserved\">Runs of versions no online instance serves: ",
        );
        for u in &status.unserved {
            let _ = write!(
                b,
                "{} v{} ({} runs, queue {}); ",
                esc(&u.workflow),
                u.version,
                u.runs,
                esc(&u.queue)
            );
        }
        b.push_str("</div>");
    }
    b.push_str(
        "<table id=\"versions\"><thead><tr><th>workflow</th><th class=\"num\">version</th><th>queue</th>\
         <th>registered</th><th class=\"num\">runs in flight</th><th>served by</th></tr></thead><tbody>",
    );
    for v in &status.versions {
        let served = if v.instances.is_empty() {
            "<span class=\"badge s-failed\">nobody</span>".to_owned()
        } else {
            esc(&v.instances.join(", ")).to_string()
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"{base}workflows/{}/{}\">{}</a></td><td class=\"num\">{}</td><td>{}</td><td>{}</td>\
             <td class=\"num\"><a href=\"{base}runs?workflow={}&amp;version={}&amp;status=running\">{}</a></td><td>{served}</td></tr>",
            url_enc(&v.workflow),
            v.version,
            esc(&v.workflow),
            v.version,
            esc(&v.queue),
            time(&v.registered_at),
            url_enc(&v.workflow),
            v.version,
            v.running
        );
    }
    b.push_str("</tbody></table>");
    render(&s, &headers, "workflows", "Workflows", "", &b)
}

pub(crate) async fn workflow(
    State(s): Ctx,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    let Ok(version) = version.parse::<i32>() else {
        return not_found(State(s), headers).await;
    };
    let loaded = match s.pool.acquire().await {
        Ok(mut conn) => crate::admin::runs::load_definition(&mut conn, &name, version).await,
        Err(e) => Err(Error::from(e)),
    };
    let def = match loaded {
        Ok((def, _)) => def,
        Err(Error::MissingDefinition { .. }) => return not_found(State(s), headers).await,
        Err(e) => return failed(&e),
    };
    let nodes: Vec<Node<'_>> = def
        .steps
        .iter()
        .map(|st| Node {
            name: &st.name,
            parents: &st.parents,
            state: "definition",
            duration_ms: None,
            note: Some(format!("{} attempts max", st.max_attempts)),
        })
        .collect();
    let mut b = format!(
        "<h1>{} <span class=\"muted\">v{} · queue {}</span></h1><div class=\"graph-wrap\">{}</div>\
         <h2>Steps</h2><table id=\"definition\"><thead><tr><th>step</th><th>after</th><th>output</th>\
         <th class=\"num\">attempts</th><th class=\"num\">timeout</th></tr></thead><tbody>",
        esc(&def.name),
        def.version,
        esc(&def.queue),
        graph::svg(&nodes)
    );
    for st in &def.steps {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&st.name),
            esc(&st.parents.join(", ")),
            esc(&st.output),
            st.max_attempts,
            duration(i64::try_from(st.timeout_ms).unwrap_or(i64::MAX))
        );
    }
    b.push_str("</tbody></table>");
    let title = format!("{} v{}", def.name, def.version);
    render(&s, &headers, "workflows", &title, "", &b)
}

pub(crate) async fn schedules(State(s): Ctx, headers: HeaderMap) -> Response {
    let list = match admin::schedules(&s.pool).await {
        Ok(l) => l,
        Err(e) => return failed(&e),
    };
    let base = &s.base;
    let mut b = String::from(
        "<h1>Schedules</h1><table id=\"schedules\"><thead><tr><th>schedule</th><th>workflow</th><th>cron</th>\
         <th>time zone</th><th>next tick</th><th>last tick</th><th>last run</th></tr></thead><tbody>",
    );
    for sc in &list {
        let last = match (sc.last_run_id, &sc.last_run_status) {
            (Some(id), st) => format!(
                "<a href=\"{base}runs/{id}\">{id}</a> {}",
                st.as_deref().map(badge).unwrap_or_default()
            ),
            (None, _) => String::new(),
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{last}</td></tr>",
            esc(&sc.name),
            esc(&sc.workflow),
            esc(&sc.cron),
            esc(&sc.time_zone),
            sc.next_tick.as_ref().map(time).unwrap_or_default(),
            sc.last_tick.as_ref().map(time).unwrap_or_default(),
        );
    }
    if list.is_empty() {
        b.push_str("<tr><td colspan=\"7\" class=\"muted\">No schedules.</td></tr>");
    }
    b.push_str("</tbody></table>");
    render(&s, &headers, "schedules", "Schedules", "", &b)
}
