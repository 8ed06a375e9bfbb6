//! Where the counter keeps loves: the hot store ([`hot`]) while a room is
//! live, SQL ([`sql`]) for an ended room's final numbers.

pub mod hot;
pub mod sql;
