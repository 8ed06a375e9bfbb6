//! `livemesh demo`: the whole mesh in this process, driven through the real
//! gRPC clients by a short scripted broadcast. Every step checks what it
//! got, so the demo fails loudly when the mesh misbehaves.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use livemesh_mesh::config::{SubscribeConfig, TelemetryConfig};
use livemesh_mesh::server::{LocalServer, ServiceSet};
use livemesh_mesh::{ClientStack, Config, MeshChannel};
use livemesh_proto::time::ms_from_timestamp;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    Comment, DepositRequest, EndRoomRequest, GetBalanceRequest, GetLovesRequest, GetRoomRequest,
    GetSettlementRequest, GiftSent, ListOngoingRequest, PartitionRequest, PublishRequest,
    ReconcileRequest, Room, RoomChange, RoomChangeKind, RoomEvent, SendGiftRequest,
    SendLovesRequest, SettleRoomRequest, Settlement, SettlementState, ShardStatement,
    StartRoomRequest, StreamPosition, StreamStarted, SubscribeRequest, SubscribeResponse,
    TopLoversRequest, WatchRequest, WatchResponse, room_event,
};
use tokio::sync::{mpsc, oneshot};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How often the demo's subscribe node reports viewer counts.
const REPORT_INTERVAL_MS: u64 = 250;

/// The longest the script waits for viewers to see something.
const VIEWER_WAIT: Duration = Duration::from_secs(3);

/// The longest the script waits for a room's settlement after its end, and
/// how often it asks meanwhile.
const SETTLE_WAIT: Duration = Duration::from_secs(10);
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// Runs the demo against the services `mesh` builds (the all-in-one mesh
/// of the product); SQLite files go to `data_dir`, or a temporary directory.
pub async fn run<S, F>(
    data_dir: Option<PathBuf>,
    mesh: impl FnOnce(Config) -> F,
) -> anyhow::Result<()>
where
    S: ServiceSet + Send + 'static,
    F: Future<Output = anyhow::Result<S>>,
{
    let _telemetry = livemesh_mesh::telemetry::init(
        &TelemetryConfig {
            log: "warn".into(),
            // The demo is a short run in the foreground: no metrics endpoint.
            metrics_listen: String::new(),
            ..TelemetryConfig::default()
        },
        "livemesh-demo",
    )?;
    let temp = tempfile::tempdir().context("creating a temporary data dir")?;
    let data_dir = data_dir.unwrap_or_else(|| temp.path().to_owned());
    let config = Config {
        data_dir: data_dir.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        // Viewer counts every quarter second rather than every two, so the
        // demo's viewers see them change within its few seconds.
        subscribe: SubscribeConfig {
            report_interval_ms: REPORT_INTERVAL_MS,
            ..SubscribeConfig::default()
        },
        ..Config::default()
    };
    let server = LocalServer::bind_then(config.listen, |addr| {
        mesh(Config {
            listen: addr,
            ..config.clone()
        })
    })
    .await?;
    println!(
        "livemesh demo: all services in one process on {}, data in {}",
        server.addr(),
        data_dir.display()
    );
    let channel = ClientStack::new(&config.client).channel(&server.uri())?;
    // The demo also plays the gift-settler once, to show what a committed
    // gift's event looks like before the real gifts further down.
    let as_gift_settler = ClientStack::new(&config.client)
        .secured(
            &livemesh_mesh::auth::Security::dev(),
            livemesh_mesh::auth::policy::GIFT_SETTLER,
        )?
        .channel(&server.uri())?;
    let result = script(channel, as_gift_settler, config.gifts.platform_cut_bps).await;
    server.stop().await?;
    match &result {
        Ok(()) => println!("\ndemo complete: every step got the answer it expected."),
        Err(err) => println!("\ndemo FAILED: {err:#}"),
    }
    result
}

