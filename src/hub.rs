//! Fan-out of committed events to live subscribers, and each subscriber's
//! catch-up from the durable log. The store publishes to the hub through
//! `store::Publish`, in seq order: on SQLite its `deliver` task after each
//! commit of the writer thread, on PostgreSQL the node's tailer as it reads
//! the log (and [`Hub::lost`] when events were pruned before it could
//! publish them). Publishing never blocks: each subscriber has a bounded
//! buffer, and one that is full is flagged "overflowed" and skipped. An
//! overflowed subscriber re-reads the log from the last seq it delivered, so
//! a slow subscriber costs bounded memory, never slows anyone else, and
//! still gets every event, in order. [`Subscription`] reads the log through
//! [`EventLog`], never a backend, so unit tests drive it with a fake log.
//! Must not: block in `publish`, or hold the registry lock across an
//! `.await`.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::{Alias, Error, Event, Result, SyncKey};
use crate::store::{EventLog, EventPage, EventQuery};

/// Events read from the log per query while replaying or catching up.
const REPLAY_PAGE: u32 = 1000;

/// The registry of live subscribers, by sync key.
pub struct Hub {
    /// Held only to register, unregister, publish and mark a loss (`lost`);
    /// never across `.await`.
    registry: Mutex<Registry>,
    /// The highest seq published or lost: every event up to it was handed
    /// out, or was pruned before this node could publish it (`lost`).
    head: AtomicU64,
    limits: SubscriberLimits,
}

/// Caps on open subscriptions, so a flood of streams cannot exhaust memory.
#[derive(Debug, Clone, Copy)]
pub struct SubscriberLimits {
    pub total: usize,
    pub per_principal: usize,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    by_key: HashMap<SyncKey, HashMap<u64, Arc<Slot>>>,
    total: usize,
    per_principal: HashMap<String, usize>,
}

/// One subscriber as the publisher sees it.
struct Slot {
    alias: Option<Alias>,
    tx: mpsc::Sender<Arc<Event>>,
    /// Set by the publisher when `tx` was full and an event was skipped; the
    /// subscriber clears it and catches up from the log.
    overflowed: AtomicBool,
    /// Wakes the subscriber when `overflowed` is set.
    wake: Notify,
}

impl Hub {
    /// A hub whose head starts at `head` (see [`Hub::advance_to`]).
    pub fn new(head: u64, limits: SubscriberLimits) -> Arc<Hub> {
        Arc::new(Hub {
            registry: Mutex::new(Registry::default()),
            head: AtomicU64::new(head),
            limits,
        })
    }

    /// Raises the head to `seq` (at startup, to the store's last seq).
    pub fn advance_to(&self, seq: u64) {
        self.head.fetch_max(seq, Ordering::AcqRel);
    }

    /// The highest seq published (or lost, see [`Hub::lost`]) so far.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the registry consistent (every
        // mutation is a single insert/remove), so poisoning is ignored.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands committed events, in seq order, to the subscribers of their keys.
    /// Never blocks.
    pub fn publish(&self, events: &[Event]) {
        let registry = self.registry();
        for event in events {
            if let Some(slots) = registry.by_key.get(&event.sync_key) {
                let shared = Arc::new(event.clone());
                for slot in slots.values() {
                    if !event.is_for(slot.alias.as_ref()) || slot.overflowed.load(Ordering::Acquire)
                    {
                        continue;
                    }
                    if let Err(mpsc::error::TrySendError::Full(_)) =
                        slot.tx.try_send(shared.clone())
                    {
                        slot.overflowed.store(true, Ordering::Release);
                        slot.wake.notify_one();
                        metrics::counter!(crate::telemetry::SUBSCRIBER_OVERFLOWS).increment(1);
                    }
                }
            }
            // After the sends: a subscriber that sees this head and an empty
            // buffer has been handed every event up to it.
            self.head.fetch_max(event.seq, Ordering::AcqRel);
        }
    }

