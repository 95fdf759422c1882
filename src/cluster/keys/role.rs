//! What a node may be used for: the roles `slave`, `build`, `master`,
//! `test`, their names in gossip and configuration, and "no roles given
//! means every role".

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a node may be used for. `slave` takes environments; the others are
/// the labels the seed's cluster used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Slave,
    Build,
    Master,
    Test,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Slave, Role::Build, Role::Master, Role::Test];

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Slave => "slave",
            Role::Build => "build",
            Role::Master => "master",
            Role::Test => "test",
        }
    }

    /// The roles of a node configured with `roles`: none given means all.
    pub fn effective(roles: &BTreeSet<Role>) -> BTreeSet<Role> {
        if roles.is_empty() {
            Role::ALL.into_iter().collect()
        } else {
            roles.clone()
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a role: use slave, build, master or test")]
pub struct BadRole(pub String);

impl FromStr for Role {
    type Err = BadRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "slave" => Ok(Role::Slave),
            "build" => Ok(Role::Build),
            "master" => Ok(Role::Master),
            "test" => Ok(Role::Test),
            _ => Err(BadRole(s.to_string())),
        }
    }
}