async fn script(
    channel: MeshChannel,
    as_gift_settler: MeshChannel,
    platform_cut_bps: u32,
) -> anyhow::Result<()> {
    let mut health = HealthClient::new(channel.clone());
    let mut admin = RoomAdminServiceClient::new(channel.clone());
    let mut query = OngoingQueryServiceClient::new(channel.clone());
    let mut counter = CounterServiceClient::new(channel.clone());

    step("health: every service reports SERVING");
    for name in livemesh_proto::SERVICE_NAMES {
        let status = health
            .check(HealthCheckRequest {
                service: (*name).to_owned(),
            })
            .await?
            .into_inner()
            .status();
        println!("  {name:<36} {}", status.as_str_name());
        ensure!(status == ServingStatus::Serving, "{name} is {status:?}");
    }

    step("a settler-like service watches room starts and ends (OngoingQuery.Watch)");
    let mut watch = query.watch(WatchRequest { from: None }).await?.into_inner();
    let first = next_change(&mut watch).await?;
    println!("  {}", describe_change(&first));
    ensure!(
        first.kind() == RoomChangeKind::Snapshot,
        "a watch without a position starts with a snapshot"
    );

    step("three anchors go live (RoomAdmin.StartRoom)");
    let mut rooms = Vec::new();
    for anchor_id in [1001, 1002, 1003] {
        let room = admin
            .start_room(StartRoomRequest { anchor_id })
            .await?
            .into_inner()
            .room
            .context("StartRoom returned no room")?;
        println!("  {}", describe(&room));
        rooms.push(room);
    }

    step("a viewer opens the first room (OngoingQuery.GetRoom, from the cache)");
    let first = query
        .get_room(GetRoomRequest {
            room_id: rooms[0].room_id,
        })
        .await?
        .into_inner()
        .room
        .context("GetRoom returned no room")?;
    println!("  {}", describe(&first));
    ensure!(first == rooms[0], "GetRoom disagrees with StartRoom");

    step("the lobby lists ongoing rooms, two per page (OngoingQuery.ListOngoing)");
    let listed = list_ongoing(&mut query, 2).await?;
    let started: Vec<u64> = rooms.iter().map(|r| r.room_id).collect();
    ensure!(listed == started, "listed {listed:?}, started {started:?}");

    step("two shard workers split the ongoing rooms (OngoingQuery.Partition)");
    let mut owned = Vec::new();
    for index in 0..2 {
        let part = query
            .partition(PartitionRequest { index, total: 2 })
            .await?
            .into_inner()
            .room_ids;
        println!("  worker {index} of 2 takes rooms {part:?}");
        owned.extend(part);
    }
    owned.sort_unstable();
    ensure!(
        owned == started,
        "partitions {owned:?} != rooms {started:?}"
    );

    step("the first broadcast ends (RoomAdmin.EndRoom)");
    let ended = admin
        .end_room(EndRoomRequest {
            room_id: rooms[0].room_id,
        })
        .await?
        .into_inner()
        .room
        .context("EndRoom returned no room")?;
    println!("  {}", describe(&ended));

    step("mistakes get precise errors");
    expect_error(
        "end it again",
        admin.end_room(EndRoomRequest {
            room_id: rooms[0].room_id,
        }),
        tonic::Code::FailedPrecondition,
    )
    .await?;
    expect_error(
        "open a room that never existed",
        query.get_room(GetRoomRequest { room_id: 424_242 }),
        tonic::Code::NotFound,
    )
    .await?;
    expect_error(
        "go live as anchor 0",
        admin.start_room(StartRoomRequest { anchor_id: 0 }),
        tonic::Code::InvalidArgument,
    )
    .await?;

    let room_id = rooms[1].room_id;
    step("viewers open the second room's live stream (SubscribeService.Subscribe)");
    let mut audience = Audience::new(channel.clone(), room_id);
    expect_error(
        "subscribe to the ended first room",
        audience.client.subscribe(SubscribeRequest {
            room_id: rooms[0].room_id,
            viewer_id: 7,
            ..SubscribeRequest::default()
        }),
        tonic::Code::FailedPrecondition,
    )
    .await?;
    println!(
        "  viewers 7, 8 and 9 subscribe to room {room_id}; 7 prints all it sees, 8 and 9 \
         only how their stream starts and ends"
    );
    let v7 = audience.open(7, None, Prints::Everything).await?;
    let v8 = audience.open(8, None, Prints::StartAndEnd).await?;
    let v9 = audience.open(9, None, Prints::StartAndEnd).await?;
    audience
        .until("every stream starts", |all| {
            all.iter().all(|v| v.started.is_some())
        })
        .await?;
    println!("  the node reports the room's viewer count every {REPORT_INTERVAL_MS} ms:");
    audience
        .until("viewer 7 sees 3 viewers", |all| {
            all[v7].viewer_count == Some(3)
        })
        .await?;

    step("viewers comment, a gift arrives (PublishService.Publish)");
    let mut publish = PublishServiceClient::new(channel.clone());
    let mut published = Vec::new();
    let hello = comment(
        &mut publish,
        &mut audience,
        501,
        "hello from Lisbon!",
        "c-501-1",
    )
    .await?;
    published.push(hello.offset);
    let (again, nodes) = publish_event(
        &mut publish,
        room_id,
        room_event::Kind::Comment(Comment {
            viewer_id: 501,
            text: "hello from Lisbon!".into(),
        }),
        "c-501-1",
    )
    .await?;
    println!(
        "  501's app retries that publish (same idempotency key): offset {} again, handed to {nodes} nodes",
        again.offset
    );
    ensure!(
        again == hello && nodes == 0,
        "a retried publish answered {again:?} (to {nodes} nodes), the first {hello:?}"
    );
    let wow = comment(&mut publish, &mut audience, 502, "that jump!", "c-502-1").await?;
    published.push(wow.offset);
    let gift_event = room_event::Kind::Gift(GiftSent {
        viewer_id: 503,
        gift_id: 12,
        amount: 500,
        transfer_id: "t-503-1".into(),
    });
    expect_error(
        "viewer 503's app publishes a gift event itself",
        publish.publish(PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(gift_event.clone()),
                ..RoomEvent::default()
            }),
            ..PublishRequest::default()
        }),
        tonic::Code::PermissionDenied,
    )
    .await?;
    println!("  viewer 503's gift 12 (500) is paid; the gift-settler publishes it");
    let gift = publish_seen(
        &mut PublishServiceClient::new(as_gift_settler),
        &mut audience,
        gift_event,
        "gift-t-503-1",
    )
    .await?;
    published.push(gift.offset);
    for viewer in &audience.viewers {
        ensure!(
            viewer.ordered == published,
            "viewer {} saw ordered events at offsets {:?}, published {published:?}",
            viewer.viewer_id,
            viewer.ordered
        );
    }
    println!(
        "  viewers 7, 8 and 9 each saw offsets {published:?} once, in order: the retry was not shown again"
    );

    step("viewer 9's connection drops; it resumes where it left off");
    let last = audience.drop_connection(v9).await?;
    println!(
        "  viewer 9's stream is gone; its last event was at offset {} (epoch {})",
        last.offset, last.epoch
    );
    audience
        .until("viewer 7 sees 2 viewers", |all| {
            all[v7].viewer_count == Some(2)
        })
        .await?;
    for (viewer_id, text, key) in [
        (502, "where did viewer 9 go?", "c-502-2"),
        (501, "replay that please", "c-501-2"),
    ] {
        let position = comment(&mut publish, &mut audience, viewer_id, text, key).await?;
        published.push(position.offset);
    }
    let missed = published[published.len() - 2..].to_vec();
    ensure!(
        audience.viewers[v7].ordered == published && audience.viewers[v8].ordered == published,
        "viewers 7 and 8 saw {:?} and {:?}, published {published:?}",
        audience.viewers[v7].ordered,
        audience.viewers[v8].ordered
    );
    println!(
        "  viewer 9 subscribes again with resume = {{epoch: {}, offset: {}}}:",
        last.epoch, last.offset
    );
    let v9 = audience.open(9, Some(last), Prints::Everything).await?;
    audience
        .until("the resumed stream replays what it missed", |all| {
            all[v9].ordered == missed
        })
        .await?;
    let started = audience.viewers[v9].started.unwrap_or_default();
    ensure!(
        started.recovered
            && !started.epoch_changed
            && started.replayed == missed.len() as u64
            && started.position.map(|p| p.offset) == missed.last().copied(),
        "the resumed stream started with {started:?}; it missed offsets {missed:?}"
    );
    println!(
        "  StreamStarted said recovered: true and {} replayed: nothing lost, nothing twice",
        started.replayed
    );

    step("viewers tap hearts in the second room (CounterService.SendLoves)");
    let mut expected = 0;
    for (viewer_id, taps) in [(501_u64, 30_u64), (502, 12), (503, 20)] {
        // Taps 50 ms apart: as fast as a human taps, buffered by the app.
        let reply = counter
            .send_loves(SendLovesRequest {
                room_id,
                viewer_id,
                batch_id: format!("{viewer_id}-1"),
                taps_ms: (0..taps).map(|i| i * 50).collect(),
            })
            .await?
            .into_inner();
        println!(
            "  viewer {viewer_id} sends {taps} taps: {} counted",
            reply.accepted
        );
        ensure!(reply.accepted == taps, "an honest batch counts in full");
        expected += reply.accepted;
    }
    let flood = counter
        .send_loves(SendLovesRequest {
            room_id,
            viewer_id: 504,
            batch_id: "504-1".into(),
            taps_ms: (0..3_000).map(|i| i % 1000).collect(),
        })
        .await?
        .into_inner();
    println!(
        "  viewer 504 sends 3000 taps in one second: {} counted, {} not ({})",
        flood.accepted, flood.rejected, flood.detail
    );
    ensure!(flood.accepted <= 20, "an abusive batch is clamped");
    expected += flood.accepted;
    let retry = counter
        .send_loves(SendLovesRequest {
            room_id,
            viewer_id: 501,
            batch_id: "501-1".into(),
            taps_ms: (0..30).map(|i| i * 50).collect(),
        })
        .await?
        .into_inner();
    println!(
        "  viewer 501's app retries its batch: the same answer ({} counted), counted once",
        retry.accepted
    );
    let total = await_loves(&mut counter, room_id, expected).await?;
    println!("  GetLoves: {total} loves in room {room_id}");
    audience
        .until("every viewer sees the love total and 3 viewers", |all| {
            live(all).all(|v| v.love_total == Some(total) && v.viewer_count == Some(3))
        })
        .await?;
    println!(
        "  every viewer's stream shows {total} loves (the counter publishes totals) and 3 viewers"
    );
    let top = counter
        .top_lovers(TopLoversRequest { room_id, limit: 3 })
        .await?
        .into_inner()
        .lovers;
    for (rank, lover) in top.iter().enumerate() {
        println!(
            "  #{} viewer {} with {} loves",
            rank + 1,
            lover.viewer_id,
            lover.loves
        );
    }

    let gift_room = rooms[2].room_id;
    let streamer = rooms[2].anchor_id;
    step(&format!(
        "viewers top up and send paid gifts in the third room (GiftsService), room {gift_room}"
    ));
    let mut gifts = GiftsServiceClient::new(channel.clone());
    for (user_id, amount) in [(501_u64, 1_000_i64), (502, 2_500), (505, 600)] {
        let deposit = gifts
            .deposit(DepositRequest {
                idempotency_key: format!("top-up-{user_id}-1"),
                user_id,
                amount,
            })
            .await?
            .into_inner();
        println!(
            "  viewer {user_id} tops up {amount}: balance {} (transfer {})",
            deposit.balance, deposit.transfer_id
        );
        ensure!(
            deposit.balance == amount,
            "viewer {user_id}'s first top-up left a balance of {}",
            deposit.balance
        );
    }
    // (viewer, idempotency key, gift, amount, the viewer's balance after it)
    let sent: [(u64, &str, u64, i64, i64); 5] = [
        (501, "gift-501-1", 7, 300, 700),
        (502, "gift-502-1", 12, 1_500, 1_000),
        (505, "gift-505-1", 3, 250, 350),
        (501, "gift-501-2", 9, 200, 500),
        (502, "gift-502-2", 7, 300, 700),
    ];
    for (index, &(viewer_id, key, gift_id, amount, after)) in sent.iter().enumerate() {
        // The first gift is sent twice: the app retries it with the same key.
        let attempts: &[&str] = if index == 0 {
            &["sends", "retries (same idempotency key)"]
        } else {
            &["sends"]
        };
        for attempt in attempts {
            let gift = gifts
                .send_gift(SendGiftRequest {
                    idempotency_key: key.into(),
                    viewer_id,
                    room_id: gift_room,
                    gift_id,
                    amount,
                })
                .await?
                .into_inner();
            println!(
                "  viewer {viewer_id} {attempt} gift {gift_id} ({amount}): balance {} (transfer {})",
                gift.balance, gift.transfer_id
            );
            ensure!(
                gift.balance == after,
                "viewer {viewer_id}'s balance is {} after gift {key}, expected {after}",
                gift.balance
            );
        }
    }
    let gross: i64 = sent.iter().map(|gift| gift.3).sum();
    expect_error(
        "viewer 505 sends a 5000 gift with a 350 balance",
        gifts.send_gift(SendGiftRequest {
            idempotency_key: "gift-505-2".into(),
            viewer_id: 505,
            room_id: gift_room,
            gift_id: 9,
            amount: 5_000,
        }),
        tonic::Code::FailedPrecondition,
    )
    .await?;
    for (user_id, expected) in [(501, 500), (502, 700), (505, 350), (streamer, 0)] {
        let balance = gifts
            .get_balance(GetBalanceRequest { user_id })
            .await?
            .into_inner()
            .balance;
        let who = if user_id == streamer {
            format!("the streamer, anchor {user_id}, has {balance} until the room is settled")
        } else {
            format!("viewer {user_id} has {balance}")
        };
        println!("  GetBalance: {who}");
        ensure!(
            balance == expected,
            "user {user_id}'s balance is {balance}, expected {expected}"
        );
    }
    println!("  the room's virtual account holds {gross} in gifts");
    let mut settlement = SettlementServiceClient::new(channel.clone());
    expect_error(
        "settle the room while it is live",
        settlement.settle_room(SettleRoomRequest { room_id: gift_room }),
        tonic::Code::FailedPrecondition,
    )
    .await?;

    step("the other broadcasts end; the lobby empties");
    for room in &rooms[1..] {
        admin
            .end_room(EndRoomRequest {
                room_id: room.room_id,
            })
            .await?;
        println!("  room {} ended", room.room_id);
    }
    let left = list_ongoing(&mut query, 2).await?;
    ensure!(left.is_empty(), "rooms still listed: {left:?}");

    step("the viewers saw their room end, and their streams closed");
    audience.closed().await?;
    for viewer in &audience.viewers {
        println!("  {}", viewer.summary());
    }
    for viewer in &audience.viewers {
        ensure!(
            viewer.problems.is_empty(),
            "viewer {}'s stream broke the contract: {:?}",
            viewer.viewer_id,
            viewer.problems
        );
    }
    for viewer in live(&audience.viewers) {
        ensure!(
            viewer.closed == Some(Ok(())),
            "viewer {}'s stream ended {:?}",
            viewer.viewer_id,
            viewer.closed
        );
        let ended = viewer
            .room_ended
            .with_context(|| format!("viewer {} never saw the room end", viewer.viewer_id))?;
        ensure!(
            viewer.ordered.last() == Some(&ended),
            "viewer {} saw events after the room ended: {:?}",
            viewer.viewer_id,
            viewer.ordered
        );
    }
    let mut after_end = published.clone();
    after_end.push(audience.viewers[v7].room_ended.unwrap_or_default());
    let mut resumed = missed.clone();
    resumed.push(audience.viewers[v7].room_ended.unwrap_or_default());
    for (index, expected) in [(v7, &after_end), (v8, &after_end), (v9, &resumed)] {
        let viewer = &audience.viewers[index];
        ensure!(
            &viewer.ordered == expected,
            "viewer {} saw offsets {:?}, expected {expected:?}",
            viewer.viewer_id,
            viewer.ordered
        );
    }

    step("meanwhile the watcher saw every start and end, in order");
    let mut seen = Vec::new();
    for _ in 0..6 {
        let change = next_change(&mut watch).await?;
        println!("  {}", describe_change(&change));
        seen.push((change.kind(), change.room.map_or(0, |r| r.room_id)));
    }
    let ids: Vec<u64> = rooms.iter().map(|r| r.room_id).collect();
    let expected = vec![
        (RoomChangeKind::Started, ids[0]),
        (RoomChangeKind::Started, ids[1]),
        (RoomChangeKind::Started, ids[2]),
        (RoomChangeKind::Ended, ids[0]),
        (RoomChangeKind::Ended, ids[1]),
        (RoomChangeKind::Ended, ids[2]),
    ];
    ensure!(seen == expected, "the watcher saw {seen:?}");

    settlement_statement(
        &mut settlement,
        &mut gifts,
        gift_room,
        gross,
        platform_cut_bps,
    )
    .await
}

