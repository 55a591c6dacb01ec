//! The copy path against a scripted broker, under paused time: the order of
//! confirms and receipts, copies in doubt, stalled confirms and the replay
//! of the spool. What RabbitMQ itself does is tested end to end.

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::scripted::{self, Control, Published};
use super::spool::tests::SmallDisk;
use super::*;
use crate::config::QueueMode;

/// Settings for a publisher on `dir`, with a small window and round timers.
fn settings(dir: &Path) -> QueueSettings {
    QueueSettings {
        url: "amqp://scripted".into(),
        queue: "tidegate.test".into(),
        exchange: "amq.topic".into(),
        push_queue: None,
        mode: QueueMode::Receipt,
        max_in_flight: NonZeroUsize::new(8).unwrap(),
        spool_dir: dir.to_path_buf(),
        spool_max_bytes: 1 << 20,
        connect_timeout: Duration::from_secs(5),
        reconnect_interval: Duration::from_secs(1),
        confirm_timeout: Duration::from_secs(10),
        heartbeat: Duration::from_secs(10),
    }
}

/// The copy of message `n` (its body is `copy n`).
fn copy(n: usize) -> QueueMessage {
    QueueMessage::new(
        true,
        format!("copy {n}").into_bytes(),
        "node.conn",
        "/",
        "echo",
        "v1",
        "node",
    )
}

/// A publisher on a scripted broker.
struct Harness {
    publisher: Publisher,
    task: PublisherTask,
    broker: Control,
    metrics: Metrics,
    dir: tempfile::TempDir,
}

impl Harness {
    /// Start a publisher; the broker is reachable when `reachable`.
    async fn start(reachable: bool, tweak: impl FnOnce(&mut QueueSettings)) -> Self {
        Self::start_on(None, reachable, tweak).await
    }

    /// [`Harness::start`] with the spool on `disk`, when given.
    async fn start_on(
        disk: Option<&SmallDisk>,
        reachable: bool,
        tweak: impl FnOnce(&mut QueueSettings),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings(dir.path());
        tweak(&mut settings);
        let (broker, control) = scripted::broker();
        control.set_reachable(reachable);
        let metrics = Metrics::new().unwrap();
        let spool = match disk {
            Some(disk) => Spool::open_with(dir.path(), settings.spool_max_bytes, |file| {
                Box::new(disk.wrap(file))
            }),
            None => Spool::open(dir.path(), settings.spool_max_bytes),
        }
        .unwrap();
        let (publisher, task) = Publisher::start_with(
            settings,
            "node".into(),
            metrics.clone(),
            Broker::Scripted(broker),
            spool,
        );
        let harness = Self {
            publisher,
            task,
            broker: control,
            metrics,
            dir,
        };
        if reachable {
            harness.until(|h| h.publisher.is_connected()).await;
        }
        harness
    }

    /// Wait (in paused time) until `done` holds.
    async fn until(&self, done: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "the condition never held"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Hand in the copies `range` and return their receipts.
    async fn publish(&self, range: std::ops::Range<usize>) -> Vec<Receipt> {
        let mut receipts = Vec::new();
        for n in range {
            receipts.push(self.publisher.publish(copy(n)).await.unwrap());
        }
        receipts
    }

    /// Hand in the big copies `range` and return their receipts.
    async fn publish_big(&self, range: std::ops::Range<usize>) -> Vec<Receipt> {
        let mut receipts = Vec::new();
        for n in range {
            receipts.push(self.publisher.publish(big_copy(n)).await.unwrap());
        }
        receipts
    }

    fn spooled(&self) -> i64 {
        self.metrics.spool_messages.get()
    }

    fn outcome(&self, outcome: &str) -> u64 {
        self.metrics
            .queue_publishes
            .with_label_values(&[outcome])
            .get()
    }

    /// Flush the publisher and return the spool's records, in order.
    async fn finish(self) -> Vec<String> {
        self.task.flush(std::time::Instant::now()).await;
        spool_bodies(self.dir.path())
    }
}

/// The bodies of the records waiting in the spool at `dir`.
fn spool_bodies(dir: &Path) -> Vec<String> {
    let mut spool = super::spool::tests::unlocked(|| Spool::open(dir, 1 << 20));
    let mut offset = spool.head();
    let mut out = Vec::new();
    while let Some((message, next)) = spool.read_at(offset).unwrap() {
        out.push(name(&message));
        offset = next;
    }
    out
}

/// A copy's name: its body without the padding of [`big_copy`].
fn name(message: &QueueMessage) -> String {
    String::from_utf8_lossy(&message.body)
        .trim_end_matches('.')
        .to_owned()
}

fn bodies(published: &[Published]) -> Vec<String> {
    published.iter().map(Published::name).collect()
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("copy {n}")).collect()
}

