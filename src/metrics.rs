//! This node's Prometheus metrics (`GET /metrics`, `api/metrics.rs`): one
//! [`Metrics`] handle owning a `prometheus-client` registry of typed
//! families, and the [`Snapshot`] of the node's own records read at each
//! scrape. No HTTP here: the API renders [`Metrics::render`].
//!
//! Two kinds of series:
//! - **Events**, counted where they happen through a clone of the handle:
//!   HTTP requests (the API's layer), placement refusals (`routing.rs`),
//!   image loads and store errors on the load path (`transfer.rs`), engine
//!   calls (`docker/bounds.rs`). The daemon makes one handle and gives it
//!   to the engine ([`crate::docker::Engine::with_metrics`]); whoever holds
//!   the engine (`Envs`, the cluster) records through it. An engine made
//!   without one (tests, tools) gets a handle of its own nobody scrapes:
//!   no global registry.
//! - **State**, read from the records at scrape time ([`Snapshot`]):
//!   environments by status, gossip members, datagrams dropped (the sealing
//!   transport's own counters), mail queue and failures, builds by status,
//!   worker states. Reading them at scrape keeps every record the one
//!   truth: no gauge to keep in step.
//!
//! Names follow the Prometheus conventions: `shoal_` prefix, the unit in
//! the name (`_seconds`, `_bytes`), counters end in `_total` (the encoder
//! adds it). Labels are bounded: route templates, never raw paths.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::builds::{BuildRecord, BuildStatus};
use crate::cluster::seal::SealCounters;
use crate::cluster::ClusterView;
use crate::model::{EnvRecord, EnvStatus};
use crate::workers::{WorkerState, WorkerStatus};

/// The content type of [`Metrics::render`]: OpenMetrics text, what
/// Prometheus asks for first.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`prometheus_text`]: the classic text format, for
/// clients that do not ask for OpenMetrics (curl, `promtool check metrics`).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpKindLabel {
    op: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets, 1 ms to ~65 s (HTTP answers, engine calls).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Load durations, 50 ms to ~30 min.
fn load_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    placement_refusals: Family<ReasonLabel, Counter>,
    load_bytes: Counter,
    load_duration: HistogramFamily<OutcomeLabel>,
    engine_duration: HistogramFamily<OpLabel>,
    engine_errors: Family<OpKindLabel, Counter>,
    store_errors: Family<KindLabel, Counter>,
}

/// A handle on this node's metrics; clones share the registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every event family registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "shoal_http_requests",
            "HTTP requests answered, by method, route template and status",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "shoal_http_request_duration",
            "Time to answer an HTTP request (to the response head), by method and route template",
            Unit::Seconds,
            http_duration.clone(),
        );
        let placement_refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "shoal_placement_refusals",
            "Nodes placement ruled out for a new environment, by reason",
            placement_refusals.clone(),
        );
        let load_bytes = Counter::default();
        registry.register_with_unit(
            "shoal_image_load",
            "Uncompressed layer bytes loaded from the store into the engine",
            Unit::Bytes,
            load_bytes.clone(),
        );
        let load_duration: HistogramFamily<OutcomeLabel> =
            Family::new_with_constructor(load_histogram);
        registry.register_with_unit(
            "shoal_image_load_duration",
            "Time an image load from the store took, by outcome (ok, failed)",
            Unit::Seconds,
            load_duration.clone(),
        );
        let engine_duration: HistogramFamily<OpLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "shoal_engine_call_duration",
            "Time a Docker engine call took, by operation",
            Unit::Seconds,
            engine_duration.clone(),
        );
        let engine_errors = Family::<OpKindLabel, Counter>::default();
        registry.register(
            "shoal_engine_call_errors",
            "Docker engine calls that failed, by operation and kind (timeout, unreachable, not_found, refused)",
            engine_errors.clone(),
        );
        let store_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "shoal_store_errors",
            "Image store errors on the load and publish paths, by kind",
            store_errors.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                http_requests,
                http_duration,
                placement_refusals,
                load_bytes,
                load_duration,
                engine_duration,
                engine_errors,
                store_errors,
            }),
        }
    }

    /// One HTTP request answered. `route` is the route template
    /// (`/v1/environments/{id}`), or `unmatched`.
    pub fn http_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let method = method_label(method);
        self.inner
            .http_requests
            .get_or_create(&HttpLabels {
                method,
                route: route.to_string(),
                status,
            })
            .inc();
        self.inner
            .http_duration
            .get_or_create(&RouteLabels {
                method,
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Placement ruled a node out for `reason` ([`crate::placement::Reason::kind`]).
    pub fn placement_refused(&self, reason: &'static str) {
        self.inner
            .placement_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// An image load ended: `bytes` sent to the engine (0 when it failed).
    pub fn image_load(&self, ok: bool, bytes: u64, took: Duration) {
        self.inner.load_bytes.inc_by(bytes);
        let outcome = if ok { "ok" } else { "failed" };
        self.inner
            .load_duration
            .get_or_create(&OutcomeLabel { outcome })
            .observe(took.as_secs_f64());
    }

    /// An engine call ended; `error` is its kind when it failed.
    pub fn engine_call(&self, op: &'static str, took: Duration, error: Option<&'static str>) {
        self.inner
            .engine_duration
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.inner
                .engine_errors
                .get_or_create(&OpKindLabel { op, kind })
                .inc();
        }
    }

    /// A store error of `kind` ([`crate::store::StoreError::kind`]).
    pub fn store_error(&self, kind: &'static str) {
        self.inner
            .store_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// The whole exposition: every event family, then `snapshot`.
    pub fn render(&self, snapshot: Snapshot) -> String {
        let mut out = String::new();
        let mut now = Registry::default();
        now.register_collector(Box::new(snapshot));
        // Writing into a String cannot fail; an encoder error would be a
        // bug of ours (a bad name), shown in the body rather than a panic.
        if let Err(e) =
            prometheus_client::encoding::text::encode_registry(&mut out, &self.inner.registry)
                .and_then(|()| prometheus_client::encoding::text::encode_registry(&mut out, &now))
                .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut out))
        {
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text
/// [`Metrics::render`] wrote. `prometheus-client` writes OpenMetrics only
/// (client_rust issues #51 and #194; a Prometheus encoder is not released),
/// and the two differ in three places, rewritten here line by line: a
/// counter's `# HELP` and `# TYPE` name its samples' `_total` name, there is
/// no `# UNIT` line, and no `# EOF`. Samples and every other line pass
/// through as the crate wrote them.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE: held until the type is known.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(h) = help.replace(rest) {
                let _ = writeln!(out, "# HELP {h}");
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, ""));
            let name = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            continue;
        }
        if let Some(h) = help.take() {
            let _ = writeln!(out, "# HELP {h}");
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(h) = help {
        let _ = writeln!(out, "# HELP {h}");
    }
    out
}