/// Waits until the Settler (started by the room's end, seen on its Watch)
/// has settled `room_id`, then prints the room's statement, the streamer's
/// balance and the per-shard reconciliation; fails unless it balances.
async fn settlement_statement(
    settlement: &mut SettlementServiceClient<MeshChannel>,
    gifts: &mut GiftsServiceClient<MeshChannel>,
    room_id: u64,
    gross: i64,
    platform_cut_bps: u32,
) -> anyhow::Result<()> {
    step(&format!(
        "the Settler pays room {room_id}'s gifts to its streamer (SettlementService)"
    ));
    let waiting = std::time::Instant::now();
    let mut polls = 0;
    let settled = loop {
        polls += 1;
        let current = settlement
            .get_settlement(GetSettlementRequest { room_id })
            .await?
            .into_inner()
            .settlement
            .context("GetSettlement returned no settlement")?;
        if current.state() == SettlementState::Settled {
            break current;
        }
        if waiting.elapsed() > SETTLE_WAIT {
            bail!(
                "room {room_id} ended but its settlement is still {} after {SETTLE_WAIT:?}",
                state_name(&current)
            );
        }
        tokio::time::sleep(SETTLE_POLL).await;
    };
    println!(
        "  GetSettlement: {} (asked {polls} times, every {SETTLE_POLL:?})",
        state_name(&settled)
    );
    let streamer = settled.streamer_id;
    let settled_at = settled
        .settled_at
        .as_ref()
        .map_or("-".into(), |ts| clock(ms_from_timestamp(ts)));
    println!(
        "\n  settlement statement of room {room_id} (streamer {streamer}), settled at {settled_at}"
    );
    let balance = gifts
        .get_balance(GetBalanceRequest { user_id: streamer })
        .await?
        .into_inner()
        .balance;
    let lines = [
        ("gross".to_owned(), settled.gross, String::new()),
        (
            format!("platform cut, {}", percent(platform_cut_bps)),
            -settled.platform_cut,
            format!("gifts.platform_cut_bps = {platform_cut_bps}"),
        ),
        (
            "streamer credit".to_owned(),
            settled.streamer_credit,
            String::new(),
        ),
        (
            format!("streamer {streamer}'s balance"),
            balance,
            "GetBalance".to_owned(),
        ),
    ];
    for (label, amount, note) in lines {
        let line = format!("    {label:<26}{amount:>8}   {note}");
        println!("{}", line.trim_end());
    }
    ensure!(
        settled.gross == gross,
        "the settlement's gross is {}, the room's gifts were {gross}",
        settled.gross
    );
    ensure!(
        settled.platform_cut + settled.streamer_credit == gross,
        "cut {} + streamer credit {} != gross {gross}",
        settled.platform_cut,
        settled.streamer_credit
    );
    ensure!(
        balance == settled.streamer_credit,
        "the streamer's balance is {balance}, the settlement credited {}",
        settled.streamer_credit
    );

    let statement = settlement
        .reconcile(ReconcileRequest { room_id })
        .await?
        .into_inner();
    println!("\n  Reconcile(room {room_id}): every difference and virtual balance must be 0");
    println!(
        "    shard  gifts debited  virtual credited  settled  platform cut  streamer credit  \
         differences  virtual balance"
    );
    let row = |shard: &str, s: &ShardStatement| {
        println!(
            "    {shard:>5}  {:>13}  {:>16}  {:>7}  {:>12}  {:>15}  {:>11}  {:>15}",
            s.gifts_debited,
            s.virtual_credited,
            s.settled,
            s.platform_cut,
            s.streamer_credit,
            format!("{} / {}", s.gift_difference, s.settlement_difference),
            s.virtual_balance
        );
    };
    let mut total = ShardStatement::default();
    for shard in &statement.shards {
        row(&shard.shard.to_string(), shard);
        total.gifts_debited += shard.gifts_debited;
        total.virtual_credited += shard.virtual_credited;
        total.settled += shard.settled;
        total.platform_cut += shard.platform_cut;
        total.streamer_credit += shard.streamer_credit;
        total.gift_difference += shard.gift_difference;
        total.settlement_difference += shard.settlement_difference;
        total.virtual_balance += shard.virtual_balance;
    }
    row("total", &total);
    println!(
        "    (differences: gifts debited - virtual credited / virtual credited - virtual balance \
         - platform cut - streamer credit)"
    );
    println!("  balanced: {}", statement.balanced);
    if !statement.balanced {
        bail!("room {room_id}'s ledger does not balance: {statement:?}");
    }
    for shard in &statement.shards {
        ensure!(
            shard.platform_cut == shard.settled * i64::from(platform_cut_bps) / 10_000
                && shard.platform_cut + shard.streamer_credit == shard.settled,
            "shard {} paid a cut of {} and {} to the streamer out of {} at {platform_cut_bps} bps",
            shard.shard,
            shard.platform_cut,
            shard.streamer_credit,
            shard.settled
        );
    }
    ensure!(
        (
            total.gifts_debited,
            total.platform_cut,
            total.streamer_credit
        ) == (settled.gross, settled.platform_cut, settled.streamer_credit),
        "the shards' totals {total:?} disagree with the settlement {settled:?}"
    );
    Ok(())
}

