#[tokio::main]
async fn main() {
    keel_shared::server::main::<keel_auth::Config, _, _>(
        "keel-auth",
        "127.0.0.1:50051",
        keel_auth::run,
    )
    .await;
}
