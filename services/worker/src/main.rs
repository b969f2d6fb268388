#[tokio::main]
async fn main() {
    keel_shared::server::main::<keel_worker::Config, _, _>(
        "keel-worker",
        "127.0.0.1:50054",
        keel_worker::run,
    )
    .await;
}