    /// Events up to `through` will never be published here (pruned from
    /// the log before this node's tailer read them). Raises the head past
    /// them, so a new subscriber starts after the hole, and flags every
    /// registered subscriber overflowed, so each re-reads the log from the
    /// last seq it delivered: one that delivered less than `through` finds
    /// it pruned and ends with `SinceTooOld` (OUT_OF_RANGE, resync), none
    /// skips the hole silently. Under the registry lock, like `register`,
    /// so a registration sees either the old head and the flag, or the new
    /// head. The flags are set before the head moves (as `publish` sends
    /// before it raises the head): an idle subscriber that reads the new
    /// head for a `Progress` then finds its flag set, and catches up instead
    /// of announcing a position past the hole. Never blocks.
    pub fn lost(&self, through: u64) {
        let registry = self.registry();
        for slot in registry.by_key.values().flat_map(HashMap::values) {
            slot.overflowed.store(true, Ordering::Release);
            slot.wake.notify_one();
        }
        self.head.fetch_max(through, Ordering::AcqRel);
        metrics::counter!(crate::telemetry::LOG_GAPS).increment(1);
    }

    /// Registers a subscriber counted under `principal`; returns its handle
    /// and the head at that moment (every later event reaches the handle's
    /// buffer or sets its overflow). Fails when a subscriber limit is reached.
    fn register(
        self: &Arc<Self>,
        keys: &[SyncKey],
        alias: Option<Alias>,
        buffer: usize,
        principal: &str,
    ) -> Result<(Registration, u64)> {
        let mut registry = self.registry();
        if registry.total >= self.limits.total {
            return Err(Error::SubscribersFull {
                open: registry.total,
            });
        }
        let mine = registry.per_principal.get(principal).copied().unwrap_or(0);
        if mine >= self.limits.per_principal {
            return Err(Error::Exhausted(format!(
                "you have {mine} open subscriptions, the limit per principal (--max-subscribers-per-principal); close one, or subscribe to several keys in one stream"
            )));
        }
        registry.total += 1;
        *registry
            .per_principal
            .entry(principal.to_owned())
            .or_default() += 1;
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let slot = Arc::new(Slot {
            alias,
            tx,
            overflowed: AtomicBool::new(false),
            wake: Notify::new(),
        });
        registry.next_id += 1;
        let id = registry.next_id;
        for key in keys {
            registry
                .by_key
                .entry(key.clone())
                .or_default()
                .insert(id, slot.clone());
        }
        let head = self.head();
        drop(registry);
        let registration = Registration {
            hub: self.clone(),
            id,
            keys: keys.to_vec(),
            principal: principal.to_owned(),
            slot,
            rx,
        };
        Ok((registration, head))
    }

    /// How many subscriptions are registered (for tests and metrics).
    pub fn subscriber_count(&self) -> usize {
        self.registry().total
    }

    /// How many sync keys have at least one subscriber.
    pub fn key_count(&self) -> usize {
        self.registry().by_key.len()
    }
}

impl crate::store::Publish for Hub {
    fn publish(&self, events: &[Event]) {
        Hub::publish(self, events);
    }

    fn lost(&self, through: u64) {
        Hub::lost(self, through);
    }
}

/// A subscriber's place in the hub; unregisters on drop, removing keys that
/// nobody listens to any more.
struct Registration {
    hub: Arc<Hub>,
    id: u64,
    keys: Vec<SyncKey>,
    principal: String,
    slot: Arc<Slot>,
    rx: mpsc::Receiver<Arc<Event>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = self.hub.registry();
        registry.total -= 1;
        if let Some(n) = registry.per_principal.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                registry.per_principal.remove(&self.principal);
            }
        }
        for key in &self.keys {
            if let Some(slots) = registry.by_key.get_mut(key) {
                slots.remove(&self.id);
                if slots.is_empty() {
                    registry.by_key.remove(key);
                }
            }
        }
    }
}

/// What a subscription yields, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Notification(Arc<Event>),
    /// Replay (if any) is over: live from here; everything up to the seq has
    /// been delivered.
    Subscribed(u64),
    /// Nothing for this subscription up to the seq.
    Progress(u64),
}

/// What a subscriber asked for, validated and authorized.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub keys: Vec<SyncKey>,
    /// Who listens: decides which addressed events it sees.
    pub alias: Option<Alias>,
    pub since: Option<u64>,
    /// Whom the subscription counts against for the per-principal limit.
    pub principal: String,
}

