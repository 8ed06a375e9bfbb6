//! Property test of `GiftsService` and `SettlementService` (every RPC)
//! through the gRPC server, on 4 balance shards of each SQL backend, with
//! the largest transfer raised to i64::MAX so that balances reach the ends
//! of their type. Any field values, to an ongoing room, an ended (and so
//! settling) one and rooms never started. Checks after every case that no
//! case panicked or answered INTERNAL/UNKNOWN, that every shard's balances
//! sum to zero, that no balance is below zero but those of the funding and
//! clearing accounts, and that users' balances are what the answered
//! deposits and gifts made them (each transfer id applied once, under the
//! id the request names).
//!
//! `PROPTEST_CASES=N` runs N cases instead of the default (see
//! `livemesh_testkit::props`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use futures::StreamExt as _;
use livemesh_fanout::FanoutConfig;
use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_gift_settler::GiftSettler;
use livemesh_gift_settler::GiftsConfig;
use livemesh_gift_settler::testing::{CLEARING, EXTERNAL};
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::{
    DepositRequest, ExportLedgerRequest, GetBalanceRequest, GetSettlementRequest, ReconcileRequest,
    SendGiftRequest, SettleRoomRequest,
};
use livemesh_publish::Dispatcher;
use livemesh_publish::PublishConfig;
use livemesh_testkit::props::{self, amount, id, id_from, key, timestamp};
use livemesh_testkit::{SqlBackend, TestServer};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tonic::Code;

const SQLITE_CASES: u32 = 160;
const MARIADB_CASES: u32 = 96;
const SHARDS: usize = 4;

#[test]
fn sqlite() {
    every_rpc_keeps_the_ledger_balanced(SqlBackend::sqlite(), SQLITE_CASES);
}

#[test]
fn mariadb() {
    every_rpc_keeps_the_ledger_balanced(SqlBackend::mariadb(), MARIADB_CASES);
}

#[derive(Debug, Clone)]
enum Call {
    Deposit(DepositRequest),
    Gift(SendGiftRequest),
    Balance(GetBalanceRequest),
    Settle(SettleRoomRequest),
    Settlement(GetSettlementRequest),
    Reconcile(ReconcileRequest),
    Export(ExportLedgerRequest),
}

/// Users: a few that come back (so balances build up), and any id.
fn user() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![3 => 1..6u64, 1 => id()]
}

/// Amounts: mostly ones that can be applied, and the extremes.
fn money() -> impl Strategy<Value = i64> + Clone {
    prop_oneof![3 => 1..1_000i64, 2 => amount()]
}

fn call(rooms: Vec<u64>) -> impl Strategy<Value = Call> {
    let room = id_from(rooms);
    prop_oneof![
        4 => (key(), user(), money()).prop_map(|(idempotency_key, user_id, amount)| {
            Call::Deposit(DepositRequest { idempotency_key, user_id, amount })
        }),
        4 => (key(), user(), room.clone(), id(), money()).prop_map(
            |(idempotency_key, viewer_id, room_id, gift_id, amount)| {
                Call::Gift(SendGiftRequest { idempotency_key, viewer_id, room_id, gift_id, amount })
            }
        ),
        1 => user().prop_map(|user_id| Call::Balance(GetBalanceRequest { user_id })),
        1 => room.clone().prop_map(|room_id| Call::Settle(SettleRoomRequest { room_id })),
        1 => room.clone().prop_map(|room_id| Call::Settlement(GetSettlementRequest { room_id })),
        1 => room.prop_map(|room_id| Call::Reconcile(ReconcileRequest { room_id })),
        1 => (timestamp(), timestamp())
            .prop_map(|(from, to)| Call::Export(ExportLedgerRequest { from, to })),
    ]
}

/// What the answers so far say the balances are.
#[derive(Default)]
struct Model {
    /// Transfer ids answered OK.
    applied: HashSet<String>,
    balances: HashMap<u64, i64>,
}

struct Mesh {
    _dir: tempfile::TempDir,
    _rooms: TestServer,
    _dispatcher: TestServer,
    server: TestServer,
    settler: GiftSettler,
    rooms: Vec<u64>,
}