/// `SETTLED`, `IN_PROGRESS`, ...
fn state_name(settlement: &Settlement) -> &'static str {
    settlement
        .state()
        .as_str_name()
        .trim_start_matches("SETTLEMENT_STATE_")
}

/// `30%`, `12.5%` of basis points.
fn percent(bps: u32) -> String {
    if bps.is_multiple_of(100) {
        format!("{}%", bps / 100)
    } else {
        let fraction = format!("{:02}", bps % 100);
        format!("{}.{}%", bps / 100, fraction.trim_end_matches('0'))
    }
}

/// Which of its events a viewer's task prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prints {
    Everything,
    StartAndEnd,
}

/// What a viewer's task received, reported to the script as it happens.
#[derive(Debug)]
enum Seen {
    Message(SubscribeResponse),
    /// The stream ended: cleanly, or with a status.
    Closed(Result<(), tonic::Status>),
}

/// One viewer stream as the script knows it: what its task reported.
#[derive(Debug, Default)]
struct Viewer {
    viewer_id: u64,
    resumed_from: Option<u64>,
    started: Option<StreamStarted>,
    /// Offsets of the ordered events (comments, gifts, room ended), as received.
    ordered: Vec<u64>,
    comments: u32,
    gifts: u32,
    love_totals: u32,
    love_total: Option<u64>,
    viewer_counts: u32,
    viewer_count: Option<u64>,
    /// The offset of the room-ended event.
    room_ended: Option<u64>,
    /// The position of the last message received: where to resume.
    last: Option<StreamPosition>,
    /// How the stream ended: OK, or the status's code and message.
    closed: Option<Result<(), String>>,
    /// The script dropped the stream, as a lost connection would.
    dropped: bool,
    /// Whatever broke the stream contract (an event before `started`, ...).
    problems: Vec<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Viewer {
    fn apply(&mut self, seen: Seen) {
        let message = match seen {
            Seen::Message(SubscribeResponse { message }) => message,
            Seen::Closed(result) => {
                self.closed =
                    Some(result.map_err(|s| format!("{:?} \"{}\"", s.code(), s.message())));
                return;
            }
        };
        let event = match message {
            Some(Message::Started(started)) => {
                if self.started.is_some() {
                    self.problems.push("a second StreamStarted".into());
                }
                self.last = started.position;
                self.started = Some(started);
                return;
            }
            Some(Message::Event(event)) => event,
            Some(Message::Batch(_)) => {
                self.problems
                    .push("a batch, though this viewer did not accept batches".into());
                return;
            }
            None => {
                self.problems
                    .push("a message with neither started nor event".into());
                return;
            }
        };
        if self.started.is_none() {
            self.problems.push(format!(
                "event at offset {} before StreamStarted",
                event.offset
            ));
        }
        if self.room_ended.is_some() {
            self.problems.push(format!(
                "event at offset {} after the room ended",
                event.offset
            ));
        }
        self.last = Some(StreamPosition {
            epoch: event.epoch,
            offset: event.offset,
        });
        match event.kind {
            Some(room_event::Kind::LoveTotal(love)) => {
                self.love_totals += 1;
                self.love_total = Some(love.total);
                return;
            }
            Some(room_event::Kind::ViewerCount(count)) => {
                self.viewer_counts += 1;
                self.viewer_count = Some(count.count);
                return;
            }
            Some(room_event::Kind::Comment(_)) => self.comments += 1,
            Some(room_event::Kind::Gift(_)) => self.gifts += 1,
            Some(room_event::Kind::RoomEnded(_)) => self.room_ended = Some(event.offset),
            None => {
                self.problems
                    .push(format!("event at offset {} without a kind", event.offset));
                return;
            }
        }
        if let Some(previous) = self.ordered.last().filter(|&&p| p >= event.offset) {
            self.problems
                .push(format!("offset {} after offset {previous}", event.offset));
        }
        self.ordered.push(event.offset);
    }

    fn summary(&self) -> String {
        let mut text = format!("viewer {}", self.viewer_id);
        if let Some(offset) = self.resumed_from {
            text.push_str(&format!(" (resumed after {offset})"));
        }
        let last = |value: Option<u64>| value.map_or(String::new(), |v| format!(" (last {v})"));
        text.push_str(&format!(
            ": {}, {}, {}{}, {}{}",
            count(self.comments, "comment"),
            count(self.gifts, "gift"),
            count(self.love_totals, "love total"),
            last(self.love_total),
            count(self.viewer_counts, "viewer count"),
            last(self.viewer_count),
        ));
        if let Some(offset) = self.room_ended {
            text.push_str(&format!(", room ended at {offset}"));
        }
        let end = match (&self.closed, self.dropped) {
            (_, true) => format!(
                "connection dropped after offset {}",
                self.last.as_ref().map_or(0, |p| p.offset)
            ),
            (Some(Ok(())), _) => "stream closed".into(),
            (Some(Err(status)), _) => format!("stream failed: {status}"),
            (None, false) => "stream still open".into(),
        };
        format!("{text}; {end}")
    }
}

/// `1 comment`, `2 comments`.
fn count(n: u32, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Streams that the script has not dropped.
fn live(all: &[Viewer]) -> impl Iterator<Item = &Viewer> {
    all.iter().filter(|v| !v.dropped)
}

/// The viewers of one room: one task per stream, reporting to the script.
struct Audience {
    client: SubscribeServiceClient<MeshChannel>,
    room_id: u64,
    sender: mpsc::UnboundedSender<(usize, Seen)>,
    reports: mpsc::UnboundedReceiver<(usize, Seen)>,
    viewers: Vec<Viewer>,
}

impl Audience {
    fn new(channel: MeshChannel, room_id: u64) -> Self {
        let (sender, reports) = mpsc::unbounded_channel();
        Self {
            client: SubscribeServiceClient::new(channel),
            room_id,
            sender,
            reports,
            viewers: Vec::new(),
        }
    }

    /// Subscribes `viewer_id` and starts the task that follows its stream;
    /// returns the stream's index in `viewers`.
    async fn open(
        &mut self,
        viewer_id: u64,
        resume: Option<StreamPosition>,
        prints: Prints,
    ) -> anyhow::Result<usize> {
        let resumed_from = resume.as_ref().map(|p| p.offset);
        let stream = self
            .client
            .subscribe(SubscribeRequest {
                room_id: self.room_id,
                viewer_id,
                resume,
                accept_batches: false,
            })
            .await
            .with_context(|| format!("viewer {viewer_id} subscribing to room {}", self.room_id))?
            .into_inner();
        let index = self.viewers.len();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(follow(
            (index, viewer_id),
            prints,
            stream,
            stopped,
            self.sender.clone(),
        ));
        self.viewers.push(Viewer {
            viewer_id,
            resumed_from,
            stop: Some(stop),
            task: Some(task),
            ..Viewer::default()
        });
        Ok(index)
    }

    /// Takes in the viewers' reports until `done` holds (within `VIEWER_WAIT`).
    async fn until(&mut self, what: &str, done: impl Fn(&[Viewer]) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + VIEWER_WAIT;
        while !done(&self.viewers) {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some((index, seen))) => self.viewers[index].apply(seen),
                Ok(None) => bail!("{what}: the viewer reports ended"),
                Err(_) => {
                    let so_far: Vec<String> = self.viewers.iter().map(Viewer::summary).collect();
                    bail!("{what}: not within {VIEWER_WAIT:?}; so far {so_far:?}");
                }
            }
        }
        Ok(())
    }

