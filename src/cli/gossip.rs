//! `shoal gossip [--json] [--watch]`: the node's raw gossip state
//! (`GET /v1/gossip`) as a members table (like `fleetctl list-machines`)
//! and then each member's keys; `--watch` polls and prints only what
//! changed (members joining or forgotten, liveness, keys set or deleted),
//! never the heartbeats that move every round.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use shoal::client::Client;
use shoal::cluster::inspect::{GossipState, Member, MemberStatus};
use shoal::units::format_size;

use super::{age, phi, table};

/// Text values longer than this are cut in the text form (`--json` has
/// them whole).
const VALUE_WIDTH: usize = 96;

/// The whole state as text: the members table, then each member's keys.
pub fn render(s: &GossipState) -> String {
    let mut out = format!(
        "gossip state of {} (cluster {}), {} member(s)\n\n",
        s.self_name,
        s.cluster_id,
        s.members.len()
    );
    out.push_str(&members_table(s));
    for m in &s.members {
        out.push_str(&format!(
            "\n{}{} generation {}: {} key(s), {} tombstone(s), {}, max version {}\n",
            m.name,
            if m.is_self { " (this node)" } else { "" },
            m.generation,
            m.keys.len(),
            m.tombstones.len(),
            bytes(m.state_bytes),
            m.max_version
        ));
        let mut rows: Vec<Vec<String>> = m
            .keys
            .iter()
            .map(|k| vec![k.key.clone(), k.version.to_string(), cut(&k.value)])
            .collect();
        rows.extend(
            m.tombstones
                .iter()
                .map(|t| vec![t.key.clone(), t.version.to_string(), "(deleted)".into()]),
        );
        out.push_str(&table(&["KEY", "VERSION", "VALUE"], &rows));
    }
    out
}

/// One line per member.
pub fn members_table(s: &GossipState) -> String {
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                format!("{}{}", m.name, if m.is_self { "*" } else { "" }),
                m.generation.to_string(),
                m.gossip_addr.to_string(),
                m.status.as_str().to_string(),
                m.heartbeat.to_string(),
                age(m.last_seen),
                phi(m.phi),
                m.max_version.to_string(),
                m.keys.len().to_string(),
                m.tombstones.len().to_string(),
                bytes(m.state_bytes),
            ]
        })
        .collect();
    table(
        &[
            "MEMBER",
            "GENERATION",
            "GOSSIP",
            "STATUS",
            "HEARTBEAT",
            "LAST SEEN",
            "PHI",
            "VERSION",
            "KEYS",
            "TOMBSTONES",
            "STATE",
        ],
        &rows,
    )
}

fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n}B")
    } else {
        format_size(n)
    }
}

fn cut(v: &str) -> String {
    if v.chars().count() <= VALUE_WIDTH {
        return v.to_string();
    }
    let mut s: String = v.chars().take(VALUE_WIDTH - 1).collect();
    s.push('…');
    s
}

/// What changed between two polls of the state.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Joined {
        member: String,
        generation: u64,
        status: MemberStatus,
    },
    /// No longer held (its grace period ended).
    Forgotten { member: String, generation: u64 },
    Status {
        member: String,
        generation: u64,
        from: MemberStatus,
        to: MemberStatus,
    },
    Set {
        member: String,
        key: String,
        value: String,
        version: u64,
    },
    Deleted {
        member: String,
        key: String,
        version: u64,
    },
    /// Gone without a tombstone, or its tombstone collected.
    Dropped { member: String, key: String },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Joined {
                member,
                generation,
                status,
            } => write!(
                f,
                "{member} joined (generation {generation}, {})",
                status.as_str()
            ),
            Change::Forgotten { member, generation } => {
                write!(f, "{member} forgotten (generation {generation})")
            }
            Change::Status {
                member, from, to, ..
            } => write!(f, "{member} {} -> {}", from.as_str(), to.as_str()),
            Change::Set {
                member,
                key,
                value,
                version,
            } => write!(f, "{member} set {key} = {} (v{version})", cut(value)),
            Change::Deleted {
                member,
                key,
                version,
            } => write!(f, "{member} deleted {key} (v{version})"),
            Change::Dropped { member, key } => write!(f, "{member} dropped {key}"),
        }
    }
}

