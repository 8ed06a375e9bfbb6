//! What counts against a breaker: the status codes that say a peer is in
//! trouble, the `grpc-timeout` a caller set, and the store errors that say a
//! database or Redis could not be reached.

use std::time::Duration;

use http::HeaderMap;

/// The gRPC status code a response carries in its headers (a trailers-only
/// error); `None` for a response whose status comes in the trailers.
pub fn header_code(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// Whether a gRPC outcome says the peer is in trouble (as opposed to the
/// caller having asked for something wrong).
pub fn code_counts_as_failure(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::ResourceExhausted
    )
}

/// The `grpc-timeout` header: an integer of at most 8 digits and a unit.
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3_600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Something that can say whether it means the guarded store is in
/// trouble (a timeout, a lost connection) rather than a refusal of this one
/// operation (a constraint, a script error).
pub trait StoreFailure {
    fn counts_as_failure(&self) -> bool;
}

/// A SQL error counts against the database when the database could not be
/// reached or talked to; an error it answered with (a constraint, a
/// deadlock, bad SQL) is about the statement.
impl StoreFailure for sqlx::Error {
    fn counts_as_failure(&self) -> bool {
        matches!(
            self,
            sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
        )
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let mut headers = HeaderMap::new();
        for (value, expected) in [
            ("250m", Duration::from_millis(250)),
            ("3S", Duration::from_secs(3)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3_600)),
            ("40u", Duration::from_micros(40)),
            ("7n", Duration::from_nanos(7)),
        ] {
            headers.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(grpc_timeout(&headers), Some(expected), "{value}");
        }
        for bad in ["", "m", "12x", "-1S"] {
            headers.insert("grpc-timeout", bad.parse().unwrap());
            assert_eq!(grpc_timeout(&headers), None, "{bad:?}");
        }
    }

    #[test]
    fn only_trouble_at_the_peer_counts_as_failure() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Internal,
            tonic::Code::Unknown,
            tonic::Code::ResourceExhausted,
        ] {
            assert!(code_counts_as_failure(code), "{code:?}");
        }
        for code in [
            tonic::Code::Ok,
            tonic::Code::InvalidArgument,
            tonic::Code::NotFound,
            tonic::Code::FailedPrecondition,
            tonic::Code::AlreadyExists,
            tonic::Code::PermissionDenied,
            tonic::Code::Unauthenticated,
        ] {
            assert!(!code_counts_as_failure(code), "{code:?}");
        }
    }
}