    /// Drops a stream as a lost connection would; returns the position of
    /// the last message it received.
    async fn drop_connection(&mut self, index: usize) -> anyhow::Result<StreamPosition> {
        let viewer = &mut self.viewers[index];
        if let Some(stop) = viewer.stop.take() {
            let _ = stop.send(());
        }
        let task = viewer.task.take().context("the stream has no task")?;
        tokio::time::timeout(VIEWER_WAIT, task)
            .await
            .context("the viewer task did not stop")??;
        // Everything it received was reported before it stopped.
        while let Ok((index, seen)) = self.reports.try_recv() {
            self.viewers[index].apply(seen);
        }
        let viewer = &mut self.viewers[index];
        viewer.dropped = true;
        viewer.last.context("the dropped stream received nothing")
    }

    /// Waits until every stream that was not dropped has ended, and for
    /// their tasks.
    async fn closed(&mut self) -> anyhow::Result<()> {
        self.until("every viewer stream ends", |all| {
            live(all).all(|v| v.closed.is_some())
        })
        .await?;
        for viewer in &mut self.viewers {
            if let Some(task) = viewer.task.take() {
                tokio::time::timeout(VIEWER_WAIT, task)
                    .await
                    .context("a viewer task did not finish")??;
            }
        }
        Ok(())
    }
}

