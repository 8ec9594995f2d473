//! What `/readyz` reports: the instance consumes, and Redis answers both the probe and the
//! checks themselves. A PING can succeed where every check fails (a script error, an
//! out-of-memory Redis), so a failed check counts too; and one failed batch keeps the
//! instance not ready for a few seconds, so readiness does not flap between a failed
//! batch and the next successful PING.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Sets `slot` to `value`; true when an error follows a success, so an outage is logged
/// once however its text varies.
fn replace(slot: &Mutex<Option<String>>, value: Option<String>) -> bool {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    let new = value.is_some() && slot.is_none();
    *slot = value;
    new
}

/// How long a failed check keeps the instance not ready.
pub const CHECK_FAILURE_HOLD: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct Health {
    started: Instant,
    consuming: AtomicBool,
    redis_probe_ok: AtomicBool,
    /// Milliseconds after `started` of the last check that failed for a reason other than
    /// its own key, plus one (0: none yet).
    last_check_failure: AtomicU64,
    /// Deliveries in flight that are not held for Redis: they should settle soon.
    working: AtomicU64,
    /// Milliseconds after `started` when a delivery was last settled, or the pipeline
    /// last became idle.
    last_progress: AtomicU64,
    /// `http.stall_seconds`, in milliseconds.
    stall_ms: AtomicU64,
    /// The broker blocks publishing (a memory or disk alarm): confirms wait for the
    /// broker, and a restart would not help, so the stall clock stops.
    publish_blocked: AtomicBool,
    /// Why the last broker connection and the last Redis probe failed (a refused TLS
    /// certificate, a wrong password): `/readyz` says it, not only the log.
    broker_error: Mutex<Option<String>>,
    redis_error: Mutex<Option<String>>,
    /// Why the defer ladder cannot be used (the broker refused to declare it, or a step
    /// is missing) while some rule defers: deferrals fall back to rejections meanwhile.
    ladder_error: Mutex<Option<String>>,
    /// Why the sharded inbound cannot be set up (the broker lacks the consistent-hash
    /// exchange type): the gate consumes its queues meanwhile, but gateways publishing to
    /// the exchange lose their messages.
    shard_error: Mutex<Option<String>>,
    /// The broker has no consistent-hash exchange type: the inbound exchange does not exist.
    no_hash_exchange: AtomicBool,
    /// The heaviest tenants of each shard lately (`GET /shards/top`).
    pub top: crate::top::TopTenants,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            consuming: AtomicBool::new(false),
            redis_probe_ok: AtomicBool::new(false),
            last_check_failure: AtomicU64::new(0),
            working: AtomicU64::new(0),
            last_progress: AtomicU64::new(0),
            stall_ms: AtomicU64::new(120_000),
            publish_blocked: AtomicBool::new(false),
            broker_error: Mutex::new(None),
            redis_error: Mutex::new(None),
            ladder_error: Mutex::new(None),
            shard_error: Mutex::new(None),
            no_hash_exchange: AtomicBool::new(false),
            top: crate::top::TopTenants::default(),
        }
    }
}

/// One look at the instance's health, as `/readyz` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub consuming: bool,
    pub redis_probe: bool,
    /// A check failed within the last [`CHECK_FAILURE_HOLD`].
    pub checks_failing: bool,
    /// Some rule defers and the ladder cannot take its messages.
    pub ladder_failing: bool,
    /// The sharded inbound's exchange cannot be set up.
    pub shards_failing: bool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.consuming
            && self.redis_probe
            && !self.checks_failing
            && !self.ladder_failing
            && !self.shards_failing
    }
}

impl Health {
    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    /// The outcome of the last Redis probe; returns true when it fails after a success
    /// (so an outage is logged once, not every probe).
    pub fn set_redis_probe(&self, outcome: Result<(), String>) -> bool {
        self.redis_probe_ok
            .store(outcome.is_ok(), Ordering::Relaxed);
        replace(&self.redis_error, outcome.err())
    }

    /// Why the last broker session failed, or `None` once one consumes.
    pub fn set_broker_error(&self, error: Option<String>) {
        replace(&self.broker_error, error);
    }

    /// Why the defer ladder cannot be used, or `None` once it can (or nothing defers).
    /// True when this begins a failure, so it is logged once.
    pub fn set_ladder_error(&self, error: Option<String>) -> bool {
        replace(&self.ladder_error, error)
    }

    /// Why the sharded inbound cannot be set up, or `None` once it is. True when this
    /// begins a failure, so it is logged once.
    /// `no_plugin`: the broker cannot have the inbound exchange at all. True when the
    /// reason is new (so it is logged once).
    pub fn set_shard_error(&self, error: Option<String>, no_plugin: bool) -> bool {
        self.no_hash_exchange.store(no_plugin, Ordering::Relaxed);
        let mut slot = self.shard_error.lock().unwrap_or_else(|e| e.into_inner());
        let new = error.is_some() && *slot != error;
        *slot = error;
        new
    }

    /// The broker has no consistent-hash exchange type, so the inbound exchange a parked
    /// message of a sharded inbound returns through cannot exist.
    pub fn no_hash_exchange(&self) -> bool {
        self.no_hash_exchange.load(Ordering::Relaxed)
    }