/// Settings of one subscription.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Events buffered for the subscriber before it catches up from the log.
    pub buffer: usize,
    /// Idle time before a `Progress` item.
    pub progress_every: Duration,
    /// Most bytes of events read from the log at a time (replay, catch-up).
    pub replay_bytes: usize,
}

enum Mode {
    /// Reading the log after `last`; `announce` sends `Subscribed` at the end.
    Replay {
        announce: bool,
    },
    Live,
}

/// One subscriber's stream of items: replay from the log, then live events,
/// catching up from the log whenever its buffer overflowed. Invariant: items
/// come in seq order, each event at most once (`last` dedupes the hand-over).
pub struct Subscription<L: EventLog> {
    registration: Registration,
    log: Arc<L>,
    keys: Vec<SyncKey>,
    alias: Option<Alias>,
    /// Every event up to this seq has been delivered or did not concern us.
    last: u64,
    replay: VecDeque<Event>,
    mode: Mode,
    /// A `Subscribed` to send before anything else (live-only start).
    pending_subscribed: Option<u64>,
    progress_every: Duration,
    replay_bytes: usize,
    /// Fires every `progress_every`; a `Progress` goes out when it fires and
    /// nothing was delivered since the last time (re-arming a timer once per
    /// interval, not once per event).
    idle: Pin<Box<tokio::time::Sleep>>,
    /// Something was delivered since the timer last fired.
    active: bool,
    shutdown: CancellationToken,
    /// `agsync_notifications_delivered_total`, resolved once.
    delivered: metrics::Counter,
}

impl<L: EventLog> Subscription<L> {
    /// Registers for `keys` and, with `since`, checks it is still replayable
    /// (so a bad `since` fails the call instead of the stream).
    pub async fn start(
        hub: &Arc<Hub>,
        log: Arc<L>,
        request: SubscribeRequest,
        options: SubscribeOptions,
        shutdown: CancellationToken,
    ) -> Result<Subscription<L>> {
        let SubscribeRequest {
            keys,
            alias,
            since,
            principal,
        } = request;
        // Register before reading the log: no event can fall between the two.
        let (registration, head) =
            hub.register(&keys, alias.clone(), options.buffer, &principal)?;
        let mut sub = Subscription {
            registration,
            log,
            keys,
            alias,
            last: head,
            replay: VecDeque::new(),
            mode: Mode::Live,
            pending_subscribed: Some(head),
            progress_every: options.progress_every,
            replay_bytes: options.replay_bytes,
            idle: Box::pin(tokio::time::sleep(options.progress_every)),
            active: false,
            // A token of its own, cancelled with the server's: waiting on it
            // takes this token's lock, not one all streams share.
            shutdown: shutdown.child_token(),
            delivered: metrics::counter!(crate::telemetry::NOTIFICATIONS_DELIVERED),
        };
        if let Some(since) = since {
            sub.last = since;
            sub.pending_subscribed = None;
            sub.mode = Mode::Replay { announce: true };
            let page = sub.read_page().await?;
            if since > page.head {
                return Err(Error::SinceAhead {
                    since,
                    head: page.head,
                });
            }
            sub.replay.extend(page.events);
        }
        Ok(sub)
    }

    async fn read_page(&self) -> Result<EventPage> {
        let page = self
            .log
            .read_events(EventQuery {
                keys: &self.keys,
                after: self.last,
                limit: REPLAY_PAGE,
                max_bytes: self.replay_bytes,
            })
            .await?;
        if self.last < page.pruned_through {
            return Err(Error::SinceTooOld {
                since: self.last,
                oldest: page.pruned_through + 1,
            });
        }
        Ok(page)
    }

    /// The sync keys listened to.
    pub fn keys(&self) -> &[SyncKey] {
        &self.keys
    }

