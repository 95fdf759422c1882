//! `shoal cluster`: every node the asked node knows (`GET /v1/cluster`),
//! alive or dead, with its facts and its gossip detail: last seen, phi,
//! heartbeat and the bytes of its gossiped state.

use serde_json::Value;
use shoal::units::format_size;

use super::{age, phi, table};

/// The table of `GET /v1/cluster`'s answer (pure).
pub fn render(v: &Value) -> String {
    let empty = vec![];
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|n| {
            let f = &n["facts"];
            let state = if n["left"] == true {
                "left"
            } else if n["alive"] != true {
                "DEAD"
            } else if f["draining"] == true {
                "draining"
            } else {
                "alive"
            };
            let num = |v: &Value| v.as_u64().unwrap_or(0);
            let labels = f["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let roles = f["roles"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                format!(
                    "{}{}",
                    n["name"].as_str().unwrap_or("?"),
                    if n["is_self"] == true { "*" } else { "" }
                ),
                state.to_string(),
                age(n["last_seen"].as_f64()),
                phi(n["phi"].as_f64()),
                num(&n["heartbeat"]).to_string(),
                format!("{}B", num(&n["state_bytes"])),
                f["http_addr"].as_str().unwrap_or("-").to_string(),
                if roles.is_empty() {
                    "all".into()
                } else {
                    roles
                },
                labels,
                format!(
                    "{}/{}",
                    format_size(num(&f["memory_committed"])),
                    format_size(num(&f["memory_allocatable"]))
                ),
                format!("{}/{}", num(&f["aio_committed"]), num(&f["aio_max"])),
                format!("{}/{}", num(&f["env_count"]), num(&f["max_envs"])),
                // Gossip carries a filter that says how many.
                f["layers"]
                    .as_array()
                    .map_or(0, |l| l.len() as u64)
                    .max(num(&f["layer_filter"]["layers"]))
                    .to_string(),
                f["storage_driver"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "STATE",
            "LAST SEEN",
            "PHI",
            "HEARTBEAT",
            "GOSSIP STATE",
            "HTTP",
            "ROLES",
            "LABELS",
            "MEMORY",
            "AIO",
            "ENVS",
            "LAYERS",
            "DRIVER",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_nodes_show_their_silence_and_phi() {
        let v = serde_json::json!({"self_name": "a", "nodes": [
            {"name": "a", "is_self": true, "alive": true, "left": false, "last_seen": 0.0,
             "phi": null, "heartbeat": 90, "state_bytes": 812,
             "facts": {"http_addr": "10.0.0.1:7070", "roles": ["slave"], "labels": {"rack": "3"},
                       "memory_committed": 0, "memory_allocatable": 1073741824,
                       "aio_committed": 0, "aio_max": 65536, "env_count": 0, "max_envs": 8,
                       "layers": ["3f2a9c0d11e4b7aa"], "storage_driver": "overlay2", "draining": false}},
            {"name": "b", "is_self": false, "alive": false, "left": false, "last_seen": 42.5,
             "phi": 63.8, "heartbeat": 17, "state_bytes": 640, "facts": null},
        ]});
        let text = render(&v);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0][..6],
            ["NODE", "STATE", "LAST", "SEEN", "PHI", "HEARTBEAT"]
        );
        assert_eq!(lines[1][..6], ["a*", "alive", "0.0s", "-", "90", "812B"]);
        assert_eq!(lines[1][6], "10.0.0.1:7070");
        assert_eq!(lines[2][..6], ["b", "DEAD", "42s", "63.8", "17", "640B"]);
    }
}
