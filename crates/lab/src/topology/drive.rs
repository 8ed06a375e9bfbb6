//! The workload: rooms, viewers and senders set up, rounds of traffic (with
//! the chaos beside them when asked), then the rooms ended and every check.

use super::chaos::Chaos;
use anyhow::{Context as _, bail, ensure};
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    DepositRequest, EndRoomRequest, GetBalanceRequest, GetLovesRequest, GetSettlementRequest,
    ReconcileRequest, SettlementState, StartRoomRequest,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::audience::{Audience, ViewerLog};
use super::metrics::check_metrics;
use super::round::{Peers, check_ordered, eventually, run_round, sender_id, viewer_id};
use super::{DEPOSIT, Mesh, Retries, RoomPlan, Topology, Workload, retrying};

pub(super) async fn drive(
    mesh: &Mesh,
    w: Workload,
    chaos: Option<&mut Chaos>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let admin = vec![RoomAdminServiceClient::new(
        mesh.channel(&mesh.topology.processes("ongoing-query")?[0].url, "admin")?,
    )];
    let subscribers = mesh.clients("subscribe", "bff", SubscribeServiceClient::new)?;
    let dispatchers = mesh.clients("publish", "bff", PublishServiceClient::new)?;
    let counters = mesh.clients("counter", "bff", CounterServiceClient::new)?;
    let gifts = mesh.clients("gift-settler", "bff", GiftsServiceClient::new)?;
    let payments = mesh.clients("gift-settler", "payments", GiftsServiceClient::new)?;
    let finance = mesh.clients("gift-settler", "finance", SettlementServiceClient::new)?;
    println!(
        "topology: {} ongoing-query, {} publish, {} subscribe, {} counter, {} gift-settler",
        mesh.topology.processes("ongoing-query")?.len(),
        dispatchers.len(),
        subscribers.len(),
        counters.len(),
        gifts.len()
    );
    let retries = Retries::default();

    // 1. Rooms.
    let mut plans = Vec::new();
    for r in 0..w.rooms {
        let anchor_id = 9_000 + r;
        let room = admin[0]
            .clone()
            .start_room(StartRoomRequest { anchor_id })
            .await
            .context("StartRoom")?
            .into_inner()
            .room
            .context("StartRoom returned no room")?;
        plans.push(RoomPlan {
            room_id: room.room_id,
            anchor_id,
            ..RoomPlan::default()
        });
    }
    let rooms_started = Instant::now();
    let room_ids: Vec<u64> = plans.iter().map(|p| p.room_id).collect();
    println!("started rooms {room_ids:?}");

    // 2. Viewers, spread over the subscribe nodes.
    let audience = Audience {
        subscribers: subscribers.clone(),
        keys: mesh.keys.clone(),
        ..Audience::default()
    };
    for (r, plan) in plans.iter().enumerate() {
        for v in 0..w.viewers_per_room {
            audience
                .join(plan.room_id, viewer_id(r as u64, v), v as usize, false)
                .await?;
        }
    }
    let streams = (w.rooms * w.viewers_per_room) as usize;
    audience
        .until("every viewer stream starts", |all| {
            all.len() == streams && all.values().all(|v| v.started)
        })
        .await?;
    println!(
        "{streams} viewer streams live over {} subscribe nodes",
        subscribers.len()
    );

    // 3. Balances for the gift senders.
    for r in 0..w.rooms {
        for s in 0..w.senders_per_room {
            let user_id = sender_id(r, s);
            let request = DepositRequest {
                idempotency_key: format!("topology-deposit-{user_id}"),
                user_id,
                amount: DEPOSIT,
            };
            retrying(
                &format!("Deposit for user {user_id}"),
                &payments,
                s as usize,
                &retries.calls,
                |mut client| {
                    let request = request.clone();
                    async move { client.deposit(request).await }
                },
            )
            .await?;
        }
    }

    // 4. Traffic, in rounds (rooms side by side), and the chaos beside it.
    let peers = Peers {
        dispatchers: &dispatchers,
        counters: &counters,
        gifts: &gifts,
        retries: &retries,
    };
    let rounds_started = watch::channel(0u64).0;
    let rounds_seen = rounds_started.subscribe();
    let chaos_over = AtomicBool::new(chaos.is_none());
    let mut round = 0u64;
    let traffic = async {
        // Owned here: when the traffic stops (done or failed), the chaos
        // waiting for a round learns it.
        let rounds_started = rounds_started;
        while round < w.rounds || !chaos_over.load(Ordering::Acquire) {
            run_round(
                mesh,
                &peers,
                &mut plans,
                round,
                rooms_started,
                w,
                &rounds_started,
            )
            .await?;
            round += 1;
        }
        anyhow::Ok(())
    };
    let disruption = async {
        let outcome = match chaos {
            Some(chaos) => disrupt(chaos, &mesh.topology, &room_ids, rounds_seen).await,
            None => Ok(()),
        };
        chaos_over.store(true, Ordering::Release);
        outcome
    };
    let (traffic, disruption) = tokio::join!(traffic, disruption);
    // The traffic's failure first: the chaos fails too when it stops.
    traffic?;
    disruption.context("the chaos")?;

    // Viewers that join after the chaos, one per room on every node (the
    // restarted one included), and one more round for them to see.
    for (r, plan) in plans.iter().enumerate() {
        for node in 0..subscribers.len() {
            let viewer = viewer_id(r as u64, w.viewers_per_room + node as u64);
            audience.join(plan.room_id, viewer, node, true).await?;
        }
    }
    let streams = streams + plans.len() * subscribers.len();
    audience
        .until("every late viewer stream starts", |all| {
            all.len() == streams && all.values().all(|v| v.started)
        })
        .await?;
    run_round(
        mesh,
        &peers,
        &mut plans,
        round,
        rooms_started,
        w,
        &watch::channel(0).0,
    )
    .await?;
    round += 1;
    ensure!(
        plans.iter().all(|p| p.loves > 0),
        "a room had no love accepted: {:?}",
        plans.iter().map(|p| p.loves).collect::<Vec<_>>()
    );
    println!(
        "{round} rounds in {:.1}s; {} calls retried with the same request (idempotency key, batch id) after a retry-later answer or a broken connection",
        started.elapsed().as_secs_f64(),
        retries.calls.load(Ordering::Relaxed)
    );

    // 5a. Every viewer sees every ordered event of its room once, in order.
    audience
        .until(
            "every viewer sees every comment and gift of its room",
            |all| {
                all.values().all(|v| {
                    let Some(plan) = plans.iter().find(|p| p.room_id == v.room_id) else {
                        return false;
                    };
                    if !v.late {
                        return v.ordered.len() >= plan.ordered_events();
                    }
                    // A late viewer: as far as those there from the start.
                    all.values()
                        .filter(|o| o.room_id == v.room_id && !o.late)
                        .all(|o| {
                            let since = o.ordered.iter().filter(|(at, _)| *at > v.start_offset);
                            o.ordered.len() >= plan.ordered_events()
                                && v.ordered.len() >= since.count()
                        })
                })
            },
        )
        .await?;
    let logs = audience.snapshot();
    let mut resumed = 0;
    for plan in &plans {
        let viewers: Vec<&ViewerLog> = logs
            .values()
            .filter(|v| v.room_id == plan.room_id)
            .collect();
        let first = viewers
            .iter()
            .find(|v| !v.late)
            .context("a room without viewers")?;
        for viewer in &viewers {
            ensure!(
                viewer.unrecovered.is_empty(),
                "viewer {} of room {} resumed without recovering every event: {:?}",
                viewer.viewer_id,
                plan.room_id,
                viewer.unrecovered
            );
            if !viewer.resumes.is_empty() {
                resumed += 1;
            }
            if viewer.late {
                // From its start on, the same sequence as everyone.
                let expected: Vec<(u64, String)> = first
                    .ordered
                    .iter()
                    .filter(|(offset, _)| *offset > viewer.start_offset)
                    .cloned()
                    .collect();
                ensure!(
                    viewer.ordered == expected,
                    "late viewer {} (node {}) of room {} joined at offset {}: saw {:?}, expected {:?}",
                    viewer.viewer_id,
                    viewer.node,
                    plan.room_id,
                    viewer.start_offset,
                    viewer.ordered,
                    expected
                );
                continue;
            }
            check_ordered(plan, viewer)?;
            ensure!(
                viewer.ordered == first.ordered,
                "viewers {} (node {}) and {} (node {}) of room {} saw different sequences",
                first.viewer_id,
                first.node,
                viewer.viewer_id,
                viewer.node,
                plan.room_id
            );
        }
    }
    let ordered: usize = plans.iter().map(RoomPlan::ordered_events).sum();
    let comments: usize = plans.iter().map(|p| p.comments.len()).sum();
    let gifted_events: usize = plans.iter().map(|p| p.gift_events.len()).sum();
    let late = logs.values().filter(|v| v.late).count();
    println!(
        "viewers: {} streams ({resumed} resumed on another node after theirs died, {late} joined after the chaos); each saw every acknowledged comment and gift of its room once, in offset order, the same on every node ({ordered} events over {} rooms: {comments} comments whose Publish answered OK, {gifted_events} gifts whose SendGift answered OK)",
        logs.len(),
        plans.len()
    );
    for viewer in logs.values().filter(|v| !v.resumes.is_empty()) {
        println!(
            "  viewer {} of room {}: {}",
            viewer.viewer_id,
            viewer.room_id,
            viewer.resumes.join("; ")
        );
    }

    // 5b. Live love totals on every counter.
    for plan in &plans {
        for (c, counter) in counters.iter().enumerate() {
            let room_id = plan.room_id;
            let total = eventually(
                &format!("counter {c} reports room {room_id}'s loves"),
                || {
                    let mut counter = counter.clone();
                    async move {
                        let total = counter
                            .get_loves(GetLovesRequest { room_id })
                            .await?
                            .into_inner()
                            .total;
                        Ok((total == plan.loves).then_some(total))
                    }
                },
            )
            .await
            .with_context(|| format!("the counters accepted {} loves", plan.loves))?;
            ensure!(total == plan.loves);
        }
    }
    let loves: u64 = plans.iter().map(|p| p.loves).sum();
    println!("both counters report the accepted loves of every room ({loves} in all)");

    // 5c. End the rooms: viewers see the end, money settles, totals land in SQL.
    for plan in &plans {
        let room_id = plan.room_id;
        let mut tries = 0;
        let ended = retrying(
            &format!("EndRoom {room_id}"),
            &admin,
            0,
            &retries.calls,
            |mut admin| {
                tries += 1;
                let retried = tries > 1;
                async move {
                    match admin.end_room(EndRoomRequest { room_id }).await {
                        // A retry of an end that was applied, its answer lost.
                        Err(status)
                            if retried && status.code() == tonic::Code::FailedPrecondition =>
                        {
                            Ok(tonic::Response::new(Default::default()))
                        }
                        other => other,
                    }
                }
            },
        )
        .await;
        ended?;
    }
    audience
        .until(
            "every viewer sees its room end and its stream close",
            |all| all.values().all(|v| v.ended && v.closed.is_some()),
        )
        .await?;
    for viewer in audience.snapshot().values() {
        if let Some(Err(status)) = &viewer.closed {
            bail!(
                "viewer {}'s stream ended with {:?}: {}",
                viewer.viewer_id,
                status.0,
                status.1
            );
        }
    }
    println!("every viewer saw its room end; every stream closed cleanly");

    for plan in &plans {
        let room_id = plan.room_id;
        let mut credit = None;
        for (f, finance) in finance.iter().enumerate() {
            let settlement = eventually(
                &format!("room {room_id} settles (asked gift-settler {f})"),
                || {
                    let mut finance = finance.clone();
                    async move {
                        let settlement = finance
                            .get_settlement(GetSettlementRequest { room_id })
                            .await?
                            .into_inner()
                            .settlement;
                        Ok(settlement.filter(|s| s.state() == SettlementState::Settled))
                    }
                },
            )
            .await?;
            ensure!(
                settlement.gross == plan.gifts && settlement.streamer_id == plan.anchor_id,
                "room {room_id} settled {} to streamer {}; gifts that answered OK sent {} to anchor {}",
                settlement.gross,
                settlement.streamer_id,
                plan.gifts,
                plan.anchor_id
            );
            credit = Some(settlement.streamer_credit);
            // Read-only checks after the chaos: a gift-settler whose MariaDB
            // just came back may answer "retry later" (and open this
            // client's breaker) for a moment, as GetSettlement above may.
            let reconcile = eventually(
                &format!("Reconcile of room {room_id} (asked gift-settler {f})"),
                || {
                    let mut finance = finance.clone();
                    async move {
                        Ok(Some(
                            finance
                                .reconcile(ReconcileRequest { room_id })
                                .await?
                                .into_inner(),
                        ))
                    }
                },
            )
            .await?;
            ensure!(
                reconcile.balanced,
                "Reconcile of room {room_id} is not balanced: {:?}",
                reconcile.shards
            );
        }
        // Paid once: the anchor's balance is this room's credit (it has no
        // other income), each sender's is its deposit minus its gifts.
        let credit = credit.context("no gift-settler")?;
        let balance = async |user: u64| -> anyhow::Result<i64> {
            eventually(&format!("the balance of user {user}"), || {
                let request = GetBalanceRequest { user_id: user };
                let mut client = gifts[0].clone();
                async move {
                    Ok(Some(
                        client
                            .get_balance(mesh.as_viewer(user, request)?)
                            .await?
                            .into_inner()
                            .balance,
                    ))
                }
            })
            .await
        };
        let paid = balance(plan.anchor_id).await?;
        ensure!(
            paid == credit,
            "streamer {} of room {room_id} holds {paid}; the settlement credited {credit}",
            plan.anchor_id
        );
        for (&sender, &sent) in &plan.sent {
            let left = balance(sender).await?;
            ensure!(
                left == DEPOSIT - sent,
                "sender {sender} holds {left}: deposited {DEPOSIT}, its gifts that answered OK sent {sent}"
            );
        }
        println!(
            "  room {room_id}: {} gifts answered OK, {} in all = settled gross; streamer {} paid {paid} once (= the settlement's credit); {} senders each debited exactly their gifts",
            plan.gift_events.len(),
            plan.gifts,
            plan.anchor_id,
            plan.sent.len()
        );
    }
    let gifted: i64 = plans.iter().map(|p| p.gifts).sum();
    println!(
        "every room settled its gifts ({gifted} in all) to its anchor once; Reconcile balanced on every gift-settler"
    );

    let db = sqlx::mysql::MySqlPool::connect(&mesh.topology.counter_database_url)
        .await
        .context("connecting to the counter's database")?;
    for plan in &plans {
        let room_id = plan.room_id;
        let total = eventually(&format!("room {room_id}'s final love total in SQL"), || {
            let db = db.clone();
            async move {
                let row: Option<(i64,)> =
                    sqlx::query_as("SELECT total FROM room_loves WHERE room_id = ?")
                        .bind(i64::try_from(room_id)?)
                        .fetch_optional(&db)
                        .await?;
                Ok(row.map(|(total,)| total))
            }
        })
        .await?;
        println!(
            "  room {room_id}: {} SendLoves answered OK accepting {} loves; final total in SQL {total}",
            plan.love_batches, plan.loves
        );
        ensure!(
            u64::try_from(total).ok() == Some(plan.loves),
            "room {room_id}'s final total in SQL is {total}; the SendLoves that answered OK accepted {}",
            plan.loves
        );
    }
    db.close().await;
    println!("every room's final love total in SQL equals the loves accepted (each batch once)");

    // 5d. The metrics the alert rules read are exported where they belong.
    check_metrics(&mesh.topology).await?;
    Ok(())
}