    /// The next item. Errors end the stream: `ShuttingDown` at shutdown,
    /// whatever the stream was doing (live, replaying, catching up),
    /// `SinceTooOld` if the subscriber fell behind the log's retention,
    /// `Busy` or `Unavailable` if the log could not be read; each says where
    /// to resume.
    pub async fn next(&mut self) -> Result<Item> {
        let shutdown = self.shutdown.clone();
        let result = tokio::select! {
            biased;
            () = shutdown.cancelled() => Err(Error::ShuttingDown { since: self.last }),
            result = self.next_item() => result,
        };
        result.map_err(|e| match e {
            Error::Busy(why) => Error::Busy(format!(
                "{why}; subscribe again with since={} to resume",
                self.last
            )),
            Error::Unavailable(why) => Error::Unavailable(format!(
                "{why}; subscribe again with since={} to resume",
                self.last
            )),
            e => e,
        })
    }

    /// `next` without the shutdown check. Cancel-safe: everything it
    /// changes before an `.await` is consistent (`last` moves only with a
    /// delivered or skipped event).
    async fn next_item(&mut self) -> Result<Item> {
        if let Some(head) = self.pending_subscribed.take() {
            return Ok(Item::Subscribed(head));
        }
        loop {
            if let Some(event) = self.replay.pop_front() {
                self.last = event.seq;
                if event.is_for(self.alias.as_ref()) {
                    self.active = true;
                    metrics::counter!(crate::telemetry::REPLAYED_EVENTS).increment(1);
                    self.delivered.increment(1);
                    return Ok(Item::Notification(Arc::new(event)));
                }
                continue;
            }
            if let Mode::Replay { announce } = self.mode {
                let page = self.read_page().await?;
                if page.events.is_empty() {
                    // The log is read up to its head as of that snapshot.
                    self.last = self.last.max(page.head);
                    self.mode = Mode::Live;
                    self.active = true;
                    if announce {
                        return Ok(Item::Subscribed(self.last));
                    }
                } else {
                    self.replay.extend(page.events);
                }
                continue;
            }
            if let Some(item) = self.next_live().await? {
                return Ok(item);
            }
        }
    }

