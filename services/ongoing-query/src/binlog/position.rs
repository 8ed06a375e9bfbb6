//! Positions in a server's binlog: MariaDB GTID states, or file and offset.

use std::collections::BTreeMap;

/// Where a tail is in a server's binlog. Serialised as a string for storage
/// (`to_token`/`from_token`), e.g. "gtid:0-1-42" or "file:mysql-bin.000003:1234";
/// prefer GTID on MariaDB when the server reports @@gtid_binlog_pos, else file+pos.
///
/// A GTID position is a MariaDB GTID state: one `domain-server-seq` per
/// replication domain, comma-separated (`0-1-42` on a single-domain server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinlogPosition {
    Gtid(String),
    File { name: String, pos: u64 },
}

impl BinlogPosition {
    /// The position as one string, for storage; [`BinlogPosition::from_token`] reads it back.
    pub fn to_token(&self) -> String {
        match self {
            BinlogPosition::Gtid(state) => format!("gtid:{state}"),
            BinlogPosition::File { name, pos } => format!("file:{name}:{pos}"),
        }
    }

    /// Reads a token written by [`BinlogPosition::to_token`]; `None` when it is not one.
    pub fn from_token(s: &str) -> Option<Self> {
        if let Some(state) = s.strip_prefix("gtid:") {
            // Only well-formed states: the string goes into a SQL statement later.
            GtidState::parse(state)?;
            return Some(BinlogPosition::Gtid(state.to_owned()));
        }
        let rest = s.strip_prefix("file:")?;
        // The offset is after the last colon, so a file name may hold colons.
        let (name, pos) = rest.rsplit_once(':')?;
        if name.is_empty() {
            return None;
        }
        Some(BinlogPosition::File {
            name: name.to_owned(),
            pos: pos.parse().ok()?,
        })
    }
}

/// One MariaDB GTID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gtid {
    pub(super) domain: u32,
    pub(super) server: u32,
    pub(super) seq: u64,
}

/// A MariaDB GTID state: the last GTID of each replication domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct GtidState(BTreeMap<u32, (u32, u64)>);

impl GtidState {
    /// `domain-server-seq[,domain-server-seq...]`, one per domain.
    pub(super) fn parse(s: &str) -> Option<Self> {
        let mut map = BTreeMap::new();
        for part in s.split(',') {
            let mut fields = part.trim().split('-');
            let domain = fields.next()?.parse().ok()?;
            let server = fields.next()?.parse().ok()?;
            let seq = fields.next()?.parse().ok()?;
            if fields.next().is_some() || map.insert(domain, (server, seq)).is_some() {
                return None;
            }
        }
        Some(Self(map))
    }

    pub(super) fn render(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(domain, (server, seq))| format!("{domain}-{server}-{seq}"))
            .collect();
        parts.join(",")
    }

    pub(super) fn apply(&mut self, gtid: Gtid) {
        self.0.insert(gtid.domain, (gtid.server, gtid.seq));
    }
}
