use keel_memory::Config;

#[tokio::main]
async fn main() {
    keel_shared::server::healthcheck_command("127.0.0.1:50053").await;
    let config = keel_shared::config::parse_config::<Config>();
    let result = async {
        let telemetry = keel_shared::telemetry::init_service("keel-memory", &config.runtime)?;
        let listener = keel_shared::server::bind(config.listen_addr).await?;
        let result = keel_memory::run(config, listener, keel_shared::shutdown::on_signal()).await;
        telemetry.shutdown().await;
        result
    }
    .await;
    keel_shared::error::exit_on_error("keel-memory", result);
}