/// Let the publisher task run (paused time advances only when all wait).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn receipts_resolve_in_publish_order_even_when_confirms_do_not() {
    let mut h = Harness::start(true, |_| {}).await;
    let mut receipts = h.publish(0..3).await;
    let mut published = h.broker.take(3).await;
    assert_eq!(bodies(&published), names(0..3));
    let third = published.pop().unwrap();
    let second = published.pop().unwrap();
    third.ack();
    second.ack();
    settle().await;
    for receipt in &mut receipts {
        assert!(
            receipt.try_durable().is_none(),
            "a receipt resolved before the first copy's"
        );
    }
    published.pop().unwrap().ack();
    for receipt in receipts {
        assert!(matches!(receipt.durable().await, Ok(Durability::Confirmed)));
    }
    assert_eq!(h.outcome("confirmed"), 3);
    assert_eq!(h.spooled(), 0);
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_nacked_copy_is_kept_in_doubt_and_published_again_after_reconnect() {
    let mut h = Harness::start(true, |_| {}).await;
    let receipts = h.publish(0..2).await;
    let mut published = h.broker.take(2).await;
    let nacked_id = published[1].message.message_id.clone();
    published.pop().unwrap().nack();
    published.pop().unwrap().ack();
    let mut receipts = receipts.into_iter();
    assert!(matches!(
        receipts.next().unwrap().durable().await,
        Ok(Durability::Confirmed)
    ));
    assert!(matches!(
        receipts.next().unwrap().durable().await,
        Err(PublishError::InDoubt)
    ));
    assert_eq!(h.spooled(), 1);
    // Published again on the next link, with the same message id.
    let again = h.broker.next().await;
    assert_eq!(again.link, 2);
    assert_eq!(again.message.message_id, nacked_id);
    again.ack();
    h.until(|h| h.spooled() == 0).await;
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn copies_unconfirmed_when_the_link_drops_are_spooled_in_doubt_and_replayed_once_in_order() {
    let mut h = Harness::start(true, |_| {}).await;
    let receipts = h.publish(0..4).await;
    let mut published = h.broker.take(4).await.into_iter();
    published.next().unwrap().ack();
    // The link drops with three copies unconfirmed.
    h.broker.cut();
    drop(published);
    let mut receipts = receipts.into_iter();
    assert!(matches!(
        receipts.next().unwrap().durable().await,
        Ok(Durability::Confirmed)
    ));
    for receipt in receipts {
        assert!(matches!(
            receipt.durable().await,
            Err(PublishError::InDoubt)
        ));
    }
    assert_eq!(h.spooled(), 3);
    // After reconnecting, each is published once more, in order.
    let replayed = h.broker.take(3).await;
    assert!(replayed.iter().all(|p| p.link == 2));
    assert_eq!(h.broker.links_opened(), 2);
    assert_eq!(bodies(&replayed), names(1..4));
    replayed.into_iter().for_each(Published::ack);
    h.until(|h| h.spooled() == 0).await;
    assert_eq!(h.outcome("replayed"), 3);
    // Nothing is published twice.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.broker.try_next().is_none());
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stalled_confirm_breaks_the_link_after_confirm_timeout() {
    let mut h = Harness::start(true, |s| s.confirm_timeout = Duration::from_secs(3)).await;
    let start = Instant::now();
    let receipt = h.publish(0..1).await.pop().unwrap();
    // The broker never answers.
    let stalled = h.broker.next().await;
    assert!(matches!(
        receipt.durable().await,
        Err(PublishError::InDoubt)
    ));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_millis(3500),
        "gave up after {waited:?}"
    );
    assert_eq!(h.spooled(), 1);
    let again = h.broker.next().await;
    assert_eq!(again.link, 2);
    assert_eq!(again.message.message_id, stalled.message.message_id);
    again.ack();
    h.until(|h| h.spooled() == 0).await;
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_spool_is_replayed_once_in_order_and_its_head_advances() {
    let mut h = Harness::start(false, |_| {}).await;
    for receipt in h.publish(0..20).await {
        assert!(matches!(receipt.durable().await, Ok(Durability::Spooled)));
    }
    assert_eq!(h.spooled(), 20);
    h.broker.set_reachable(true);
    // The window (8) is refilled as copies are confirmed.
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let published = h.broker.next().await;
        seen.push(published.name());
        published.ack();
    }
    assert_eq!(seen, names(0..20));
    h.until(|h| h.spooled() == 0).await;
    assert_eq!(h.outcome("replayed"), 20);
    // Replay is over: a new copy goes straight to the broker.
    let receipt = h.publish(20..21).await.pop().unwrap();
    let direct = h.broker.next().await;
    assert_eq!(direct.name(), "copy 20");
    direct.ack();
    assert!(matches!(receipt.durable().await, Ok(Durability::Confirmed)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.broker.try_next().is_none(), "a copy was published twice");
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_replay_cut_short_resumes_at_the_first_unconfirmed_copy() {
    let mut h = Harness::start(false, |_| {}).await;
    h.publish(0..12).await;
    h.until(|h| h.spooled() == 12).await;
    h.broker.set_reachable(true);
    for n in 0..3 {
        let published = h.broker.next().await;
        assert_eq!(published.name(), format!("copy {n}"));
        published.ack();
    }
    h.until(|h| h.spooled() == 9).await;
    // The link drops before the fourth copy is confirmed.
    h.broker.cut();
    let mut replayed = Vec::new();
    while replayed.len() < 9 {
        let published = h.broker.next().await;
        // Copies published on the first link get no answer.
        if published.link == 1 {
            continue;
        }
        replayed.push(published.name());
        published.ack();
    }
    assert_eq!(replayed, names(3..12));
    h.until(|h| h.spooled() == 0).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.broker.try_next().is_none(), "a copy was published twice");
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn copies_handed_in_during_a_replay_follow_it_in_order() {
    let mut h = Harness::start(false, |_| {}).await;
    h.publish(0..5).await;
    h.until(|h| h.spooled() == 5).await;
    h.broker.set_reachable(true);
    let first = h.broker.next().await;
    // While the replay is on, new copies go to the spool behind it.
    for receipt in h.publish(5..8).await {
        assert!(matches!(receipt.durable().await, Ok(Durability::Spooled)));
    }
    let mut seen = vec![first.name()];
    first.ack();
    while seen.len() < 8 {
        let published = h.broker.next().await;
        seen.push(published.name());
        published.ack();
    }
    assert_eq!(seen, names(0..8));
    h.until(|h| h.spooled() == 0).await;
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn flushing_spools_what_the_broker_has_not_confirmed() {
    let mut h = Harness::start(true, |_| {}).await;
    let receipts = h.publish(0..3).await;
    let mut published = h.broker.take(3).await.into_iter();
    published.next().unwrap().ack();
    let _unanswered: Vec<_> = published.collect();
    h.until(|h| h.outcome("confirmed") == 1).await;
    let Harness { task, dir, .. } = h;
    task.flush(std::time::Instant::now()).await;
    let mut receipts = receipts.into_iter();
    assert!(matches!(
        receipts.next().unwrap().durable().await,
        Ok(Durability::Confirmed)
    ));
    for receipt in receipts {
        assert!(matches!(
            receipt.durable().await,
            Err(PublishError::InDoubt)
        ));
    }
    assert_eq!(spool_bodies(dir.path()), names(1..3));
}

/// A copy of about 1 KB (about 1.1 KB in the spool).
fn big_copy(n: usize) -> QueueMessage {
    let mut copy = copy(n);
    copy.body.resize(1000, b'.');
    copy
}

/// Room for `records` big copies in the spool, and not one more.
fn room_for(records: u64) -> u64 {
    records * record_bound(&big_copy(0)) + 10
}

fn async_mode(records: u64) -> impl FnOnce(&mut QueueSettings) {
    move |s: &mut QueueSettings| {
        s.mode = QueueMode::Async;
        s.spool_max_bytes = room_for(records);
    }
}

#[tokio::test(start_paused = true)]
async fn in_async_mode_the_reply_waits_for_acceptance_not_for_the_confirm() {
    let mut h = Harness::start(true, async_mode(3)).await;
    let mut receipt = h.publisher.publish(big_copy(0)).await.unwrap();
    let published = h.broker.next().await;
    // Accepted (published with room reserved) before the broker answers.
    assert!(matches!(receipt.try_ready(), Some(Ok(()))));
    assert!(receipt.try_durable().is_none());
    published.ack();
    assert!(matches!(receipt.durable().await, Ok(Durability::Confirmed)));
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn in_async_mode_a_copy_the_spool_refuses_during_a_replay_gets_no_reply() {
    let mut h = Harness::start(false, async_mode(3)).await;
    for n in 0..3 {
        let receipt = h.publisher.publish(big_copy(n)).await.unwrap();
        assert!(receipt.ready().await.is_ok());
    }
    h.broker.set_reachable(true);
    // The replay is on and not confirmed yet; the spool is full.
    let replaying = h.broker.next().await;
    assert!(h.publisher.is_connected());
    let refused = h.publisher.publish(big_copy(3)).await.unwrap();
    assert!(matches!(
        refused.ready().await,
        Err(PublishError::SpoolFull)
    ));
    assert!(
        !h.publisher.is_ready(),
        "connected but replaying with a full spool: no new copy can be taken"
    );
    // The replay goes on without it.
    let mut seen = vec![replaying.name()];
    replaying.ack();
    while seen.len() < 3 {
        let published = h.broker.next().await;
        seen.push(published.name());
        published.ack();
    }
    h.until(|h| h.spooled() == 0).await;
    assert!(h.publisher.is_ready());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        h.broker.try_next().is_none(),
        "the refused copy was published"
    );
    assert_eq!(seen.len(), 3);
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn in_async_mode_copies_in_flight_when_the_link_drops_always_fit_in_the_spool() {
    let mut h = Harness::start(true, async_mode(3)).await;
    // Six copies, room in the spool for three.
    let mut receipts = h.publish_big(0..6).await;
    let published = h.broker.take(3).await;
    // The fourth waits for room to be reserved for it: no reply yet.
    settle().await;
    assert!(receipts[3].try_ready().is_none());
    assert!(
        h.publisher.is_ready(),
        "copies are taken (with back-pressure) while they go straight to the broker"
    );
    // The link drops before any confirm.
    h.broker.cut();
    drop(published);
    let mut replied = Vec::new();
    for (n, receipt) in receipts.into_iter().enumerate() {
        match receipt.ready().await {
            Ok(()) => replied.push(format!("copy {n}")),
            Err(e) => assert!(matches!(e, PublishError::SpoolFull), "{e}"),
        }
    }
    assert_eq!(replied, names(0..3), "every accepted copy is in the spool");
    assert!(!h.publisher.is_ready(), "the spool is full");
    let replayed = h.broker.take(3).await;
    assert_eq!(bodies(&replayed), replied);
    assert!(replayed.iter().all(|p| p.link == 2));
    // Keep the link's copies unconfirmed so the spool still holds them.
    let spooled = h.finish().await;
    assert_eq!(spooled, replied);
}

#[tokio::test(start_paused = true)]
async fn a_copy_waiting_for_spool_room_goes_out_once_a_confirm_frees_it() {
    let mut h = Harness::start(true, async_mode(2)).await;
    let mut receipts = h.publish_big(0..3).await;
    let mut published = h.broker.take(2).await.into_iter();
    settle().await;
    assert!(receipts[2].try_ready().is_none());
    assert!(h.broker.try_next().is_none());
    published.next().unwrap().ack();
    let third = h.broker.next().await;
    assert_eq!(third.name(), "copy 2");
    assert!(matches!(receipts[2].try_ready(), Some(Ok(()))));
    published.next().unwrap().ack();
    third.ack();
    for receipt in receipts {
        assert!(matches!(receipt.durable().await, Ok(Durability::Confirmed)));
    }
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_copy_the_disk_refuses_is_never_published_and_one_it_took_is_never_lost() {
    let disk = SmallDisk::new(2 * record_bound(&big_copy(0)) + 100);
    let mut h = Harness::start_on(Some(&disk), false, |_| {}).await;
    let mut outcomes = Vec::new();
    // One at a time, so each is a batch of its own.
    for n in 0..4 {
        let receipt = h.publisher.publish(big_copy(n)).await.unwrap();
        outcomes.push(receipt.durable().await);
    }
    assert!(matches!(outcomes[0], Ok(Durability::Spooled)));
    assert!(matches!(outcomes[1], Ok(Durability::Spooled)));
    assert!(matches!(outcomes[2], Err(PublishError::SpoolFailed(_))));
    assert!(matches!(outcomes[3], Err(PublishError::SpoolFailed(_))));
    assert!(!h.publisher.is_ready(), "the disk refuses copies");
    // The disk has room again.
    disk.set_free(1 << 20);
    for receipt in h.publish_big(4..6).await {
        assert!(matches!(receipt.durable().await, Ok(Durability::Spooled)));
    }
    assert!(h.publisher.is_ready());
    h.broker.set_reachable(true);
    let mut replayed = Vec::new();
    while replayed.len() < 4 {
        let published = h.broker.next().await;
        replayed.push(published.name());
        published.ack();
    }
    assert_eq!(replayed, ["copy 0", "copy 1", "copy 4", "copy 5"]);
    h.until(|h| h.spooled() == 0).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        h.broker.try_next().is_none(),
        "a refused copy was published"
    );
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn copies_in_doubt_the_disk_refuses_are_kept_until_it_has_room() {
    let disk = SmallDisk::new(1 << 20);
    let mut h = Harness::start_on(Some(&disk), true, async_mode(8)).await;
    let receipts = h.publish_big(0..3).await;
    let published = h.broker.take(3).await;
    for mut receipt in receipts {
        assert!(matches!(receipt.try_ready(), Some(Ok(()))), "replied");
    }
    // The disk fills, then the link drops before any confirm.
    disk.set_free(0);
    h.broker.cut();
    drop(published);
    h.until(|h| !h.publisher.is_ready()).await;
    assert_eq!(h.spooled(), 0);
    // New copies are refused: they would overtake those in doubt.
    let refused = h.publish_big(3..4).await.pop().unwrap();
    assert!(matches!(
        refused.ready().await,
        Err(PublishError::SpoolFailed(_))
    ));
    // The broker is back before the disk: still nothing overtakes them.
    h.until(|h| h.broker.links_opened() == 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(h.broker.try_next().is_none());
    disk.set_free(1 << 20);
    h.until(|h| h.spooled() == 3).await;
    let replayed = h.broker.take(3).await;
    assert_eq!(bodies(&replayed), names(0..3));
    replayed.into_iter().for_each(Published::ack);
    h.until(|h| h.spooled() == 0).await;
    assert!(h.publisher.is_ready());
    assert!(h.finish().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn readiness_stays_off_while_the_disk_refuses_writes_and_returns_once_it_takes_them() {
    let disk = SmallDisk::new(100);
    let h = Harness::start_on(Some(&disk), false, |_| {}).await;
    let refused = h.publish_big(0..1).await.pop().unwrap();
    assert!(matches!(
        refused.durable().await,
        Err(PublishError::SpoolFailed(_))
    ));
    // Health checks every 250 ms: the disk is still full, so not ready.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !h.publisher.is_ready(),
        "ready while the disk refuses writes"
    );
    // Room again: ready without any copy having to try the disk first.
    disk.set_free(1 << 20);
    h.until(|h| h.publisher.is_ready()).await;
    for receipt in h.publish_big(1..3).await {
        assert!(matches!(receipt.durable().await, Ok(Durability::Spooled)));
    }
    assert_eq!(h.finish().await, names(1..3));
}

#[tokio::test(start_paused = true)]
async fn a_replay_of_a_full_spool_takes_new_copies_as_confirms_free_room() {
    let mut h = Harness::start(false, |s| s.spool_max_bytes = room_for(4)).await;
    for receipt in h.publish_big(0..4).await {
        assert!(matches!(receipt.durable().await, Ok(Durability::Spooled)));
    }
    let refused = h.publish_big(4..5).await.pop().unwrap();
    assert!(matches!(
        refused.durable().await,
        Err(PublishError::SpoolFull)
    ));
    assert!(!h.publisher.is_ready());
    h.broker.set_reachable(true);
    let mut replaying = h.broker.take(4).await.into_iter();
    // Two copies of the replay are confirmed; two are still on their way.
    replaying.next().unwrap().ack();
    replaying.next().unwrap().ack();
    h.until(|h| h.spooled() == 2).await;
    assert!(h.publisher.is_ready(), "confirms freed room in the spool");
    // New copies are taken, behind the replay.
    for receipt in h.publish_big(5..7).await {
        assert!(matches!(receipt.durable().await, Ok(Durability::Spooled)));
    }
    let mut seen: Vec<_> = names(0..2);
    for published in replaying {
        seen.push(published.name());
        published.ack();
    }
    for published in h.broker.take(2).await {
        seen.push(published.name());
        published.ack();
    }
    assert_eq!(seen, [names(0..4), names(5..7)].concat());
    h.until(|h| h.spooled() == 0).await;
    assert!(h.finish().await.is_empty());
}