    /// The last errors, one `name: error` line each, for `/readyz`.
    pub fn errors(&self) -> String {
        let mut out = String::new();
        for (name, error) in [
            ("broker_error", &self.broker_error),
            ("redis_error", &self.redis_error),
            ("defer_ladder_error", &self.ladder_error),
            ("inbound_shards_error", &self.shard_error),
        ] {
            if let Some(error) = error.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
                out.push_str(&format!("{name}: {error}\n"));
            }
        }
        out
    }

    /// A check failed because Redis did not answer or failed as a whole. True when this
    /// begins an outage: no check had failed within [`CHECK_FAILURE_HOLD`].
    pub fn check_failed(&self) -> bool {
        let now = self.now_ms() + 1;
        let previous = self.last_check_failure.swap(now, Ordering::Relaxed);
        previous == 0 || now - previous.min(now) >= CHECK_FAILURE_HOLD.as_millis() as u64
    }

    /// Redis answered a batch of checks. True once per outage, when no check has failed
    /// for [`CHECK_FAILURE_HOLD`]: the outage is over. (Batches run side by side, so some
    /// get through while an outage begins or ends.)
    pub fn checks_answered(&self) -> bool {
        let failed = self.last_check_failure.load(Ordering::Relaxed);
        failed > 0
            && self.now_ms().saturating_sub(failed - 1) >= CHECK_FAILURE_HOLD.as_millis() as u64
            && self
                .last_check_failure
                .compare_exchange(failed, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness_at(Instant::now())
    }

    fn readiness_at(&self, now: Instant) -> Readiness {
        let failed = self.last_check_failure.load(Ordering::Relaxed);
        let since_start = now.saturating_duration_since(self.started).as_millis() as u64;
        let checks_failing = failed > 0
            && since_start.saturating_sub(failed - 1) < CHECK_FAILURE_HOLD.as_millis() as u64;
        Readiness {
            consuming: self.consuming.load(Ordering::Relaxed),
            redis_probe: self.redis_probe_ok.load(Ordering::Relaxed),
            checks_failing,
            ladder_failing: self
                .ladder_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some(),
            shards_failing: self
                .shard_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some(),
        }
    }

    pub fn ready(&self) -> bool {
        self.readiness().ready()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The pipeline moved: `settled` deliveries were settled just now, and `working`
    /// (in flight, not held for Redis) are left.
    pub fn progress(&self, settled: bool, working: usize) {
        let was = self.working.swap(working as u64, Ordering::Relaxed);
        if settled || was == 0 {
            self.last_progress.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The broker blocked or unblocked publishing; the stall clock starts again after.
    pub fn set_publish_blocked(&self, blocked: bool) {
        self.publish_blocked.store(blocked, Ordering::Relaxed);
        if !blocked {
            self.last_progress.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    pub fn set_stall(&self, stall: Duration) {
        self.stall_ms
            .store(stall.as_millis() as u64, Ordering::Relaxed);
    }

    /// True when messages are in flight and none was settled for `http.stall_seconds`:
    /// the pipeline is stuck (a confirm or an ack that never comes), and `/healthz` says
    /// so.
    pub fn stalled(&self) -> bool {
        let stall = Duration::from_millis(self.stall_ms.load(Ordering::Relaxed));
        self.stalled_at(self.now_ms(), stall)
    }

    fn stalled_at(&self, now_ms: u64, stall: Duration) -> bool {
        !self.publish_blocked.load(Ordering::Relaxed)
            && self.working.load(Ordering::Relaxed) > 0
            && now_ms.saturating_sub(self.last_progress.load(Ordering::Relaxed))
                >= stall.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_without_a_settlement_for_the_stall_time_is_stuck() {
        let health = Health::default();
        let stall = Duration::from_secs(120);
        assert!(!health.stalled_at(500_000, stall), "idle is not stuck");
        health.progress(false, 5);
        let t = health.last_progress.load(Ordering::Relaxed);
        assert!(!health.stalled_at(t + 119_000, stall));
        assert!(health.stalled_at(t + 120_000, stall));
        health.progress(true, 5);
        let t = health.last_progress.load(Ordering::Relaxed);
        assert!(
            !health.stalled_at(t + 60_000, stall),
            "a settlement is progress"
        );
        health.progress(false, 0);
        assert!(!health.stalled_at(t + 600_000, stall), "nothing in flight");
        health.progress(false, 3);
        health.set_publish_blocked(true);
        assert!(
            !health.stalled_at(t + 600_000, stall),
            "a broker alarm is not a stuck gate"
        );
    }

    #[test]
    fn an_outage_begins_with_its_first_failed_check_and_is_not_over_at_once() {
        let health = Health::default();
        assert!(!health.checks_answered(), "no outage yet");
        assert!(health.check_failed(), "the first failure begins it");
        assert!(!health.check_failed(), "the next is the same outage");
        assert!(!health.checks_answered(), "not over within the hold");
    }

    #[test]
    fn a_failed_check_outweighs_a_good_probe_for_a_while() {
        let health = Health::default();
        health.set_consuming(true);
        health.set_redis_probe(Ok(()));
        let t0 = Instant::now();
        assert!(health.readiness_at(t0).ready());
        health.check_failed();
        let r = health.readiness_at(Instant::now());
        assert!(r.checks_failing && !r.ready(), "{r:?}");
        health.set_redis_probe(Ok(()));
        assert!(
            !health
                .readiness_at(Instant::now() + Duration::from_secs(1))
                .ready(),
            "the next good PING does not make it ready again"
        );
        assert!(
            health
                .readiness_at(Instant::now() + CHECK_FAILURE_HOLD + Duration::from_millis(10))
                .ready()
        );
        health.set_redis_probe(Err("refused".into()));
        assert!(
            !health
                .readiness_at(Instant::now() + CHECK_FAILURE_HOLD * 2)
                .ready()
        );
    }
}
