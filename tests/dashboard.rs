//! The web dashboard against the real Postgres: its pages in a real headless
//! Chromium (through ChromeDriver) over a database with real runs — the graph,
//! filters, the cancel button, run data shown as text, no console error, with
//! screenshots in `target/screenshots/` — and its guards over plain HTTP (token,
//! CSRF, other origins, read-only, the listen address), and keyset pagination.

#[path = "support/browser.rs"]
mod browser;

use std::time::Duration;

use pgflow::{StepError, workflow};
use pgflow_runtime::dashboard::Dashboard;
use pgflow_runtime::{Error, Runtime, admin};
use pgflow_suite::support::{serve, status_of, wait_finished};
use sqlx::PgPool;

pub struct Pipeline;

#[workflow(name = "dash_pipeline", queue = "dash")]
impl Pipeline {
    #[step]
    async fn fetch(input: String) -> Result<String, StepError> {
        Ok(input)
    }

    #[step]
    async fn upper(fetch: String) -> Result<String, StepError> {
        Ok(fetch.to_uppercase())
    }

    #[step(depends_on = [fetch])]
    async fn count(fetch: String) -> Result<usize, StepError> {
        Ok(fetch.len())
    }

    #[step(depends_on = [upper, count])]
    async fn join(upper: String, count: usize) -> Result<String, StepError> {
        Ok(format!("{upper} ({count})"))
    }
}

pub struct Flaky;

#[workflow(name = "dash_flaky", queue = "dash")]
impl Flaky {
    #[step(max_attempts = 2, backoff = "10ms")]
    async fn call(n: u32) -> Result<u32, StepError> {
        Err(StepError::retryable(format!(
            "upstream said <b>no</b> to {n}"
        )))
    }
}

/// Waits for a signal: the dashboard sends it.
pub struct Approval;

#[workflow(name = "dash_approval", queue = "dash")]
impl Approval {
    #[step(signal = verdict)]
    async fn decide(input: String, verdict: String) -> Result<String, StepError> {
        Ok(format!("{input}: {verdict}"))
    }
}

/// Runs on a queue no runtime here serves: they stay running (the cancel button).
pub struct Parked;