/// One viewer's task: reads its stream, prints what it sees, reports it,
/// until the stream ends or the script drops it.
async fn follow(
    (index, viewer_id): (usize, u64),
    prints: Prints,
    mut stream: tonic::Streaming<SubscribeResponse>,
    mut stop: oneshot::Receiver<()>,
    reports: mpsc::UnboundedSender<(usize, Seen)>,
) {
    loop {
        let seen = tokio::select! {
            // Sent, or the script is gone: drop the stream.
            _ = &mut stop => return,
            message = stream.message() => match message {
                Ok(Some(message)) => Seen::Message(message),
                Ok(None) => Seen::Closed(Ok(())),
                Err(status) => Seen::Closed(Err(status)),
            },
        };
        let edge = match &seen {
            Seen::Closed(_) => true,
            Seen::Message(SubscribeResponse { message }) => match message {
                Some(Message::Started(_)) => true,
                Some(Message::Event(event)) => {
                    matches!(event.kind, Some(room_event::Kind::RoomEnded(_)))
                }
                Some(Message::Batch(_)) | None => true,
            },
        };
        if prints == Prints::Everything || edge {
            println!("  viewer {viewer_id} sees: {}", describe_seen(&seen));
        }
        let closed = matches!(seen, Seen::Closed(_));
        if reports.send((index, seen)).is_err() || closed {
            return;
        }
    }
}

