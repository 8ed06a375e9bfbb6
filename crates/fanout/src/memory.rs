//! The in-process fan-out store: one map of rooms under one lock. Every
//! operation is one short critical section, which is what makes each of
//! them atomic, as the Redis scripts are.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::{Append, Appended, FanoutSettings, Head, History, Position, Renewed, Slot};

#[derive(Debug, Default)]
struct Room {
    epoch: u64,
    seq: u64,
    history: VecDeque<(u64, Vec<u8>)>,
    latest: BTreeMap<&'static str, (u64, Vec<u8>)>,
    ended: bool,
    /// node -> (lease expiry ms, viewers)
    nodes: BTreeMap<String, (i64, u64)>,
    /// The room is forgotten after this time (ms).
    expires_ms: i64,
}

impl Room {
    fn drop_dead_nodes(&mut self, now_ms: i64) {
        self.nodes.retain(|_, (expiry, _)| *expiry > now_ms);
    }
}

/// The embedded default's fan-out store.
#[derive(Debug)]
pub struct MemoryFanout {
    settings: FanoutSettings,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    rooms: HashMap<u64, Room>,
    /// (room, key) -> (epoch, offset, expiry ms)
    idempotency: HashMap<(u64, String), (u64, u64, i64)>,
    /// Appends since the last sweep of expired entries.
    since_sweep: u64,
}

/// A sweep of expired rooms and keys runs every this many appends.
const SWEEP_EVERY: u64 = 10_000;

impl MemoryFanout {
    pub fn new(settings: FanoutSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether anything is stored for the room.
    pub fn holds(&self, room_id: u64) -> bool {
        let state = self.lock();
        state.rooms.contains_key(&room_id)
            || state.idempotency.keys().any(|(room, _)| *room == room_id)
    }

    /// How many rooms have state here.
    pub fn room_count(&self) -> usize {
        self.lock().rooms.len()
    }

    /// How many rooms have anything stored here: a room entry or an
    /// idempotency key.
    pub fn stored_rooms(&self) -> usize {
        let state = self.lock();
        let mut rooms: std::collections::HashSet<u64> = state.rooms.keys().copied().collect();
        rooms.extend(state.idempotency.keys().map(|(room, _)| *room));
        rooms.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent before it can
        // panic, so a poisoned lock still holds valid data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ttl_ms(secs: u64) -> i64 {
        i64::try_from(secs.saturating_mul(1_000)).unwrap_or(i64::MAX)
    }

    /// The room, created with a new epoch if it has none (or expired).
    fn room<'a>(&self, state: &'a mut State, room_id: u64, now_ms: i64) -> &'a mut Room {
        let room = state.rooms.entry(room_id).or_default();
        if room.epoch != 0 && room.expires_ms <= now_ms {
            *room = Room::default();
        }
        if room.epoch == 0 {
            room.epoch = u64::try_from(now_ms).unwrap_or(1).max(1);
            room.expires_ms = now_ms.saturating_add(Self::ttl_ms(self.settings.room_ttl_secs));
        }
        room
    }

    pub fn append(&self, append: &Append<'_>) -> Appended {
        let now = append.now_ms;
        let mut state = self.lock();
        state.since_sweep += 1;
        if state.since_sweep >= SWEEP_EVERY {
            state.since_sweep = 0;
            state.rooms.retain(|_, room| room.expires_ms > now);
            state.idempotency.retain(|_, (_, _, expiry)| *expiry > now);
        }
        let key = append
            .idempotency_key
            .map(|key| (append.room_id, key.to_owned()));
        if let Some(key) = &key
            && let Some(&(epoch, offset, expiry)) = state.idempotency.get(key)
            && expiry > now
        {
            return Appended::Duplicate { epoch, offset };
        }
        let room = self.room(&mut state, append.room_id, now);
        if room.ended {
            return Appended::Ended {
                epoch: room.epoch,
                offset: room.seq,
            };
        }
        let offset = match append.slot {
            Slot::Ordered => {
                room.seq += 1;
                room.history.push_back((room.seq, append.payload.to_vec()));
                while room.history.len() > self.settings.history_len as usize {
                    room.history.pop_front();
                }
                room.seq
            }
            Slot::Latest(kind) => {
                room.latest
                    .insert(kind, (room.seq, append.payload.to_vec()));
                room.seq
            }
        };
        let ttl = if append.ends_room {
            room.ended = true;
            self.settings.ended_ttl_secs
        } else {
            self.settings.room_ttl_secs
        };
        room.expires_ms = now.saturating_add(Self::ttl_ms(ttl));
        room.drop_dead_nodes(now);
        let epoch = room.epoch;
        let nodes = room.nodes.keys().cloned().collect();
        if let Some(key) = key {
            let expiry = now.saturating_add(Self::ttl_ms(self.settings.idempotency_ttl_secs));
            state.idempotency.insert(key, (epoch, offset, expiry));
        }
        Appended::New {
            epoch,
            offset,
            nodes,
        }
    }

    pub fn join(&self, room_id: u64, node: &str, viewers: u64, lease_ms: u64, now_ms: i64) -> Head {
        let mut state = self.lock();
        let room = self.room(&mut state, room_id, now_ms);
        let expiry = now_ms.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
        room.nodes.insert(node.to_owned(), (expiry, viewers));
        Head {
            epoch: room.epoch,
            offset: room.seq,
            ended: room.ended,
            latest: room.latest.values().cloned().collect(),
        }
    }

    pub fn renew(
        &self,
        room_id: u64,
        node: &str,
        viewers: u64,
        lease_ms: u64,
        now_ms: i64,
    ) -> Renewed {
        let mut state = self.lock();
        let room = self.room(&mut state, room_id, now_ms);
        let expiry = now_ms.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
        room.nodes.insert(node.to_owned(), (expiry, viewers));
        room.drop_dead_nodes(now_ms);
        Renewed {
            viewers: room.nodes.values().map(|(_, v)| *v).sum(),
            reporter: room.nodes.keys().next().is_some_and(|first| first == node),
            epoch: room.epoch,
            offset: room.seq,
        }
    }

    pub fn leave(&self, room_id: u64, node: &str) {
        if let Some(room) = self.lock().rooms.get_mut(&room_id) {
            room.nodes.remove(node);
        }
    }

    pub fn history(&self, room_id: u64, after: u64, upto: u64) -> History {
        let state = self.lock();
        match state.rooms.get(&room_id) {
            Some(room) => History {
                epoch: room.epoch,
                entries: room
                    .history
                    .iter()
                    .filter(|(offset, _)| *offset > after && *offset <= upto)
                    .cloned()
                    .collect(),
            },
            None => History {
                epoch: 0,
                entries: Vec::new(),
            },
        }
    }

    pub fn head(&self, room_id: u64) -> Position {
        let state = self.lock();
        state.rooms.get(&room_id).map_or(
            Position {
                epoch: 0,
                offset: 0,
            },
            |room| Position {
                epoch: room.epoch,
                offset: room.seq,
            },
        )
    }

    pub fn nodes(&self, room_id: u64, now_ms: i64) -> Vec<String> {
        let state = self.lock();
        state.rooms.get(&room_id).map_or_else(Vec::new, |room| {
            room.nodes
                .iter()
                .filter(|(_, (expiry, _))| *expiry > now_ms)
                .map(|(node, _)| node.clone())
                .collect()
        })
    }
}
