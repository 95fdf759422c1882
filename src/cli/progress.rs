//! Progress of long client commands, on stderr so stdout keeps only the
//! result (`--json` stays machine-readable): an indicatif bar with bytes,
//! rate and estimate when stderr is a terminal, plain lines otherwise (a
//! pipe, a CI log: at most one a second, plus the last).
//!
//! `shoal publish` reads the bytes from `GET /v1/images/{ref}/progress`
//! while its `POST /v1/images` runs; `shoal create --wait` from the
//! record's `load` (`bytes_done` of `bytes_needed`) while it loads.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use shoal::client::Client;
use shoal::model::{EnvRecord, EnvStatus, ImageInfo};
use shoal::publishing::PublishProgress;
use shoal::units::{format_duration, format_size};
use tokio::time::Instant;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An indicatif bar on the terminal.
    Bar,
    /// Plain lines.
    Lines,
}

impl Mode {
    /// A bar only for a person at a terminal; `--json` never gets one.
    pub fn pick(json: bool, stderr_is_terminal: bool) -> Mode {
        if stderr_is_terminal && !json {
            Mode::Bar
        } else {
            Mode::Lines
        }
    }

    /// [`Mode::pick`] for this process's stderr.
    pub fn here(json: bool) -> Mode {
        Mode::pick(json, std::io::stderr().is_terminal())
    }
}

/// Plain lines at most this often.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// One plain progress line (pure): bytes, share, rate and estimate.
pub fn line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let rate_s = format!("{}/s", format_size(rate as u64));
    if total == 0 {
        return format!("{label}: {}, {rate_s}", format_size(done));
    }
    let pct = (done.min(total) as f64 * 100.0 / total as f64).floor();
    let eta = if done >= total {
        "0s".to_string()
    } else if rate > 0.0 {
        format_duration(Duration::from_secs_f64(
            ((total - done) as f64 / rate).ceil(),
        ))
    } else {
        "?".to_string()
    };
    format!(
        "{label}: {} of {} ({pct:.0}%), {rate_s}, about {eta} left",
        format_size(done),
        format_size(total)
    )
}

/// A progress display of bytes.
pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Option<Instant>,
    last: (u64, u64),
}

impl Progress {
    pub fn new(label: &str, mode: Mode) -> Progress {
        let bar = (mode == Mode::Bar).then(|| {
            // A spinner until the total is known, then the bar.
            let b = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
                b.set_style(style);
            }
            b.set_message(label.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Progress {
            label: label.to_string(),
            bar,
            started: Instant::now(),
            last_line: None,
            last: (0, 0),
        }
    }

    /// Changes the label (e.g. the environment's status).
    pub fn set_label(&mut self, label: &str) {
        if label == self.label {
            return;
        }
        self.label = label.to_string();
        match &self.bar {
            Some(b) => b.set_message(label.to_string()),
            None => {
                eprintln!("{label}");
                self.last_line = Some(Instant::now());
            }
        }
    }

    /// `done` of `total` bytes so far.
    pub fn update(&mut self, done: u64, total: u64) {
        if (done, total) == self.last {
            return;
        }
        self.last = (done, total);
        match &self.bar {
            Some(b) => {
                if b.length().is_none() && total > 0 {
                    b.set_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:24}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                }
                if total > 0 {
                    b.set_length(total.max(done));
                }
                b.set_position(done);
            }
            None => {
                let due = self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY);
                if due {
                    eprintln!("{}", line(&self.label, done, total, self.started.elapsed()));
                    self.last_line = Some(Instant::now());
                }
            }
        }
    }

    /// Ends the display with a last line.
    pub fn finish(self, message: &str) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
        eprintln!("{message}");
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// `shoal publish`: the POST, with the node's progress of it polled beside.
pub async fn publish(
    client: &Client,
    source: &str,
    image_ref: &str,
    mode: Mode,
) -> Result<ImageInfo> {
    let label = format!("publish {image_ref}");
    let mut p = Progress::new(&label, mode);
    let body = json!({"source": source, "ref": image_ref});
    let post = client.post::<ImageInfo>("/v1/images", &body);
    tokio::pin!(post);
    let path = format!("/v1/images/{image_ref}/progress");
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let result = loop {
        tokio::select! {
            r = &mut post => break r,
            _ = tick.tick() => {
                if let Ok(pp) = client.get::<PublishProgress>(&path).await {
                    p.update(pp.bytes, pp.total);
                }
            }
        }
    };
    match result {
        Ok(img) => {
            let secs = p.elapsed();
            p.finish(&format!(
                "{label}: done, {} in {} ({}/s)",
                format_size(img.size),
                if secs < Duration::from_secs(1) {
                    "<1s".to_string()
                } else {
                    format_duration(secs)
                },
                format_size((img.size as f64 / secs.as_secs_f64().max(0.001)) as u64)
            ));
            Ok(img)
        }
        Err(e) => {
            p.finish(&format!("{label}: failed"));
            Err(e.into())
        }
    }
}

/// `shoal create --wait`: polls the record until it is ready or failed,
/// showing its status and its load.
pub async fn wait_env(client: &Client, mut rec: EnvRecord, mode: Mode) -> Result<EnvRecord> {
    let label = |r: &EnvRecord| format!("create {}: {}", r.id, r.status);
    let mut p = Progress::new(&label(&rec), mode);
    if mode == Mode::Lines {
        eprintln!("{}", label(&rec));
    }
    while matches!(
        rec.status,
        EnvStatus::Pending | EnvStatus::Loading | EnvStatus::Starting
    ) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rec = client.get(&format!("/v1/environments/{}", rec.id)).await?;
        p.set_label(&label(&rec));
        if rec.load.bytes_needed > 0 {
            p.update(rec.load.bytes_done, rec.load.bytes_needed);
        }
    }
    let secs = format_duration(p.elapsed());
    p.finish(&format!("{} after {secs}", label(&rec)));
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_only_for_a_terminal_without_json() {
        for (json, tty, want) in [
            (false, true, Mode::Bar),
            (false, false, Mode::Lines),
            (true, true, Mode::Lines),
            (true, false, Mode::Lines),
        ] {
            assert_eq!(Mode::pick(json, tty), want, "json={json} tty={tty}");
        }
    }

    #[test]
    fn lines_say_bytes_share_rate_and_estimate() {
        let mib = 1 << 20;
        for (done, total, secs, want) in [
            (
                10 * mib,
                40 * mib,
                2.0,
                "publish a:1: 10MiB of 40MiB (25%), 5MiB/s, about 6s left",
            ),
            (
                40 * mib,
                40 * mib,
                8.0,
                "publish a:1: 40MiB of 40MiB (100%), 5MiB/s, about 0s left",
            ),
            // The engine's size is an estimate: more than it is 100%.
            (
                41 * mib,
                40 * mib,
                1.0,
                "publish a:1: 41MiB of 40MiB (100%), 41MiB/s, about 0s left",
            ),
            (
                0,
                40 * mib,
                0.0,
                "publish a:1: 0B of 40MiB (0%), 0B/s, about ? left",
            ),
            (3 * mib, 0, 1.0, "publish a:1: 3MiB, 3MiB/s"),
        ] {
            assert_eq!(
                line("publish a:1", done, total, Duration::from_secs_f64(secs)),
                want
            );
        }
    }
}
