//! A TCP proxy in front of Redis for one test's service: Redis sees that
//! service's connections come from the proxy's upstream sockets, so the test
//! can pick them out of `CLIENT LIST` (other tests share the Redis), drop
//! them with `CLIENT KILL ID`, and refuse new ones for a while.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use keel_shared::testing;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub(crate) struct RedisProxy {
    /// The Redis URL that goes through the proxy.
    pub url: String,
    /// Local ports of the proxy's open connections to Redis.
    upstream_ports: Arc<Mutex<HashSet<u16>>>,
    /// While set, new connections are closed at once (Redis unreachable).
    refusing: Arc<AtomicBool>,
    /// Connections closed at once so far.
    refused: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

/// One `CLIENT LIST` line as its fields.
pub(crate) type ClientInfo = HashMap<String, String>;

impl RedisProxy {
    pub(crate) async fn start() -> Self {
        let target = testing::redis_url();
        let (scheme, userinfo, host_port, rest) = split_url(&target);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("{scheme}{userinfo}{}{rest}", listener.local_addr().unwrap());
        let upstream_ports = Arc::new(Mutex::new(HashSet::new()));
        let refusing = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let (ports, refuse, closed) = (upstream_ports.clone(), refusing.clone(), refused.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    closed.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: closed
                }
                let Ok(mut outbound) = TcpStream::connect(&host_port).await else {
                    continue;
                };
                let port = outbound.local_addr().unwrap().port();
                ports.lock().unwrap().insert(port);
                let ports = ports.clone();
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    ports.lock().unwrap().remove(&port);
                });
            }
        });
        Self {
            url,
            upstream_ports,
            refusing,
            refused,
            accept,
        }
    }

    /// Refuse (true) or accept again (false) new connections.
    pub(crate) fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// How many connections were refused so far.
    pub(crate) fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// `CLIENT LIST` entries of the connections made through this proxy.
    pub(crate) async fn clients(&self) -> Vec<ClientInfo> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut admin().await)
            .await
            .expect("CLIENT LIST");
        let ports = self.upstream_ports.lock().unwrap().clone();
        list.lines()
            .map(|line| {
                line.split(' ')
                    .filter_map(|field| field.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<ClientInfo>()
            })
            .filter(|client| {
                client
                    .get("addr")
                    .and_then(|addr| addr.rsplit_once(':'))
                    .and_then(|(_, port)| port.parse::<u16>().ok())
                    .is_some_and(|port| ports.contains(&port))
            })
            .collect()
    }

    /// Those of them in pub/sub mode (`flags` has P).
    pub(crate) async fn pubsub_clients(&self) -> Vec<ClientInfo> {
        self.clients()
            .await
            .into_iter()
            .filter(|c| c.get("flags").is_some_and(|f| f.contains('P')))
            .collect()
    }

    /// `CLIENT KILL ID` for each of them; how many there were.
    pub(crate) async fn kill_pubsub_clients(&self) -> usize {
        let clients = self.pubsub_clients().await;
        let mut conn = admin().await;
        for client in &clients {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(&client["id"])
                .query_async(&mut conn)
                .await
                .expect("CLIENT KILL");
        }
        clients.len()
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A direct connection to the test Redis (not through any proxy).
pub(crate) async fn admin() -> redis::aio::MultiplexedConnection {
    redis::Client::open(testing::redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// `PUBSUB NUMSUB` of one channel.
pub(crate) async fn numsub(channel: &str) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut admin().await)
        .await
        .expect("PUBSUB NUMSUB");
    n
}

/// (`redis://`, `user:pass@` or "", `host:port`, `/db?...` or "").
fn split_url(url: &str) -> (String, String, String, String) {
    let (scheme, after) = url.split_once("://").expect("a redis:// URL");
    let end = after.find(['/', '?']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host.to_string()),
        None => (String::new(), authority.to_string()),
    };
    let host_port = if host_port.contains(':') {
        host_port
    } else {
        format!("{host_port}:6379")
    };
    (
        format!("{scheme}://"),
        userinfo,
        host_port,
        rest.to_string(),
    )
}
