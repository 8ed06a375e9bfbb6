//! A room as the rooms table holds it, and how room ids name their region.

use livemesh_proto::time::timestamp_from_ms;
use livemesh_proto::v1;

/// Bits 48..62 of a room id (and of an anchor id) name a region.
pub const REGION_SHIFT: u32 = 48;
/// The highest region number: ids stay below 2^63, so they fit the signed
/// 64-bit integers of SQLite and MySQL.
pub const MAX_REGION: u16 = (1 << 15) - 1;
/// Mask of the region-local part of an id.
pub const LOCAL_MASK: u64 = (1 << REGION_SHIFT) - 1;

/// The region an id names, or `None` when bit 63 is set (no such region).
pub fn region_of(id: u64) -> Option<u16> {
    u16::try_from(id >> REGION_SHIFT)
        .ok()
        .filter(|region| *region <= MAX_REGION)
}

/// The room id of row `local` in `region`'s rooms table.
pub fn room_id(region: u16, local: i64) -> u64 {
    (u64::from(region) << REGION_SHIFT) | (local.unsigned_abs() & LOCAL_MASK)
}

/// The row id of `room_id` in its region's rooms table.
pub fn local_id(room_id: u64) -> i64 {
    // Masked to 48 bits, so it always fits an i64.
    (room_id & LOCAL_MASK) as i64
}

/// Where a room is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ongoing,
    Ended,
}

impl Status {
    pub(crate) fn from_db(code: i32) -> Option<Self> {
        match code {
            1 => Some(Status::Ongoing),
            2 => Some(Status::Ended),
            _ => None,
        }
    }
}

/// One row of a rooms table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomRecord {
    pub room_id: u64,
    pub anchor_id: u64,
    pub status: Status,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    /// Incremented by every change of the row; the cache keeps the highest.
    pub version: u64,
}

impl RoomRecord {
    pub fn is_ongoing(&self) -> bool {
        self.status == Status::Ongoing
    }

    pub fn region(&self) -> u16 {
        region_of(self.room_id).unwrap_or_default()
    }
}

impl From<RoomRecord> for v1::Room {
    fn from(room: RoomRecord) -> Self {
        v1::Room {
            room_id: room.room_id,
            anchor_id: room.anchor_id,
            status: match room.status {
                Status::Ongoing => v1::RoomStatus::Ongoing,
                Status::Ended => v1::RoomStatus::Ended,
            }
            .into(),
            started_at: Some(timestamp_from_ms(room.started_at_ms)),
            ended_at: room.ended_at_ms.map(timestamp_from_ms),
            version: room.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_round_trip_region_and_local_id() {
        for region in [0, 1, 7, MAX_REGION] {
            for local in [1_i64, 42, (1 << 48) - 1] {
                let id = room_id(region, local);
                assert_eq!(region_of(id), Some(region));
                assert_eq!(local_id(id), local);
                assert!(i64::try_from(id).is_ok(), "room ids fit a signed BIGINT");
            }
        }
        assert_eq!(region_of(1 << 63), None);
        assert_eq!(region_of(12345), Some(0), "small ids are region 0");
    }
}
