//! The demo's steps that count: loves in the second room (CounterService),
//! paid gifts in the third (GiftsService), and the third room's settlement
//! after its end (SettlementService).

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use livemesh_mesh::MeshChannel;
use livemesh_proto::time::ms_from_timestamp;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::{
    DepositRequest, GetBalanceRequest, GetLovesRequest, GetSettlementRequest, ReconcileRequest,
    Room, SendGiftRequest, SendLovesRequest, SettleRoomRequest, Settlement, SettlementState,
    ShardStatement, TopLoversRequest,
};

use super::viewers::{Audience, live};
use super::{Clients, SETTLE_POLL, SETTLE_WAIT, clock, expect_error, step};

/// Honest batches, a clamped flood and a retried batch; then the total, as
/// GetLoves and every viewer of `audience` see it, and the top lovers.
pub(super) async fn loves(c: &mut Clients, audience: &mut Audience) -> anyhow::Result<()> {
    step("viewers tap hearts in the second room (CounterService.SendLoves)");
    let counter = &mut c.counter;
    let room_id = audience.room_id;
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
    let total = await_loves(counter, room_id, expected).await?;
    println!("  GetLoves: {total} loves in room {room_id}");
    audience
        .until("every viewer sees the love total and 3 viewers", |all| {
            live(all).all(|v| v.love_total == Some(total) && v.viewer_count == Some(3))
        })
        .await?;
    println!(
        "  every viewer's stream shows {total} loves (the counter publishes totals) and 3 viewers"
    );
    print_top_lovers(counter, room_id, 3).await
}

/// Prints the room's `limit` top lovers (CounterService.TopLovers), ranked.
pub(super) async fn print_top_lovers(
    counter: &mut CounterServiceClient<MeshChannel>,
    room_id: u64,
    limit: u32,
) -> anyhow::Result<()> {
    let top = counter
        .top_lovers(TopLoversRequest { room_id, limit })
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
    Ok(())
}

/// Top-ups, gifts (one retried with its key), a gift past the balance,
/// the balances, and a settlement refused while `room` is live; returns
/// the gifts' sum.
pub(super) async fn gifts(c: &mut Clients, room: &Room) -> anyhow::Result<i64> {
    let gift_room = room.room_id;
    let streamer = room.anchor_id;
    step(&format!(
        "viewers top up and send paid gifts in the third room (GiftsService), room {gift_room}"
    ));
    let gifts = &mut c.gifts;
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
    expect_error(
        "settle the room while it is live",
        c.settlement
            .settle_room(SettleRoomRequest { room_id: gift_room }),
        tonic::Code::FailedPrecondition,
    )
    .await?;
    Ok(gross)
}

/// Waits until the Settler (started by the room's end, seen on its Watch)
/// has settled `room_id`, then prints the room's statement, the streamer's
/// balance and the per-shard reconciliation; fails unless it balances.
pub(super) async fn settlement_statement(
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
