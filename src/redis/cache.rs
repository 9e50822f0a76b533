//! A local cache of completed records, so that replays skip the round trip.
//!
//! Invariant: only completed records are cached (they never change until they expire or are
//! removed), and an entry is never served past its record's expiry or the configured age.

use super::*;

/// Recently seen completed records, by Redis key (see [`RedisStoreBuilder::cache`]).
pub(super) struct Cache {
    pub(super) entries: usize,
    pub(super) max_age: Duration,
    pub(super) map: Mutex<HashMap<Vec<u8>, (Instant, Completed)>>,
}

impl Cache {
    pub(super) fn get(&self, key: &[u8]) -> Option<Completed> {
        let mut map = self.map.lock();
        let (at, done) = map.get(key)?;
        let now_ms = crate::clock::Clock::now(&crate::clock::SystemClock).as_millis();
        if at.elapsed() > self.max_age || done.expires_at.as_millis() <= now_ms {
            map.remove(key);
            return None;
        }
        Some(done.clone())
    }

    pub(super) fn put(&self, key: Vec<u8>, done: &Completed) {
        let mut map = self.map.lock();
        if map.len() >= self.entries {
            // Full: drop what is too old; if that frees nothing, start over (a cache miss
            // only costs a round trip).
            let max_age = self.max_age;
            map.retain(|_, (at, _)| at.elapsed() <= max_age);
            if map.len() >= self.entries {
                map.clear();
            }
        }
        map.insert(key, (Instant::now(), done.clone()));
    }
}