/// The method as a bounded label: the methods the API serves, else `other`.
pub fn method_label(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// The outbox as read at a scrape, and the mailer's failure counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailCounts {
    /// Messages waiting in the outbox.
    pub pending: u64,
    /// Sends the server did not accept (retried later).
    pub failed_retry: u64,
    /// Sends refused for good (the message is dropped).
    pub failed_permanent: u64,
}

/// The node's state as read at one scrape (pure data; see the `*_by_*`
/// functions that build it from the records).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub envs: BTreeMap<&'static str, u64>,
    pub members: BTreeMap<&'static str, u64>,
    pub datagrams_dropped: BTreeMap<&'static str, u64>,
    pub mail: MailCounts,
    pub builds: BTreeMap<&'static str, u64>,
    /// (worker, state) → 1 for its state, 0 for the others.
    pub workers: BTreeMap<(String, &'static str), i64>,
}

/// This node's environment records by status (every status, 0 included).
pub fn envs_by_status(records: &[EnvRecord]) -> BTreeMap<&'static str, u64> {
    use EnvStatus::*;
    let mut m: BTreeMap<&'static str, u64> =
        [Pending, Loading, Starting, Ready, Failed, Deleted, Lost]
            .into_iter()
            .map(|s| (s.as_str(), 0))
            .collect();
    for r in records {
        *m.entry(r.status.as_str()).or_default() += 1;
    }
    m
}

/// The members this node's gossip knows, by `alive`, `dead` and `left`
/// (a member that left is not counted dead).
pub fn members_by_state(view: &ClusterView) -> BTreeMap<&'static str, u64> {
    let mut m: BTreeMap<&'static str, u64> = ["alive", "dead", "left"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for n in &view.nodes {
        let state = if n.left {
            "left"
        } else if n.alive {
            "alive"
        } else {
            "dead"
        };
        *m.entry(state).or_default() += 1;
    }
    m
}

/// Datagrams the sealing transport dropped, by reason.
pub fn dropped_by_reason(c: &SealCounters) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([
        ("bad_auth", c.dropped_bad_auth),
        ("replay", c.dropped_replay),
        ("unsealed", c.dropped_unsealed),
        ("malformed", c.dropped_malformed),
        ("oversize", c.dropped_oversize),
    ])
}