async fn mesh(backend: &SqlBackend) -> Mesh {
    let (dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    for shard in 0..SHARDS {
        config
            .section_mut::<GiftsConfig>()
            .shard_urls
            .push(backend.database_url(&format!("props{shard}")).await);
    }
    config.section_mut::<GiftsConfig>().ongoing_query_url = rooms.url();
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms.url();
    config.section_mut::<GiftsConfig>().max_transfer_amount = i64::MAX;
    let store = FanoutStore::memory(FanoutSettings::from(&*config.section::<FanoutConfig>()));
    let dispatcher = TestServer::start(Dispatcher::from_config(&config, store).unwrap()).await;
    config.section_mut::<GiftsConfig>().publish_url = dispatcher.url();
    let settler = GiftSettler::from_config(&config).await.unwrap();
    let server = TestServer::start(settler.clone()).await;
    let ongoing = livemesh_testkit::start_room(rooms.channel(), 9).await;
    let ended = livemesh_testkit::start_room(rooms.channel(), 9).await;
    livemesh_testkit::end_room(rooms.channel(), ended).await;
    Mesh {
        _dir: dir,
        _rooms: rooms,
        _dispatcher: dispatcher,
        server,
        settler,
        rooms: vec![ongoing, ended],
    }
}

fn every_rpc_keeps_the_ledger_balanced(backend: SqlBackend, cases: u32) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mesh = rt.block_on(mesh(&backend));
    let model = Mutex::new(Model::default());
    props::run(&rt, cases, call(mesh.rooms.clone()), |call| {
        let (mesh, model) = (&mesh, &model);
        async move {
            let channel = props::probe_channel(&mesh.server, None);
            let mut gifts = GiftsServiceClient::new(channel.clone());
            let mut settlement = SettlementServiceClient::new(channel);
            let mut touched = None;
            match call {
                Call::Deposit(request) => {
                    let answer = gifts.deposit(request.clone()).await;
                    props::check(
                        "Deposit",
                        &answer,
                        &[
                            Code::InvalidArgument,
                            Code::OutOfRange,
                            Code::AlreadyExists,
                            Code::FailedPrecondition,
                        ],
                    )?;
                    if let Ok(reply) = answer {
                        let id = format!("deposit:{}:{}", request.user_id, request.idempotency_key);
                        applied(
                            model,
                            &id,
                            &reply.into_inner().transfer_id,
                            request.user_id,
                            request.amount,
                        )?;
                        touched = Some(request.user_id);
                    }
                }
                Call::Gift(request) => {
                    let answer = gifts.send_gift(request.clone()).await;
                    props::check(
                        "SendGift",
                        &answer,
                        &[
                            Code::InvalidArgument,
                            Code::NotFound,
                            Code::FailedPrecondition,
                            Code::OutOfRange,
                            Code::AlreadyExists,
                        ],
                    )?;
                    if let Ok(reply) = answer {
                        prop_assert_eq!(
                            request.room_id,
                            mesh.rooms[0],
                            "a gift to a room not ongoing"
                        );
                        let id = format!("gift:{}:{}", request.viewer_id, request.idempotency_key);
                        applied(
                            model,
                            &id,
                            &reply.into_inner().transfer_id,
                            request.viewer_id,
                            -request.amount,
                        )?;
                        touched = Some(request.viewer_id);
                    }
                }
                Call::Balance(request) => {
                    let answer = gifts.get_balance(request).await;
                    props::check("GetBalance", &answer, &[Code::InvalidArgument])?;
                    touched = answer.is_ok().then_some(request.user_id);
                }
                Call::Settle(request) => {
                    let answer = settlement.settle_room(request).await;
                    let allowed = [
                        Code::InvalidArgument,
                        Code::NotFound,
                        Code::FailedPrecondition,
                    ];
                    props::check("SettleRoom", &answer, &allowed)?;
                }
                Call::Settlement(request) => {
                    let answer = settlement.get_settlement(request).await;
                    props::check(
                        "GetSettlement",
                        &answer,
                        &[Code::InvalidArgument, Code::NotFound],
                    )?;
                }
                Call::Reconcile(request) => {
                    let answer = settlement.reconcile(request).await;
                    props::check(
                        "Reconcile",
                        &answer,
                        &[Code::InvalidArgument, Code::NotFound],
                    )?;
                }
                Call::Export(request) => {
                    let answer = settlement.export_ledger(request).await;
                    props::check("ExportLedger", &answer, &[Code::InvalidArgument])?;
                    if let Ok(stream) = answer {
                        let mut stream = stream.into_inner();
                        while let Some(item) = stream.next().await {
                            props::check("ExportLedger stream", &item, &[])?;
                        }
                    }
                }
            }
            check_ledger(mesh, model, touched).await
        }
    });
}

/// Records a transfer answered OK: applied once under the id the request
/// names, moving `delta` on `user`'s balance.
fn applied(
    model: &Mutex<Model>,
    expected_id: &str,
    transfer_id: &str,
    user: u64,
    delta: i64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        transfer_id,
        expected_id,
        "the answer names another transfer"
    );
    let mut model = model.lock().unwrap();
    if model.applied.insert(expected_id.to_owned()) {
        let balance = model.balances.entry(user).or_default();
        *balance = balance
            .checked_add(delta)
            .ok_or_else(|| TestCaseError::fail(format!("user {user}'s balance wrapped")))?;
    }
    Ok(())
}

/// Every shard sums to zero, only the funding and clearing accounts are
/// below zero, and `user`'s balance is the model's.
async fn check_ledger(
    mesh: &Mesh,
    model: &Mutex<Model>,
    user: Option<u64>,
) -> Result<(), TestCaseError> {
    for shard in mesh.settler.shards() {
        let total = shard.total().await.unwrap();
        prop_assert_eq!(total, 0, "shard {} sums to {}", shard.index, total);
        for (account, balance) in shard.negative_balances().await.unwrap() {
            prop_assert!(
                account == EXTERNAL || account == CLEARING,
                "{account} is at {balance} in shard {}",
                shard.index
            );
        }
    }
    if let Some(user) = user {
        let held = mesh
            .settler
            .shard(user)
            .balance(&livemesh_gift_settler::testing::user_account(user))
            .await
            .unwrap();
        let expected = model
            .lock()
            .unwrap()
            .balances
            .get(&user)
            .copied()
            .unwrap_or(0);
        prop_assert_eq!(held, expected, "user {}'s balance", user);
    }
    Ok(())
}
