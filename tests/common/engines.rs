//! Engines a test starts for itself next to the machine's own Redis and RabbitMQ: a Redis
//! Cluster, a Redis primary and replica under three sentinels, a Redis with TLS, and extra
//! RabbitMQ nodes (alone, with TLS, or clustered). Each lives in a temporary directory on
//! free loopback ports; dropping it stops its processes however the test ends and deletes
//! the directory (kept, and named on stderr, when KONSTRUCT_TEST_KEEP_ENGINES is set).
//! Every wait has a deadline; the slow ones are async, so a gate running in the same
//! runtime keeps working while a test reshards or fails over.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku};
use rcgen::{IsCa, Issuer, KeyPair, KeyUsagePurpose};

use super::unique;

/// A directory of the test's own, deleted on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("konstruct-{}", unique(label)));
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!(
                "cannot create {} ({e}): set TMPDIR to a writable directory.",
                path.display()
            );
        }
        Self(path)
    }

    fn sub(&self, name: impl ToString) -> PathBuf {
        let path = self.0.join(name.to_string());
        std::fs::create_dir_all(&path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KONSTRUCT_TEST_KEEP_ENGINES").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `n` distinct loopback ports that nothing listens on now (held together while picked).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.as_ref().unwrap().local_addr().unwrap().port())
        .collect()
}

/// Sleeps before the next try; panics with `what` and the last failure after `deadline`.
async fn retry(deadline: Instant, what: &str, last: &str) {
    assert!(
        Instant::now() < deadline,
        "gave up waiting for {what} (last check: {last})"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Runs a command to the end (killed after `within`): its stdout, or why it failed.
async fn run(cmd: &mut tokio::process::Command, within: Duration) -> Result<String, String> {
    let what = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = match tokio::time::timeout(within, cmd.output()).await {
        Err(_) => return Err(format!("{what} did not finish within {within:?}")),
        Ok(Err(e)) => return Err(format!("cannot run {what} ({e}): is it on PATH?")),
        Ok(Ok(out)) => out,
    };
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success();
    if ok {
        Ok(text)
    } else {
        Err(format!("{what}: {text}{stderr}"))
    }
}

/// A server the test started, stopped on drop: SIGKILL for Redis; for a RabbitMQ start
/// script SIGTERM (it stops the node cleanly in ~1–1.5 s), then, after 30 s, SIGKILL to the
/// script and to the Erlang VM named in the node's pid file.
struct Proc {
    port: u16,
    log: PathBuf,
    child: Child,
    rabbit_pid_file: Option<PathBuf>,
}

impl Proc {
    fn spawn(port: u16, cmd: &mut Command, log: PathBuf, rabbit_pid_file: Option<PathBuf>) -> Self {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {program} ({e}): install Redis 7 built with TLS and RabbitMQ 3.10+, or set KONSTRUCT_TEST_RABBITMQ_SBIN to the directory of RabbitMQ's scripts.")
        });
        Self {
            port,
            log,
            child,
            rabbit_pid_file,
        }
    }

    /// The end of its output, for failure messages (the directory goes with the test).
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid_file) = &self.rabbit_pid_file {
            let beam = std::fs::read_to_string(pid_file).ok();
            signal("TERM", &self.child.id().to_string());
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if let (Ok(None), Some(pid)) = (self.child.try_wait(), beam) {
                signal("KILL", pid.trim()); // the script still waits for it: the pid is its
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(name: &str, pid: &str) {
    let mut kill = Command::new("kill");
    let _ = kill
        .arg(format!("-{name}"))
        .arg(pid)
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------
// Redis

/// `redis-server` on 127.0.0.1:`port` (0: none), in the foreground, without persistence.
fn redis_command(port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--save", "", "--dir"])
        .arg(dir);
    cmd.args("--bind 127.0.0.1 --appendonly no --repl-diskless-sync-delay 0".split(' '));
    cmd
}

/// `redis-cli -h 127.0.0.1 -p port ARGS`. It exits 0 on error replies: callers check the text.
async fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    run(&mut cmd, Duration::from_secs(10)).await
}

/// Waits for PONG (`options` such as `--tls` go first).
async fn wait_pong(process: &Proc, options: &[&str]) {
    let args: Vec<&str> = options.iter().copied().chain(["ping"]).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let last = match redis_cli(process.port, &args).await {
            Ok(out) if out.trim() == "PONG" => return,
            Ok(out) | Err(out) => out,
        };
        if Instant::now() > deadline {
            let (port, log) = (process.port, process.tail());
            panic!("redis-server on port {port} did not answer PING ({last}); its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// Flagged `fail`: the primaries agree that it is down.
    pub failed: bool,
    pub primary_id: Option<String>,
    /// Inclusive slot ranges it serves (primaries only).
    pub slots: Vec<(u16, u16)>,
}

fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    let range = |s: &str| -> Option<(u16, u16)> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        Some((a.parse().ok()?, b.parse().ok()?)) // None for "[slot->-id]" (migrating)
    };
    let node = |line: &str| -> Option<ClusterNode> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let address = f.get(1)?.split('@').next()?;
        Some(ClusterNode {
            id: f[0].to_owned(),
            port: address.rsplit(':').next()?.parse().ok()?,
            primary: f.get(2)?.contains("master"),
            failed: f[2].split(',').any(|flag| flag == "fail"),
            primary_id: f.get(3).filter(|id| **id != "-").map(|id| id.to_string()),
            slots: f.iter().skip(8).filter_map(|&s| range(s)).collect(),
        })
    };
    text.lines().filter_map(node).collect()
}

fn owner(nodes: &[ClusterNode], slot: u16) -> Option<ClusterNode> {
    let serves = |n: &&ClusterNode| n.slots.iter().any(|&(a, b)| a <= slot && slot <= b);
    let mut primaries = nodes.iter().filter(|n| n.primary && !n.failed);
    primaries.find(serves).cloned()
}

/// A Redis Cluster of primaries × (1 + replicas) `redis-server` children, with a 2-second
/// `cluster-node-timeout`, so a killed primary's replica takes over in 3–4 s.
pub struct RedisCluster {
    /// None once killed.
    nodes: Vec<Option<Proc>>,
    /// Replicas that should be attached: one less for every primary killed.
    expected_replicas: usize,
    dir: TempDir,
}

impl RedisCluster {
    /// ~2.5 s for 3 × 2 nodes.
    pub async fn start(primaries: usize, replicas_per_primary: usize) -> Self {
        assert!(primaries >= 3, "a Redis Cluster needs at least 3 primaries");
        let dir = TempDir::new("redis-cluster");
        let mut nodes = Vec::new();
        // The bus port is explicit: port + 10000 may be taken, or above 65535.
        for pair in free_ports(2 * primaries * (1 + replicas_per_primary)).chunks(2) {
            let (port, bus, node_dir) = (pair[0], pair[1].to_string(), dir.sub(pair[0]));
            let mut cmd = redis_command(port, &node_dir);
            cmd.args(["--cluster-enabled", "yes", "--cluster-port", &bus]);
            cmd.args(["--cluster-node-timeout", "2000", "--cluster-config-file"]);
            cmd.arg(node_dir.join("nodes.conf"));
            nodes.push(Some(Proc::spawn(
                port,
                &mut cmd,
                node_dir.join("log"),
                None,
            )));
        }
        let expected_replicas = primaries * replicas_per_primary;
        let cluster = Self {
            nodes,
            expected_replicas,
            dir,
        };
        for node in cluster.nodes.iter().flatten() {
            wait_pong(node, &[]).await;
        }
        let replicas = replicas_per_primary.to_string();
        let mut create = tokio::process::Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        create.args(
            cluster
                .live_ports()
                .iter()
                .map(|p| format!("127.0.0.1:{p}")),
        );
        create.args(["--cluster-replicas", &replicas, "--cluster-yes"]);
        if let Err(e) = run(&mut create, Duration::from_secs(60)).await {
            panic!("redis-cli --cluster create failed (it needs Redis 5 or later): {e}");
        }
        cluster.wait_ok(Duration::from_secs(30)).await;
        cluster
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes.iter().flatten().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:P` of every node not killed.
    pub fn seed_urls(&self) -> Vec<String> {
        let urls = self
            .live_ports()
            .into_iter()
            .map(|p| format!("redis://127.0.0.1:{p}"));
        urls.collect()
    }

    /// The cluster as a running node sees it (`CLUSTER NODES`): ids for `reshard`.
    pub async fn nodes(&self) -> Vec<ClusterNode> {
        let text = redis_cli(self.live_ports()[0], &["cluster", "nodes"]).await;
        parse_cluster_nodes(&text.unwrap_or_else(|e| panic!("{e}")))
    }

    /// `CLUSTER KEYSLOT key` (hash tags included).
    pub async fn keyslot(&self, key: &str) -> u16 {
        let out = redis_cli(self.live_ports()[0], &["cluster", "keyslot", key]).await;
        let slot = out.as_deref().map(|o| o.trim().parse());
        match slot {
            Ok(Ok(slot)) => slot,
            _ => panic!("CLUSTER KEYSLOT answered {out:?}"),
        }
    }

    /// The primary that serves `key` now.
    pub async fn owner_of_key(&self, key: &str) -> ClusterNode {
        let slot = self.keyslot(key).await;
        owner(&self.nodes().await, slot).unwrap_or_else(|| panic!("no primary serves {slot}"))
    }

    /// Moves `slots` slots and their keys from primary `from` (all primaries when None) to
    /// primary `to` (node ids) with `redis-cli --cluster reshard`, then waits for agreement.
    /// 1500 slots: under 1 s idle, 5–7 s under a write load.
    pub async fn reshard(&self, from: Option<&str>, to: &str, slots: usize) {
        let (seed, slots) = (
            format!("127.0.0.1:{}", self.live_ports()[0]),
            slots.to_string(),
        );
        let mut cmd = tokio::process::Command::new("redis-cli");
        cmd.args(["--cluster", "reshard", &seed, "--cluster-to", to]);
        cmd.args([
            "--cluster-from",
            from.unwrap_or("all"),
            "--cluster-slots",
            &slots,
        ]);
        cmd.args(["--cluster-yes", "--cluster-pipeline", "100"]);
        if let Err(e) = run(&mut cmd, Duration::from_secs(180)).await {
            panic!("redis-cli --cluster reshard failed: {e}");
        }
        self.wait_ok(Duration::from_secs(30)).await;
    }

    /// SIGKILLs the primary serving `key`; returns it once one of its replicas serves the
    /// key's slot and the cluster is healthy again (3–4 s).
    pub async fn kill_primary_owning(&mut self, key: &str) -> ClusterNode {
        let (slot, before) = (self.keyslot(key).await, self.nodes().await);
        let victim = owner(&before, slot).unwrap_or_else(|| panic!("no primary serves {slot}"));
        let its = Some(victim.id.as_str());
        if before
            .iter()
            .any(|n| !n.failed && n.primary_id.as_deref() == its)
        {
            self.expected_replicas -= 1;
        }
        for node in &mut self.nodes {
            if node.as_ref().is_some_and(|n| n.port == victim.port) {
                *node = None; // dropped: SIGKILL
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = owner(&self.nodes().await, slot).map(|n| n.port);
            if now.is_some_and(|port| port != victim.port) {
                break;
            }
            let what = format!("a replica taking slot {slot} over from {}", victim.port);
            retry(deadline, &what, &format!("served by {now:?}")).await;
        }
        self.wait_ok(Duration::from_secs(30)).await;
        victim
    }

    /// Waits until every running node says cluster_state:ok with all 16384 slots, all agree
    /// on who serves which slots, and every replica is attached and in sync.
    pub async fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while let Err(e) = self.check_ok().await {
            retry(deadline, "a healthy Redis Cluster", &e).await;
        }
    }

    async fn check_ok(&self) -> Result<(), String> {
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        let mut maps = Vec::new();
        for port in self.live_ports() {
            let info = redis_cli(port, &["cluster", "info"]).await?;
            for want in ["cluster_state:ok", "cluster_slots_ok:16384", known.as_str()] {
                if !info.lines().any(|l| l.trim() == want) {
                    return Err(format!("{port} lacks {want}"));
                }
            }
            let view = parse_cluster_nodes(&redis_cli(port, &["cluster", "nodes"]).await?);
            let replicas = view.iter().filter(|n| !n.primary && !n.failed).count();
            if replicas != self.expected_replicas {
                return Err(format!("{port} sees {replicas} replicas"));
            }
            let primaries = view.iter().filter(|n| n.primary && !n.failed);
            let map = primaries.flat_map(|n| n.slots.iter().map(move |s| (*s, n.port)));
            let mut map: Vec<_> = map.collect();
            map.sort_unstable();
            maps.push(map);
            if view.iter().any(|n| n.port == port && !n.primary) {
                let replication = redis_cli(port, &["info", "replication"]).await?;
                if !replication.contains("master_link_status:up") {
                    return Err(format!("replica {port} is not in sync yet"));
                }
            }
        }
        if maps.windows(2).any(|w| w[0] != w[1]) {
            return Err("the nodes disagree about who serves which slots".into());
        }
        Ok(())
    }
}

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "mymaster";

/// A primary, its replica and three sentinels (quorum 2, down-after 1 s, failover-timeout 5 s).
pub struct RedisSentinel {
    /// The two servers: the first starts as the primary, the second as its replica.
    pub redis_ports: [u16; 2],
    pub sentinel_ports: [u16; 3],
    processes: Vec<Proc>,
    dir: TempDir,
}

impl RedisSentinel {
    /// 2–3 s: the sentinels find each other through hello messages every 2 s.
    pub async fn start() -> Self {
        let dir = TempDir::new("redis-sentinel");
        let p = free_ports(5);
        let (redis_ports, sentinel_ports) = ([p[0], p[1]], [p[2], p[3], p[4]]);
        let mut processes = Vec::new();
        for port in redis_ports {
            let mut cmd = redis_command(port, &dir.sub(port));
            if port != p[0] {
                cmd.args(["--replicaof", "127.0.0.1", &p[0].to_string()]);
            }
            processes.push(Proc::spawn(port, &mut cmd, dir.sub(port).join("log"), None));
        }
        // Sentinels started before the replica is in sync learn of it only from their next
        // INFO to the primary, 10 s later.
        let deadline = Instant::now() + Duration::from_secs(15);
        for process in &processes {
            wait_pong(process, &[]).await;
        }
        loop {
            let info = redis_cli(p[1], &["info", "replication"])
                .await
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                break;
            }
            retry(deadline, "the replica in sync", &info).await;
        }
        for port in sentinel_ports {
            let (d, m) = (dir.sub(port), MASTER_NAME);
            // Each sentinel rewrites its own file.
            let conf = format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {m} 127.0.0.1 {} 2\nsentinel down-after-milliseconds {m} 1000\nsentinel failover-timeout {m} 5000\n",
                d.display(),
                p[0]
            );
            std::fs::write(d.join("sentinel.conf"), conf).unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.arg(d.join("sentinel.conf")).arg("--sentinel");
            processes.push(Proc::spawn(port, &mut cmd, d.join("log"), None));
        }
        let sentinel = Self {
            redis_ports,
            sentinel_ports,
            processes,
            dir,
        };
        for process in &sentinel.processes[2..] {
            wait_pong(process, &[]).await;
        }
        sentinel.wait_settled(Duration::from_secs(30)).await;
        sentinel
    }

    pub fn sentinel_urls(&self) -> Vec<String> {
        let urls = self
            .sentinel_ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"));
        urls.collect()
    }

    /// The primary's port, as the first sentinel names it.
    pub async fn primary_port(&self) -> u16 {
        let port = sentinel_primary(self.sentinel_ports[0]).await;
        port.unwrap_or_else(|e| panic!("{e}"))
    }

    /// `SENTINEL FAILOVER`: returns the new primary's port once all three sentinels name it
    /// and it says it is a primary (~1.2 s). The old primary goes on answering as a primary
    /// for ~10 s, until a sentinel's periodic INFO finds it and demotes it.
    pub async fn failover(&self) -> u16 {
        // A sentinel whose view of the last failover is still stale would undo this one.
        self.wait_settled(Duration::from_secs(60)).await;
        let old = self.primary_port().await;
        let new = self.redis_ports.into_iter().find(|&p| p != old).unwrap();
        let command = ["sentinel", "failover", MASTER_NAME];
        let reply = redis_cli(self.sentinel_ports[0], &command).await;
        assert_eq!(
            reply.as_deref().map(str::trim),
            Ok("OK"),
            "SENTINEL FAILOVER"
        );
        self.wait_promoted(new, &format!("the failover from {old} to {new}"))
            .await
    }

    /// SIGKILLs the primary; returns the replica's port once every sentinel names it and
    /// it answers as the primary (the sentinels notice after `down-after-milliseconds`).
    pub async fn kill_primary(&mut self) -> u16 {
        self.wait_settled(Duration::from_secs(60)).await;
        let old = self.primary_port().await;
        let new = self.redis_ports.into_iter().find(|&p| p != old).unwrap();
        let primary = self.processes.iter_mut().find(|p| p.port == old);
        let primary = primary.expect("the primary is one of the test's servers");
        let _ = primary.child.kill();
        let _ = primary.child.wait();
        let what = format!("the sentinels promoting {new} after {old} was killed");
        self.wait_promoted(new, &what).await
    }

    /// Waits (30 s at most) until every sentinel names `new` and it answers as the
    /// primary; returns `new`.
    async fn wait_promoted(&self, new: u16, what: &str) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut named = Vec::new();
            for sentinel in self.sentinel_ports {
                named.push(sentinel_primary(sentinel).await);
            }
            let role = redis_cli(new, &["role"]).await.unwrap_or_default();
            if named.iter().all(|p| *p == Ok(new)) && role.starts_with("master\n") {
                return new;
            }
            let state = format!("sentinels name {named:?}; {role:?}");
            retry(deadline, what, &state).await;
        }
    }

    /// Waits until the sentinels agree on the primary, know each other, and have seen the
    /// other server as its in-sync replica: at once after start; ~20 s after a failover.
    pub async fn wait_settled(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while let Err(e) = self.check_settled().await {
            retry(deadline, "settled sentinels", &e).await;
        }
    }

    async fn check_settled(&self) -> Result<(), String> {
        let primary = sentinel_primary(self.sentinel_ports[0]).await?;
        let replica = self.redis_ports.into_iter().find(|&p| p != primary);
        let (primary, replica) = (
            primary.to_string(),
            replica.ok_or("no primary")?.to_string(),
        );
        for s in self.sentinel_ports {
            let master = redis_cli(s, &["sentinel", "master", MASTER_NAME]).await?;
            check_fields(
                s,
                &master,
                &[("port", primary.as_str()), ("num-other-sentinels", "2")],
            )?;
            let replicas = redis_cli(s, &["sentinel", "replicas", MASTER_NAME]).await?;
            let wants = [
                ("port", replica.as_str()),
                ("flags", "slave"),
                ("role-reported", "slave"),
            ];
            check_fields(s, &replicas, &wants)?;
            check_fields(
                s,
                &replicas,
                &[
                    ("master-link-status", "ok"),
                    ("master-port", primary.as_str()),
                ],
            )?;
        }
        Ok(())
    }
}

async fn sentinel_primary(sentinel: u16) -> Result<u16, String> {
    let command = ["sentinel", "get-master-addr-by-name", MASTER_NAME];
    let out = redis_cli(sentinel, &command).await?;
    let port = out.lines().nth(1).and_then(|p| p.trim().parse().ok());
    port.ok_or_else(|| format!("sentinel {sentinel} named the primary {out:?}"))
}

/// Checks `key value` pairs in redis-cli's flat output of a sentinel's reply.
fn check_fields(sentinel: u16, text: &str, wants: &[(&str, &str)]) -> Result<(), String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for (key, want) in wants {
        let pair = lines.chunks(2).find(|pair| pair[0] == *key);
        let found = pair.and_then(|pair| pair.get(1));
        if found != Some(want) {
            return Err(format!(
                "sentinel {sentinel}: {key} is {found:?}, not {want}"
            ));
        }
    }
    Ok(())
}

/// PEM files made with rcgen: a CA, a server certificate for localhost and 127.0.0.1, a
/// client certificate, an unrelated CA, and an expired client certificate (January 2020).
pub struct TestCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting it instead of `ca` must fail.
    pub other_ca: PathBuf,
    /// Signed by `ca`, valid from 2020-01-01 to 2020-01-02.
    pub expired_client_cert: PathBuf,
    pub expired_client_key: PathBuf,
}

impl TestCerts {
    pub fn generate(dir: &Path) -> Self {
        let write = |name: &str, pem: String| {
            std::fs::write(dir.join(name), pem).unwrap();
            dir.join(name)
        };
        let (ca_pem, ca) = new_ca("konstruct test CA");
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (server_cert, server_key) = leaf(&ca, names, Eku::ServerAuth, false);
        let (client_cert, client_key) = leaf(&ca, vec![], Eku::ClientAuth, false);
        let (expired_cert, expired_key) = leaf(&ca, vec![], Eku::ClientAuth, true);
        Self {
            ca: write("ca.pem", ca_pem),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            other_ca: write("other-ca.pem", new_ca("unrelated test CA").0),
            expired_client_cert: write("expired-client.pem", expired_cert),
            expired_client_key: write("expired-client.key", expired_key),
        }
    }
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name); // unlike the leaves' name
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(params, key))
}

/// A certificate signed by `ca` and its PKCS#8 key, both PEM.
fn leaf(
    ca: &Issuer<'static, KeyPair>,
    names: Vec<String>,
    eku: Eku,
    expired: bool,
) -> (String, String) {
    let mut params = CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "konstruct test");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    }
    let key = KeyPair::generate().unwrap();
    let pem = params.signed_by(&key, ca).unwrap().pem();
    (pem, key.serialize_pem())
}

/// A Redis that speaks only TLS (`--port 0 --tls-port P`), with certificates from `certs`.
pub struct TlsRedis {
    pub port: u16,
    pub certs: TestCerts,
    process: Proc,
    dir: TempDir,
}

impl TlsRedis {
    /// ~0.1 s.
    pub async fn start(require_client_cert: bool) -> Self {
        let dir = TempDir::new("redis-tls");
        let certs = TestCerts::generate(&dir.0);
        let port = free_ports(1)[0];
        let mut cmd = redis_command(0, &dir.0);
        cmd.arg("--tls-port").arg(port.to_string());
        cmd.arg("--tls-cert-file").arg(&certs.server_cert);
        cmd.arg("--tls-key-file").arg(&certs.server_key);
        cmd.arg("--tls-ca-cert-file").arg(&certs.ca);
        let auth = if require_client_cert { "yes" } else { "no" };
        cmd.args(["--tls-auth-clients", auth]);
        let process = Proc::spawn(port, &mut cmd, dir.0.join("log"), None);
        let c = &certs;
        let paths = [&c.ca, &c.client_cert, &c.client_key].map(|p| p.display().to_string());
        let [ca, cert, key] = paths.each_ref().map(String::as_str);
        wait_pong(
            &process,
            &["--tls", "--cacert", ca, "--cert", cert, "--key", key],
        )
        .await;
        Self {
            port,
            certs,
            process,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

// ---------------------------------------------------------------------------------------
// RabbitMQ

/// A RabbitMQ script: in KONSTRUCT_TEST_RABBITMQ_SBIN, else Debian's real scripts (its
/// /usr/sbin wrappers `su` to the rabbitmq user and reset HOME), else on PATH.
fn rabbit_script(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("KONSTRUCT_TEST_RABBITMQ_SBIN") {
        return PathBuf::from(dir).join(name);
    }
    let debian = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if debian.exists() { debian } else { name.into() }
}

/// A HOME for test nodes and their CLI: a private Erlang cookie (so they can never reach
/// the machine's node, nor it them), an empty rabbitmq-env.conf and no plugins.
fn prepare_rabbit_home(home: &Path) {
    use std::hash::BuildHasher;
    use std::os::unix::fs::PermissionsExt;
    let random = || std::collections::hash_map::RandomState::new().hash_one(unique("cookie"));
    let cookie = home.join(".erlang.cookie");
    std::fs::write(&cookie, format!("{:016X}{:016X}", random(), random())).unwrap();
    std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
    std::fs::write(home.join("rabbitmq-env.conf"), "").unwrap();
    std::fs::write(home.join("enabled_plugins"), "[].\n").unwrap();
}

/// An extra RabbitMQ node, `NAME@localhost`, run by the test as the current user.
pub struct RabbitNode {
    pub name: String,
    pub amqp_port: u16,
    pub amqps_port: Option<u16>,
    pub certs: Option<TestCerts>,
    dist_port: u16,
    home: PathBuf,
    dir: PathBuf,
    process: Option<Proc>,
    own_dir: Option<TempDir>, // after `process`: deleted once the node has stopped
}

impl RabbitNode {
    /// A node with a plain AMQP listener (~4–5 s).
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A node with plain and TLS listeners (`verify_peer`; `fail_if_no_peer_cert` as asked).
    pub async fn start_tls(require_client_cert: bool) -> Self {
        Self::start_with(Some(require_client_cert)).await
    }

    async fn start_with(tls: Option<bool>) -> Self {
        let dir = TempDir::new("rabbit");
        prepare_rabbit_home(&dir.0);
        let tls = tls.map(|require| (TestCerts::generate(&dir.0), require));
        let mut node = Self::new(&dir.0, format!("{}@localhost", unique("rabbit")), tls);
        node.own_dir = Some(dir);
        node.start_again().await;
        node
    }

    fn new(home: &Path, name: String, tls: Option<(TestCerts, bool)>) -> Self {
        let ports = free_ports(3);
        let dir = home.join(name.split('@').next().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{}\n", ports[0]);
        if let Some((c, require)) = &tls {
            let (ca, cert, key) = (
                c.ca.display(),
                c.server_cert.display(),
                c.server_key.display(),
            );
            conf += &format!(
                "listeners.ssl.local = 127.0.0.1:{}\nssl_options.cacertfile = {ca}\nssl_options.certfile = {cert}\nssl_options.keyfile = {key}\nssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = {require}\n",
                ports[2]
            );
        }
        std::fs::write(dir.join("rabbit.conf"), conf).unwrap();
        let (amqp_port, dist_port, home) = (ports[0], ports[1], home.to_owned());
        let (amqps_port, certs) = (tls.is_some().then_some(ports[2]), tls.map(|t| t.0));
        let (process, own_dir) = (None, None);
        Self {
            name,
            amqp_port,
            amqps_port,
            certs,
            dist_port,
            home,
            dir,
            process,
            own_dir,
        }
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    pub fn amqps_url(&self) -> String {
        let port = self
            .amqps_port
            .expect("a TLS listener (RabbitNode::start_tls)");
        format!("amqps://guest:guest@127.0.0.1:{port}/%2f")
    }

    /// A RabbitMQ script with the environment of this node's CLI.
    fn script(&self, name: &str) -> Command {
        let mut cmd = Command::new(rabbit_script(name));
        cmd.env("HOME", &self.home); // where the cookie is
        cmd.env(
            "RABBITMQ_CONF_ENV_FILE",
            self.home.join("rabbitmq-env.conf"),
        );
        cmd.env(
            "RABBITMQ_ENABLED_PLUGINS_FILE",
            self.home.join("enabled_plugins"),
        );
        cmd
    }

    /// Starts the node again on the same ports and data (a cluster member rejoins; ~4 s).
    pub async fn start_again(&mut self) {
        assert!(self.process.is_none(), "{} is already running", self.name);
        let (d, mut cmd) = (&self.dir, self.script("rabbitmq-server"));
        cmd.env("RABBITMQ_NODENAME", &self.name);
        cmd.env("RABBITMQ_NODE_PORT", self.amqp_port.to_string());
        cmd.env("RABBITMQ_DIST_PORT", self.dist_port.to_string());
        cmd.env("RABBITMQ_CONFIG_FILE", d.join("rabbit.conf"));
        cmd.env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"));
        cmd.env("RABBITMQ_MNESIA_BASE", d.join("mnesia"));
        cmd.env("RABBITMQ_LOG_BASE", d.join("log"));
        cmd.env("RABBITMQ_PLUGINS_EXPAND_DIR", d.join("plugins-expand"));
        cmd.env("RABBITMQ_PID_FILE", d.join("pid"));
        let erl_args = "-kernel inet_dist_use_interface {127,0,0,1}";
        cmd.env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", erl_args);
        let log = d.join("stdout.log");
        let process = Proc::spawn(self.amqp_port, &mut cmd, log, Some(d.join("pid")));
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(120);
        // Booting takes 4 s or more; each check starts a CLI VM, which a booting node feels.
        tokio::time::sleep(Duration::from_secs(2)).await;
        loop {
            let process = self.process.as_mut().unwrap();
            if let Ok(Some(status)) = process.child.try_wait() {
                let (name, log) = (&self.name, process.tail());
                panic!("RabbitMQ node {name} exited while starting ({status}):\n{log}");
            }
            // This fails at once (~0.5 s) until the node has registered with epmd.
            let Err(e) = self.ctl(&["await_startup", "--timeout", "5"]).await else {
                return;
            };
            retry(deadline, &format!("RabbitMQ node {} up", self.name), &e).await;
        }
    }

    /// `rabbitmqctl -n NODE ARGS`: its output.
    pub async fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = tokio::process::Command::from(self.script("rabbitmqctl"));
        cmd.args(["-n", &self.name]).args(args);
        run(&mut cmd, Duration::from_secs(90)).await
    }

    /// A clean stop: SIGTERM to the start script, which stops the node (~1–1.5 s).
    pub async fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            let _ = tokio::task::spawn_blocking(move || drop(process)).await;
        }
    }
}

/// `n` nodes sharing a cookie, nodes 2..n joined to node 1. Three nodes on 2 cores: 5–11 s
/// to boot in parallel (depending on load), ~3 s to join.
pub struct RabbitCluster {
    pub nodes: Vec<RabbitNode>,
    dir: TempDir,
}

impl RabbitCluster {
    pub async fn start(n: usize) -> Self {
        Self::start_with_plugins(n, &[]).await
    }

    /// `n` nodes with `plugins` enabled (e.g. `rabbitmq_consistent_hash_exchange`).
    pub async fn start_with_plugins(n: usize, plugins: &[&str]) -> Self {
        let dir = TempDir::new("rabbit-cluster");
        prepare_rabbit_home(&dir.0);
        let enabled = format!("[{}].\n", plugins.join(","));
        std::fs::write(dir.0.join("enabled_plugins"), enabled).unwrap();
        let base = unique("rabbit");
        let new = |i| RabbitNode::new(&dir.0, format!("{base}-{i}@localhost"), None);
        let nodes = (1..=n).map(new).collect();
        let mut cluster = Self { nodes, dir };
        let starting = cluster.nodes.iter_mut().map(RabbitNode::start_again);
        futures::future::join_all(starting).await;
        let first = cluster.nodes[0].name.clone();
        let steps: [&[&str]; 3] = [&["stop_app"], &["join_cluster", &first], &["start_app"]];
        for node in &cluster.nodes[1..] {
            for step in &steps {
                if let Err(e) = node.ctl(step).await {
                    panic!("{step:?} on {} (joining {first}) failed: {e}", node.name);
                }
            }
        }
        cluster.wait_running(n, Duration::from_secs(60)).await;
        cluster
    }

    pub fn amqp_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitNode::amqp_url).collect()
    }

    /// Waits until `cluster_status`, asked of a node the test has not stopped, lists `n`
    /// running nodes.
    pub async fn wait_running(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let last = match self.running_nodes().await {
                Ok(names) if names.len() == n => return,
                Ok(names) => format!("{names:?}"),
                Err(e) => e,
            };
            retry(deadline, &format!("{n} running RabbitMQ nodes"), &last).await;
        }
    }

    async fn running_nodes(&self) -> Result<Vec<serde_json::Value>, String> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.process.is_some())
            .ok_or("none running")?;
        let json = node.ctl(&["cluster_status", "--formatter", "json"]).await?;
        let status = serde_json::from_str::<serde_json::Value>(&json);
        let names = status.map(|s| s["running_nodes"].as_array().cloned());
        names
            .ok()
            .flatten()
            .ok_or(format!("no running_nodes in {json}"))
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        // All nodes stop at once, each in its own thread, before the directory goes.
        std::thread::scope(|scope| {
            for process in self.nodes.iter_mut().filter_map(|n| n.process.take()) {
                scope.spawn(move || drop(process));
            }
        });
    }
}