/// This node's build records by status (every status, 0 included).
pub fn builds_by_status(records: &[BuildRecord]) -> BTreeMap<&'static str, u64> {
    use BuildStatus::*;
    let mut m: BTreeMap<&'static str, u64> = [Queued, Building, Published, Failed, Pruned]
        .into_iter()
        .map(|s| (build_status(s), 0))
        .collect();
    for r in records {
        *m.entry(build_status(r.status)).or_default() += 1;
    }
    m
}

fn build_status(s: BuildStatus) -> &'static str {
    match s {
        BuildStatus::Queued => "queued",
        BuildStatus::Building => "building",
        BuildStatus::Published => "published",
        BuildStatus::Failed => "failed",
        BuildStatus::Pruned => "pruned",
    }
}

fn worker_state(s: WorkerState) -> &'static str {
    match s {
        WorkerState::Running => "running",
        WorkerState::Stopped => "stopped",
        WorkerState::Failed => "failed",
    }
}

/// One series per worker and state: 1 for the state it is in, 0 for the
/// others (so a query sees a worker leave `running`).
pub fn workers_by_state(ws: &[WorkerStatus]) -> BTreeMap<(String, &'static str), i64> {
    let mut m = BTreeMap::new();
    for w in ws {
        for s in [
            WorkerState::Running,
            WorkerState::Stopped,
            WorkerState::Failed,
        ] {
            m.insert((w.name.clone(), worker_state(s)), i64::from(s == w.state));
        }
    }
    m
}

fn gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(v).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(v).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

