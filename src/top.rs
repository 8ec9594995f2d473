//! Which tenants fill which shard: when one shard of a sharded inbound backs up, an
//! operator asks any gate (`GET /shards/top`) instead of reading a metric per tenant.
//!
//! Every gate consumes every shard, so each sees a fair sample of all of them. A gateway
//! publishes to the inbound exchange with the tenant as routing key, so a delivery's routing
//! key names its tenant without parsing the body. Per shard, the heaviest routing keys are
//! kept with the space-saving algorithm (Metwally et al.): at most [`SLOTS`] counters, so
//! memory is bounded whatever the number of tenants, and any key with more than 1/SLOTS of
//! a shard's messages is certain to be listed. Counts cover the current minute and the one
//! before it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Counters kept per shard.
const SLOTS: usize = 32;
/// Keys listed per shard.
const LISTED: usize = 5;
/// How long one generation of counts covers.
const PERIOD: Duration = Duration::from_secs(60);

/// One shard's heaviest keys.
#[derive(Debug, Default, Clone)]
struct Sketch {
    /// routing key → (count, the most it may be overcounted by)
    counts: HashMap<String, (u64, u64)>,
    total: u64,
}

impl Sketch {
    fn add(&mut self, key: &str) {
        self.total += 1;
        if let Some((count, _)) = self.counts.get_mut(key) {
            *count += 1;
            return;
        }
        if self.counts.len() < SLOTS {
            self.counts.insert(key.to_owned(), (1, 0));
            return;
        }
        // Replace the smallest counter; the newcomer inherits its count as its error.
        let (smallest, &(min, _)) = self
            .counts
            .iter()
            .min_by_key(|(_, (count, _))| *count)
            .expect("a full sketch has counters");
        let smallest = smallest.clone();
        self.counts.remove(&smallest);
        self.counts.insert(key.to_owned(), (min + 1, min));
    }
}

/// One shard in the answer of `GET /shards/top`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ShardTop {
    pub queue: String,
    /// Deliveries this gate took from the shard in the last one to two minutes.
    pub messages: u64,
    pub tenants: Vec<TenantCount>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TenantCount {
    pub tenant_id: String,
    /// At most this many of the shard's messages, and at least `messages - overcount`.
    pub messages: u64,
    pub overcount: u64,
}

/// The sketches of every consumed queue, this minute's and the last.
#[derive(Debug)]
pub struct TopTenants {
    inner: Mutex<Generations>,
}

#[derive(Debug)]
struct Generations {
    started: Instant,
    current: HashMap<String, Sketch>,
    previous: HashMap<String, Sketch>,
}

impl Default for TopTenants {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Generations {
                started: Instant::now(),
                current: HashMap::new(),
                previous: HashMap::new(),
            }),
        }
    }
}

impl TopTenants {
    /// Counts one batch of deliveries from `queue`, by routing key.
    pub fn record<'a>(&self, queue: &str, keys: impl IntoIterator<Item = &'a str>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.rotate();
        if !g.current.contains_key(queue) {
            g.current.insert(queue.to_owned(), Sketch::default());
        }
        let sketch = g.current.get_mut(queue).expect("inserted above");
        for key in keys {
            sketch.add(key);
        }
    }

    /// Every shard this gate took messages from lately, the fullest first, each with its
    /// heaviest tenants.
    pub fn top(&self) -> Vec<ShardTop> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.rotate();
        let mut merged: HashMap<&str, Sketch> = HashMap::new();
        for (queue, sketch) in g.previous.iter().chain(&g.current) {
            let m = merged.entry(queue).or_default();
            m.total += sketch.total;
            for (key, (count, error)) in &sketch.counts {
                let e = m.counts.entry(key.clone()).or_default();
                e.0 += count;
                e.1 += error;
            }
        }
        let mut shards: Vec<ShardTop> = merged
            .into_iter()
            .map(|(queue, sketch)| {
                let mut tenants: Vec<TenantCount> = sketch
                    .counts
                    .into_iter()
                    .map(|(tenant_id, (messages, overcount))| TenantCount {
                        tenant_id,
                        messages,
                        overcount,
                    })
                    .collect();
                tenants.sort_by(|a, b| {
                    b.messages
                        .cmp(&a.messages)
                        .then(a.tenant_id.cmp(&b.tenant_id))
                });
                tenants.truncate(LISTED);
                ShardTop {
                    queue: queue.to_owned(),
                    messages: sketch.total,
                    tenants,
                }
            })
            .collect();
        shards.sort_by(|a, b| b.messages.cmp(&a.messages).then(a.queue.cmp(&b.queue)));
        shards
    }
}

impl Generations {
    fn rotate(&mut self) {
        let elapsed = self.started.elapsed();
        if elapsed < PERIOD {
            return;
        }
        self.previous = if elapsed < 2 * PERIOD {
            std::mem::take(&mut self.current)
        } else {
            HashMap::new()
        };
        self.current.clear();
        self.started = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_tenant_tops_its_shard_among_many_others() {
        let top = TopTenants::default();
        // 10,000 tenants once each, one tenant 5,000 times, interleaved.
        for i in 0..10_000 {
            let other = format!("t{i}");
            top.record("q.3", [other.as_str()]);
            if i % 2 == 0 {
                top.record("q.3", ["flood"]);
            }
        }
        top.record("q.1", ["quiet"]);
        let shards = top.top();
        assert_eq!(shards[0].queue, "q.3");
        assert_eq!(shards[0].messages, 15_000);
        assert_eq!(shards[0].tenants[0].tenant_id, "flood");
        let flood = &shards[0].tenants[0];
        assert!(flood.messages - flood.overcount <= 5_000 && flood.messages >= 5_000);
        assert!(shards[0].tenants.len() <= LISTED);
        assert_eq!(shards[1].tenants[0].tenant_id, "quiet");
    }

    #[test]
    fn memory_is_bounded_per_shard() {
        let mut sketch = Sketch::default();
        for i in 0..100_000 {
            sketch.add(&format!("t{i}"));
        }
        assert_eq!(sketch.counts.len(), SLOTS);
        assert_eq!(sketch.total, 100_000);
    }
}