/// The changes from `old` to `new` (pure): members by name and generation,
/// keys by version. Heartbeats, last seen and phi are not changes.
pub fn changes(old: &GossipState, new: &GossipState) -> Vec<Change> {
    let index = |s: &GossipState| -> BTreeMap<(String, u64), Member> {
        s.members
            .iter()
            .map(|m| ((m.name.clone(), m.generation), m.clone()))
            .collect()
    };
    let (old, new) = (index(old), index(new));
    let mut out = Vec::new();
    for ((name, generation), m) in &new {
        let Some(o) = old.get(&(name.clone(), *generation)) else {
            out.push(Change::Joined {
                member: name.clone(),
                generation: *generation,
                status: m.status,
            });
            for k in &m.keys {
                out.push(Change::Set {
                    member: name.clone(),
                    key: k.key.clone(),
                    value: k.value.clone(),
                    version: k.version,
                });
            }
            continue;
        };
        if o.status != m.status {
            out.push(Change::Status {
                member: name.clone(),
                generation: *generation,
                from: o.status,
                to: m.status,
            });
        }
        let old_keys: BTreeMap<&str, u64> =
            o.keys.iter().map(|k| (k.key.as_str(), k.version)).collect();
        let old_tomb: BTreeMap<&str, u64> = o
            .tombstones
            .iter()
            .map(|t| (t.key.as_str(), t.version))
            .collect();
        for k in &m.keys {
            if old_keys.get(k.key.as_str()) != Some(&k.version) {
                out.push(Change::Set {
                    member: name.clone(),
                    key: k.key.clone(),
                    value: k.value.clone(),
                    version: k.version,
                });
            }
        }
        for t in &m.tombstones {
            if old_tomb.get(t.key.as_str()) != Some(&t.version) {
                out.push(Change::Deleted {
                    member: name.clone(),
                    key: t.key.clone(),
                    version: t.version,
                });
            }
        }
        let live_now = |key: &str| m.keys.iter().any(|k| k.key == key);
        let tomb_now = |key: &str| m.tombstones.iter().any(|t| t.key == key);
        for key in old_keys.keys() {
            if !live_now(key) && !tomb_now(key) {
                out.push(Change::Dropped {
                    member: name.clone(),
                    key: key.to_string(),
                });
            }
        }
    }
    for (name, generation) in old.keys() {
        if !new.contains_key(&(name.clone(), *generation)) {
            out.push(Change::Forgotten {
                member: name.clone(),
                generation: *generation,
            });
        }
    }
    out
}

/// How `shoal gossip` runs.
pub struct Options {
    pub json: bool,
    pub watch: bool,
    /// Between polls with `--watch`.
    pub interval: Duration,
    /// Stop watching after this long (`None`: until interrupted).
    pub limit: Option<Duration>,
}

