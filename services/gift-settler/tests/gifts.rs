//! Deposits and gifts end to end through gRPC, on 4 balance shards of each
//! SQL backend (SQLite files; databases on the harness's MariaDB). Rooms
//! come from a real ongoing-query server.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_gift_settler::GiftSettler;
use livemesh_gift_settler::testing::{
    LedgerError, PLATFORM, Step, Transfer, cut_of, room_account, user_account,
};
use livemesh_mesh::{Config, MeshChannel};
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::{DepositRequest, EndRoomRequest, GetBalanceRequest, SendGiftRequest};
use livemesh_proto::v1::{
    ExportLedgerRequest, GetSettlementRequest, ReconcileRequest, SettlementState,
};
use livemesh_publish::Dispatcher;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use livemesh_gift_settler::GiftsConfig;
use livemesh_proto::v1::SettleRoomRequest;
use livemesh_publish::PublishConfig;
use livemesh_testkit::{PrivateMariadb, SqlBackend, TestServer, until};

livemesh_testkit::sql_backend_suite!(
    a_gift_moves_money_from_the_viewer_to_the_room_in_the_viewers_shard,
    the_same_key_twice_is_one_gift_and_other_content_is_refused,
    insufficient_funds_change_nothing_and_say_the_balance,
    unknown_and_ended_rooms_and_bad_amounts_get_precise_codes,
    concurrent_viewers_gifting_and_depositing_conserve_money,
    settlement_pays_exactly_once_with_a_crash_before_and_after_each_step,
    a_room_end_settles_by_itself_and_reconciles_to_zero,
    a_refused_transfer_in_a_group_commit_is_rolled_back_alone,
    random_concurrent_deposits_and_gifts_conserve_money,
    balances_never_wrap_and_a_transfer_past_a_limit_is_refused_alone,
    a_transfer_the_database_refuses_is_refused_alone_and_never_unavailable,
    every_gift_that_answered_ok_is_in_the_rooms_stream_before_its_end,
    keys_differing_in_case_or_trailing_spaces_are_different_transfers,
    an_export_with_timestamps_at_the_ends_of_i64_is_answered,
    two_settlers_racing_on_one_room_end_settle_it_once,
);

const SHARDS: usize = 4;
const SUBACCOUNTS: u32 = 8;

struct Mesh {
    _dir: tempfile::TempDir,
    rooms: TestServer,
    _dispatcher: TestServer,
    /// The dispatcher's fan-out store: the room histories viewers are served.
    store: FanoutStore,
    _gifts_server: TestServer,
    settler: GiftSettler,
    /// The gift-settler's config (a second replica starts from it).
    config: Config,
    admin: RoomAdminServiceClient<MeshChannel>,
    gifts: GiftsServiceClient<MeshChannel>,
}

async fn mesh(backend: &SqlBackend) -> Mesh {
    mesh_with(backend, |_| {}).await
}

/// [`mesh`] with `tune` applied to the gift-settler's config.
async fn mesh_with(backend: &SqlBackend, tune: impl FnOnce(&mut Config)) -> Mesh {
    let mut shard_urls = Vec::new();
    for shard in 0..SHARDS {
        shard_urls.push(backend.database_url(&format!("shard{shard}")).await);
    }
    mesh_on_with(shard_urls, tune).await
}

/// The mesh with its balance shards at `shard_urls`.
async fn mesh_on(shard_urls: Vec<String>) -> Mesh {
    mesh_on_with(shard_urls, |_| {}).await
}

async fn mesh_on_with(shard_urls: Vec<String>, tune: impl FnOnce(&mut Config)) -> Mesh {
    let (dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    config.section_mut::<GiftsConfig>().shard_urls = shard_urls;
    config.section_mut::<GiftsConfig>().room_subaccounts = SUBACCOUNTS;
    config.section_mut::<GiftsConfig>().ongoing_query_url = rooms.url();
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms.url();
    // A dispatcher takes each gift's event before the gift commits.
    let store = FanoutStore::memory(FanoutSettings::default());
    let dispatcher =
        TestServer::start(Dispatcher::from_config(&config, store.clone()).unwrap()).await;
    config.section_mut::<GiftsConfig>().publish_url = dispatcher.url();
    tune(&mut config);
    let settler = GiftSettler::from_config(&config).await.unwrap();
    let gifts_server = TestServer::start(settler.clone()).await;
    Mesh {
        admin: RoomAdminServiceClient::new(rooms.channel()),
        gifts: GiftsServiceClient::new(gifts_server.channel()),
        _dir: dir,
        rooms,
        _dispatcher: dispatcher,
        store,
        _gifts_server: gifts_server,
        settler,
        config,
    }
}

impl Mesh {
    async fn start_room(&mut self) -> u64 {
        livemesh_testkit::start_room(self.rooms.channel(), 5).await
    }

    async fn deposit(
        &mut self,
        key: &str,
        user_id: u64,
        amount: i64,
    ) -> Result<i64, tonic::Status> {
        Ok(self
            .gifts
            .deposit(DepositRequest {
                idempotency_key: key.to_owned(),
                user_id,
                amount,
            })
            .await?
            .into_inner()
            .balance)
    }

    /// Deposits of `amount` for each of `users` (keys `<tag>-<n>`), each in
    /// a task of its own, so they share batches with what the test does
    /// meanwhile.
    fn deposits_meanwhile(
        &self,
        tag: &str,
        users: &[u64],
        amount: i64,
    ) -> tokio::task::JoinSet<Result<(), tonic::Status>> {
        let mut calls = tokio::task::JoinSet::new();
        for (n, user) in users.iter().copied().enumerate() {
            let mut gifts = self.gifts.clone();
            let key = format!("{tag}-{n}");
            calls.spawn(async move {
                gifts
                    .deposit(DepositRequest {
                        idempotency_key: key,
                        user_id: user,
                        amount,
                    })
                    .await
                    .map(|_| ())
            });
        }
        calls
    }

    async fn gift(
        &mut self,
        key: &str,
        viewer_id: u64,
        room_id: u64,
        amount: i64,
    ) -> Result<(String, i64), tonic::Status> {
        let reply = self
            .gifts
            .send_gift(SendGiftRequest {
                idempotency_key: key.to_owned(),
                viewer_id,
                room_id,
                gift_id: 1,
                amount,
            })
            .await?
            .into_inner();
        Ok((reply.transfer_id, reply.balance))
    }

    async fn balance(&mut self, user_id: u64) -> i64 {
        self.gifts
            .get_balance(GetBalanceRequest { user_id })
            .await
            .unwrap()
            .into_inner()
            .balance
    }

    /// The Reconcile statement of `room_id`.
    async fn statement(&self, room_id: u64) -> livemesh_proto::v1::ReconcileResponse {
        SettlementServiceClient::new(self._gifts_server.channel())
            .reconcile(ReconcileRequest { room_id })
            .await
            .unwrap()
            .into_inner()
    }

    /// The room's virtual balance over every shard and sub-account.
    async fn room_total(&self, room_id: u64) -> i64 {
        let mut total = 0;
        for shard in self.settler.shards() {
            for sub in 0..SUBACCOUNTS {
                total += shard.balance(&room_account(room_id, sub)).await.unwrap();
            }
        }
        total
    }

    /// All balances over all shards sum to zero: money is only moved, the
    /// external funding account going negative by what entered (and the
    /// clearing account of settlements summing to zero across shards).
    async fn assert_conserved(&self) {
        let mut total = 0;
        for shard in self.settler.shards() {
            total += shard.total().await.unwrap();
        }
        assert_eq!(total, 0, "money was created or lost");
    }
}

async fn a_gift_moves_money_from_the_viewer_to_the_room_in_the_viewers_shard(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    assert_eq!(mesh.deposit("top-up-1", 11, 1_000).await.unwrap(), 1_000);
    let (transfer, balance) = mesh.gift("g-1", 11, room, 300).await.unwrap();
    assert_eq!(balance, 700);
    assert!(transfer.contains("g-1"), "{transfer}");
    assert_eq!(mesh.balance(11).await, 700);
    assert_eq!(mesh.room_total(room).await, 300);
    // Both movements are in the viewer's own shard.
    let viewer_shard = mesh.settler.shard(11);
    assert_eq!(viewer_shard.balance(&user_account(11)).await.unwrap(), 700);
    let mut in_viewers_shard = 0;
    for sub in 0..SUBACCOUNTS {
        in_viewers_shard += viewer_shard
            .balance(&room_account(room, sub))
            .await
            .unwrap();
    }
    assert_eq!(in_viewers_shard, 300);
    mesh.assert_conserved().await;
}

async fn the_same_key_twice_is_one_gift_and_other_content_is_refused(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    mesh.deposit("d", 12, 500).await.unwrap();
    assert_eq!(
        mesh.deposit("d", 12, 500).await.unwrap(),
        500,
        "a deposit retried credits once"
    );
    let first = mesh.gift("same", 12, room, 100).await.unwrap();
    let again = mesh.gift("same", 12, room, 100).await.unwrap();
    assert_eq!(first, again, "the same result, no second debit");
    assert_eq!(mesh.balance(12).await, 400);
    let err = mesh.gift("same", 12, room, 250).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("idempotency key"),
        "{}",
        err.message()
    );
    let err = mesh.deposit("d", 12, 999).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert_eq!(mesh.balance(12).await, 400);
    assert_eq!(mesh.room_total(room).await, 100);
    mesh.assert_conserved().await;
}

