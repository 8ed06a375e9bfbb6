//! The livemesh contract (`proto/livemesh/v1`), generated at build time.
//!
//! This is the only crate that holds generated code; every service and the
//! all-in-one binary depend on it.

pub mod codec;
pub mod encoded;

/// Package `livemesh.v1`.
pub mod v1 {
    #![allow(missing_docs, unused_qualifications, clippy::all, clippy::pedantic)]
    tonic::include_proto!("livemesh.v1");
}

/// The encoded `FileDescriptorSet` of the whole contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/livemesh_descriptor.bin"));

/// The fully-qualified names of every livemesh service, as health and
/// reflection report them.
pub const SERVICE_NAMES: &[&str] = &[
    "livemesh.v1.SubscribeService",
    "livemesh.v1.PublishService",
    "livemesh.v1.CounterService",
    "livemesh.v1.OngoingQueryService",
    "livemesh.v1.RoomAdminService",
    "livemesh.v1.GiftsService",
    "livemesh.v1.SettlementService",
];

/// Conversions between wall-clock milliseconds and protobuf timestamps.
pub mod time {
    /// How long ago `ts` was by this machine's clock (e.g. a message's
    /// `written_at` when it arrives); zero for a time ahead of the clock
    /// or out of range.
    pub fn since(ts: prost_types::Timestamp) -> std::time::Duration {
        std::time::SystemTime::try_from(ts)
            .ok()
            .and_then(|then| std::time::SystemTime::now().duration_since(then).ok())
            .unwrap_or_default()
    }

    /// A timestamp for `ms` milliseconds since the Unix epoch.
    pub fn timestamp_from_ms(ms: i64) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            // Always in 0..1_000_000_000, so the cast cannot truncate.
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        }
    }

    /// Milliseconds since the Unix epoch of `ts`, rounding towards the past,
    /// saturating at `i64::MIN` / `i64::MAX`: a timestamp is client input,
    /// and one with `seconds` near either end of i64 must not overflow
    /// (a panic in debug builds, a wrapped time in release builds).
    pub fn ms_from_timestamp(ts: &prost_types::Timestamp) -> i64 {
        ts.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(ts.nanos).div_euclid(1_000_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn since_is_the_age_of_a_past_time_and_zero_for_a_future_one() {
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        let age = time::since(time::timestamp_from_ms(now_ms - 1_500));
        assert!(
            age >= std::time::Duration::from_millis(1_500)
                && age < std::time::Duration::from_secs(60),
            "{age:?}"
        );
        let ahead = time::since(time::timestamp_from_ms(now_ms + 60_000));
        assert_eq!(ahead, std::time::Duration::ZERO);
        let out_of_range = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(time::since(out_of_range), std::time::Duration::ZERO);
    }

    #[test]
    fn service_names_match_the_descriptor_set() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let mut described: Vec<String> = fds
            .file
            .iter()
            .filter(|f| f.package() == "livemesh.v1")
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(|s| format!("livemesh.v1.{}", s.name()))
            })
            .collect();
        described.sort();
        let mut listed: Vec<String> = SERVICE_NAMES.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(described, listed);
    }

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for ms in [0, 1, 999, 1000, 1_700_000_000_123, -1, -1001] {
            assert_eq!(time::ms_from_timestamp(&time::timestamp_from_ms(ms)), ms);
        }
    }

    /// Found by the property tests: `seconds * 1000` overflowed (a panic in
    /// debug builds) for timestamps a client may send.
    #[test]
    fn extreme_timestamps_saturate_instead_of_overflowing() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(
            time::ms_from_timestamp(&ts(i64::MAX, 999_999_999)),
            i64::MAX
        );
        assert_eq!(time::ms_from_timestamp(&ts(i64::MIN, -1)), i64::MIN);
        assert_eq!(
            time::ms_from_timestamp(&ts(i64::MAX / 1000, i32::MAX)),
            i64::MAX
        );
        assert_eq!(time::ms_from_timestamp(&ts(-1, i32::MIN)), -1000 - 2148);
    }
}