fn describe_seen(seen: &Seen) -> String {
    let message = match seen {
        Seen::Closed(Ok(())) => return "end of stream (OK)".into(),
        Seen::Closed(Err(status)) => {
            return format!(
                "the stream fails: {:?} \"{}\"",
                status.code(),
                status.message()
            );
        }
        Seen::Message(SubscribeResponse { message }) => message,
    };
    let event = match message {
        Some(Message::Started(started)) => {
            let (epoch, offset) = started
                .position
                .as_ref()
                .map_or((0, 0), |p| (p.epoch, p.offset));
            let mut text = format!("stream started at offset {offset} (epoch {epoch})");
            if started.recovered || started.epoch_changed || started.replayed > 0 {
                text.push_str(&format!(
                    ", recovered: {}, epoch_changed: {}, {} replayed",
                    started.recovered, started.epoch_changed, started.replayed
                ));
            }
            return text;
        }
        Some(Message::Event(event)) => event,
        Some(Message::Batch(batch)) => return format!("a batch of {} events", batch.events.len()),
        None => return "an empty message".into(),
    };
    describe_event(event)
}

fn describe_event(event: &RoomEvent) -> String {
    let offset = event.offset;
    match &event.kind {
        Some(room_event::Kind::Comment(c)) => {
            format!(
                "comment from {} {:?} (offset {offset})",
                c.viewer_id, c.text
            )
        }
        Some(room_event::Kind::Gift(g)) => format!(
            "gift {} from {}, amount {} (transfer {}, offset {offset})",
            g.gift_id, g.viewer_id, g.amount, g.transfer_id
        ),
        Some(room_event::Kind::LoveTotal(love)) => format!("love total {}", love.total),
        Some(room_event::Kind::ViewerCount(count)) => format!("viewers {}", count.count),
        Some(room_event::Kind::RoomEnded(_)) => format!("room ended (offset {offset})"),
        None => format!("an event without a kind (offset {offset})"),
    }
}