    /// One step of live mode: an item, or `None` to loop (switched to catch-up
    /// or skipped a duplicate).
    async fn next_live(&mut self) -> Result<Option<Item>> {
        let slot = self.registration.slot.clone();
        let event = match self.registration.rx.try_recv() {
            Ok(event) => event,
            Err(mpsc::error::TryRecvError::Empty) => {
                if slot.overflowed.swap(false, Ordering::AcqRel) {
                    // Events were skipped after the buffer's last one: read
                    // them from the log. New ones flow into the buffer again.
                    self.mode = Mode::Replay { announce: false };
                    metrics::counter!(crate::telemetry::SUBSCRIBER_CATCHUPS).increment(1);
                    return Ok(None);
                }
                tokio::select! {
                    received = self.registration.rx.recv() => match received {
                        Some(event) => event,
                        None => return Err(Error::Unavailable("the subscription was closed".into())),
                    },
                    () = slot.wake.notified() => return Ok(None),
                    () = self.idle.as_mut() => {
                        self.idle.as_mut().reset(Instant::now() + self.progress_every);
                        if std::mem::take(&mut self.active) {
                            return Ok(None); // not idle: wait another interval
                        }
                        // Read the head before checking the buffer: every
                        // event up to it is in the buffer or flagged overflow.
                        let head = self.registration.hub.head();
                        if !self.registration.rx.is_empty() || slot.overflowed.load(Ordering::Acquire) {
                            return Ok(None);
                        }
                        self.last = self.last.max(head);
                        return Ok(Some(Item::Progress(self.last)));
                    }
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => {
                return Err(Error::Unavailable("the subscription was closed".into()));
            }
        };
        if event.seq <= self.last {
            return Ok(None); // already delivered by a replay
        }
        self.last = event.seq;
        self.active = true;
        self.delivered.increment(1);
        Ok(Some(Item::Notification(event)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, key: &str, aliases: &[&str]) -> Event {
        Event {
            seq,
            sync_key: SyncKey::parse("k", key).unwrap(),
            database: None,
            id: None,
            rev: None,
            deleted: false,
            aliases: aliases
                .iter()
                .map(|a| Alias::parse("a", a).unwrap())
                .collect(),
            attributes: Default::default(),
        }
    }

    fn key(k: &str) -> SyncKey {
        SyncKey::parse("k", k).unwrap()
    }

    const LIMITS: SubscriberLimits = SubscriberLimits {
        total: 3,
        per_principal: 2,
    };

    /// The durable log as the hub sees it, in memory: what a backend's
    /// `read_events` answers, with pruning.
    #[derive(Default)]
    struct FakeLog(Mutex<LogState>);

    #[derive(Default)]
    struct LogState {
        events: Vec<Event>,
        head: u64,
        pruned_through: u64,
    }

    impl EventLog for FakeLog {
        async fn read_events(&self, query: EventQuery<'_>) -> Result<EventPage> {
            let log = self.0.lock().unwrap();
            let mut events = Vec::new();
            let mut bytes = 0;
            for event in log.events.iter().filter(|e| e.seq > query.after) {
                if !query.keys.contains(&event.sync_key) {
                    continue;
                }
                if events.len() == query.limit as usize || bytes >= query.max_bytes {
                    break;
                }
                bytes += event.approx_bytes();
                events.push(event.clone());
            }
            Ok(EventPage {
                events,
                head: log.head,
                pruned_through: log.pruned_through,
            })
        }
    }

    impl FakeLog {
        /// Commits `events`: into the log, then published, as the store
        /// does.
        fn commit(&self, hub: &Hub, events: &[Event]) {
            {
                let mut log = self.0.lock().unwrap();
                log.events.extend_from_slice(events);
                log.head = events.iter().map(|e| e.seq).fold(log.head, u64::max);
            }
            hub.publish(events);
        }

        fn prune(&self, through: u64) {
            let mut log = self.0.lock().unwrap();
            log.events.retain(|e| e.seq > through);
            log.pruned_through = through;
        }
    }

    fn deletion(seq: u64, key: &str) -> Event {
        Event {
            database: Some(crate::domain::DbName::parse("d", "cars").unwrap()),
            deleted: true,
            ..event(seq, key, &[])
        }
    }

    /// One step of a subscription case.
    enum Step {
        /// Events committed to the log and published.
        Commit(Vec<Event>),
        /// The log pruned through a seq (the writer's retention).
        Prune(u64),
        /// The node learns events up to a seq were pruned before it
        /// published them (a PostgreSQL tailer behind the retention).
        Lost(u64),
        /// The next items, exactly (`n5`: notification 5, `subscribed 7`,
        /// `progress 9`).
        Expect(&'static [&'static str]),
        /// The next call fails with this error (its Display, in part).
        Fails(&'static str),
        /// Nothing more is delivered (within 1 ms of paused time).
        Quiet,
        /// The server shuts down.
        Shutdown,
    }
    use Step::*;

    struct Case {
        name: &'static str,
        /// In the log before the subscription starts.
        log: Vec<Event>,
        pruned_through: u64,
        keys: &'static [&'static str],
        alias: Option<&'static str>,
        since: Option<u64>,
        buffer: usize,
        progress_every: Duration,
        /// `Err(part of the message)` if the start must fail.
        starts: std::result::Result<(), &'static str>,
        steps: Vec<Step>,
    }

    impl Default for Case {
        fn default() -> Self {
            Case {
                name: "",
                log: Vec::new(),
                pruned_through: 0,
                keys: &["a"],
                alias: None,
                since: None,
                buffer: 16,
                progress_every: Duration::from_secs(3600),
                starts: Ok(()),
                steps: Vec::new(),
            }
        }
    }

    fn label(item: &Item) -> String {
        match item {
            Item::Notification(e) if e.is_database_deleted() => format!("deleted {}", e.seq),
            Item::Notification(e) => format!("n{}", e.seq),
            Item::Subscribed(seq) => format!("subscribed {seq}"),
            Item::Progress(seq) => format!("progress {seq}"),
        }
    }

    fn run_of(seqs: std::ops::RangeInclusive<u64>, key: &str) -> Vec<Event> {
        seqs.map(|seq| event(seq, key, &[])).collect()
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "live from the head: subscribed, then each event once",
                log: run_of(1..=3, "a"),
                steps: vec![
                    Expect(&["subscribed 3"]),
                    Commit(run_of(4..=5, "a")),
                    Expect(&["n4", "n5"]),
                    Quiet,
                ],
                ..Case::default()
            },
            Case {
                name: "replay then live: no gap, no duplicate at the hand-off",
                log: run_of(1..=5, "a"),
                since: Some(2),
                steps: vec![
                    // 6 and 7 land in the log and the live buffer while
                    // the replay is still at 3: the replay reads them from
                    // the log, and the buffered copies are dropped.
                    Commit(run_of(6..=7, "a")),
                    Expect(&["n3", "n4", "n5", "n6", "n7", "subscribed 7"]),
                    Commit(run_of(8..=8, "a")),
                    Expect(&["n8"]),
                    Quiet,
                ],
                ..Case::default()
            },
            Case {
                name: "resume at the head: subscribed at once",
                log: run_of(1..=4, "a"),
                since: Some(4),
                steps: vec![Expect(&["subscribed 4"]), Quiet],
                ..Case::default()
            },
            Case {
                name: "a slow subscriber catches up from the log, every event once, in order",
                buffer: 2,
                steps: vec![
                    Expect(&["subscribed 0"]),
                    Commit(run_of(1..=10, "a")),
                    Expect(&["n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10"]),
                    Commit(run_of(11..=11, "a")),
                    Expect(&["n11"]),
                    Quiet,
                ],
                ..Case::default()
            },
            Case {
                name: "since older than the retention: the start fails with OUT_OF_RANGE",
                log: run_of(6..=8, "a"),
                pruned_through: 5,
                since: Some(3),
                starts: Err(
                    "since=3 is older than the event log's retention (the oldest event kept is seq 6)",
                ),
                ..Case::default()
            },
            Case {
                name: "since ahead of the head: the start fails",
                log: run_of(1..=8, "a"),
                since: Some(9),
                starts: Err("since=9 is ahead of this server's newest event (seq 8)"),
                ..Case::default()
            },
            Case {
                name: "since at the pruning mark: replayable",
                log: run_of(6..=8, "a"),
                pruned_through: 5,
                since: Some(5),
                steps: vec![Expect(&["n6", "n7", "n8", "subscribed 8"])],
                ..Case::default()
            },
            Case {
                name: "an overflowed subscriber whose position was pruned meanwhile ends OUT_OF_RANGE",
                buffer: 1,
                steps: vec![
                    Expect(&["subscribed 0"]),
                    Commit(run_of(1..=5, "a")),
                    Prune(3),
                    Expect(&["n1"]),
                    Fails(
                        "since=1 is older than the event log's retention (the oldest event kept is seq 4)",
                    ),
                ],
                ..Case::default()
            },
            Case {
                name: "events lost before publication end live subscribers OUT_OF_RANGE, never skipped",
                steps: vec![
                    Expect(&["subscribed 0"]),
                    Commit(run_of(1..=2, "a")),
                    Expect(&["n1", "n2"]),
                    // 3..=10 committed and pruned while this node was not
                    // reading the log; it publishes only 11.
                    Prune(10),
                    Lost(10),
                    Commit(run_of(11..=11, "a")),
                    Fails(
                        "since=2 is older than the event log's retention (the oldest event kept is seq 11)",
                    ),
                ],
                ..Case::default()
            },
            Case {
                name: "events lost with events still buffered: those are delivered, then OUT_OF_RANGE",
                steps: vec![
                    Expect(&["subscribed 0"]),
                    Commit(run_of(1..=2, "a")),
                    Prune(10),
                    Lost(10),
                    Commit(run_of(11..=11, "a")),
                    Expect(&["n1", "n2"]),
                    Fails(
                        "since=2 is older than the event log's retention (the oldest event kept is seq 11)",
                    ),
                ],
                ..Case::default()
            },
            Case {
                name: "an idle subscriber and a lost hole: OUT_OF_RANGE, never a progress past it",
                progress_every: Duration::from_secs(30),
                log: run_of(1..=2, "a"),
                steps: vec![
                    Expect(&["subscribed 2"]),
                    Prune(10),
                    Lost(10),
                    Fails(
                        "since=2 is older than the event log's retention (the oldest event kept is seq 11)",
                    ),
                ],
                ..Case::default()
            },
            Case {
                name: "the database deleted: delivered in order, live and replayed",
                log: vec![event(1, "a", &[]), deletion(2, "a")],
                since: Some(0),
                steps: vec![
                    Expect(&["n1", "deleted 2", "subscribed 2"]),
                    Commit(vec![deletion(3, "a"), event(4, "a", &[])]),
                    Expect(&["deleted 3", "n4"]),
                ],
                ..Case::default()
            },
            Case {
                name: "progress: an idle subscriber hears the head, its keys' events or not",
                progress_every: Duration::from_secs(30),
                log: run_of(1..=2, "a"),
                steps: vec![
                    Expect(&["subscribed 2"]),
                    Commit(run_of(3..=5, "other")),
                    Expect(&["progress 5"]),
                    Commit(run_of(6..=6, "a")),
                    // Active in the last interval: no progress for it.
                    Expect(&["n6", "progress 6"]),
                ],
                ..Case::default()
            },
            Case {
                name: "many keys and an alias: only this subscriber's events, replayed and live",
                keys: &["a", "b"],
                alias: Some("bob"),
                since: Some(0),
                log: vec![
                    event(1, "a", &[]),
                    event(2, "b", &["bob"]),
                    event(3, "c", &[]),
                    event(4, "a", &["alice"]),
                    event(5, "b", &["alice", "bob"]),
                ],
                steps: vec![
                    Expect(&["n1", "n2", "n5", "subscribed 5"]),
                    Commit(vec![
                        event(6, "b", &[]),
                        event(7, "a", &["alice"]),
                        event(8, "c", &["bob"]),
                        event(9, "a", &["bob"]),
                    ]),
                    Expect(&["n6", "n9"]),
                    Quiet,
                ],
                ..Case::default()
            },
            Case {
                name: "many keys, no alias: addressed events are not for it",
                keys: &["a", "b"],
                since: Some(0),
                log: vec![event(1, "a", &["bob"]), event(2, "b", &[])],
                steps: vec![
                    Expect(&["n2", "subscribed 2"]),
                    Commit(vec![event(3, "a", &["bob"]), event(4, "a", &[])]),
                    Expect(&["n4"]),
                ],
                ..Case::default()
            },
            Case {
                name: "shutdown ends the stream, naming where to resume",
                log: run_of(1..=3, "a"),
                since: Some(1),
                steps: vec![
                    Expect(&["n2"]),
                    Shutdown,
                    Fails("subscribe again with since=2"),
                ],
                ..Case::default()
            },
        ]
    }

    async fn run_case(case: Case) {
        let name = case.name;
        let log = Arc::new(FakeLog::default());
        {
            let mut state = log.0.lock().unwrap();
            state.head = case.log.iter().map(|e| e.seq).max().unwrap_or(0);
            state.events = case.log;
            state.pruned_through = case.pruned_through;
        }
        let head = log.0.lock().unwrap().head;
        let hub = Hub::new(head, LIMITS);
        let shutdown = CancellationToken::new();
        let started = Subscription::start(
            &hub,
            log.clone(),
            SubscribeRequest {
                keys: case.keys.iter().map(|k| key(k)).collect(),
                alias: case.alias.map(|a| Alias::parse("a", a).unwrap()),
                since: case.since,
                principal: String::new(),
            },
            SubscribeOptions {
                buffer: case.buffer,
                progress_every: case.progress_every,
                replay_bytes: 1 << 20,
            },
            shutdown.clone(),
        )
        .await;
        let mut sub = match (started, case.starts) {
            (Ok(sub), Ok(())) => sub,
            (Err(e), Err(want)) => {
                assert!(e.to_string().contains(want), "{name}: {e}");
                return;
            }
            (Ok(_), Err(want)) => panic!("{name}: started, expected {want:?}"),
            (Err(e), Ok(())) => panic!("{name}: did not start: {e}"),
        };
        for step in case.steps {
            match step {
                Commit(events) => log.commit(&hub, &events),
                Prune(through) => log.prune(through),
                Lost(through) => hub.lost(through),
                Shutdown => shutdown.cancel(),
                Expect(labels) => {
                    let mut got = Vec::new();
                    for _ in labels {
                        let item = tokio::time::timeout(Duration::from_secs(7200), sub.next())
                            .await
                            .unwrap_or_else(|_| panic!("{name}: stalled after {got:?}"));
                        match item {
                            Ok(item) => got.push(label(&item)),
                            Err(e) => panic!("{name}: failed after {got:?}: {e}"),
                        }
                    }
                    assert_eq!(got, labels, "{name}");
                }
                Fails(want) => match sub.next().await {
                    Err(e) => assert!(e.to_string().contains(want), "{name}: {e}"),
                    Ok(item) => panic!("{name}: expected {want:?}, got {}", label(&item)),
                },
                Quiet => {
                    if let Ok(item) =
                        tokio::time::timeout(Duration::from_millis(1), sub.next()).await
                    {
                        panic!("{name}: expected nothing, got {item:?}");
                    }
                }
            }
        }
    }

    /// The subscription state machine, case by case, on a fake log (time
    /// paused: progress intervals pass at once when nothing else can run).
    #[tokio::test(start_paused = true)]
    async fn subscriptions_on_a_fake_log() {
        for case in cases() {
            run_case(case).await;
        }
    }

    #[test]
    fn lost_raises_the_head_for_new_subscribers() {
        let hub = Hub::new(5, LIMITS);
        hub.lost(10);
        assert_eq!(hub.head(), 10);
        let (_, head) = hub.register(&[key("a")], None, 1, "").unwrap();
        assert_eq!(head, 10);
        hub.lost(7); // never lowers it
        assert_eq!(hub.head(), 10);
    }

    #[test]
    fn subscriber_limits() {
        let hub = Hub::new(0, LIMITS);
        let a1 = hub.register(&[key("a")], None, 1, "alice").unwrap();
        let _a2 = hub.register(&[key("a")], None, 1, "alice").unwrap();
        let err = hub.register(&[key("a")], None, 1, "alice").err().unwrap();
        assert!(err.to_string().contains("limit per principal"), "{err}");
        let _b1 = hub.register(&[key("a")], None, 1, "bob").unwrap();
        let err = hub.register(&[key("a")], None, 1, "carol").err().unwrap();
        assert!(err.to_string().contains("3 open subscriptions"), "{err}");
        drop(a1);
        assert!(hub.register(&[key("a")], None, 1, "carol").is_ok());
    }

    #[test]
    fn publish_filters_by_key_and_alias_and_never_blocks() {
        let hub = Hub::new(0, LIMITS);
        let (mut anon, head) = hub.register(&[key("a")], None, 2, "").unwrap();
        assert_eq!(head, 0);
        let (mut bob, _) = hub
            .register(
                &[key("a"), key("b")],
                Alias::parse("a", "bob").ok(),
                8,
                "bob",
            )
            .unwrap();
        hub.publish(&[
            event(1, "a", &[]),
            event(2, "b", &[]),
            event(3, "a", &["bob"]),
            event(4, "a", &[]),
            event(5, "a", &[]),
            event(6, "c", &[]),
        ]);
        assert_eq!(hub.head(), 6);
        let drain = |r: &mut Registration| {
            std::iter::from_fn(|| r.rx.try_recv().ok().map(|e| e.seq)).collect::<Vec<_>>()
        };
        // The anonymous subscriber's buffer of 2 filled at seq 4: 5 was
        // skipped and the overflow flagged, so it will catch up from the log.
        assert_eq!(drain(&mut anon), vec![1, 4]);
        assert!(anon.slot.overflowed.load(Ordering::Acquire));
        assert_eq!(drain(&mut bob), vec![1, 2, 3, 4, 5]);
        assert!(!bob.slot.overflowed.load(Ordering::Acquire));
    }

    #[test]
    fn keys_nobody_listens_to_are_removed() {
        let hub = Hub::new(7, LIMITS);
        let (first, head) = hub.register(&[key("a"), key("b")], None, 4, "").unwrap();
        assert_eq!(head, 7);
        let (second, _) = hub.register(&[key("b")], None, 4, "").unwrap();
        assert_eq!((hub.subscriber_count(), hub.key_count()), (2, 2));
        drop(first);
        assert_eq!((hub.subscriber_count(), hub.key_count()), (1, 1));
        drop(second);
        assert_eq!((hub.subscriber_count(), hub.key_count()), (0, 0));
    }
}
