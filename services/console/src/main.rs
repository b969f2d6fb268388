#[tokio::main]
async fn main() {
    let config = keel_shared::config::parse_config::<keel_console::Config>();
    let result = async {
        let telemetry = keel_shared::telemetry::init_service("keel-console", &config.runtime)?;
        let listener = keel_shared::server::bind(config.addr).await?;
        let result = keel_console::run(config, listener, keel_shared::shutdown::on_signal()).await;
        telemetry.shutdown().await;
        result
    }
    .await;
    keel_shared::error::exit_on_error("keel-console", result);
}