/// Publishes one event; returns its position and how many nodes it was handed to.
async fn publish_event(
    publish: &mut PublishServiceClient<MeshChannel>,
    room_id: u64,
    kind: room_event::Kind,
    idempotency_key: &str,
) -> anyhow::Result<(StreamPosition, u64)> {
    let reply = publish
        .publish(PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(kind),
                ..RoomEvent::default()
            }),
            idempotency_key: Some(idempotency_key.to_owned()),
            forwarded_from: None,
        })
        .await?
        .into_inner();
    let position = reply.position.context("Publish returned no position")?;
    Ok((position, reply.nodes))
}

/// Publishes an ordered event, waits until every live viewer has it, and
/// says where it went.
async fn publish_seen(
    publish: &mut PublishServiceClient<MeshChannel>,
    audience: &mut Audience,
    kind: room_event::Kind,
    idempotency_key: &str,
) -> anyhow::Result<StreamPosition> {
    let (position, nodes) = publish_event(publish, audience.room_id, kind, idempotency_key).await?;
    audience
        .until(
            &format!("every viewer sees offset {}", position.offset),
            |all| live(all).all(|v| v.ordered.contains(&position.offset)),
        )
        .await?;
    println!(
        "  published at offset {}, handed to {nodes} node; every viewer stream has it",
        position.offset
    );
    Ok(position)
}

/// A viewer's comment, published and seen.
async fn comment(
    publish: &mut PublishServiceClient<MeshChannel>,
    audience: &mut Audience,
    viewer_id: u64,
    text: &str,
    idempotency_key: &str,
) -> anyhow::Result<StreamPosition> {
    println!("  viewer {viewer_id} comments {text:?}");
    let kind = room_event::Kind::Comment(Comment {
        viewer_id,
        text: text.to_owned(),
    });
    publish_seen(publish, audience, kind, idempotency_key).await
}

/// The next change on a watch stream, within two seconds.
async fn next_change(stream: &mut tonic::Streaming<WatchResponse>) -> anyhow::Result<RoomChange> {
    tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .context("no room change within 2 s")??
        .and_then(|m| m.change)
        .context("the watch stream ended")
}

fn describe_change(change: &RoomChange) -> String {
    let kind = change
        .kind()
        .as_str_name()
        .trim_start_matches("ROOM_CHANGE_KIND_");
    let position = change.position.as_ref().map_or("", |p| p.token.as_str());
    match &change.room {
        Some(room) => format!(
            "{kind:<8} room {} (version {}) at position {position}",
            room.room_id, room.version
        ),
        None => format!("{kind:<8} (the ongoing rooms follow as STARTED) at position {position}"),
    }
}

/// Waits (a flush is 10 ms away) until the room's total reaches `expected`.
async fn await_loves(
    counter: &mut CounterServiceClient<MeshChannel>,
    room_id: u64,
    expected: u64,
) -> anyhow::Result<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let total = counter
            .get_loves(GetLovesRequest { room_id })
            .await?
            .into_inner()
            .total;
        if total >= expected || std::time::Instant::now() > deadline {
            ensure!(
                total == expected,
                "GetLoves says {total}, expected {expected}"
            );
            return Ok(total);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn step(title: &str) {
    println!("\n> {title}");
}

async fn list_ongoing(
    query: &mut OngoingQueryServiceClient<MeshChannel>,
    page_size: u32,
) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    for page_number in 1.. {
        let page = query
            .list_ongoing(ListOngoingRequest {
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        let page_ids: Vec<u64> = page.rooms.iter().map(|r| r.room_id).collect();
        println!("  page {page_number}: rooms {page_ids:?}");
        ids.extend(page_ids);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(ids)
}

async fn expect_error<T>(
    what: &str,
    call: impl Future<Output = Result<T, tonic::Status>>,
    code: tonic::Code,
) -> anyhow::Result<()> {
    match call.await {
        Ok(_) => bail!("{what}: succeeded, expected {code:?}"),
        Err(status) if status.code() == code => {
            println!("  {what}: {:?} \"{}\"", status.code(), status.message());
            Ok(())
        }
        Err(status) => bail!("{what}: got {status:?}, expected {code:?}"),
    }
}

fn describe(room: &Room) -> String {
    let started = room.started_at.as_ref().map(ms_from_timestamp);
    let ended = room.ended_at.as_ref().map(ms_from_timestamp);
    let mut text = format!(
        "room {} (anchor {}) {}",
        room.room_id,
        room.anchor_id,
        room.status()
            .as_str_name()
            .trim_start_matches("ROOM_STATUS_")
    );
    if let Some(started) = started {
        text.push_str(&format!(", started {}", clock(started)));
    }
    if let Some(ended) = ended {
        text.push_str(&format!(", ended {}", clock(ended)));
    }
    text
}

/// `HH:MM:SS.mmm UTC` of epoch milliseconds.
fn clock(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1_000 % 60,
        day_ms % 1_000
    )
}
