//! The Redis pool. Redis is not needed to start: it may be down at start-up and
//! callers treat its errors as UNAVAILABLE, so building the pool never waits.
//! `rediss://` URLs connect over TLS (rustls), trusting the CA(s) in
//! `KEEL_REDIS_CA_FILE` when set, the system's roots otherwise.
//!
//! `REDIS_URL` may also name a Redis Cluster (`redis+cluster://h1:p1,h2:p2`,
//! `rediss+cluster://` for TLS). Then [`Pool`] hands out one multiplexed
//! cluster connection (redis-rs `cluster-async`: it follows the slot map,
//! MOVED/ASK and failovers itself, so a pool of them would add nothing) and
//! splits a pipeline whose commands live in different slots into one
//! pipeline per slot. Every multi-key command Keel sends stays in one slot
//! (see [`crate::queue`]).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Manager, PoolError, Runtime, TimeoutType};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::StartupError;
use crate::config::RedisConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn invalid(var: &'static str, reason: impl Into<String>) -> StartupError {
    StartupError::InvalidVar {
        var,
        reason: reason.into(),
    }
}

/// The node URLs of a cluster-form `REDIS_URL`
/// (`redis+cluster://[userinfo@]host1:port1,host2:port2[/path][?query]`,
/// `rediss+cluster://` for TLS): one `redis://` (`rediss://`) URL per node,
/// each with the userinfo, path and query. None for any other URL.
pub fn cluster_nodes(url: &str) -> Result<Option<Vec<String>>, String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Ok(None);
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|host| format!("{scheme}://{userinfo}{host}{tail}"))
        .collect();
    if nodes.is_empty() {
        return Err("a cluster URL names no node (redis+cluster://host1:port1,host2:port2)".into());
    }
    Ok(Some(nodes))
}

/// The PEM of `KEEL_REDIS_CA_FILE` (None when unset), checked to hold a
/// certificate and to go with TLS URLs only.
fn ca_pem(cfg: &RedisConfig, tls: bool) -> Result<Option<Vec<u8>>, StartupError> {
    let Some(ca_file) = cfg.redis_ca_file.as_deref() else {
        return Ok(None);
    };
    if !tls {
        return Err(invalid(
            "KEEL_REDIS_CA_FILE",
            "set, but REDIS_URL is not a rediss:// URL",
        ));
    }
    let pem = std::fs::read(ca_file).map_err(|e| {
        invalid(
            "KEEL_REDIS_CA_FILE",
            format!("cannot read {}: {e}", ca_file.display()),
        )
    })?;
    // Fails early on a file holding no certificate, which redis-rs would
    // only notice when connecting.
    crate::tls::roots(Some(ca_file)).map_err(|reason| invalid("KEEL_REDIS_CA_FILE", reason))?;
    Ok(Some(pem))
}

fn is_tls(url: &str) -> bool {
    url.starts_with("rediss://") || url.starts_with("valkeys://")
}

fn install_crypto_provider() {
    // redis-rs builds its rustls config from the process's default crypto
    // provider; name ours (ring) so that another crate enabling a second
    // provider in rustls cannot leave it without one.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn single_client(url: &str, ca: Option<Vec<u8>>) -> Result<redis::Client, StartupError> {
    let Some(pem) = ca else {
        return redis::Client::open(url).map_err(|e| invalid("REDIS_URL", e.to_string()));
    };
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(|e| invalid("REDIS_URL", e.to_string()))
}

/// A client for `cfg`'s URL, with its CA file when one is set: the one
/// server's, or for a cluster URL its first node's. Every Redis connection
/// (pool, pub/sub, stream readers) is made from one of these or a
/// [`Client`].
pub fn client(cfg: &RedisConfig) -> Result<redis::Client, StartupError> {
    Client::open(cfg)?
        .node_clients()
        .into_iter()
        .next()
        .ok_or_else(|| invalid("REDIS_URL", "names no node"))
}

