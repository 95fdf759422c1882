//! The replay cache: every `(timestamp, nonce)` pair accepted within the
//! skew window, bounded in size; when full it drops the oldest and refuses
//! anything not newer than what it dropped, so a replay is never accepted.

use std::collections::BTreeSet;

use super::{AuthError, MAX_SKEW_MS, NONCE_LEN};

/// The `(timestamp, nonce)` pairs accepted within the skew window, bounded
/// in size (see the module doc). Pure: the caller passes the time.
#[derive(Debug)]
pub struct NonceCache {
    seen: BTreeSet<(u64, [u8; NONCE_LEN])>,
    cap: usize,
    /// The newest timestamp ever dropped from `seen`: nothing at or before
    /// it is accepted any more.
    floor: Option<u64>,
}

impl NonceCache {
    pub fn new(cap: usize) -> NonceCache {
        NonceCache {
            seen: BTreeSet::new(),
            cap: cap.max(1),
            floor: None,
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Records a pair, or says why it cannot be accepted.
    pub fn insert(
        &mut self,
        ts: u64,
        nonce: [u8; NONCE_LEN],
        now_ms: u64,
    ) -> Result<(), AuthError> {
        // Pairs older than the window are refused by the skew check anyway.
        while let Some(&(oldest, _)) = self.seen.first() {
            if now_ms.saturating_sub(oldest) <= MAX_SKEW_MS {
                break;
            }
            self.drop_oldest();
        }
        if self.floor.is_some_and(|f| ts <= f) {
            return Err(AuthError::TooOld);
        }
        if !self.seen.insert((ts, nonce)) {
            return Err(AuthError::Replay);
        }
        while self.seen.len() > self.cap {
            self.drop_oldest();
        }
        Ok(())
    }

    fn drop_oldest(&mut self) {
        if let Some((ts, _)) = self.seen.pop_first() {
            self.floor = Some(self.floor.map_or(ts, |f| f.max(ts)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_auth::tests::NOW;

    #[test]
    fn a_full_cache_drops_the_oldest_and_refuses_anything_not_newer() {
        let mut cache = NonceCache::new(3);
        for (i, ts) in [10u64, 20, 30].into_iter().enumerate() {
            assert_eq!(cache.insert(NOW + ts, [i as u8; 16], NOW), Ok(()));
        }
        assert_eq!(cache.insert(NOW + 40, [3; 16], NOW), Ok(()));
        assert_eq!(cache.len(), 3);
        // The dropped pair (ts 10) cannot come back, nor anything as old.
        assert_eq!(cache.insert(NOW + 10, [0; 16], NOW), Err(AuthError::TooOld));
        assert_eq!(cache.insert(NOW + 5, [9; 16], NOW), Err(AuthError::TooOld));
        // Pairs still held are replays; newer ones are fine.
        assert_eq!(cache.insert(NOW + 20, [1; 16], NOW), Err(AuthError::Replay));
        assert_eq!(cache.insert(NOW + 25, [9; 16], NOW), Ok(()));
    }

    #[test]
    fn the_cache_forgets_pairs_older_than_the_window() {
        let mut cache = NonceCache::new(100);
        for i in 0..50u64 {
            cache.insert(NOW + i, [i as u8; 16], NOW).unwrap();
        }
        let later = NOW + 49 + MAX_SKEW_MS + 1;
        cache.insert(later, [1; 16], later).unwrap();
        assert_eq!(cache.len(), 1);
        // Even if the clock steps back, a forgotten pair is refused.
        assert_eq!(cache.insert(NOW + 3, [3; 16], NOW), Err(AuthError::TooOld));
    }
}
