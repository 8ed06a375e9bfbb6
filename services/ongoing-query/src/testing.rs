//! What ongoing-query's tests (and benches) reach beyond the gRPC API,
//! behind the `testing` feature: the binlog tail, a region's rooms table,
//! and the layout of room ids. Not for production callers: these names may
//! change with the service's internals.

pub use crate::binlog::{
    BinlogPosition, RoomRow, TailError, TailEvent, current_position, spawn_tail,
};
pub use crate::partition::owner;
pub use crate::room::{REGION_SHIFT, RoomRecord, local_id, region_of, room_id};
pub use crate::store::RegionStore;
