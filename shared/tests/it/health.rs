//! Health entries as probes see them: readiness ("") waits for the backends,
//! liveness does not.

use keel_shared::server;
use keel_shared::testing;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn liveness_is_serving_while_readiness_waits_for_the_backends() {
    let (health, service) = server::health(&["keel.test.v1.Thing"]).await;
    let (listener, addr) = testing::listener().await;
    let shutdown = CancellationToken::new();
    let router = server::builder().add_service(service);
    let served = tokio::spawn(server::serve(
        router,
        listener,
        shutdown.clone(),
        std::time::Duration::from_secs(1),
    ));
    let mut client = HealthClient::new(testing::channel(addr).await);
    let mut status = async |name: &str| {
        client
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .map(|r| r.into_inner().status())
    };
    assert_eq!(status("").await.unwrap(), ServingStatus::NotServing);
    assert_eq!(
        status("keel.test.v1.Thing").await.unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(
        status(server::LIVENESS).await.unwrap(),
        ServingStatus::Serving
    );

    health.set(true).await;
    assert_eq!(status("").await.unwrap(), ServingStatus::Serving);
    health.set(false).await;
    assert_eq!(
        status(server::LIVENESS).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        status("keel.nothing").await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    shutdown.cancel();
    served.await.unwrap().unwrap();
}
