//! What the property tests (`services/<svc>/tests/props.rs`) share: field
//! generators biased towards the values that break services (0, the ends
//! of each integer type, empty, huge and invisible text, timestamps at the
//! ends of i64), a runner with a modest number of cases, and the check of
//! every answer's status.
//!
//! Each property test starts its servers once and sends every case to them
//! through gRPC, so the cases also find state that one request leaves for
//! the next. The number of cases is the `default_cases` each test passes
//! (chosen so that the whole props suite adds well under a minute to the
//! test command on 2 cores); `PROPTEST_CASES=N` in the environment
//! overrides it for every property test, e.g.
//! `PROPTEST_CASES=2000 scripts/with-servers cargo nextest run -E 'binary(props)'`.
//!
//! A failing case is shrunk and reported with its inputs; it is not
//! written to a regressions file: a defect found is fixed with a named
//! regression test of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::{ClientStack, MeshChannel};
use livemesh_proto::v1::{Comment, GiftSent, LoveTotal, RoomEnded, ViewerCount, room_event};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::TestServer;

pub use proptest;

/// The runner of a property test: `default_cases` cases, or
/// `PROPTEST_CASES` if set.
pub fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default_cases);
    watch_panics();
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs `test` on values of `strategy` with [`runner`]; panics with the
/// (shrunk) failing input. `test` runs on `rt`.
pub fn run<S, F, Fut>(rt: &tokio::runtime::Runtime, default_cases: u32, strategy: S, test: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Fut,
    Fut: Future<Output = Result<(), TestCaseError>>,
{
    let mut runner = runner(default_cases);
    let result = runner.run(&strategy, |value| {
        let before = panics();
        let outcome = rt.block_on(test(value));
        let after = panics();
        if after > before {
            return Err(TestCaseError::fail(format!(
                "{} panic(s) while this case ran (see the panic message above)",
                after - before
            )));
        }
        outcome
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

static PANICS: AtomicUsize = AtomicUsize::new(0);
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Counts every panic of the process, on any thread (a server task's too,
/// which a client only sees as a reset stream), on top of the usual hook;
/// [`runner`] calls it, a regression test may call it itself.
pub fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut last) = LAST_PANIC.lock() {
                *last = info.to_string();
            }
            previous(info);
        }));
    });
}

/// Panics of this process so far (from the first [`watch_panics`] on).
pub fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// A channel to `server` that shows the server's own answers: no retries
/// and a circuit breaker that never opens (a breaker opened by a run of
/// refusals would answer UNAVAILABLE for the server), through the mesh's
/// client stack as every client. With `service`, calls come from that mesh
/// service (dev mode's unsigned `Dev <service>` credential).
pub fn probe_channel(server: &TestServer, service: Option<&str>) -> MeshChannel {
    let config = ClientConfig {
        max_retries: 0,
        breaker_min_calls: u32::MAX,
        ..ClientConfig::default()
    };
    let mut stack = ClientStack::new(&config);
    if let Some(service) = service {
        stack = stack
            .secured(&livemesh_mesh::auth::Security::dev(), service)
            .expect("dev mode needs no secret");
    }
    stack
        .channel(&format!("http://{}", server.addr))
        .expect("loopback uri")
}

/// Checks the status of an answer to client input: never INTERNAL or
/// UNKNOWN (a caller's input is not a server fault), and one of `allowed`.
pub fn check_code(
    rpc: &str,
    status: &tonic::Status,
    allowed: &[tonic::Code],
) -> Result<(), TestCaseError> {
    let code = status.code();
    if matches!(code, tonic::Code::Internal | tonic::Code::Unknown) || !allowed.contains(&code) {
        return Err(TestCaseError::fail(format!(
            "{rpc} answered {code:?} ({:?}); allowed: {allowed:?}",
            excerpt(status.message())
        )));
    }
    Ok(())
}

/// Checks a result: OK, or an error status [`check_code`] accepts.
pub fn check<T>(
    rpc: &str,
    result: &Result<T, tonic::Status>,
    allowed: &[tonic::Code],
) -> Result<(), TestCaseError> {
    match result {
        Ok(_) => Ok(()),
        Err(status) => check_code(rpc, status, allowed),
    }
}

/// At most 200 characters of `text`, for failure messages.
fn excerpt(text: &str) -> String {
    let mut out: String = text.chars().take(200).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// Ids: 0, the ends of u64 and of i64 (ids are stored as signed 64-bit
/// integers), small ones, and any.
pub fn id() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(i64::MAX as u64 + 1),
        1..1_000u64,
        any::<u64>(),
    ]
    .boxed()
}

