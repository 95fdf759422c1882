//! A real browser for tests: Debian's Chromium, headless, driven over the
//! W3C WebDriver protocol through `chromedriver` on a loopback port. The
//! protocol is plain JSON over HTTP, so the few commands the tests need
//! are sent with shoal's own client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use shoal::client::Client;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub fn chromedriver() -> Option<PathBuf> {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// chromedriver plus one browser session; both end on drop.
pub struct Browser {
    driver: Option<Child>,
    client: Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start(chromium: &Path, chromedriver: &Path) -> Result<Browser> {
        let port = super::smtp::free_tcp_port()?;
        let driver = Command::new(chromedriver)
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let client = Client::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(60))?;
        let profile = tempfile::tempdir()?;
        let mut b = Browser {
            driver: Some(driver),
            client,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = b.raw("GET", "/status", None).await {
                if v["value"]["ready"] == true {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not come up");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-default-apps",
                    format!("--user-data-dir={}", b._profile.path().display()),
                    "--window-size=1100,900",
                ],
            },
        }}});
        let v = b.raw("POST", "/session", Some(caps)).await?;
        b.session = v["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no session: {v}"))?
            .to_string();
        Ok(b)
    }

    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (status, bytes) = self
            .client
            .send_raw(
                method.parse()?,
                path,
                body.map(|b| b.to_string().into_bytes()),
            )
            .await?;
        let v: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("webdriver {path}: {}", String::from_utf8_lossy(&bytes)))?;
        if !status.is_success() {
            bail!("webdriver {method} {path}: {status} {}", v["value"]);
        }
        Ok(v)
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let v = self
            .raw(method, &format!("/session/{}{path}", self.session), body)
            .await?;
        Ok(v["value"].clone())
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .await?;
        Ok(())
    }

    pub async fn url(&self) -> Result<String> {
        Ok(self
            .cmd("GET", "/url", None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub async fn source(&self) -> Result<String> {
        Ok(self
            .cmd("GET", "/source", None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub async fn set_size(&self, width: u32, height: u32) -> Result<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await?;
        Ok(())
    }

    /// The first element matching a CSS selector.
    pub async fn find(&self, css: &str) -> Result<String> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await
            .with_context(|| format!("finding {css}"))?;
        Ok(v[ELEMENT].as_str().context("no element id")?.to_string())
    }

    /// Waits until an element matching `css` has text containing `needle`.
    pub async fn wait_text(&self, css: &str, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(el) = self.find(css).await {
                if let Ok(t) = self.text(&el).await {
                    if t.contains(needle) {
                        return Ok(t);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{css} never showed {needle:?}; page: {}",
                    self.source().await.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn text(&self, el: &str) -> Result<String> {
        Ok(self
            .cmd("GET", &format!("/element/{el}/text"), None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub async fn attr(&self, el: &str, name: &str) -> Result<String> {
        Ok(self
            .cmd("GET", &format!("/element/{el}/attribute/{name}"), None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub async fn click(&self, el: &str) -> Result<()> {
        self.cmd("POST", &format!("/element/{el}/click"), Some(json!({})))
            .await?;
        Ok(())
    }

    pub async fn type_into(&self, el: &str, text: &str) -> Result<()> {
        self.cmd("POST", &format!("/element/{el}/clear"), Some(json!({})))
            .await?;
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await?;
        Ok(())
    }

    pub async fn back(&self) -> Result<()> {
        self.cmd("POST", "/back", Some(json!({}))).await?;
        Ok(())
    }

    /// Saves a PNG screenshot.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let b64 = self.cmd("GET", "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().context("no screenshot")?)?;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session ends the browser; then chromedriver goes.
        if !self.session.is_empty() {
            let client = self.client.clone();
            let path = format!("/session/{}", self.session);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().unwrap();
                let _ = rt.block_on(client.send_raw(hyper::Method::DELETE, &path, None));
            })
            .join()
            .ok();
        }
        if let Some(mut d) = self.driver.take() {
            // Ending chromedriver ends the browser it started.
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}
