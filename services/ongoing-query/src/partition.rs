//! Rendezvous (highest-random-weight) hashing of rooms onto workers: each
//! room goes to the worker with the highest weight for it, so changing the
//! number of workers from `n` to `n + 1` moves only the rooms the new worker
//! wins, about `1/(n + 1)` of them.

/// The most workers a partition may be split into.
pub const MAX_WORKERS: u32 = 65_536;

/// A stable 64-bit mix (splitmix64's finaliser): the same on every node and
/// every release, unlike the standard library's randomly keyed hasher.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn weight(room_id: u64, worker: u32) -> u64 {
    mix(room_id ^ mix(u64::from(worker).wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The worker of `total` that owns `room_id`. `total` must be at least 1.
pub fn owner(room_id: u64, total: u32) -> u32 {
    (0..total)
        .max_by_key(|worker| (weight(room_id, *worker), std::cmp::Reverse(*worker)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_room_has_exactly_one_owner_and_load_is_even() {
        let total = 7;
        let mut load = vec![0_u32; total as usize];
        for room in 1..=7_000_u64 {
            load[owner(room, total) as usize] += 1;
        }
        assert_eq!(load.iter().sum::<u32>(), 7_000);
        for n in load {
            assert!((800..=1_200).contains(&n), "uneven load {n}");
        }
    }

    #[test]
    fn adding_a_worker_moves_about_one_in_n_rooms_and_only_to_it() {
        let rooms = 20_000_u64;
        let moved: Vec<u64> = (1..=rooms)
            .filter(|room| owner(*room, 10) != owner(*room, 11))
            .collect();
        let share = moved.len() as f64 / rooms as f64;
        assert!((0.07..0.12).contains(&share), "moved {share}");
        assert!(moved.iter().all(|room| owner(*room, 11) == 10));
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::owner;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// For every total from 1 to 16: each room has exactly one owner, and
        /// growing the total by one moves about 1/(total + 1) of the rooms
        /// (with room for sampling noise), all of them to the new worker.
        #[test]
        fn ownership_is_exact_and_moves_little(rooms in proptest::collection::btree_set(any::<u64>(), 2_000..3_000)) {
            let rooms: Vec<u64> = rooms.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
            for total in 1..=16_u32 {
                let mut owned = vec![0_usize; total as usize];
                for room in &rooms {
                    let worker = owner(*room, total);
                    prop_assert!(worker < total);
                    owned[worker as usize] += 1;
                }
                prop_assert_eq!(owned.iter().sum::<usize>(), rooms.len());

                let moved: Vec<u64> = rooms.iter().copied().filter(|r| owner(*r, total) != owner(*r, total + 1)).collect();
                prop_assert!(moved.iter().all(|r| owner(*r, total + 1) == total), "moves only to the new worker");
                let share = moved.len() as f64 / rooms.len() as f64;
                let expected = 1.0 / f64::from(total + 1);
                // Binomial noise over >= 2000 rooms is below 3.5 standard deviations here.
                let sigma = (expected * (1.0 - expected) / rooms.len() as f64).sqrt();
                prop_assert!(share <= expected + 3.5 * sigma + 0.005, "total {}: moved {:.4}, expected about {:.4}", total, share, expected);
            }
        }
    }
}