/// The chaos, one disruption after the other, each in a round that began
/// after the previous disruption was over (so each strikes under traffic,
/// with calls in flight): one replica of every service SIGKILLed and restarted, the
/// Redis master of the first room's slot, MariaDB.
async fn disrupt(
    chaos: &mut Chaos,
    topology: &Topology,
    room_ids: &[u64],
    rounds: watch::Receiver<u64>,
) -> anyhow::Result<()> {
    // Each disruption strikes 50 ms into a round that started after the
    // previous one was over: while that round's calls are in flight.
    let after = |seen: u64| {
        let mut rounds = rounds.clone();
        async move {
            let round = rounds
                .wait_for(|&started| started > seen)
                .await
                .map(|r| *r)?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            anyhow::Ok(round)
        }
    };
    let mut seen = after(0).await?;
    for service in [
        "subscribe",
        "publish",
        "counter",
        "gift-settler",
        "ongoing-query",
    ] {
        let mut process = topology
            .processes(service)?
            .last()
            .cloned()
            .context("a service without processes")?;
        chaos.kill_and_restart(&mut process).await?;
        seen = after(seen).await?;
    }
    let room = room_ids.first().context("no room")?;
    chaos
        .fail_over_master(&topology.redis_nodes, &format!("{{room:{room}}}"))
        .await?;
    seen = after(seen).await?;
    let (Some(pidfile), Some(cnf)) = (&topology.mysql_pidfile, &topology.mysql_cnf) else {
        bail!("the topology file names no MariaDB pid and option files");
    };
    chaos
        .kill_and_restart_mariadb(pidfile, cnf, &topology.counter_database_url)
        .await?;
    after(seen).await?;
    Ok(())
}
