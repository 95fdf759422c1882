//! The operations that turn a node's published key-values into new ones
//! (keys to set, keys to tombstone), and what a node's state weighs.

use std::collections::BTreeMap;

/// The operations that turn the published key-values `old` into `new`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvDiff {
    /// Keys to set (new or changed values).
    pub set: Vec<(String, String)>,
    /// Keys to delete (tombstoned, so peers learn of the removal).
    pub delete: Vec<String>,
}

impl KvDiff {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.delete.is_empty()
    }
}

/// Diffs two key-value sets. Keys in `old` that shoal does not own (none
/// today) are deleted too: the node's state is exactly `new` afterwards.
pub fn diff_kv<'a>(
    old: impl IntoIterator<Item = (&'a str, &'a str)>,
    new: &[(String, String)],
) -> KvDiff {
    let old: BTreeMap<&str, &str> = old.into_iter().collect();
    let new_map: BTreeMap<&str, &str> = new.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let set = new_map
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let delete = old
        .keys()
        .filter(|k| !new_map.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    KvDiff { set, delete }
}

/// Sum of key and value bytes: what a node's state weighs in gossip,
/// before chitchat's per-entry overhead.
pub fn kv_bytes(kv: &[(String, String)]) -> usize {
    kv.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::keys::tests::{kv_refs, sample};
    use crate::cluster::keys::to_kv;

    #[test]
    fn diff_sets_changed_and_deletes_removed() {
        let mut a = sample();
        let old = to_kv(&a);
        a.envs.clear();
        a.layers.insert("fedcba9876543210".into());
        a.memory_committed = 0;
        let new = to_kv(&a);
        let d = diff_kv(kv_refs(&old), &new);
        assert_eq!(d.delete, vec!["env:e1".to_string()]);
        let set_keys: Vec<&str> = d.set.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(set_keys, vec!["layers", "mem"]);
        assert!(diff_kv(kv_refs(&new), &new).is_empty());
    }
}
