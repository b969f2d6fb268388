#[tokio::main]
async fn main() {
    keel_shared::server::main::<keel_jobs::Config, _, _>(
        "keel-jobs",
        "127.0.0.1:50052",
        keel_jobs::run,
    )
    .await;
}
