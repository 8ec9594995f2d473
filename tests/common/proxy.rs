//! A TCP proxy that can fail silently: `freeze` stops forwarding on every connection it
//! already has, in both directions, without closing any (no FIN, no RST), while new
//! connections pass as before. That is what an expired NAT entry, a dead node behind a
//! virtual IP or a frozen VM look like to the client: a connection that says nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct FreezingProxy {
    pub addr: SocketAddr,
    /// Connections numbered below this are frozen.
    frozen_below: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl FreezingProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::start_at("127.0.0.1", upstream).await
    }

    /// Listens on a free port of `ip` (any of 127.0.0.0/8 on Linux) instead.
    pub async fn start_at(ip: &str, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen_below, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (freeze, count, stopping) = (frozen_below.clone(), accepted.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                    _ = stopping.cancelled() => return,
                };
                let number = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                    tokio::spawn(forward(
                        from,
                        to,
                        number,
                        freeze.subscribe(),
                        stopping.clone(),
                    ));
                }
            }
        });
        Self {
            addr,
            frozen_below,
            accepted,
            stop,
        }
    }

    /// Every connection made so far goes silent, for good; later ones pass.
    pub fn freeze(&self) {
        self.frozen_below
            .send_replace(self.accepted.load(Ordering::SeqCst));
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies `from` to `to` until either ends, or until connection `number` is frozen: then
/// holds both halves open, reading and writing nothing, until the proxy stops.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: u64,
    mut frozen_below: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let frozen = |below: &watch::Receiver<u64>| number < *below.borrow();
    loop {
        if frozen(&frozen_below) {
            break;
        }
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // Read before the freeze but not yet passed on: dropped, as a dead path
                // drops it.
                if frozen(&frozen_below) {
                    break;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = frozen_below.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.cancelled() => return,
        }
    }
    // Silent: both halves stay open until the proxy is dropped.
    stop.cancelled().await;
    drop((from, to));
}