/// `shoal gossip`.
pub async fn run(client: &Client, opts: Options) -> Result<()> {
    let mut last: GossipState = client.get("/v1/gossip").await?;
    if opts.json {
        if opts.watch {
            println!("{}", serde_json::to_string(&last)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&last)?);
        }
    } else {
        print!("{}", render(&last));
    }
    if !opts.watch {
        return Ok(());
    }
    let until = opts.limit.map(|l| tokio::time::Instant::now() + l);
    loop {
        if until.is_some_and(|u| tokio::time::Instant::now() + opts.interval > u) {
            return Ok(());
        }
        tokio::time::sleep(opts.interval).await;
        let now: GossipState = client.get("/v1/gossip").await?;
        let stamp = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        for c in changes(&last, &now) {
            if opts.json {
                let mut v = serde_json::to_value(&c)?;
                v["at"] = serde_json::json!(stamp);
                println!("{v}");
            } else {
                println!("{stamp} {c}");
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal::cluster::inspect::{KeyEntry, Tombstone};

    fn member(name: &str, status: MemberStatus, keys: &[(&str, &str, u64)]) -> Member {
        Member {
            name: name.into(),
            generation: 7,
            gossip_addr: "127.0.0.1:7946".parse().unwrap(),
            status,
            is_self: name == "a",
            heartbeat: 40,
            last_seen: Some(0.4),
            phi: Some(0.8),
            max_version: keys.iter().map(|k| k.2).max().unwrap_or(0),
            last_gc_version: 0,
            state_bytes: keys.iter().map(|k| (k.0.len() + k.1.len()) as u64).sum(),
            keys: keys
                .iter()
                .map(|(k, v, n)| KeyEntry {
                    key: k.to_string(),
                    value: v.to_string(),
                    version: *n,
                })
                .collect(),
            tombstones: Vec::new(),
        }
    }

    fn state(members: Vec<Member>) -> GossipState {
        GossipState {
            self_name: "a".into(),
            cluster_id: "lab".into(),
            members,
        }
    }

    #[test]
    fn the_text_lists_members_then_their_keys() {
        let mut b = member("b", MemberStatus::Dead, &[("envs", "0,8", 3)]);
        b.tombstones.push(Tombstone {
            key: "env:e1".into(),
            version: 5,
        });
        b.phi = Some(12.34);
        let s = state(vec![
            member("a", MemberStatus::Alive, &[("name", "a", 1)]),
            b,
        ]);
        let text = render(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "gossip state of a (cluster lab), 2 member(s)");
        assert!(lines[2].starts_with("MEMBER  GENERATION  GOSSIP"), "{text}");
        assert!(lines[3].starts_with("a*  "), "{text}");
        let b_row: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(
            b_row,
            [
                "b",
                "7",
                "127.0.0.1:7946",
                "dead",
                "40",
                "0.4s",
                "12.3",
                "3",
                "1",
                "1",
                "7B"
            ]
        );
        assert!(text.contains("\nb generation 7: 1 key(s), 1 tombstone(s), 7B, max version 3\n"));
        assert!(text.contains("\nenvs    3        0,8\n"), "{text}");
        assert!(text.contains("\nenv:e1  5        (deleted)\n"), "{text}");
    }

    #[test]
    fn long_values_are_cut_in_text_only() {
        let long = "x".repeat(300);
        let s = state(vec![member(
            "a",
            MemberStatus::Alive,
            &[("env:e1", &long, 1)],
        )]);
        let text = render(&s);
        assert!(text.contains(&format!("{}…", "x".repeat(VALUE_WIDTH - 1))));
        assert!(!text.contains(&"x".repeat(VALUE_WIDTH)));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(&long));
    }

    #[test]
    fn changes_name_what_moved_and_nothing_else() {
        let a = member("a", MemberStatus::Alive, &[("name", "a", 1)]);
        let b1 = member(
            "b",
            MemberStatus::Alive,
            &[("envs", "0,8", 3), ("env:e1", "{}", 4)],
        );
        let old = state(vec![a.clone(), b1.clone()]);
        // Only heartbeats moved: nothing to print.
        let mut beat = old.clone();
        for m in &mut beat.members {
            m.heartbeat += 5;
            m.last_seen = Some(3.0);
            m.phi = Some(4.0);
        }
        assert_eq!(changes(&old, &beat), vec![]);
        // b died, changed envs, deleted env:e1; c joined.
        let mut b2 = member("b", MemberStatus::Dead, &[("envs", "1,8", 6)]);
        b2.tombstones.push(Tombstone {
            key: "env:e1".into(),
            version: 7,
        });
        let c = member("c", MemberStatus::Alive, &[("name", "c", 1)]);
        let new = state(vec![a.clone(), b2, c]);
        let got: Vec<String> = changes(&old, &new).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            got,
            [
                "b alive -> dead",
                "b set envs = 1,8 (v6)",
                "b deleted env:e1 (v7)",
                "c joined (generation 7, alive)",
                "c set name = c (v1)",
            ]
        );
        // b forgotten, and a key of a gone without a tombstone.
        let a2 = member("a", MemberStatus::Alive, &[]);
        let got: Vec<String> = changes(&old, &state(vec![a2]))
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(got, ["a dropped name", "b forgotten (generation 7)"]);
        let json = serde_json::to_value(changes(&old, &beat)).unwrap();
        assert_eq!(json, serde_json::json!([]));
        let v = serde_json::to_value(Change::Status {
            member: "b".into(),
            generation: 7,
            from: MemberStatus::Alive,
            to: MemberStatus::Dead,
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"change": "status", "member": "b", "generation": 7, "from": "alive", "to": "dead"})
        );
    }
}
