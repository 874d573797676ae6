//! A real headless Chromium driven over WebDriver: Debian's `chromedriver` (package
//! `chromium-driver`, installed by scripts/test.sh with `chromium`) started on a free port, and
//! the few W3C WebDriver calls the dashboard tests need, sent with reqwest.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::{free_port, log_file, wait_until};

/// The key W3C WebDriver uses for element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium flags that work in this sandbox (no GPU, no network beyond loopback).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
];

/// A chromedriver process with one browser session, both ended when dropped.
pub struct Browser {
    _driver: Child,
    closed: bool,
    _profile: tempfile::TempDir,
    http: reqwest::Client,
    session: String,
    base: String,
}

impl Browser {
    pub async fn start() -> anyhow::Result<Self> {
        let port = free_port();
        let (_, log) = log_file("chromedriver");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver (install Debian's chromium and chromium-driver; scripts/test.sh does)")?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        wait_until(Duration::from_secs(20), "chromedriver to answer", || {
            let (http, url) = (http.clone(), format!("{base}/status"));
            async move {
                match http.get(url).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| v["value"]["ready"] == true),
                    Err(_) => false,
                }
            }
        })
        .await?;
        let profile = tempfile::tempdir()?;
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let binary = which_chromium()?;
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": binary, "args": args },
            }}
        });
        let created = post(&http, &format!("{base}/session"), &capabilities).await?;
        let session = created["sessionId"]
            .as_str()
            .with_context(|| format!("no session id in {created}"))?
            .to_string();
        Ok(Self {
            _driver: driver,
            closed: false,
            _profile: profile,
            http,
            session,
            base,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        post(&self.http, &self.url("/url"), &json!({ "url": url })).await?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; returns its value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        post(
            &self.http,
            &self.url("/execute/sync"),
            &json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Moves the page's clock (`Date`, `Date.now()`) `by` ahead from the next page loaded on:
    /// a page left open past midnight, or events from days ago, without waiting for them.
    /// Timers are not affected. Chromium only (chromedriver's DevTools passthrough).
    pub async fn clock_ahead(&self, by: Duration) -> anyhow::Result<()> {
        let source = format!(
            "(() => {{
               const Real = Date;
               const ahead = {};
               class Later extends Real {{
                 constructor(...args) {{ super(...(args.length ? args : [Real.now() + ahead])); }}
                 static now() {{ return Real.now() + ahead; }}
               }}
               globalThis.Date = Later;
             }})();",
            by.as_millis()
        );
        post(
            &self.http,
            &self.url("/goog/cdp/execute"),
            &json!({ "cmd": "Page.addScriptToEvaluateOnNewDocument", "params": { "source": source } }),
        )
        .await
        .context("moving the page's clock")?;
        Ok(())
    }

    /// Clicks the first element matching `css`, as a user would (WebDriver element click).
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let found = post(
            &self.http,
            &self.url("/element"),
            &json!({ "using": "css selector", "value": css }),
        )
        .await
        .with_context(|| format!("finding {css}"))?;
        let id = found[ELEMENT_KEY]
            .as_str()
            .with_context(|| format!("no element reference in {found}"))?;
        post(
            &self.http,
            &self.url(&format!("/element/{id}/click")),
            &json!({}),
        )
        .await
        .with_context(|| format!("clicking {css}"))?;
        Ok(())
    }

    /// Types `text` into the first element matching `css`, as a user would (element send keys).
    pub async fn type_text(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let found = post(
            &self.http,
            &self.url("/element"),
            &json!({ "using": "css selector", "value": css }),
        )
        .await
        .with_context(|| format!("finding {css}"))?;
        let id = found[ELEMENT_KEY]
            .as_str()
            .with_context(|| format!("no element reference in {found}"))?;
        post(
            &self.http,
            &self.url(&format!("/element/{id}/value")),
            &json!({ "text": text }),
        )
        .await
        .with_context(|| format!("typing into {css}"))?;
        Ok(())
    }

    /// The text content of the first element matching `css` ("" when there is none).
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let value = self
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
                vec![json!(css)],
            )
            .await?;
        Ok(value.as_str().unwrap_or_default().to_string())
    }

    /// Waits up to `patience` until the first element matching `css` contains `needle`; the
    /// error names `what` was awaited.
    pub async fn wait_for_text(
        &self,
        patience: Duration,
        what: &str,
        css: &str,
        needle: &str,
    ) -> anyhow::Result<()> {
        wait_until(patience, what, || async {
            self.text(css).await.is_ok_and(|t| t.contains(needle))
        })
        .await
        .map(drop)
    }

    /// Whether the element with id `id` exists and is not hidden (false when the page does not
    /// answer).
    pub async fn shown(&self, id: &str) -> bool {
        self.execute(
            "const e = document.getElementById(arguments[0]); return !!e && !e.hidden;",
            vec![json!(id)],
        )
        .await
        .is_ok_and(|v| v == true)
    }

    /// A PNG screenshot of the page.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        let response = self
            .http
            .get(self.url("/screenshot"))
            .send()
            .await?
            .json::<Value>()
            .await?;
        let data = response["value"].as_str().context("screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

impl Browser {
    /// Ends the session: chromedriver closes the browser (dropping the `Browser` kills only
    /// chromedriver).
    /// Drains `worker` from the ops dashboard's worker table: Drain, then the confirming click.
    pub async fn drain_on_dashboard(&self, worker: &str) -> anyhow::Result<()> {
        for button in ["button.drain", "button.drain.confirm"] {
            self.click(&format!("tr[data-worker-id='{worker}'] {button}"))
                .await?;
        }
        Ok(())
    }

    pub async fn close(mut self) -> anyhow::Result<()> {
        self.http.delete(self.url("")).send().await?;
        self.closed = true;
        Ok(())
    }
}

impl Drop for Browser {
    /// A test that failed before `close` still ends the browser: chromedriver would otherwise
    /// be killed and leave Chromium running. Plain blocking HTTP, as no runtime may be left.
    fn drop(&mut self) {
        use std::io::{Read as _, Write as _};
        if self.closed {
            return;
        }
        let Some(addr) = self.base.strip_prefix("http://") else {
            return;
        };
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
    }
}

fn which_chromium() -> anyhow::Result<String> {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(candidate).exists() {
            return Ok(candidate.to_string());
        }
    }
    bail!("chromium is not installed (Debian package chromium; scripts/test.sh installs it)")
}

/// POSTs a WebDriver command and returns its `value`, or the driver's error.
async fn post(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let response = http.post(url).json(body).send().await?;
    let status = response.status();
    let mut answer: Value = response.json().await?;
    if !status.is_success() {
        bail!(
            "webdriver {url}: HTTP {status}: {} {}",
            answer["value"]["error"],
            answer["value"]["message"]
        );
    }
    Ok(answer["value"].take())
}
