//! The hot store's Redis keys (the project's key rule).
//!
//! `counter|<phase>|` names the service and the stage (the seed's
//! `[service-name]|[phase]|[entry-key]`); `{room:<id>}` is the hash
//! tag: Redis Cluster hashes only the part inside the braces, so all keys of a
//! room share one slot and one Lua script may touch them together.

/// `counter|<phase>|{room:<id>}|total:<shard>`: one shard of the room's total.
pub fn total(phase: &str, room_id: u64, shard: u32) -> String {
    format!("counter|{phase}|{{room:{room_id}}}|total:{shard}")
}

/// `counter|<phase>|{room:<id>}|lovers`: the room's ranking (a sorted set:
/// member = viewer id, score = loves).
pub fn lovers(phase: &str, room_id: u64) -> String {
    format!("counter|{phase}|{{room:{room_id}}}|lovers")
}

/// `counter|<phase>|{room:<id>}|flush:<flush id>`: marks an applied flush.
pub fn flush(phase: &str, room_id: u64, flush_id: &str) -> String {
    format!("counter|{phase}|{{room:{room_id}}}|flush:{flush_id}")
}

/// `counter|<phase>|{room:<id>}|batch:<viewer>:<batch id>`: marks a counted
/// SendLoves batch (value: its loves).
pub fn batch(phase: &str, room_id: u64, viewer_id: u64, batch_id: &str) -> String {
    format!("counter|{phase}|{{room:{room_id}}}|batch:{viewer_id}:{batch_id}")
}

/// `counter|<phase>|{room:<id>}|closed`: the room's final total was taken;
/// flushes are refused.
pub fn closed(phase: &str, room_id: u64) -> String {
    format!("counter|{phase}|{{room:{room_id}}}|closed")
}

/// `counter|<phase>|{room:<id>}|finaliser`: the finaliser's lease (value: its node id).
pub fn finaliser(phase: &str, room_id: u64) -> String {
    format!("counter|{phase}|{{room:{room_id}}}|finaliser")
}

/// A `SCAN`/`KEYS` pattern matching every key of the room.
#[cfg(any(test, feature = "testing"))]
pub fn room_pattern(phase: &str, room_id: u64) -> String {
    format!("counter|{phase}|{{room:{room_id}}}|*")
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_follow_the_rule() {
        assert_eq!(
            super::total("loves", 42, 3),
            "counter|loves|{room:42}|total:3"
        );
        assert_eq!(super::lovers("loves", 42), "counter|loves|{room:42}|lovers");
        assert_eq!(
            super::flush("loves", 42, "n:7"),
            "counter|loves|{room:42}|flush:n:7"
        );
        assert_eq!(
            super::room_pattern("loves", 42),
            "counter|loves|{room:42}|*"
        );
    }
}