/// What connections to `REDIS_URL` are made from: one server's client, or a
/// cluster's node URLs (and CA) from which cluster clients are built.
#[derive(Clone)]
pub enum Client {
    Single(redis::Client),
    Cluster(ClusterNodes),
}

/// A Redis Cluster as `REDIS_URL` names it.
#[derive(Clone)]
pub struct ClusterNodes {
    nodes: Vec<String>,
    ca: Option<Vec<u8>>,
    clients: Vec<redis::Client>,
}

impl ClusterNodes {
    /// A cluster client; `response_timeout` bounds each command's wait.
    fn client(&self, response_timeout: Option<Duration>) -> RedisResult<ClusterClient> {
        let mut builder =
            ClusterClientBuilder::new(self.nodes.clone()).connection_timeout(CONNECT_TIMEOUT);
        if let Some(timeout) = response_timeout {
            builder = builder.response_timeout(timeout);
        }
        if let Some(pem) = &self.ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        builder.build()
    }
}

impl Client {
    /// Checks `cfg` (URL form, CA file) without connecting.
    pub fn open(cfg: &RedisConfig) -> Result<Self, StartupError> {
        install_crypto_provider();
        let url = cfg.redis_url.as_str();
        match cluster_nodes(url).map_err(|reason| invalid("REDIS_URL", reason))? {
            None => Ok(Self::Single(single_client(url, ca_pem(cfg, is_tls(url))?)?)),
            Some(nodes) => {
                let ca = ca_pem(cfg, nodes.iter().all(|n| is_tls(n)))?;
                let clients = nodes
                    .iter()
                    .map(|node| single_client(node, ca.clone()))
                    .collect::<Result<Vec<_>, _>>()?;
                let cluster = ClusterNodes { nodes, ca, clients };
                // Checks the node URLs as redis-rs reads them.
                cluster
                    .client(None)
                    .map_err(|e| invalid("REDIS_URL", e.to_string()))?;
                Ok(Self::Cluster(cluster))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A client per node `REDIS_URL` names (one for a single server). Pub/sub
    /// uses these: a cluster broadcasts every PUBLISH to all of its nodes, so
    /// a subscriber on any node hears every channel; on failure it moves to
    /// the next node.
    pub fn node_clients(&self) -> Vec<redis::Client> {
        match self {
            Self::Single(client) => vec![client.clone()],
            Self::Cluster(cluster) => cluster.clients.clone(),
        }
    }

    /// A connection of its own (not from the pool), each command waiting up
    /// to `response_timeout`: for blocking reads.
    pub async fn dedicated(&self, response_timeout: Duration) -> RedisResult<Connection> {
        match self {
            Self::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response_timeout));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Connection(Conn::Dedicated(conn)))
            }
            Self::Cluster(cluster) => {
                let client = cluster.client(Some(response_timeout))?;
                let conn = tokio::time::timeout(CONNECT_TIMEOUT * 2, client.get_async_connection())
                    .await
                    .map_err(|_| {
                        redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "connecting to the cluster timed out",
                        ))
                    })??;
                Ok(Connection(Conn::Cluster(conn)))
            }
        }
    }
}

/// The pool every Redis user takes connections from: a deadpool of
/// connections to one server, or the one cluster connection.
#[derive(Clone)]
pub enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(ClusterPool),
}

/// The shared multiplexed connection to a cluster, made on first use (and
/// again after a failed attempt).
#[derive(Clone)]
pub struct ClusterPool {
    client: Arc<ClusterClient>,
    conn: Arc<tokio::sync::Mutex<Option<ClusterConnection>>>,
}

