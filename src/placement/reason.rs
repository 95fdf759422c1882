//! Why a node cannot take an environment: one [`Reason`] per filter, the
//! resource a refusal names, and the sentence each reads as.

use std::fmt;

use serde::Serialize;

use crate::cluster::keys::EngineState;
use crate::cluster::Role;
use crate::units::format_size;

/// Why a node cannot take the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    Dead,
    Left,
    UnreadableFacts {
        error: String,
    },
    /// Its gossiped HTTP address failed the checks: nothing is sent there.
    BadHttpAddr {
        error: String,
    },
    Draining,
    /// The node's engine does not answer (`unreachable` or `hung`).
    EngineDown {
        engine: EngineState,
    },
    /// The node cannot read the image store (missing, unmounted, hung).
    StoreUnavailable,
    NotSlave {
        roles: Vec<Role>,
    },
    LabelMismatch {
        label: String,
        wanted: String,
        has: Option<String>,
    },
    MaxEnvs {
        running: u32,
        max: u32,
    },
    MemoryShort {
        short: u64,
        need: u64,
        free: u64,
    },
    AioShort {
        short: u64,
        need: u64,
        free: u64,
    },
}

impl Reason {
    /// The reason's name, as its `reason` tag serializes (`memory_short`):
    /// the bounded label of `shoal_placement_refusals_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::Dead => "dead",
            Reason::Left => "left",
            Reason::UnreadableFacts { .. } => "unreadable_facts",
            Reason::BadHttpAddr { .. } => "bad_http_addr",
            Reason::Draining => "draining",
            Reason::EngineDown { .. } => "engine_down",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::NotSlave { .. } => "not_slave",
            Reason::LabelMismatch { .. } => "label_mismatch",
            Reason::MaxEnvs { .. } => "max_envs",
            Reason::MemoryShort { .. } => "memory_short",
            Reason::AioShort { .. } => "aio_short",
        }
    }

    /// The resource that was short, as refusals name it (`memory`, `aio`,
    /// `max_envs`, `draining`); `None` for reasons that are not a shortage.
    pub fn resource(&self) -> Option<&'static str> {
        match self {
            Reason::MemoryShort { .. } => Some("memory"),
            Reason::AioShort { .. } => Some("aio"),
            Reason::MaxEnvs { .. } => Some("max_envs"),
            Reason::Draining => Some("draining"),
            Reason::EngineDown { .. } => Some("engine"),
            Reason::StoreUnavailable => Some("store"),
            _ => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Dead => write!(f, "node is dead (no gossip heartbeat)"),
            Reason::Left => write!(f, "node left the cluster"),
            Reason::UnreadableFacts { error } => {
                write!(f, "node's gossip facts are unreadable: {error}")
            }
            Reason::BadHttpAddr { error } => write!(f, "node is not called: {error}"),
            Reason::Draining => write!(f, "node is draining and takes no new environments"),
            Reason::EngineDown {
                engine: EngineState::Hung,
            } => write!(
                f,
                "engine hung (the node's docker engine takes connections but does not answer)"
            ),
            Reason::EngineDown { .. } => {
                write!(
                    f,
                    "engine unreachable (the node's docker engine does not answer)"
                )
            }
            Reason::StoreUnavailable => write!(
                f,
                "store unavailable (the node cannot read the image store)"
            ),
            Reason::NotSlave { roles } => {
                let r: Vec<&str> = roles.iter().map(Role::as_str).collect();
                write!(f, "node is not a slave (roles: {})", r.join(", "))
            }
            Reason::LabelMismatch {
                label,
                wanted,
                has: Some(has),
            } => {
                write!(f, "label {label} is {has}, wanted {wanted}")
            }
            Reason::LabelMismatch {
                label,
                wanted,
                has: None,
            } => {
                write!(f, "label {label} is not set, wanted {wanted}")
            }
            Reason::MaxEnvs { running, max } => {
                write!(f, "node runs {running} of at most {max} environments")
            }
            Reason::MemoryShort { short, need, free } => write!(
                f,
                "memory short by {} (needs {}, {} free)",
                format_size(*short),
                format_size(*need),
                format_size(*free)
            ),
            Reason::AioShort { short, need, free } => {
                write!(
                    f,
                    "AIO contexts short by {short} (needs {need}, {free} free)"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn reasons_read_as_sentences() {
        let cases = [
            (Reason::Dead, "node is dead (no gossip heartbeat)"),
            (
                Reason::EngineDown {
                    engine: EngineState::Unreachable,
                },
                "engine unreachable (the node's docker engine does not answer)",
            ),
            (
                Reason::EngineDown {
                    engine: EngineState::Hung,
                },
                "engine hung (the node's docker engine takes connections but does not answer)",
            ),
            (
                Reason::StoreUnavailable,
                "store unavailable (the node cannot read the image store)",
            ),
            (
                Reason::NotSlave {
                    roles: vec![Role::Build],
                },
                "node is not a slave (roles: build)",
            ),
            (
                Reason::LabelMismatch {
                    label: "memory".into(),
                    wanted: "256GB".into(),
                    has: Some("128GB".into()),
                },
                "label memory is 128GB, wanted 256GB",
            ),
            (
                Reason::MaxEnvs { running: 8, max: 8 },
                "node runs 8 of at most 8 environments",
            ),
            (
                Reason::MemoryShort {
                    short: 12 * GIB,
                    need: 32 * GIB,
                    free: 20 * GIB,
                },
                "memory short by 12GiB (needs 32GiB, 20GiB free)",
            ),
            (
                Reason::AioShort {
                    short: 5,
                    need: 10,
                    free: 5,
                },
                "AIO contexts short by 5 (needs 10, 5 free)",
            ),
        ];
        for (r, s) in cases {
            assert_eq!(r.to_string(), s);
        }
    }

    /// `kind` is the serde tag of every variant.
    #[test]
    fn kinds_are_the_serialized_tags() {
        let all = [
            Reason::Dead,
            Reason::Left,
            Reason::UnreadableFacts { error: "x".into() },
            Reason::BadHttpAddr { error: "x".into() },
            Reason::Draining,
            Reason::EngineDown {
                engine: EngineState::Hung,
            },
            Reason::StoreUnavailable,
            Reason::NotSlave { roles: vec![] },
            Reason::LabelMismatch {
                label: "a".into(),
                wanted: "b".into(),
                has: None,
            },
            Reason::MaxEnvs { running: 1, max: 1 },
            Reason::MemoryShort {
                short: 1,
                need: 2,
                free: 1,
            },
            Reason::AioShort {
                short: 1,
                need: 2,
                free: 1,
            },
        ];
        for r in all {
            let v = serde_json::to_value(&r).unwrap();
            assert_eq!(v["reason"], r.kind(), "{r:?}");
        }
    }
}
