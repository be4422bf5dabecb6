//! Browser-test harness: drives Debian's headless Chromium through ChromeDriver (WebDriver)
//! with `fantoccini`.
//!
//! Include it from a test crate with `#[path = "support/browser.rs"] mod browser;`.
//! Console errors are read from ChromeDriver's log endpoint (`POST /session/{id}/se/log`), which
//! ChromeDriver collects from the DevTools console, uncaught exceptions, unhandled promise
//! rejections and failed resource loads ("Failed to load resource: ... 404").
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// Flags for Chromium on a closed network (no background requests, no sandbox as root).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1280,900",
];

/// A headless Chromium session behind its own ChromeDriver process.
///
/// Call [`Browser::close`] at the end of a test; if the test panics first, `Drop` ends the
/// session, kills ChromeDriver and removes the profile directory.
pub struct Browser {
    client: Client,
    driver: Child,
    port: u16,
    session_id: String,
    profile_dir: PathBuf,
    closed: bool,
}

/// ChromeDriver's (non-W3C, but supported in W3C mode) "get log" command for the browser log.
#[derive(Debug)]
struct GetBrowserLog;

impl WebDriverCompatibleCommand for GetBrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({ "type": "browser" }).to_string()),
        )
    }
}

impl Browser {
    /// Starts ChromeDriver on a free port and opens a Chromium session with a fresh profile.
    pub async fn start() -> Browser {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("no free TCP port for chromedriver")
            .port();
        let driver_bin =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium_bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {driver_bin}: {e}"));

        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let exited = driver.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = driver.kill();
                let _ = driver.wait();
                panic!(
                    "chromedriver did not listen on port {port} within 10 s (exit status: {exited:?})"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let profile_dir = std::env::temp_dir().join(format!(
            "pgflow-chromium-{}-{port}-{nanos}",
            std::process::id()
        ));
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| (*a).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile_dir.display()));
        let Value::Object(caps) = json!({
            "goog:chromeOptions": { "binary": chromium_bin, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        }) else {
            unreachable!("json! object literal")
        };
        let caps: Capabilities = caps;

        let connected = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        let client = match connected {
            Ok(client) => client,
            Err(e) => {
                let _ = driver.kill();
                let _ = driver.wait();
                let _ = std::fs::remove_dir_all(&profile_dir);
                panic!("cannot open a Chromium session through chromedriver: {e:?}");
            }
        };
        // From here on, Drop cleans up whatever happens.
        let mut browser = Browser {
            client,
            driver,
            port,
            session_id: String::new(),
            profile_dir,
            closed: false,
        };
        browser.session_id = browser
            .client
            .session_id()
            .await
            .expect("asking fantoccini for the session id")
            .expect("a new WebDriver session has an id");
        browser
    }

    /// The WebDriver client, for navigation, element look-ups, clicks and scripts.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The console's SEVERE entries (errors, uncaught exceptions, failed loads) since the last call.
    pub async fn console_errors(&self) -> Vec<String> {
        let log = self
            .client
            .issue_cmd(GetBrowserLog)
            .await
            .expect("reading the browser log from chromedriver");
        let entries = match log {
            Value::Array(entries) => entries,
            other => panic!("chromedriver returned a non-array browser log: {other}"),
        };
        entries
            .iter()
            .filter(|entry| entry["level"] == "SEVERE")
            .map(|entry| match entry["message"].as_str() {
                Some(message) => message.to_owned(),
                None => entry.to_string(),
            })
            .collect()
    }

    /// Saves a PNG of the viewport to `<target dir>/screenshots/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| manifest_dir.join("target"), |dir| manifest_dir.join(dir));
        let dir = target.join("screenshots");
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{safe}.png"));
        let png = self.client.screenshot().await.expect("taking a screenshot");
        std::fs::write(&path, png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Navigates to `url`, waits for `document.readyState == "complete"`, and panics if the
    /// console has errors (including any left over since the previous check).
    pub async fn goto_and_check(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("navigating to {url}: {e}"));
        self.wait_loaded().await;
        self.check_console().await;
    }

    /// Waits (up to 10 s) until the current document has loaded (after a click that
    /// navigates: WebDriver's click does not wait for the next page).
    pub async fn wait_loaded(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // a click's navigation may not have begun yet
        tokio::time::sleep(Duration::from_millis(150)).await;
        loop {
            let state = self
                .client
                .execute("return document.readyState", vec![])
                .await;
            if matches!(state, Ok(ref s) if s == "complete") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not finish loading within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the element `css` selects, waits for the page it loads and checks the
    /// console.
    pub async fn click_and_check(&self, css: &str) {
        self.client
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
        self.wait_loaded().await;
        self.check_console().await;
    }

    /// Panics with the console's errors since the last check, if there are any.
    pub async fn check_console(&self) {
        let errors = self.console_errors().await;
        assert!(
            errors.is_empty(),
            "console errors:\n  {}",
            errors.join("\n  ")
        );
    }

    /// Ends the WebDriver session (Chromium quits), then stops ChromeDriver.
    pub async fn close(mut self) {
        self.client
            .clone()
            .close()
            .await
            .expect("closing the WebDriver session");
        self.closed = true;
        // Drop kills and reaps ChromeDriver and removes the profile directory.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.closed {
            // Synchronous DELETE /session/{id}: ChromeDriver quits Chromium before answering, so
            // killing ChromeDriver afterwards does not orphan browser processes.
            if let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let request = format!(
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    self.session_id, self.port
                );
                if stream.write_all(request.as_bytes()).is_ok() {
                    let _ = stream.read(&mut [0_u8; 1024]);
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile_dir);
    }
}