#[workflow(name = "dash_parked", queue = "dash_nobody")]
impl Parked {
    #[step]
    async fn wait(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

/// What a hostile input looks like on the page: markup that would run if it were
/// not escaped.
const HOSTILE: &str = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">";

async fn runtime(pool: &PgPool) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .queue("dash", 8)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .expect("runtime")
}

/// The DOM, read in the page.
async fn js(b: &browser::Browser, script: &str) -> serde_json::Value {
    b.client()
        .execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("script {script}: {e}"))
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn every_page_renders_real_runs_in_a_real_browser(pool: PgPool) {
    let rt = runtime(&pool).await;
    let ok = rt
        .start::<Pipeline>("hello".to_owned())
        .await
        .expect("start");
    let hostile = rt
        .start::<Pipeline>(HOSTILE.to_owned())
        .await
        .expect("start");
    let failed = rt.start::<Flaky>(7).await.expect("start");
    let parked = rt.start::<Parked>(1).await.expect("start");
    let approval = rt
        .start::<Approval>("draft".to_owned())
        .await
        .expect("start");
    wait_finished(&pool, &[ok.id(), hostile.id(), failed.id()]).await;
    let base = serve(Dashboard::new(pool.clone()).router()).await;
    let b = browser::Browser::start().await;

    // overview
    b.goto_and_check(&format!("{base}/")).await;
    assert_eq!(
        js(&b, "return document.getElementById('page').dataset.page").await,
        "overview"
    );
    let running = js(
        &b,
        "return document.querySelector('#card-running .v').textContent",
    )
    .await;
    assert_eq!(
        running, "2",
        "two runs are running (parked, awaiting a signal)"
    );
    assert_eq!(
        js(
            &b,
            "return document.querySelectorAll('#per-workflow tbody tr').length"
        )
        .await,
        2,
        "two workflows finished runs in the last hour"
    );
    b.screenshot("overview").await;

    // runs: all five, then filtered to the failed one by the form
    b.goto_and_check(&format!("{base}/runs")).await;
    assert_eq!(
        js(
            &b,
            "return document.querySelectorAll('#runs tr.run').length"
        )
        .await,
        5
    );
    b.screenshot("runs").await;
    js(
        &b,
        "document.getElementById('f-status').value = 'failed'; return null",
    )
    .await;
    b.click_and_check("#apply").await;
    let statuses = js(
        &b,
        "return Array.from(document.querySelectorAll('#runs tr.run')).map(r => r.dataset.status)",
    )
    .await;
    assert_eq!(statuses, serde_json::json!(["failed"]));
    assert!(
        b.client()
            .current_url()
            .await
            .expect("url")
            .as_str()
            .contains("status=failed")
    );
    b.check_console().await;

    // a succeeded run: one node per step, each completed; its hostile input as text
    b.goto_and_check(&format!("{base}/runs/{}", hostile.id()))
        .await;
    let nodes = js(
        &b,
        "return Array.from(document.querySelectorAll('#graph g.node')).map(n => [n.dataset.step, n.dataset.state])",
    )
    .await;
    assert_eq!(
        nodes,
        serde_json::json!([
            ["fetch", "completed"],
            ["upper", "completed"],
            ["count", "completed"],
            ["join", "completed"]
        ])
    );
    assert_eq!(
        js(
            &b,
            "return document.querySelectorAll('#graph path.edge').length"
        )
        .await,
        4
    );
    // a diamond: upper and count side by side, in the column after fetch
    let columns = js(
        &b,
        "return Array.from(document.querySelectorAll('#graph g.node')).map(n => n.transform.baseVal[0].matrix.e)",
    )
    .await;
    let x: Vec<f64> = serde_json::from_value(columns).expect("numbers");
    assert!(x[0] < x[1] && x[1] == x[2] && x[2] < x[3], "{x:?}");
    let shown = js(&b, "return document.getElementById('input').textContent").await;
    // the input as JSON, as text
    let as_json = serde_json::to_string(HOSTILE).expect("json");
    assert!(shown.as_str().expect("text").contains(&as_json), "{shown}");
    assert_eq!(js(&b, "return typeof window.__pwned").await, "undefined");
    assert_eq!(
        js(&b, "return document.querySelectorAll('img').length").await,
        0
    );
    assert_eq!(
        js(&b, "return document.querySelectorAll('script').length").await,
        1
    );
    b.screenshot("run").await;

    // the steps' stored outputs (the last step's is the run's output)
    let outputs = js(
        &b,
        "return Array.from(document.querySelectorAll('#step-outputs details')).map(d => [d.dataset.step, d.querySelector('pre').textContent])",
    )
    .await;
    let upper = serde_json::to_string(&HOSTILE.to_uppercase()).expect("json");
    assert_eq!(outputs[1], serde_json::json!(["upper", upper]), "{outputs}");
    assert_eq!(
        outputs[2],
        serde_json::json!(["count", HOSTILE.len().to_string()])
    );

    // a failed run: its step failed, with both attempts' errors as text
    b.goto_and_check(&format!("{base}/runs/{}", failed.id()))
        .await;
    assert_eq!(
        js(
            &b,
            "return document.querySelector('#graph g.node').dataset.state"
        )
        .await,
        "failed"
    );
    let errors = js(
        &b,
        "return document.querySelector('#steps tr[data-step=call] td.error').textContent",
    )
    .await;
    let errors = errors.as_str().expect("text");
    assert_eq!(
        errors.matches("upstream said <b>no</b> to 7").count(),
        2,
        "{errors}"
    );
    assert!(
        js(
            &b,
            "return document.getElementById('retry-button') !== null"
        )
        .await
        .as_bool()
        .expect("bool")
    );

    // the running run: the cancel button cancels it
    b.goto_and_check(&format!("{base}/runs/{}", parked.id()))
        .await;
    assert_eq!(
        js(
            &b,
            "return document.querySelector('#run-status .badge').dataset.status"
        )
        .await,
        "running"
    );
    assert_eq!(
        js(
            &b,
            "return document.querySelector('#graph g.node').dataset.state"
        )
        .await,
        "queued"
    );
    b.click_and_check("#cancel-button").await;
    assert_eq!(
        js(
            &b,
            "return document.querySelector('#run-status .badge').dataset.status"
        )
        .await,
        "cancelled"
    );
    b.check_console().await;
    let stored = admin::run_detail(&pool, parked.id()).await.expect("run");
    assert_eq!(stored.run.status, "cancelled");

    // a run waiting for a signal: the form sends it, the run finishes with it
    b.goto_and_check(&format!("{base}/runs/{}", approval.id()))
        .await;
    assert_eq!(
        js(
            &b,
            "return document.querySelector('#graph g.node').dataset.state"
        )
        .await,
        "awaiting_signal"
    );
    js(
        &b,
        "document.getElementById('signal-name').value = 'verdict'; \
         document.getElementById('signal-payload').value = '\"approved\"'; return null",
    )
    .await;
    b.click_and_check("#signal-button").await;
    wait_finished(&pool, &[approval.id()]).await;
    let done = admin::run_detail(&pool, approval.id()).await.expect("run");
    assert_eq!(done.output, Some(serde_json::json!("draft: approved")));
    b.goto_and_check(&format!("{base}/runs/{}", approval.id()))
        .await;
    let signals = js(&b, "return document.getElementById('signals').textContent").await;
    assert!(
        signals
            .as_str()
            .expect("text")
            .contains("verdict\"approved\""),
        "{signals}"
    );

    // fork the succeeded run from `upper`: the new run's page, reusing `fetch`
    b.goto_and_check(&format!("{base}/runs/{}", ok.id())).await;
    js(
        &b,
        "document.getElementById('fork-from').value = 'upper'; return null",
    )
    .await;
    b.click_and_check("#fork-button").await;
    let url = b.client().current_url().await.expect("url");
    let forked: i64 = url
        .path()
        .rsplit('/')
        .next()
        .and_then(|id| id.parse().ok())
        .expect("the fork's page");
    assert_ne!(forked, ok.id().0);
    wait_finished(&pool, &[pgflow::RunId(forked)]).await;
    let fork = admin::run_detail(&pool, pgflow::RunId(forked))
        .await
        .expect("fork");
    assert_eq!(fork.forked_from, Some(ok.id().0));
    assert_eq!(fork.run.status, "succeeded");

    // queues, instances, workflows (and a definition's graph), schedules
    b.goto_and_check(&format!("{base}/queues")).await;
    assert_eq!(
        js(&b, "return document.getElementById('page').dataset.page").await,
        "queues"
    );
    b.screenshot("queues").await;
    b.goto_and_check(&format!("{base}/instances")).await;
    let online = js(
        &b,
        "return document.querySelectorAll('#instances .badge[data-status=online]').length",
    )
    .await;
    assert_eq!(online, 1);
    b.screenshot("instances").await;
    b.goto_and_check(&format!("{base}/workflows")).await;
    b.screenshot("workflows").await;
    b.goto_and_check(&format!("{base}/workflows/dash_pipeline/1"))
        .await;
    assert_eq!(
        js(
            &b,
            "return document.querySelectorAll('#graph g.node').length"
        )
        .await,
        4
    );
    b.goto_and_check(&format!("{base}/schedules")).await;
    // live updates: a run started while the page is open shows up without a reload
    b.goto_and_check(&format!("{base}/runs")).await;
    let count = "return document.querySelectorAll('#runs tr.run').length";
    assert_eq!(js(&b, count).await, 6);
    js(
        &b,
        "document.body.dataset.marker = 'same page'; return null",
    )
    .await;
    rt.start::<Parked>(9).await.expect("start");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(js(&b, count).await, 7);
    assert_eq!(
        js(&b, "return document.body.dataset.marker").await,
        "same page"
    );
    b.check_console().await;
    b.close().await;
    rt.shutdown().await.expect("shutdown");
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// A POST of an HTML form's body.
fn form_post(c: &reqwest::Client, url: &str, body: String) -> reqwest::RequestBuilder {
    c.post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_token_guards_every_page(pool: PgPool) {
    let base = serve(Dashboard::new(pool).token("s3cret").router()).await;
    let c = client();
    let r = c.get(format!("{base}/runs")).send().await.expect("get");
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{base}/runs"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{base}/runs"))
        .bearer_auth("s3cret")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .expect("csp");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    // once in the address: a cookie, and a redirect without it
    let r = c
        .get(format!("{base}/runs?token=s3cret"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/runs");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("pair").to_owned();
    let r = c
        .get(format!("{base}/queues"))
        .header("cookie", pair)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn actions_need_the_csrf_token_the_origin_and_write_access(pool: PgPool) {
    let rt = Runtime::builder()
        .pool(pool.clone())
        .start()
        .await
        .expect("rt");
    let run = rt.start::<Parked>(1).await.expect("start");
    let base = serve(Dashboard::new(pool.clone()).router()).await;
    let c = client();
    let page = c
        .get(format!("{base}/runs/{}", run.id()))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a csrf field")
        .to_owned();
    let cancel = format!("{base}/runs/{}/cancel", run.id());
    // no token, a wrong one, another origin: refused, the run untouched
    for (form, origin) in [
        (String::new(), None),
        ("csrf=0000".to_owned(), None),
        (format!("csrf={csrf}"), Some("http://evil.example")),
    ] {
        let mut req = form_post(&c, &cancel, form);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        assert_eq!(req.send().await.expect("post").status(), 403);
    }
    assert_eq!(status_of(&pool, run.id()).await, "running");
    // read-only: no buttons, and the action refused
    let ro = serve(Dashboard::new(pool.clone()).read_only(true).router()).await;
    let page = c
        .get(format!("{ro}/runs/{}", run.id()))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(!page.contains("cancel-button") && page.contains("read-only"));
    let r = form_post(
        &c,
        &format!("{ro}/runs/{}/cancel", run.id()),
        format!("csrf={csrf}"),
    )
    .send()
    .await
    .expect("post");
    assert_eq!(r.status(), 403);
    // the right token from the same origin cancels
    let r = form_post(&c, &cancel, format!("csrf={csrf}"))
        .header("origin", base.as_str())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 303);
    assert_eq!(status_of(&pool, run.id()).await, "cancelled");
    // a signal whose payload is not JSON, a fork from a step that does not exist:
    // said plainly
    let r = form_post(
        &c,
        &format!("{base}/runs/{}/signal", run.id()),
        format!("csrf={csrf}&name=go&payload=%7Bnot+json"),
    )
    .send()
    .await
    .expect("post");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.expect("text").contains("not JSON"));
    let r = form_post(
        &c,
        &format!("{base}/runs/{}/fork", run.id()),
        format!("csrf={csrf}&from=%3Cnope%3E"),
    )
    .send()
    .await
    .expect("post");
    assert_eq!(r.status(), 409);
    let text = r.text().await.expect("text");
    assert!(
        text.contains("&lt;nope&gt;") && !text.contains("<nope>"),
        "{text}"
    );
    // again: cancelling a cancelled run changes nothing
    let r = form_post(&c, &cancel, format!("csrf={csrf}"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 303);
    assert_eq!(status_of(&pool, run.id()).await, "cancelled");
    rt.shutdown().await.expect("shutdown");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn serving_beyond_localhost_needs_a_token(pool: PgPool) {
    let err = Dashboard::new(pool)
        .serve("0.0.0.0:0".parse().expect("addr"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("token"), "{err}");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn the_run_list_pages_by_keyset_and_filters(pool: PgPool) {
    let rt = Runtime::builder()
        .pool(pool.clone())
        .start()
        .await
        .expect("rt");
    let ids = rt.start_many::<Parked>(0..120).await.expect("start");
    let base = serve(Dashboard::new(pool.clone()).router()).await;
    let c = client();
    let mut seen = Vec::new();
    let mut url = format!("{base}/runs?workflow=dash_parked");
    for _ in 0..5 {
        let page = c
            .get(&url)
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("text");
        for part in page.split("<tr class=\"run\" data-id=\"").skip(1) {
            seen.push(
                part.split('"')
                    .next()
                    .expect("id")
                    .parse::<i64>()
                    .expect("number"),
            );
        }
        match page.split("id=\"older\" href=\"").nth(1) {
            Some(rest) => {
                let href = rest.split('"').next().expect("href").replace("&amp;", "&");
                url = format!("{base}{href}");
            }
            None => break,
        }
    }
    let mut want: Vec<i64> = ids.iter().map(|id| id.0).collect();
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seen, want, "every run once, newest first, over three pages");
    // a search by id; an unknown status is a notice, not an error
    let one = want[7];
    let page = c
        .get(format!("{base}/runs?q={one}&status=bogus"))
        .send()
        .await
        .expect("get");
    assert_eq!(page.status(), 200);
    let page = page.text().await.expect("text");
    assert_eq!(page.matches("<tr class=\"run\"").count(), 1, "{page}");
    assert!(page.contains("unknown status"), "{page}");
    rt.shutdown().await.expect("shutdown");
}

/// The run list stays an index range at any size: with 200,000 runs (a rare
/// workflow, tenant keys, idempotency keys, start times over two days), each filter
/// is planned on its index, never a scan of the table, and a time window bounds the
/// walk by id.
#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn each_run_filter_is_an_index_range(pool: PgPool) {
    sqlx::query(
        "INSERT INTO pgflow.runs (workflow, version, input, status, key, idempotency_key, created_at)
         SELECT CASE WHEN g % 10000 = 0 THEN 'rare' ELSE 'big' END, 1, '1',
                CASE WHEN g % 1000 = 0 THEN 'failed' ELSE 'succeeded' END,
                CASE WHEN g % 100 = 0 THEN 'tenant-' || (g % 700) END,
                CASE WHEN g % 50 = 0 THEN 'order-' || g END,
                now() - make_interval(secs => (200000 - g) * 0.9)
         FROM generate_series(1, 200000) g",
    )
    .execute(&pool)
    .await
    .expect("runs");
    sqlx::query("ANALYZE pgflow.runs")
        .execute(&pool)
        .await
        .expect("analyze");
    let since = chrono::Utc::now() - chrono::Duration::minutes(15);
    let cases: [(&str, admin::RunFilter); 5] = [
        (
            "runs_workflow_id",
            admin::RunFilter {
                workflow: Some("rare".into()),
                ..admin::RunFilter::default()
            },
        ),
        (
            "runs_key_id",
            admin::RunFilter {
                key: Some("tenant-300".into()),
                ..admin::RunFilter::default()
            },
        ),
        (
            "runs_idempotency_key_only",
            admin::RunFilter {
                search: Some("order-150000".into()),
                ..admin::RunFilter::default()
            },
        ),
        (
            "runs_pkey",
            admin::RunFilter {
                search: Some("123456".into()),
                ..admin::RunFilter::default()
            },
        ),
        (
            "runs_pkey",
            admin::RunFilter {
                since: Some(since),
                status: Some(pgflow_runtime::RunStatus::Failed),
                ..admin::RunFilter::default()
            },
        ),
    ];
    for (index, filter) in &cases {
        let plan = admin::explain_list_runs(&pool, filter)
            .await
            .expect("plan")
            .join("\n");
        assert!(plan.contains(index), "{index}: {plan}");
        assert!(!plan.contains("Seq Scan"), "{filter:?}: {plan}");
    }
    // what the window holds, and only that
    let recent = admin::list_runs(
        &pool,
        &admin::RunFilter {
            since: Some(since),
            limit: 2_000,
            ..admin::RunFilter::default()
        },
    )
    .await
    .expect("list");
    assert!((990..=1_010).contains(&recent.len()), "{}", recent.len());
    assert!(recent.iter().all(|r| r.created_at >= since));
    let rare = admin::list_runs(
        &pool,
        &admin::RunFilter {
            workflow: Some("rare".into()),
            ..admin::RunFilter::default()
        },
    )
    .await
    .expect("list");
    assert_eq!(rare.len(), 20);
}