impl ClusterPool {
    async fn get(&self) -> Result<ClusterConnection, PoolError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = tokio::time::timeout(CONNECT_TIMEOUT * 2, self.client.get_async_connection())
            .await
            .map_err(|_| PoolError::Timeout(TimeoutType::Create))?
            .map_err(PoolError::Backend)?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single(pool) => f.debug_tuple("Single").field(&pool.status()).finish(),
            Self::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

impl From<deadpool_redis::Pool> for Pool {
    fn from(pool: deadpool_redis::Pool) -> Self {
        Self::Single(pool)
    }
}

impl Pool {
    /// A connection: pooled for one server, the shared one for a cluster.
    pub async fn get(&self) -> Result<Connection, PoolError> {
        match self {
            Self::Single(pool) => Ok(Connection(Conn::Pooled(pool.get().await?))),
            Self::Cluster(pool) => Ok(Connection(Conn::Cluster(pool.get().await?))),
        }
    }

    /// The deadpool's status (None for a cluster: one multiplexed connection).
    pub fn status(&self) -> Option<deadpool_redis::Status> {
        match self {
            Self::Single(pool) => Some(pool.status()),
            Self::Cluster(_) => None,
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

/// A connection from [`Pool::get`] or [`Client::dedicated`]; `&mut *conn`
/// (or `&mut conn`) is what redis commands are queried on.
pub struct Connection(Conn);

/// The connection behind a [`Connection`].
pub enum Conn {
    Pooled(deadpool_redis::Connection),
    Dedicated(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Deref for Connection {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.0
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.0
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Pooled(conn) => conn.req_packed_command(cmd),
            Self::Dedicated(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Pooled(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Dedicated(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => {
                // An atomic pipeline (MULTI..EXEC: offset 1) must stay whole.
                if offset != 0 || count != pipeline.len() {
                    return conn.req_packed_commands(pipeline, offset, count);
                }
                match split_by_slot(pipeline) {
                    None => conn.req_packed_commands(pipeline, offset, count),
                    Some(parts) => Box::pin(run_parts(conn.clone(), parts, pipeline.len())),
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Pooled(conn) => conn.get_db(),
            Self::Dedicated(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A pipeline as one part per slot, each with its commands' places in the
/// original and where to send it; None when redis-rs can send it whole (all
/// its keyed commands in one slot, no PUBLISH) or when it holds a command
/// this does not know the key of. A cluster broadcasts PUBLISH to every
/// node, so PUBLISH goes with any part; redis-rs would route it by its
/// channel's slot.
fn split_by_slot(
    pipeline: &Pipeline,
) -> Option<Vec<(Vec<usize>, Pipeline, SingleNodeRoutingInfo)>> {
    let mut parts: Vec<(Option<Route>, Vec<usize>, Pipeline)> = Vec::new();
    let mut publishes = false;
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        let mut args = cmd.args_iter().map(|arg| match arg {
            redis::Arg::Simple(bytes) => bytes,
            _ => b"",
        });
        let name = args.next().unwrap_or_default().to_ascii_uppercase();
        let route = if name == b"PUBLISH" {
            publishes = true;
            None
        } else if FIRST_KEY_COMMANDS.contains(&name.as_slice()) {
            Some(Route::with_key(args.next()?, SlotAddr::Master))
        } else {
            return None;
        };
        match parts.iter_mut().find(|part| part.0 == route) {
            Some(part) => {
                part.1.push(i);
                part.2.add_command(cmd.clone());
            }
            None => {
                let mut pipe = redis::pipe();
                pipe.add_command(cmd.clone());
                parts.push((route, vec![i], pipe));
            }
        }
    }
    let keyed = parts.iter().filter(|part| part.0.is_some()).count();
    if keyed <= 1 && !publishes {
        return None;
    }
    // Commands without a slot of their own ride with the first keyed part.
    let loose = parts
        .iter()
        .position(|part| part.0.is_none())
        .map(|at| parts.remove(at));
    let mut out: Vec<(Vec<usize>, Pipeline, SingleNodeRoutingInfo)> = parts
        .into_iter()
        .filter_map(|(route, places, pipe)| {
            route.map(|route| (places, pipe, SingleNodeRoutingInfo::SpecificNode(route)))
        })
        .collect();
    if let Some((_, places, pipe)) = loose {
        match out.first_mut() {
            Some(first) => {
                for (place, cmd) in places.into_iter().zip(pipe.cmd_iter()) {
                    first.0.push(place);
                    first.1.add_command(cmd.clone());
                }
            }
            None => out.push((places, pipe, SingleNodeRoutingInfo::RandomPrimary)),
        }
    }
    Some(out)
}

/// Commands whose one key is their first argument: those a pipeline may be
/// split by.
const FIRST_KEY_COMMANDS: &[&[u8]] = &[
    b"XADD",
    b"XACK",
    b"XCLAIM",
    b"XDEL",
    b"XLEN",
    b"XRANGE",
    b"XREVRANGE",
    b"XTRIM",
    b"XPENDING",
    b"XAUTOCLAIM",
    b"ZADD",
    b"ZREM",
    b"ZRANGE",
    b"GET",
    b"SET",
    b"INCR",
    b"EXPIRE",
    b"PEXPIRE",
    b"HSET",
    b"HGET",
    b"HDEL",
];

/// Sends the parts at once and puts their replies back in the pipeline's order.
async fn run_parts(
    conn: ClusterConnection,
    parts: Vec<(Vec<usize>, Pipeline, SingleNodeRoutingInfo)>,
    len: usize,
) -> RedisResult<Vec<Value>> {
    let replies = futures::future::try_join_all(parts.iter().map(|(_, pipe, route)| {
        let mut conn = conn.clone();
        let (pipe, route) = (pipe.clone(), route.clone());
        async move {
            let n = pipe.len();
            conn.route_pipeline(pipe, 0, n, route).await
        }
    }))
    .await?;
    let mut values = vec![Value::Nil; len];
    for ((places, _, _), reply) in parts.iter().zip(replies) {
        for (place, value) in places.iter().zip(reply) {
            values[*place] = value;
        }
    }
    Ok(values)
}

/// The pool for `cfg`'s URL (one server or a cluster). Never connects.
pub fn pool(cfg: &RedisConfig) -> Result<Pool, StartupError> {
    match Client::open(cfg)? {
        Client::Cluster(cluster) => Ok(Pool::Cluster(ClusterPool {
            client: Arc::new(
                cluster
                    .client(None)
                    .map_err(|e| invalid("REDIS_URL", e.to_string()))?,
            ),
            conn: Arc::new(tokio::sync::Mutex::new(None)),
        })),
        Client::Single(client) => {
            let info = client.get_connection_info().clone();
            let manager = Manager::new(info).map_err(|e| invalid("REDIS_URL", e.to_string()))?;
            deadpool_redis::Pool::builder(manager)
                .max_size(cfg.redis_pool_size.max(1))
                .wait_timeout(Some(Duration::from_secs(5)))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .recycle_timeout(Some(Duration::from_secs(2)))
                .runtime(Runtime::Tokio1)
                .build()
                .map(Pool::Single)
                .map_err(|e| invalid("REDIS_URL", e.to_string()))
        }
    }
}

/// True when Redis answers PING (for a cluster: every master does).
pub async fn ping(pool: &Pool) -> bool {
    let Ok(mut conn) = pool.get().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut *conn)
        .await
        .is_ok()
}

/// `XGROUP CREATE <stream> workers 0 MKSTREAM`: the job stream's consumer
/// group, reading from the stream's start (entries added before any worker
/// read them are delivered too); an existing group is fine.
pub async fn ensure_group(
    conn: &mut impl redis::aio::ConnectionLike,
    stream: &str,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(crate::queue::CONSUMER_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Records `kinds` as served by a stream worker as of now: `ZADD
/// <prefix>:jobs:kinds <now ms> <kind>...` (see [`crate::queue`]).
pub async fn announce_kinds(
    conn: &mut impl redis::aio::ConnectionLike,
    config: &crate::config::RedisConfig,
    kinds: &[impl AsRef<str>],
) -> redis::RedisResult<()> {
    if kinds.is_empty() {
        return Ok(());
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut cmd = redis::cmd("ZADD");
    cmd.arg(config.served_kinds());
    for kind in kinds {
        cmd.arg(now_ms).arg(kind.as_ref());
    }
    cmd.query_async::<u64>(conn).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_names_each_node_with_the_userinfo_and_tls() {
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379"), Ok(None));
        assert_eq!(
            cluster_nodes("redis+cluster://a:7000,b:7001"),
            Ok(Some(vec!["redis://a:7000".into(), "redis://b:7001".into()]))
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://u:p%40w@a:7000, b:7001/?protocol=resp3"),
            Ok(Some(vec![
                "rediss://u:p%40w@a:7000/?protocol=resp3".into(),
                "rediss://u:p%40w@b:7001/?protocol=resp3".into()
            ]))
        );
        assert!(cluster_nodes("redis+cluster://").is_err());
    }

    #[test]
    fn a_bad_cluster_url_or_a_ca_file_without_tls_is_a_startup_error() {
        let mut cfg = RedisConfig::new("redis+cluster://,", "keel");
        let err = pool(&cfg).expect_err("no node");
        assert!(err.to_string().contains("REDIS_URL"), "{err}");
        cfg.redis_url = "redis+cluster://127.0.0.1:27000,127.0.0.1:27001".into();
        assert!(pool(&cfg).expect("a cluster pool").is_cluster());
        cfg.redis_ca_file = Some("/nonexistent/ca.pem".into());
        let err = pool(&cfg).expect_err("CA file with redis+cluster://");
        assert!(err.to_string().contains("not a rediss://"), "{err}");
        cfg.redis_url = "rediss+cluster://127.0.0.1:27000,127.0.0.1:27001".into();
        let err = pool(&cfg).expect_err("an unreadable CA file");
        assert!(err.to_string().contains("KEEL_REDIS_CA_FILE"), "{err}");
        assert!(err.to_string().contains("cannot read"), "{err}");
        cfg.redis_ca_file = None;
        assert!(
            pool(&cfg)
                .expect("TLS with the system's roots")
                .is_cluster()
        );
    }

    #[test]
    fn a_pipeline_across_slots_splits_per_slot_with_publish_riding_along() {
        let mut pipe = redis::pipe();
        pipe.cmd("XADD").arg("k:{echo}").arg("*").arg("f").arg("v");
        pipe.cmd("XADD").arg("k:{sleep}").arg("*").arg("f").arg("v");
        pipe.cmd("PUBLISH").arg("ch:1").arg("x");
        pipe.cmd("XACK").arg("k:{echo}:high").arg("g").arg("1-0");
        let parts = split_by_slot(&pipe).expect("two slots");
        let places: Vec<Vec<usize>> = parts.iter().map(|p| p.0.clone()).collect();
        assert_eq!(places, vec![vec![0, 3, 2], vec![1]]);

        let mut one_slot = redis::pipe();
        one_slot
            .cmd("XADD")
            .arg("k:{echo}")
            .arg("*")
            .arg("f")
            .arg("v");
        one_slot
            .cmd("XADD")
            .arg("k:{echo}:low")
            .arg("*")
            .arg("f")
            .arg("v");
        assert!(split_by_slot(&one_slot).is_none());

        let mut publishes = redis::pipe();
        publishes.cmd("PUBLISH").arg("ch:1").arg("x");
        publishes.cmd("PUBLISH").arg("ch:2").arg("x");
        let parts = split_by_slot(&publishes).expect("routed explicitly");
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].0, vec![0, 1]);

        let mut unknown = redis::pipe();
        unknown
            .cmd("XADD")
            .arg("k:{echo}")
            .arg("*")
            .arg("f")
            .arg("v");
        unknown.cmd("SUNION").arg("a").arg("b");
        assert!(split_by_slot(&unknown).is_none());
    }
}