fn as_gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauges(
            &mut encoder,
            "shoal_environments",
            "Environment records of this node, by status",
            self.envs
                .iter()
                .map(|(s, n)| ([("status", *s)], as_gauge(*n))),
        )?;
        gauges(
            &mut encoder,
            "shoal_gossip_members",
            "Cluster members this node's gossip knows (itself included), by state",
            self.members
                .iter()
                .map(|(s, n)| ([("state", *s)], as_gauge(*n))),
        )?;
        counters(
            &mut encoder,
            "shoal_gossip_datagrams_dropped",
            "Gossip datagrams the sealing transport dropped, by reason (oversize: a message too large to send)",
            self.datagrams_dropped
                .iter()
                .map(|(r, n)| ([("reason", *r)], *n)),
        )?;
        gauges(
            &mut encoder,
            "shoal_mail_queue_depth",
            "Mails waiting in this node's outbox",
            [(Vec::<(&str, &str)>::new(), as_gauge(self.mail.pending))],
        )?;
        counters(
            &mut encoder,
            "shoal_mail_send_failures",
            "Mail sends that failed, by kind (retry: tried again later; permanent: dropped)",
            [
                ([("kind", "retry")], self.mail.failed_retry),
                ([("kind", "permanent")], self.mail.failed_permanent),
            ],
        )?;
        gauges(
            &mut encoder,
            "shoal_builds",
            "Build records of this node, by status",
            self.builds
                .iter()
                .map(|(s, n)| ([("status", *s)], as_gauge(*n))),
        )?;
        gauges(
            &mut encoder,
            "shoal_worker_state",
            "Background workers: 1 for the state each is in, 0 for the others",
            self.workers
                .iter()
                .map(|((w, s), v)| ([("worker", w.as_str()), ("state", *s)], *v)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_renames_counters_and_drops_unit_and_eof() {
        let om = "\
# HELP shoal_x Things done.
# TYPE shoal_x counter
shoal_x_total{a=\"b\"} 3
# HELP shoal_d_seconds Time.
# TYPE shoal_d_seconds histogram
# UNIT shoal_d_seconds seconds
shoal_d_seconds_sum 0.5
shoal_d_seconds_count 1
shoal_d_seconds_bucket{le=\"+Inf\"} 1
# HELP shoal_g A gauge
# TYPE shoal_g gauge
shoal_g 7
# HELP shoal_y_total Already suffixed.
# TYPE shoal_y_total counter
shoal_y_total 1
# EOF
";
        let want = "\
# HELP shoal_x_total Things done.
# TYPE shoal_x_total counter
shoal_x_total{a=\"b\"} 3
# HELP shoal_d_seconds Time.
# TYPE shoal_d_seconds histogram
shoal_d_seconds_sum 0.5
shoal_d_seconds_count 1
shoal_d_seconds_bucket{le=\"+Inf\"} 1
# HELP shoal_g A gauge
# TYPE shoal_g gauge
shoal_g 7
# HELP shoal_y_total Already suffixed.
# TYPE shoal_y_total counter
shoal_y_total 1
";
        assert_eq!(prometheus_text(om), want);
    }

    #[test]
    fn both_formats_carry_the_same_samples() {
        let m = Metrics::new();
        m.http_request("POST", "/v1/placement", 200, Duration::from_millis(1));
        let om = m.render(Snapshot::default());
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        assert_eq!(samples(&om), samples(&prometheus_text(&om)));
        assert!(!samples(&om).is_empty());
    }

    #[test]
    fn envs_are_counted_by_status_with_every_status_shown() {
        let rec = |status| {
            let s = crate::cluster::keys::EnvSummary {
                id: "e1".into(),
                image: "demo:1".into(),
                owner: "a@example.com".into(),
                status: "ready".into(),
                memory: 1 << 20,
                endpoints: vec![],
            };
            let mut r = crate::routing::lost_record("n1", &s);
            r.status = status;
            r
        };
        let m = envs_by_status(&[
            rec(EnvStatus::Ready),
            rec(EnvStatus::Ready),
            rec(EnvStatus::Failed),
        ]);
        assert_eq!(m.len(), 7);
        assert_eq!(m["ready"], 2);
        assert_eq!(m["failed"], 1);
        assert_eq!(m["pending"], 0);
    }

    #[test]
    fn members_are_alive_dead_or_left() {
        let node = |name: &str, alive, left| crate::cluster::NodeView {
            name: name.into(),
            facts: None,
            facts_error: None,
            http_error: None,
            alive,
            left,
            is_self: false,
            generation: 1,
            gossip_addr: "127.0.0.1:7946".parse().unwrap(),
            heartbeat: 1,
            last_seen: None,
            phi: None,
            state_bytes: 0,
        };
        let view = ClusterView {
            self_name: "a".into(),
            nodes: vec![
                node("a", true, false),
                node("b", false, false),
                node("c", false, true),
                node("d", true, true),
                node("e", true, false),
            ],
        };
        let m = members_by_state(&view);
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            [("alive", 2), ("dead", 1), ("left", 2)]
        );
    }

    #[test]
    fn methods_are_bounded() {
        for (m, want) in [
            ("GET", "GET"),
            ("POST", "POST"),
            ("DELETE", "DELETE"),
            ("BREW", "other"),
            ("get", "other"),
        ] {
            assert_eq!(method_label(m), want, "{m}");
        }
    }

    #[test]
    fn dropped_reasons_map_each_counter() {
        let c = SealCounters {
            dropped_bad_auth: 1,
            dropped_replay: 2,
            dropped_unsealed: 3,
            dropped_malformed: 4,
            dropped_oversize: 5,
            opened: 99,
            ..Default::default()
        };
        let m = dropped_by_reason(&c);
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            [
                ("bad_auth", 1),
                ("malformed", 4),
                ("oversize", 5),
                ("replay", 2),
                ("unsealed", 3)
            ]
        );
    }

    #[test]
    fn workers_have_one_series_per_state() {
        let w = |name: &str, state| WorkerStatus {
            name: name.into(),
            state,
            started_at: time::OffsetDateTime::UNIX_EPOCH,
            ended_at: None,
            error: None,
        };
        let m = workers_by_state(&[
            w("reaper", WorkerState::Running),
            w("gc", WorkerState::Failed),
        ]);
        let want = [
            (("gc", "failed"), 1),
            (("gc", "running"), 0),
            (("gc", "stopped"), 0),
            (("reaper", "failed"), 0),
            (("reaper", "running"), 1),
            (("reaper", "stopped"), 0),
        ];
        let got: Vec<_> = m.iter().map(|((n, s), v)| ((n.as_str(), *s), *v)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn render_has_every_family_and_ends_with_eof() {
        let m = Metrics::new();
        m.http_request(
            "GET",
            "/v1/environments/{id}",
            404,
            Duration::from_millis(3),
        );
        m.placement_refused("memory_short");
        m.image_load(true, 1234, Duration::from_millis(500));
        m.engine_call("inspect", Duration::from_millis(2), Some("not_found"));
        m.store_error("digest_mismatch");
        let snap = Snapshot {
            envs: envs_by_status(&[]),
            mail: MailCounts {
                pending: 2,
                ..Default::default()
            },
            ..Default::default()
        };
        let text = m.render(snap);
        for line in [
            r#"shoal_http_requests_total{method="GET",route="/v1/environments/{id}",status="404"} 1"#,
            r#"shoal_placement_refusals_total{reason="memory_short"} 1"#,
            "shoal_image_load_bytes_total 1234",
            r#"shoal_image_load_duration_seconds_count{outcome="ok"} 1"#,
            r#"shoal_engine_call_errors_total{op="inspect",kind="not_found"} 1"#,
            r#"shoal_store_errors_total{kind="digest_mismatch"} 1"#,
            r#"shoal_environments{status="ready"} 0"#,
            "shoal_mail_queue_depth 2",
            r#"shoal_mail_send_failures_total{kind="retry"} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line} in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