/// One of `known` most of the time, else any [`id`]: most cases then reach
/// past the existence checks.
pub fn id_from(known: Vec<u64>) -> BoxedStrategy<u64> {
    prop_oneof![
        2 => proptest::sample::select(known),
        1 => id(),
    ]
    .boxed()
}

/// Signed amounts: 0, ±1, the ends of i64 and values next to them, small
/// ones, and any.
pub fn amount() -> BoxedStrategy<i64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(-1),
        Just(i64::MAX),
        Just(i64::MAX - 1),
        Just(i64::MIN),
        Just(i64::MIN + 1),
        Just(1 << 62),
        -1_000..1_000i64,
        any::<i64>(),
    ]
    .boxed()
}

/// Text: empty, only whitespace or invisible characters, control and
/// bidirectional characters, non-ASCII, long, and any; at most a few
/// thousand characters (a request stays far below the message limit).
pub fn text() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just(" \t\n".to_owned()),
        Just("\u{200B}".to_owned()),
        Just("\u{FEFF}".to_owned()),
        Just("\0".to_owned()),
        Just("hi\u{202E}dlrow".to_owned()),
        Just("é 漢字 🎉".to_owned()),
        "[a-zA-Z0-9 ]{1,40}",
        (0..5_000usize).prop_map(|n| "x".repeat(n)),
        any::<String>(),
    ]
    .boxed()
}

/// Idempotency keys and other client-chosen ids: like [`text`], with
/// lengths around the usual limits (128 and 200 bytes) and case and
/// spacing variants of one key.
pub fn key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[a-zA-Z0-9:|_-]{1,12}",
        1 => Just("k".to_owned()),
        1 => Just("K".to_owned()),
        1 => Just("k ".to_owned()),
        1 => (120..210usize).prop_map(|n| "k".repeat(n)),
        2 => text(),
    ]
    .boxed()
}

/// A protobuf timestamp: unset, ordinary, or with seconds and nanos at the
/// ends of their types (nanos outside 0..1e9 too: clients may send them).
pub fn timestamp() -> BoxedStrategy<Option<prost_types::Timestamp>> {
    let seconds = prop_oneof![
        Just(0i64),
        Just(i64::MAX),
        Just(i64::MIN),
        Just(i64::MAX / 1_000),
        Just(i64::MIN / 1_000),
        1_600_000_000..1_900_000_000i64,
        any::<i64>(),
    ];
    let nanos = prop_oneof![
        Just(0i32),
        Just(999_999_999),
        Just(i32::MAX),
        Just(i32::MIN),
        Just(-1),
        any::<i32>(),
    ];
    proptest::option::weighted(0.8, (seconds, nanos))
        .prop_map(|t| t.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }))
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_and_unknown_are_never_allowed() {
        let allowed = [
            tonic::Code::Internal,
            tonic::Code::Unknown,
            tonic::Code::NotFound,
        ];
        assert!(check_code("R", &tonic::Status::internal("x"), &allowed).is_err());
        assert!(check_code("R", &tonic::Status::unknown("x"), &allowed).is_err());
        assert!(check_code("R", &tonic::Status::not_found("x"), &allowed).is_ok());
        assert!(check_code("R", &tonic::Status::aborted("x"), &allowed).is_err());
    }

    #[test]
    fn panics_on_any_thread_are_counted() {
        let _ = runner(1);
        let before = panics();
        let _ = std::thread::spawn(|| panic!("counted")).join();
        assert!(panics() > before);
    }
}

/// A room event's kind, or none, with the weights `[none, love total,
/// comment, gift, viewer count, room ended]`.
pub fn room_event_kind(weights: [u32; 6]) -> BoxedStrategy<Option<room_event::Kind>> {
    let [none, love_total, comment, gift, viewer_count, room_ended] = weights;
    prop_oneof![
        none => Just(None),
        love_total => any::<u64>().prop_map(|total| Some(room_event::Kind::LoveTotal(LoveTotal { total }))),
        comment => (id(), text()).prop_map(|(viewer_id, text)| {
            Some(room_event::Kind::Comment(Comment { viewer_id, text }))
        }),
        gift => (id(), id(), amount(), key()).prop_map(|(viewer_id, gift_id, amount, transfer_id)| {
            Some(room_event::Kind::Gift(GiftSent { viewer_id, gift_id, amount, transfer_id }))
        }),
        viewer_count => any::<u64>().prop_map(|count| Some(room_event::Kind::ViewerCount(ViewerCount { count }))),
        room_ended => timestamp().prop_map(|ended_at| Some(room_event::Kind::RoomEnded(RoomEnded { ended_at }))),
    ]
    .boxed()
}
