//! Client-side load balancing (`grpc_client::balanced_channel`) over two
//! real servers: calls reach both; a replica that stops (or reports
//! NOT_SERVING) leaves the balance, so calls stop failing; once it serves
//! again on the same address, calls reach it again.

use std::net::SocketAddr;
use std::time::Duration;

use keel_shared::config::GrpcClientTlsConfig;
use keel_shared::server::{self, Health};
use keel_shared::{grpc_client, testing};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const WAIT: Duration = Duration::from_secs(30);
const CALLS: usize = 40;

/// A server on `listener` whose health registers the service `name` (so a
/// check of that name tells which replica answered), SERVING.
struct Replica {
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
    served: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Replica {
    async fn start(name: &'static str, listener: tokio::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let (health, service) = server::health(&[name]).await;
        health.set(true).await;
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(server::serve(
            server::builder().add_service(service),
            listener,
            shutdown.clone(),
            Duration::from_millis(100),
        ));
        Self {
            addr,
            health,
            shutdown,
            served,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.served.await.unwrap().unwrap();
    }
}

/// Which replica answered each of [`CALLS`] calls ("a" or "b"), or the
/// error code of a call that failed.
async fn answers(channel: &grpc_client::BalancedChannel) -> Vec<Result<&'static str, Code>> {
    let mut out = Vec::new();
    for _ in 0..CALLS {
        let reply = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: "keel.test.v1.A".into(),
            })
            .await;
        out.push(match reply {
            Ok(_) => Ok("a"),
            // B does not know A's name.
            Err(s) if s.code() == Code::NotFound => Ok("b"),
            Err(s) => Err(s.code()),
        });
    }
    out
}

fn count(answers: &[Result<&'static str, Code>], want: Result<&'static str, Code>) -> usize {
    answers.iter().filter(|a| **a == want).count()
}

#[tokio::test]
async fn calls_spread_over_replicas_and_skip_the_ones_that_are_down() {
    let a = Replica::start("keel.test.v1.A", testing::listener().await.0).await;
    let b = Replica::start("keel.test.v1.B", testing::listener().await.0).await;
    let (a_addr, b_addr) = (a.addr, b.addr);
    let endpoints = grpc_client::client_endpoints(
        &format!("http://{a_addr}, http://{b_addr}"),
        &GrpcClientTlsConfig::default(),
    )
    .unwrap();
    assert_eq!(endpoints.len(), 2);
    let channel = grpc_client::balanced_channel(endpoints);

    let seen = answers(&channel).await;
    assert_eq!(
        count(&seen, Ok("a")) + count(&seen, Ok("b")),
        CALLS,
        "{seen:?}"
    );
    assert!(
        count(&seen, Ok("a")) > 0 && count(&seen, Ok("b")) > 0,
        "{seen:?}"
    );

    // B stops: once its health check fails, every call goes to A.
    b.stop().await;
    testing::eventually(WAIT, "calls to skip the stopped replica", || async {
        let seen = answers(&channel).await;
        count(&seen, Ok("a")) == CALLS
    })
    .await;

    // B serves again at the same address: calls reach it again.
    let listener = tokio::net::TcpListener::bind(b_addr).await.unwrap();
    let b = Replica::start("keel.test.v1.B", listener).await;
    testing::eventually(WAIT, "calls to reach the restarted replica", || async {
        let seen = answers(&channel).await;
        count(&seen, Ok("b")) > 0 && count(&seen, Ok("a")) + count(&seen, Ok("b")) == CALLS
    })
    .await;

    // A reports NOT_SERVING (lost its backends): it leaves the balance too.
    a.health.set(false).await;
    testing::eventually(WAIT, "calls to skip the NOT_SERVING replica", || async {
        let seen = answers(&channel).await;
        count(&seen, Ok("b")) == CALLS
    })
    .await;

    // With no replica SERVING, both are used again rather than none: calls
    // still get answers instead of waiting for a replica to come back.
    b.health.set(false).await;
    testing::eventually(WAIT, "both replicas back in when none serves", || async {
        let seen = answers(&channel).await;
        count(&seen, Ok("a")) > 0 && count(&seen, Ok("b")) > 0
    })
    .await;

    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_list_with_an_empty_url_is_refused() {
    let tls = GrpcClientTlsConfig::default();
    assert!(grpc_client::client_endpoints("http://a:1,,http://b:1", &tls).is_err());
    assert!(grpc_client::client_endpoints("http://a:1,", &tls).is_err());
    // https:// without a CA to trust is refused for any URL of the list.
    let err = grpc_client::client_endpoints("http://a:1,https://b:1", &tls).unwrap_err();
    assert!(err.contains("KEEL_TLS_CA_FILE"), "{err}");
}
