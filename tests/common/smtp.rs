//! A real SMTP server for tests: `tests/smtp_sink.py` (aiosmtpd) on a
//! loopback port, writing each accepted message to a directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Whether tests must fail (not skip) when a tool is missing.
pub fn require_tools() -> bool {
    std::env::var("SHOAL_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Whether python3 can import aiosmtpd.
pub fn have_aiosmtpd() -> bool {
    Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running sink; killed on drop.
pub struct SmtpSink {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

/// One delivered message.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub message_id: String,
    pub body: String,
}

impl SmtpSink {
    pub fn start(port: u16, dir: &Path) -> Result<SmtpSink> {
        std::fs::create_dir_all(dir)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_sink.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting tests/smtp_sink.py")?;
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 16];
            let n = out.read(&mut buf).unwrap_or(0);
            let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            // Keep the pipe open (and drained) for the sink's whole life.
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        let sink = SmtpSink {
            port,
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(s) if s.starts_with("ready") => Ok(sink),
            other => bail!("smtp sink did not start: {other:?}"),
        }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message delivered so far, oldest first.
    pub fn mails(&self) -> Vec<Mail> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        names.sort();
        names
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .map(|raw| parse(&raw))
            .collect()
    }

    /// Waits until a message whose subject contains `needle` arrived.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> Result<Mail> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self
                .mails()
                .into_iter()
                .find(|m| m.subject.contains(needle))
            {
                return Ok(m);
            }
            if Instant::now() > deadline {
                bail!(
                    "no mail with {needle:?} within {timeout:?}; got: {:?}",
                    self.mails().iter().map(|m| &m.subject).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Headers and body of a plain-text message (quoted-printable or 7bit, as
/// lettre writes it for short text).
fn parse(raw: &str) -> Mail {
    let raw = raw.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
    // Unfold continuation lines.
    let head = head.replace("\n ", " ").replace("\n\t", " ");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let qp = header("Content-Transfer-Encoding").eq_ignore_ascii_case("quoted-printable");
    let body = if qp {
        decode_qp(body)
    } else {
        body.to_string()
    };
    Mail {
        to: header("To"),
        subject: header("Subject"),
        message_id: header("Message-ID"),
        body,
    }
}

fn decode_qp(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'=' if b.get(i + 1) == Some(&b'\n') => i += 2,
            b'=' if i + 2 < b.len() + 1 => {
                match std::str::from_utf8(&b[i + 1..(i + 3).min(b.len())])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'=');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
