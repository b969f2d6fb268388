#[tokio::main]
async fn main() {
    keel_shared::server::main::<keel_memory::Config, _, _>(
        "keel-memory",
        "127.0.0.1:50053",
        keel_memory::run,
    )
    .await;
}