async fn insufficient_funds_change_nothing_and_say_the_balance(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    mesh.deposit("d", 13, 50).await.unwrap();
    let err = mesh.gift("big", 13, room, 51).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("50"),
        "the balance is named: {}",
        err.message()
    );
    assert_eq!(mesh.balance(13).await, 50);
    assert_eq!(mesh.room_total(room).await, 0);
    // The refused key was not used up: the same key with an affordable amount works.
    assert_eq!(mesh.gift("big", 13, room, 50).await.unwrap().1, 0);
    let err = mesh.gift("more", 14, room, 1).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "a user never funded: {err:?}"
    );
    mesh.assert_conserved().await;
}

async fn unknown_and_ended_rooms_and_bad_amounts_get_precise_codes(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    mesh.deposit("d", 15, 100).await.unwrap();
    let code = |r: Result<(String, i64), tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(mesh.gift("a", 15, room + 999, 1).await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(mesh.gift("b", 15, room, 0).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(mesh.gift("c", 15, room, -5).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(mesh.gift("", 15, room, 5).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        mesh.deposit("e", 15, 0).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    mesh.gift("before-end", 15, room, 10).await.unwrap();
    livemesh_testkit::end_room(mesh.rooms.channel(), room).await;
    // Gifts are refused once the settler has seen the end (Watch): every
    // shard then marks the room ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for shard in mesh.settler.shards() {
        while shard.room_status(room).await.unwrap().as_deref() != Some("ended") {
            assert!(
                std::time::Instant::now() < deadline,
                "shard {} never saw the end",
                shard.index
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let err = mesh.gift("after-end", 15, room, 10).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("ended"), "{}", err.message());
    assert_eq!(mesh.balance(15).await, 90);
    mesh.assert_conserved().await;
}

async fn concurrent_viewers_gifting_and_depositing_conserve_money(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    const VIEWERS: u64 = 16;
    const GIFTS: u64 = 12;
    let mut tasks = tokio::task::JoinSet::new();
    for viewer in 1..=VIEWERS {
        let mut gifts = mesh.gifts.clone();
        tasks.spawn(async move {
            let mut deposited = 0;
            let mut gifted = 0;
            for i in 0..GIFTS {
                // Deposits race the same viewer's gifts; some gifts are refused.
                if i % 3 == 0 {
                    let amount = i64::try_from(10 + viewer).unwrap();
                    gifts
                        .deposit(DepositRequest {
                            idempotency_key: format!("d{i}"),
                            user_id: viewer,
                            amount,
                        })
                        .await
                        .unwrap();
                    deposited += amount;
                }
                let amount = i64::try_from(1 + (viewer + i) % 7).unwrap();
                let reply = gifts
                    .send_gift(SendGiftRequest {
                        idempotency_key: format!("g{i}"),
                        viewer_id: viewer,
                        room_id: room,
                        gift_id: 3,
                        amount,
                    })
                    .await;
                match reply {
                    Ok(_) => gifted += amount,
                    Err(status) => assert_eq!(
                        status.code(),
                        tonic::Code::FailedPrecondition,
                        "only insufficient funds may refuse: {status:?}"
                    ),
                }
            }
            (viewer, deposited, gifted)
        });
    }
    let mut all_gifted = 0;
    while let Some(done) = tasks.join_next().await {
        let (viewer, deposited, gifted) = done.unwrap();
        assert_eq!(
            mesh.balance(viewer).await,
            deposited - gifted,
            "viewer {viewer}"
        );
        all_gifted += gifted;
    }
    assert!(all_gifted > 0);
    assert_eq!(mesh.room_total(room).await, all_gifted);
    mesh.assert_conserved().await;
}

/// Funds a few viewers (spread over the shards) and has each gift in `room`;
/// returns the room's gross.
async fn gifts_in(mesh: &mut Mesh, room: u64, tag: &str) -> i64 {
    let mut gross = 0;
    for viewer in 100..108u64 {
        mesh.deposit(&format!("{tag}-d{viewer}"), viewer, 1_000)
            .await
            .unwrap();
        for g in 0..3 {
            let amount = i64::try_from(viewer % 10 + 3 * g + 1).unwrap();
            mesh.gift(&format!("{tag}-g{viewer}-{g}"), viewer, room, amount)
                .await
                .unwrap();
            gross += amount;
        }
    }
    gross
}

/// What the streamer and the platform should get from a room's shards.
async fn expected_cut(mesh: &Mesh, room: u64) -> (i64, i64) {
    let mut cut = 0;
    let mut gross = 0;
    for shard in mesh.settler.shards() {
        let v = shard.room_balance(room).await.unwrap();
        cut += cut_of(v, 3_000);
        gross += v;
    }
    (gross, cut)
}

/// Polls GetSettlement (15 s at most) until the room's settlement, which
/// the test does not ask for, is settled; returns it.
async fn settled_by_itself(
    settlement: &mut SettlementServiceClient<MeshChannel>,
    room_id: u64,
) -> livemesh_proto::v1::Settlement {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let row = settlement
            .get_settlement(GetSettlementRequest { room_id })
            .await
            .unwrap()
            .into_inner()
            .settlement
            .unwrap();
        if row.state() == SettlementState::Settled {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never settled: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A settled room's statement: balanced, and in every shard no difference
/// and nothing left in the room's virtual accounts.
fn assert_reconciled(statement: &livemesh_proto::v1::ReconcileResponse) {
    assert!(statement.balanced, "{statement:?}");
    for shard in &statement.shards {
        assert_eq!(shard.gift_difference, 0, "{statement:?}");
        assert_eq!(shard.settlement_difference, 0, "{statement:?}");
        assert_eq!(shard.virtual_balance, 0, "{statement:?}");
    }
}

async fn settlement_pays_exactly_once_with_a_crash_before_and_after_each_step(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let shards = u32::try_from(SHARDS).unwrap();
    let mut steps = vec![Step::Begin];
    for s in 0..shards {
        steps.extend([Step::EndShard(s), Step::SweepShard(s), Step::PayShard(s)]);
    }
    steps.push(Step::Finish);
    let inner = mesh.settler.clone();
    // The streamer is a user like any other: its shard is where it is paid.
    let streamer = 5;
    for (i, &crash_at) in steps.iter().enumerate() {
        let room = mesh.start_room().await;
        let gross = gifts_in(&mut mesh, room, &format!("r{i}")).await;
        let (virtual_total, cut) = expected_cut(&mesh, room).await;
        assert_eq!(virtual_total, gross);
        let before = mesh.balance(streamer).await;
        // The platform's account is credited in the streamer's shard.
        let platform_shard = inner.shard(streamer);
        let platform_before = platform_shard.balance(PLATFORM).await.unwrap();
        // A crash before this step (= after the one before it)...
        let err = inner.settle(room, streamer, &|step| step == crash_at).await;
        assert!(err.is_err(), "crash injected before {crash_at:?}");
        // ... and, when there is a later step, one more crash after it.
        if let Some(&later) = steps.get(i + 2) {
            assert!(
                inner
                    .settle(room, streamer, &|step| step == later)
                    .await
                    .is_err()
            );
        }
        // The retry finishes, and a further one changes nothing.
        let row = inner.settle(room, streamer, &|_| false).await.unwrap();
        let again = inner.settle(room, streamer, &|_| false).await.unwrap();
        assert_eq!(row, again);
        assert_eq!(row.state, "settled");
        assert_eq!(row.gross, gross, "crash before {crash_at:?}");
        assert_eq!(row.platform_cut, cut);
        assert_eq!(row.streamer_credit, gross - cut);
        assert_eq!(
            mesh.balance(streamer).await,
            before + gross - cut,
            "paid once"
        );
        assert_eq!(
            platform_shard.balance(PLATFORM).await.unwrap(),
            platform_before + cut
        );
        assert_eq!(
            mesh.room_total(room).await,
            0,
            "every virtual account emptied"
        );
        let err = mesh
            .gift(&format!("late-{i}"), 100, room, 1)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    }
    mesh.assert_conserved().await;
}

async fn a_room_end_settles_by_itself_and_reconciles_to_zero(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    let gross = gifts_in(&mut mesh, room, "auto").await;
    let (_, cut) = expected_cut(&mesh, room).await;
    let mut settlement = SettlementServiceClient::new(mesh._gifts_server.channel());
    let err = settlement
        .settle_room(SettleRoomRequest { room_id: room })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "ongoing: {err:?}"
    );
    livemesh_testkit::end_room(mesh.rooms.channel(), room).await;
    // The Watch's end starts the Settler; await its result.
    let row = settled_by_itself(&mut settlement, room).await;
    assert_eq!(
        (row.gross, row.platform_cut, row.streamer_credit),
        (gross, cut, gross - cut)
    );
    assert_eq!(row.streamer_id, 5);
    // SettleRoom by hand on a settled room returns the same, pays nothing more.
    let again = settlement
        .settle_room(SettleRoomRequest { room_id: room })
        .await
        .unwrap()
        .into_inner()
        .settlement
        .unwrap();
    assert_eq!(again, row);
    let statement = settlement
        .reconcile(ReconcileRequest { room_id: room })
        .await
        .unwrap()
        .into_inner();
    assert!(statement.balanced, "{statement:?}");
    assert_eq!(statement.shards.len(), SHARDS);
    let gifted: i64 = statement.shards.iter().map(|s| s.gifts_debited).sum();
    assert_eq!(gifted, gross);
    for shard in &statement.shards {
        assert_eq!(shard.gift_difference, 0);
        assert_eq!(shard.settlement_difference, 0);
        assert_eq!(shard.virtual_balance, 0);
        assert_eq!(shard.settled, shard.platform_cut + shard.streamer_credit);
    }
    // The export: every transfer's entries sum to zero, and the gifts are there.
    let mut export = settlement
        .export_ledger(ExportLedgerRequest {
            from: None,
            to: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut per_transfer = HashMap::<String, i64>::new();
    let mut entries = 0;
    while let Some(item) = export.message().await.unwrap() {
        let entry = item.entry.unwrap();
        *per_transfer.entry(entry.transfer_id).or_default() += entry.amount;
        entries += 1;
    }
    assert!(
        entries >= 2 * 8 * 4,
        "deposits and gifts: {entries} entries"
    );
    assert!(
        per_transfer.values().all(|&sum| sum == 0),
        "{per_transfer:?}"
    );
    assert!(per_transfer.keys().any(|t| t.starts_with("settle-in:")));
    mesh.assert_conserved().await;
}

async fn a_refused_transfer_in_a_group_commit_is_rolled_back_alone(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    let viewer = 21;
    mesh.deposit("d", viewer, 100).await.unwrap();
    // Open the room in the viewer's shard (a gift does it on first use).
    mesh.gift("open", viewer, room, 1).await.unwrap();
    let shard = mesh.settler.shard(viewer).clone();
    let gift = |key: &str, amount: i64| Transfer {
        transfer_id: format!("gift:{viewer}:{key}"),
        kind: "gift",
        debit: user_account(viewer),
        credit: room_account(room, 0),
        amount,
        request: format!("batch {key} {amount}"),
        room_id: Some(room),
        report: user_account(viewer),
        debit_may_go_negative: false,
        now_ms: livemesh_mesh::now_ms(),
        gift: None,
    };
    let batch = [
        gift("a", 30),
        gift("too-much", 500),
        gift("a", 30), // the same transfer again in the same batch: applied once
        gift("b", 60),
        gift("c", 20), // 99 - 30 - 60 = 9 left: refused
    ];
    let results = shard
        .apply_batch(&batch, &livemesh_gift_settler::testing::Silent)
        .await
        .unwrap();
    assert!(matches!(results[0], Ok(ref a) if !a.replayed && a.balance == 69));
    assert!(matches!(
        results[1],
        Err(LedgerError::Insufficient {
            balance: 69,
            amount: 500
        })
    ));
    assert!(matches!(results[2], Ok(ref a) if a.replayed && a.balance == 69));
    assert!(matches!(results[3], Ok(ref a) if a.balance == 9));
    assert!(matches!(
        results[4],
        Err(LedgerError::Insufficient { balance: 9, .. })
    ));
    assert_eq!(mesh.balance(viewer).await, 9);
    assert_eq!(mesh.room_total(room).await, 1 + 30 + 60);
    mesh.assert_conserved().await;
}

/// Users other than `user` whose balance lives in the same shard and whose
/// transfers take the same batch worker, so they share its batches.
fn same_lane_as(user: u64, count: usize) -> Vec<u64> {
    use livemesh_gift_settler::{shard_of, testing::lane};
    let workers = GiftsConfig::default().batch_workers as u64;
    (user + 1..)
        .filter(|u| {
            shard_of(*u, SHARDS) == shard_of(user, SHARDS)
                && lane(*u) % workers == lane(user) % workers
        })
        .take(count)
        .collect()
}

/// Defects 2 and 3 of issue 12: concurrent deposits of i64::MAX wrapped the
/// balance around (all answered OK); 2^62 twice failed as UNAVAILABLE, with
/// the unrelated deposits batched with it.
async fn balances_never_wrap_and_a_transfer_past_a_limit_is_refused_alone(backend: SqlBackend) {
    let mut mesh = mesh_with(&backend, |config| {
        config.section_mut::<GiftsConfig>().max_transfer_amount = i64::MAX
    })
    .await;
    let rich = 1_000;
    // The 2^62 case below runs in another shard: this one's funding
    // account is spent down to i64::MIN + 1 by the first part.
    let twice = (rich + 1..)
        .find(|u| {
            livemesh_gift_settler::shard_of(*u, SHARDS)
                != livemesh_gift_settler::shard_of(rich, SHARDS)
        })
        .unwrap();
    let others = same_lane_as(twice, 40);
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..4 {
        let mut gifts = mesh.gifts.clone();
        calls.spawn(async move {
            let reply = gifts
                .deposit(DepositRequest {
                    idempotency_key: format!("max-{n}"),
                    user_id: rich,
                    amount: i64::MAX,
                })
                .await;
            (true, reply.map(|r| r.into_inner().balance))
        });
    }
    let result = calls.join_all().await;
    let ok = result.iter().filter(|(_, r)| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one i64::MAX deposit fits: {result:?}");
    for (_, reply) in &result {
        match reply {
            Ok(balance) => assert_eq!(*balance, i64::MAX),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
                // The user's balance above i64::MAX or the funding
                // account's below i64::MIN: the limit is named.
                assert!(
                    status.message().contains("922337203685477580"),
                    "{}",
                    status.message()
                );
            }
        }
    }
    assert_eq!(mesh.balance(rich).await, i64::MAX);
    mesh.assert_conserved().await;

    // 2^62 twice: the second would pass i64::MAX. It is refused for good
    // (OUT_OF_RANGE, not "retry"), and the deposits batched with it go in.
    mesh.deposit("big-1", twice, 1 << 62).await.unwrap();
    let calls = mesh.deposits_meanwhile("small", &others, 5);
    let err = mesh.deposit("big-2", twice, 1 << 62).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    for reply in calls.join_all().await {
        reply.unwrap();
    }
    assert_eq!(mesh.balance(twice).await, 1 << 62);
    for user in &others {
        assert_eq!(mesh.balance(*user).await, 5);
    }
    mesh.assert_conserved().await;

    // The ledger's sums hold whatever the balances: two accounts at
    // i64::MAX and two at -i64::MAX sum to 0, where a plain SQL SUM fails
    // (SQLite: "integer overflow") or clamps (MySQL's cast).
    let shard = mesh.settler.shards()[0].clone();
    livemesh_mesh::on_db!(shard.db(), pool => {
        sqlx::query(
            "INSERT INTO accounts (account, balance, may_go_negative) VALUES \
             ('test:max-a', 9223372036854775807, 0), ('test:max-b', 9223372036854775807, 0), \
             ('test:min-a', -9223372036854775807, 1), ('test:min-b', -9223372036854775807, 1)",
        )
        .execute(pool)
        .await
        .unwrap();
    });
    mesh.assert_conserved().await;
}

/// Defect 3 of issue 12: a transfer the database refuses failed its whole
/// batch, and every caller was told UNAVAILABLE ("retry"), which could
/// never succeed for it.
async fn a_transfer_the_database_refuses_is_refused_alone_and_never_unavailable(
    backend: SqlBackend,
) {
    let mut mesh = mesh(&backend).await;
    let user = 2_000;
    let others = same_lane_as(user, 30);
    let shard = mesh.settler.shard(user).clone();
    // A trigger stands in for any rule of the database the ledger's own
    // checks do not know.
    livemesh_mesh::on_db!(shard.db(), pool => {
        let trigger = if shard.db().is_mysql() {
            "CREATE TRIGGER poison BEFORE INSERT ON transfers FOR EACH ROW BEGIN \
             IF NEW.transfer_id LIKE '%poison%' THEN \
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned'; END IF; END"
        } else {
            "CREATE TRIGGER poison BEFORE INSERT ON transfers \
             WHEN NEW.transfer_id LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        };
        sqlx::query(trigger).execute(pool).await.unwrap();
    });
    let calls = mesh.deposits_meanwhile("ok", &others, 7);
    let err = mesh.deposit("poison", user, 10).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Internal,
        "a permanent refusal: {err:?}"
    );
    assert!(err.message().contains("not applied"), "{}", err.message());
    for reply in calls.join_all().await {
        reply.unwrap();
    }
    for other in &others {
        assert_eq!(mesh.balance(*other).await, 7);
    }
    assert_eq!(mesh.balance(user).await, 0);
    mesh.assert_conserved().await;
}

/// Defect 9 of issue 12: gift events were published after the gift
/// committed, in the background, and refused once the room's end was
/// stored: paid gifts that answered OK never reached the viewers.
async fn every_gift_that_answered_ok_is_in_the_rooms_stream_before_its_end(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    let viewers: Vec<u64> = (3_001..=3_012).collect();
    for viewer in &viewers {
        mesh.deposit("fund", *viewer, 1_000_000).await.unwrap();
    }
    let sent = Arc::new(AtomicU64::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for viewer in viewers.iter().copied() {
        let mut gifts = mesh.gifts.clone();
        let sent = sent.clone();
        senders.spawn(async move {
            let mut ok = Vec::new();
            for n in 0.. {
                let reply = gifts
                    .send_gift(SendGiftRequest {
                        idempotency_key: format!("race-{n}"),
                        viewer_id: viewer,
                        room_id: room,
                        gift_id: 1,
                        amount: 1,
                    })
                    .await;
                match reply {
                    Ok(reply) => {
                        ok.push(reply.into_inner().transfer_id);
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => break,
                    Err(status) if status.code() == tonic::Code::Unavailable => {}
                    Err(status) => panic!("unexpected {status:?}"),
                }
            }
            ok
        });
    }
    // End the room while the gifts pour in.
    until("100 gifts in", WAIT, || sent.load(Ordering::SeqCst) >= 100).await;
    livemesh_testkit::end_room(mesh.rooms.channel(), room).await;
    let answered: Vec<String> = senders.join_all().await.into_iter().flatten().collect();
    // The dispatcher stores the end once its Watch tells it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let history = loop {
        let history = mesh.store.history(room, 0, u64::MAX).await.unwrap();
        let ended = history.entries.iter().any(|(_, payload)| {
            matches!(
                event_kind(payload),
                Some(livemesh_proto::v1::room_event::Kind::RoomEnded(_))
            )
        });
        if ended {
            break history;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the room's end was never stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut shown = Vec::new();
    let mut after_end = false;
    for (_, payload) in &history.entries {
        match event_kind(payload) {
            Some(livemesh_proto::v1::room_event::Kind::RoomEnded(_)) => after_end = true,
            Some(livemesh_proto::v1::room_event::Kind::Gift(gift)) => {
                assert!(!after_end, "gift {} after the room's end", gift.transfer_id);
                shown.push(gift.transfer_id);
            }
            _ => {}
        }
    }
    let mut expected = answered.clone();
    expected.sort();
    shown.sort();
    assert!(answered.len() >= 100, "{}", answered.len());
    assert_eq!(shown, expected, "every OK gift shown once, no other");
    mesh.assert_conserved().await;
}

fn event_kind(payload: &[u8]) -> Option<livemesh_proto::v1::room_event::Kind> {
    use prost::Message as _;
    livemesh_proto::v1::RoomEvent::decode(payload).unwrap().kind
}

/// One operation of the property test.
#[derive(Debug, Clone)]
enum Op {
    Deposit { user: u64, key: u8, amount: i64 },
    Gift { viewer: u64, key: u8, amount: i64 },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (1..6u64, 0..4u8, 1..80i64).prop_map(|(user, key, amount)| Op::Deposit {
            user,
            key,
            amount
        }),
        (1..6u64, 0..6u8, 1..60i64).prop_map(|(viewer, key, amount)| Op::Gift {
            viewer,
            key,
            amount
        }),
    ]
}

/// Random batches of deposits and gifts (keys reused on purpose, with the
/// same or other content) run all at once; whatever the interleaving,
/// every balance is what the accepted transfers say, and money is conserved.
async fn random_concurrent_deposits_and_gifts_conserve_money(backend: SqlBackend) {
    use proptest::strategy::{Strategy, ValueTree};
    let mut mesh = mesh(&backend).await;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let ops = proptest::collection::vec(op(), 1..60);
    for case in 0..6u64 {
        let room = mesh.start_room().await;
        let batch = ops.new_tree(&mut runner).unwrap().current();
        // Users are fresh per case.
        let user = |u: u64| 10_000 * (case + 1) + u;
        let calls = batch.iter().cloned().map(|op| {
            let mut gifts = mesh.gifts.clone();
            async move {
                match op {
                    Op::Deposit {
                        user: u,
                        key,
                        amount,
                    } => {
                        let reply = gifts
                            .deposit(DepositRequest {
                                idempotency_key: format!("k{key}"),
                                user_id: user(u),
                                amount,
                            })
                            .await;
                        (
                            user(u),
                            reply.map(|r| r.into_inner().transfer_id),
                            amount,
                            false,
                        )
                    }
                    Op::Gift {
                        viewer,
                        key,
                        amount,
                    } => {
                        let reply = gifts
                            .send_gift(SendGiftRequest {
                                idempotency_key: format!("k{key}"),
                                viewer_id: user(viewer),
                                room_id: room,
                                gift_id: 1,
                                amount,
                            })
                            .await;
                        (
                            user(viewer),
                            reply.map(|r| r.into_inner().transfer_id),
                            amount,
                            true,
                        )
                    }
                }
            }
        });
        let results = futures::future::join_all(calls).await;
        // Each accepted transfer id counts once, with the amount it was accepted for.
        let mut accepted: HashMap<String, (u64, i64, bool)> = HashMap::new();
        for (who, result, amount, is_gift) in results {
            match result {
                Ok(transfer_id) => {
                    let first = accepted
                        .entry(transfer_id)
                        .or_insert((who, amount, is_gift));
                    assert_eq!(first.1, amount, "a key answered OK for other content");
                }
                Err(status) => assert!(
                    matches!(
                        status.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists
                    ),
                    "case {case}: unexpected {status:?}"
                ),
            }
        }
        let mut expected: HashMap<u64, i64> = HashMap::new();
        let mut gifted = 0;
        for (who, amount, is_gift) in accepted.values() {
            let sign = if *is_gift { -1 } else { 1 };
            *expected.entry(*who).or_default() += sign * amount;
            if *is_gift {
                gifted += amount;
            }
        }
        for (who, balance) in &expected {
            assert_eq!(
                mesh.balance(*who).await,
                *balance,
                "case {case}, user {who}: {batch:?}"
            );
        }
        assert_eq!(mesh.room_total(room).await, gifted, "case {case}");
        mesh.assert_conserved().await;
    }
}

/// Balance shards of the chaos tests: two databases on one private MariaDB.
const CHAOS_SHARDS: usize = 2;
/// How long the chaos tests await each condition.
const WAIT: Duration = Duration::from_secs(30);

async fn chaos_mesh(db: &PrivateMariadb) -> Mesh {
    let tag = livemesh_testkit::unique_name("chaos");
    mesh_on(
        (0..CHAOS_SHARDS)
            .map(|s| db.database_url(&format!("{tag}_shard{s}")))
            .collect(),
    )
    .await
}

/// Calls `call` until it answers OK, as a client keeping the idempotency
/// contract does: a failed call is retried with the same key. Only "retry
/// later" failures are acceptable; panics after 30 s.
async fn until_ok<T, F, Fut>(what: &str, failures: &AtomicU64, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(reply) => return reply,
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ),
                    "{what}: only 'retry later' may fail while MariaDB restarts: {status:?}"
                );
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what}: still failing after 30 s: {status:?}"
                );
                failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// What one viewer's OK answers said was done.
#[derive(Debug, Default)]
struct Accepted {
    deposited: i64,
    /// Transfer id -> amount, for gifts and deposits.
    gifts: HashMap<String, i64>,
    deposits: HashMap<String, i64>,
}

/// One viewer: a deposit, then gifts (and a top-up every 5 gifts) until
/// told to stop, each call retried with its key until OK.
async fn gifting_viewer(
    gifts: GiftsServiceClient<MeshChannel>,
    room_id: u64,
    viewer_id: u64,
    ok_calls: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u64, Accepted) {
    let mut accepted = Accepted::default();
    let mut n = 0_u64;
    while !*stop.borrow() {
        if n.is_multiple_of(5) {
            let request = DepositRequest {
                idempotency_key: format!("d{n}"),
                user_id: viewer_id,
                amount: 100,
            };
            let reply = until_ok(
                &format!("viewer {viewer_id} deposit {n}"),
                &failures,
                || {
                    let (mut gifts, request) = (gifts.clone(), request.clone());
                    async move { gifts.deposit(request).await }
                },
            )
            .await
            .into_inner();
            accepted.deposited += 100;
            accepted.deposits.insert(reply.transfer_id, 100);
        }
        let amount = i64::try_from(1 + (viewer_id + n) % 7).unwrap();
        let request = SendGiftRequest {
            idempotency_key: format!("g{n}"),
            viewer_id,
            room_id,
            gift_id: 2,
            amount,
        };
        let reply = until_ok(&format!("viewer {viewer_id} gift {n}"), &failures, || {
            let (mut gifts, request) = (gifts.clone(), request.clone());
            async move { gifts.send_gift(request).await }
        })
        .await
        .into_inner();
        assert!(
            accepted.gifts.insert(reply.transfer_id, amount).is_none(),
            "two gifts answered with one transfer id"
        );
        ok_calls.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
    (viewer_id, accepted)
}

/// Every ledger entry, grouped by transfer id.
async fn ledger(mesh: &Mesh) -> HashMap<String, Vec<i64>> {
    let mut settlement = SettlementServiceClient::new(mesh._gifts_server.channel());
    let mut export = settlement
        .export_ledger(ExportLedgerRequest {
            from: None,
            to: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut per_transfer = HashMap::<String, Vec<i64>>::new();
    while let Some(item) = export.message().await.unwrap() {
        let entry = item.entry.unwrap();
        per_transfer
            .entry(entry.transfer_id)
            .or_default()
            .push(entry.amount);
    }
    per_transfer
}

/// Chaos: MariaDB (both balance shards) killed with SIGKILL and restarted
/// twice while 8 viewers deposit and send gifts; clients retry failures
/// with the same idempotency key. Every call that answered OK is in the
/// ledger exactly once (two entries summing to zero), nothing else is, the
/// balances are deposits minus gifts, and the room reconciles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_mariadb_killed_during_gifts_loses_and_doubles_nothing() {
    const VIEWERS: u64 = 8;
    const KILLS: usize = 2;
    let db = PrivateMariadb::start().await;
    let mut mesh = chaos_mesh(&db).await;
    let room = mesh.start_room().await;
    let ok_calls = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut viewers = tokio::task::JoinSet::new();
    for viewer in 1..=VIEWERS {
        viewers.spawn(gifting_viewer(
            mesh.gifts.clone(),
            room,
            viewer,
            ok_calls.clone(),
            failures.clone(),
            stopped.clone(),
        ));
    }
    let oks = || ok_calls.load(Ordering::Relaxed);
    for _ in 0..KILLS {
        let before = oks();
        until("gifts before the kill", WAIT, || {
            oks() >= before + 4 * VIEWERS
        })
        .await;
        let failed = failures.load(Ordering::Relaxed);
        db.kill();
        until("calls failing while MariaDB is down", WAIT, || {
            failures.load(Ordering::Relaxed) >= failed + VIEWERS
        })
        .await;
        db.restart().await;
    }
    let before = oks();
    until("gifts after the last restart", WAIT, || {
        oks() >= before + 4 * VIEWERS
    })
    .await;
    stop.send_replace(true);
    let mut all = HashMap::new();
    while let Some(done) = viewers.join_next().await {
        let (viewer, accepted) = done.unwrap();
        all.insert(viewer, accepted);
    }

    let mut gifted = 0;
    for (viewer, accepted) in &all {
        let gifts: i64 = accepted.gifts.values().sum();
        assert_eq!(
            mesh.balance(*viewer).await,
            accepted.deposited - gifts,
            "viewer {viewer}: deposits minus accepted gifts"
        );
        gifted += gifts;
    }
    assert_eq!(
        mesh.room_total(room).await,
        gifted,
        "the room got every accepted gift once"
    );
    let ledger = ledger(&mesh).await;
    let mut expected: HashMap<&str, i64> = HashMap::new();
    for accepted in all.values() {
        for (id, amount) in accepted.gifts.iter().chain(&accepted.deposits) {
            expected.insert(id, *amount);
        }
    }
    for (id, entries) in &ledger {
        if !(id.starts_with("gift:") || id.starts_with("deposit:")) {
            continue;
        }
        let amount = expected
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} is in the ledger but no call answered OK for it"));
        let mut sorted = entries.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            vec![-amount, *amount],
            "{id}: applied once, two entries"
        );
    }
    for id in expected.keys() {
        assert!(
            ledger.contains_key(*id),
            "{id} answered OK but is not in the ledger"
        );
    }
    let statement = mesh.statement(room).await;
    assert!(statement.balanced, "{statement:?}");
    let debited: i64 = statement.shards.iter().map(|s| s.gifts_debited).sum();
    assert_eq!(debited, gifted);
    mesh.assert_conserved().await;
    println!(
        "{} gifts and {} deposits accepted over {KILLS} MariaDB kills; {} failed calls retried",
        all.values().map(|a| a.gifts.len()).sum::<usize>(),
        all.values().map(|a| a.deposits.len()).sum::<usize>(),
        failures.load(Ordering::Relaxed)
    );
}

/// Waits until the room's settlement is `settled` (SettleRoom retried with
/// the same room while it fails, as finance would), and returns it.
async fn settled(
    mesh: &Mesh,
    room_id: u64,
    failures: &AtomicU64,
) -> livemesh_proto::v1::Settlement {
    let settlement = SettlementServiceClient::new(mesh._gifts_server.channel());
    until_ok(&format!("settling room {room_id}"), failures, || {
        let mut settlement = settlement.clone();
        async move { settlement.settle_room(SettleRoomRequest { room_id }).await }
    })
    .await
    .into_inner()
    .settlement
    .unwrap()
}

/// Checks a settled room: streamer paid gross minus the cut exactly once,
/// every virtual account zero, Reconcile balanced, each settlement transfer
/// in the ledger once.
async fn assert_settled_once(mesh: &mut Mesh, gifted: &Gifted) {
    let &Gifted {
        room,
        gross,
        cut,
        before: streamer_before,
    } = gifted;
    let failures = AtomicU64::new(0);
    let row = settled(mesh, room, &failures).await;
    assert_eq!(row.state(), SettlementState::Settled, "{row:?}");
    assert_eq!(
        (row.gross, row.platform_cut, row.streamer_credit),
        (gross, cut, gross - cut)
    );
    assert_eq!(
        mesh.balance(row.streamer_id).await,
        streamer_before + gross - cut,
        "paid once"
    );
    assert_eq!(
        mesh.room_total(room).await,
        0,
        "every virtual account emptied"
    );
    assert_reconciled(&mesh.statement(room).await);
    let ledger = ledger(mesh).await;
    for s in 0..CHAOS_SHARDS {
        for kind in ["settle-in", "cut"] {
            if let Some(entries) = ledger.get(&format!("{kind}:{room}:{s}")) {
                assert_eq!(entries.len(), 2, "{kind}:{room}:{s} applied once");
            }
        }
    }
    assert!(ledger.values().all(|e| e.iter().sum::<i64>() == 0));
}

/// A started room with the test viewers' gifts in it, what its settlement
/// must pay, and the streamer's balance before it.
struct Gifted {
    room: u64,
    gross: i64,
    cut: i64,
    before: i64,
}

async fn gifted_room(mesh: &mut Mesh, tag: &str, streamer: u64) -> Gifted {
    let room = mesh.start_room().await;
    let gross = gifts_in(mesh, room, tag).await;
    let (_, cut) = expected_cut(mesh, room).await;
    let before = mesh.balance(streamer).await;
    Gifted {
        room,
        gross,
        cut,
        before,
    }
}

/// SIGKILLs the private MariaDB and starts it again on the same data;
/// returns when it was killed (ms since the epoch).
async fn kill_and_restart(db: &PrivateMariadb) -> i64 {
    db.kill();
    let killed_at = livemesh_mesh::now_ms();
    db.restart().await;
    killed_at
}

/// Waits (without calling SettleRoom) until the settler has settled the
/// room by itself, after the kill at `killed_at_ms`.
async fn settles_by_itself(mesh: &Mesh, room_id: u64, killed_at_ms: i64) {
    let mut settlement = SettlementServiceClient::new(mesh._gifts_server.channel());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // GetSettlement reads the coordinating shard: it fails while the
        // shards come back.
        if let Ok(reply) = settlement
            .get_settlement(GetSettlementRequest { room_id })
            .await
        {
            let row = reply.into_inner().settlement.unwrap();
            if row.state() == SettlementState::Settled {
                let settled_at = row.settled_at.unwrap();
                assert!(
                    livemesh_proto::time::ms_from_timestamp(&settled_at) >= killed_at_ms,
                    "room {room_id} was settled before the kill: the kill interrupted nothing"
                );
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "room {room_id}: the settler did not finish by itself within 30 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Chaos: MariaDB killed while rooms' settlements run, three ways. Room A:
/// right after its end is committed (the settler hears of it from the
/// Watch while the restart's crash recovery runs). Room C: as soon as the
/// settler has recorded the settlement as begun. Room B: by the settler's
/// step hook after shard 0 is paid and shard 1 is swept but not yet paid.
/// After the restart A and C settle by themselves and B through SettleRoom
/// retried; each streamer is paid exactly once, every virtual account is
/// zero, and Reconcile is balanced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_mariadb_killed_during_settlement_pays_exactly_once() {
    let db = Arc::new(PrivateMariadb::start().await);
    let mut mesh = chaos_mesh(&db).await;
    let streamer = 5; // the rooms' anchor
    let inner = mesh.settler.clone();

    // Room A: the end commits, then MariaDB dies at once.
    let a = gifted_room(&mut mesh, "a", streamer).await;
    let room_a = a.room;
    livemesh_testkit::end_room(mesh.rooms.channel(), room_a).await;
    let killed_at = kill_and_restart(&db).await;
    settles_by_itself(&mesh, room_a, killed_at).await;
    assert_settled_once(&mut mesh, &a).await;

    // Room C: killed once the settlement has begun.
    let c = gifted_room(&mut mesh, "c", streamer).await;
    let room_c = c.room;
    livemesh_testkit::end_room(mesh.rooms.channel(), room_c).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match inner.shards()[0].settlement(room_c).await.unwrap() {
            Some(row) if row.state == "in_progress" => break,
            Some(row) => panic!("the settlement finished before it could be interrupted: {row:?}"),
            None => assert!(
                tokio::time::Instant::now() < deadline,
                "the settler did not begin settling room {room_c} within 10 s of its end"
            ),
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let killed_at = kill_and_restart(&db).await;
    settles_by_itself(&mesh, room_c, killed_at).await;
    assert_settled_once(&mut mesh, &c).await;

    // Room B: killed at a precise point of the settlement.
    let b = gifted_room(&mut mesh, "b", streamer).await;
    let room_b = b.room;
    let killer = db.clone();
    let err = inner
        .settle(room_b, streamer, &move |step| {
            if step == Step::PayShard(1) {
                killer.kill();
            }
            false
        })
        .await;
    assert!(
        err.is_err(),
        "MariaDB died before shard 1 was paid: {err:?}"
    );
    db.restart().await;
    // The kill hit where intended: begun, shard 1 swept, shard 1 not paid.
    let row = inner.shards()[0].settlement(room_b).await.unwrap().unwrap();
    assert_eq!(row.state, "in_progress", "{row:?}");
    let payer = inner.shard(streamer);
    let unpaid = payer
        .transfer_amount(&format!("settle-in:{room_b}:1"))
        .await
        .unwrap()
        + payer
            .transfer_amount(&format!("cut:{room_b}:1"))
            .await
            .unwrap();
    assert_eq!(unpaid, 0, "shard 1 was paid before the kill");
    assert!(
        inner.shards()[1]
            .room_transfers(room_b, "settle-out")
            .await
            .unwrap()
            > 0,
        "shard 1 was not swept before the kill"
    );
    livemesh_testkit::end_room(mesh.rooms.channel(), room_b).await;
    assert_settled_once(&mut mesh, &b).await;
    mesh.assert_conserved().await;
}

/// Found by the property test: on MariaDB the transfer ids compared with
/// the server's case-insensitive, space-padding collation, so deposits
/// with the keys `k`, `K` and `k ` were one transfer id, and the second
/// answered UNAVAILABLE forever.
async fn keys_differing_in_case_or_trailing_spaces_are_different_transfers(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let room = mesh.start_room().await;
    let keys = ["k", "K", "k ", "k  "];
    for (n, key) in keys.iter().enumerate() {
        let balance = mesh.deposit(key, 41, 10).await.unwrap();
        assert_eq!(balance, 10 * (n as i64 + 1), "deposit with key {key:?}");
    }
    for (n, key) in keys.iter().enumerate() {
        let (transfer_id, balance) = mesh.gift(key, 41, room, 1).await.unwrap();
        assert_eq!(transfer_id, format!("gift:41:{key}"));
        assert_eq!(balance, 40 - (n as i64 + 1), "gift with key {key:?}");
    }
    // Replays still find their own transfer.
    assert_eq!(mesh.deposit("K", 41, 10).await.unwrap(), 20);
    assert_eq!(mesh.balance(41).await, 36);
    mesh.assert_conserved().await;
}

/// Found by the property test: ExportLedger turned `from`/`to` into
/// milliseconds with `seconds * 1000`, which overflowed (a panic in the
/// handler in debug builds) for seconds near the ends of i64.
async fn an_export_with_timestamps_at_the_ends_of_i64_is_answered(backend: SqlBackend) {
    use futures::StreamExt as _;
    let mut mesh = mesh(&backend).await;
    mesh.deposit("export", 42, 10).await.unwrap();
    let channel = mesh._gifts_server.channel();
    let mut settlement = SettlementServiceClient::new(channel);
    let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let export = |from, to| ExportLedgerRequest { from, to };
    let mut all = settlement
        .export_ledger(export(ts(i64::MIN), ts(i64::MAX)))
        .await
        .unwrap()
        .into_inner();
    let mut entries = 0;
    while let Some(entry) = all.next().await {
        entry.unwrap();
        entries += 1;
    }
    assert_eq!(entries, 2, "the deposit's two entries");
    let err = settlement
        .export_ledger(export(ts(i64::MAX), ts(i64::MIN)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

/// Issue 16, point 6: two gift-settler replicas on the same shards both
/// follow the rooms' Watch, so both react to one room's end. Each room is
/// also settled by hand on both replicas at the same moment as the end (the
/// race a restart's resume or a finance SettleRoom makes). The streamer is
/// paid once, every settlement transfer is in the ledger once, every virtual
/// account is zero and Reconcile is balanced, asked of either replica.
async fn two_settlers_racing_on_one_room_end_settle_it_once(backend: SqlBackend) {
    let mut mesh = mesh(&backend).await;
    let second = GiftSettler::from_config(&mesh.config).await.unwrap();
    let second_server = TestServer::start(second.clone()).await;
    let (a, b) = (mesh.settler.clone(), second.clone());
    let streamer = 5; // the rooms' anchor
    let shards = u32::try_from(SHARDS).unwrap();
    let conflicts = AtomicU64::new(0);
    for round in 0..3 {
        let room = mesh.start_room().await;
        let gross = gifts_in(&mut mesh, room, &format!("race{round}")).await;
        let (virtual_total, cut) = expected_cut(&mesh, room).await;
        assert_eq!(virtual_total, gross);
        let before = mesh.balance(streamer).await;
        let platform = a.shard(streamer);
        let platform_before = platform.balance(PLATFORM).await.unwrap();
        let mut admin = mesh.admin.clone();
        let (ended, by_a, by_b) = tokio::join!(
            admin.end_room(EndRoomRequest { room_id: room }),
            settle_racing(&a, room, streamer, &conflicts),
            settle_racing(&b, room, streamer, &conflicts),
        );
        ended.unwrap();
        assert_eq!(by_a, by_b, "both replicas report one settlement");
        assert_eq!(
            (by_a.gross, by_a.platform_cut, by_a.streamer_credit),
            (gross, cut, gross - cut)
        );
        // Both Watch followers settle the room too; await each replica's view.
        for server in [&mesh._gifts_server, &second_server] {
            let mut settlement = SettlementServiceClient::new(server.channel());
            let row = settled_by_itself(&mut settlement, room).await;
            assert_eq!((row.gross, row.streamer_id), (gross, streamer));
            let statement = settlement
                .reconcile(ReconcileRequest { room_id: room })
                .await
                .unwrap()
                .into_inner();
            assert_reconciled(&statement);
        }
        // Once more on both, after the followers: nothing changes.
        let (again_a, again_b) = tokio::join!(
            settle_racing(&a, room, streamer, &conflicts),
            settle_racing(&b, room, streamer, &conflicts),
        );
        assert_eq!(again_a, by_a);
        assert_eq!(again_b, by_a);
        assert_eq!(
            mesh.balance(streamer).await,
            before + gross - cut,
            "the streamer is paid once"
        );
        assert_eq!(
            platform.balance(PLATFORM).await.unwrap(),
            platform_before + cut,
            "the platform's cut is taken once"
        );
        assert_eq!(
            mesh.room_total(room).await,
            0,
            "every virtual account emptied"
        );
        let ledger = ledger(&mesh).await;
        let mut paid = 0;
        for s in 0..shards {
            for kind in ["settle-in", "cut"] {
                if let Some(entries) = ledger.get(&format!("{kind}:{room}:{s}")) {
                    assert_eq!(entries.len(), 2, "{kind}:{room}:{s} applied once");
                    paid += entries.iter().filter(|&&e| e > 0).sum::<i64>();
                }
            }
            for sub in 0..SUBACCOUNTS {
                if let Some(entries) = ledger.get(&format!("settle-out:{room}:{s}:{sub}")) {
                    assert_eq!(entries.len(), 2, "settle-out:{room}:{s}:{sub} applied once");
                }
            }
        }
        assert_eq!(
            paid, gross,
            "the streamer and the platform got the gross once"
        );
        assert!(ledger.values().all(|e| e.iter().sum::<i64>() == 0));
    }
    mesh.assert_conserved().await;
    // How often the replicas met on one transfer (a race the ledger's
    // unique transfer ids settle): informative, the money checks above decide.
    eprintln!(
        "racing settlements: {} concurrent-transaction conflicts retried",
        conflicts.load(Ordering::Relaxed)
    );
}

/// Settles as a replica does: a settlement that meets a concurrent
/// transaction on the same transfer (the other replica won it) is retried,
/// as the settler's own loop does; anything else fails the test.
async fn settle_racing(
    settler: &GiftSettler,
    room: u64,
    streamer: u64,
    conflicts: &AtomicU64,
) -> livemesh_gift_settler::testing::SettlementRow {
    for _ in 0..50 {
        match settler.settle(room, streamer, &|_| false).await {
            Ok(row) => return row,
            Err(livemesh_gift_settler::testing::SettleError::Ledger(LedgerError::Conflict)) => {
                conflicts.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => panic!("settling room {room}: {err}"),
        }
    }
    panic!("settling room {room}: 50 conflicts in a row");
}
