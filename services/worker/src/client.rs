//! The jobs service client: `JobRunnerService` with the worker credential on
//! every call, and the classification of its answers.

use std::time::Duration;

use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_shared::StartupError;
use keel_shared::config::GrpcClientTlsConfig;
use keel_shared::grpc_client::BalancedChannel;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tonic::{Code, Request, Status};

pub type JobsClient = JobRunnerServiceClient<InterceptedService<BalancedChannel, Bearer>>;

/// Adds `authorization: Bearer <worker token>` and the current trace context
/// to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Result<Self, StartupError> {
        let mut value: MetadataValue<Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| StartupError::InvalidVar {
                    var: "KEEL_WORKER_TOKEN",
                    reason: "must be visible ASCII".into(),
                })?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        keel_shared::telemetry::inject_trace_context(request.metadata_mut());
        Ok(request)
    }
}

/// A client that connects on first use (and reconnects after outages), so
/// the worker starts whether or not the jobs service is up. Over several
/// jobs replicas it spreads its calls over those SERVING
/// ([`keel_shared::grpc_client::balanced_channel`]).
pub fn connect(endpoints: Vec<Endpoint>, token: &str) -> Result<JobsClient, StartupError> {
    let channel = keel_shared::grpc_client::balanced_channel(endpoints);
    Ok(JobRunnerServiceClient::with_interceptor(
        channel,
        Bearer::new(token)?,
    ))
}

/// The jobs service's endpoints, one per comma-separated URL of
/// KEEL_JOBS_URL: plaintext for http://, TLS for https:// (trusting
/// KEEL_TLS_CA_FILE). Each URL needs a host.
pub fn endpoints(jobs_url: &str, tls: &GrpcClientTlsConfig) -> Result<Vec<Endpoint>, StartupError> {
    let invalid = |reason: String| StartupError::InvalidVar {
        var: "KEEL_JOBS_URL",
        reason,
    };
    let endpoints = keel_shared::grpc_client::client_endpoints(jobs_url, tls).map_err(invalid)?;
    endpoints
        .into_iter()
        .map(|endpoint| {
            if endpoint.uri().host().is_none_or(str::is_empty) {
                return Err(invalid(format!(
                    "{} needs a host, e.g. http://127.0.0.1:50052",
                    endpoint.uri()
                )));
            }
            Ok(endpoint
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .tcp_nodelay(true))
        })
        .collect()
}

/// How the worker treats an error answer from the jobs service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The transition does not apply (finished, running elsewhere, cancelled,
    /// not due, unknown job): nothing to retry.
    Refused,
    /// The request itself was rejected (e.g. an output too large).
    Rejected,
    /// Outage, overload or misconfiguration: try again later.
    Transient,
}

pub fn classify(status: &Status) -> Answer {
    match status.code() {
        Code::FailedPrecondition | Code::NotFound => Answer::Refused,
        Code::InvalidArgument | Code::OutOfRange => Answer::Rejected,
        _ => Answer::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers() {
        assert_eq!(classify(&Status::failed_precondition("x")), Answer::Refused);
        assert_eq!(classify(&Status::not_found("x")), Answer::Refused);
        assert_eq!(classify(&Status::invalid_argument("x")), Answer::Rejected);
        for s in [
            Status::unavailable("x"),
            Status::deadline_exceeded("x"),
            Status::internal("x"),
            Status::permission_denied("x"),
            Status::unknown("x"),
        ] {
            assert_eq!(classify(&s), Answer::Transient, "{s:?}");
        }
    }

    #[test]
    fn one_endpoint_per_url() {
        let tls = GrpcClientTlsConfig::default();
        let hosts = |url: &str| -> Vec<String> {
            endpoints(url, &tls)
                .unwrap()
                .iter()
                .map(|e| e.uri().authority().unwrap().to_string())
                .collect()
        };
        assert_eq!(hosts("http://127.0.0.1:50052"), ["127.0.0.1:50052"]);
        assert_eq!(
            hosts("http://a:50052, http://b:50052/,http://c:50052"),
            ["a:50052", "b:50052", "c:50052"]
        );
        for bad in [
            "not a url",
            "http://a:50052,,http://b:50052",
            "http://a:1,",
            "/path",
        ] {
            let Err(StartupError::InvalidVar { var, .. }) = endpoints(bad, &tls) else {
                panic!("{bad:?} accepted");
            };
            assert_eq!(var, "KEEL_JOBS_URL");
        }
        // https:// needs the CA to trust, for every URL of the list.
        assert!(endpoints("http://a:50052,https://b:50052", &tls).is_err());
    }

    #[test]
    fn bearer_is_sensitive() {
        let mut b = Bearer::new("secret").unwrap();
        let req = b.call(Request::new(())).unwrap();
        let v = req.metadata().get("authorization").unwrap();
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().unwrap(), "Bearer secret");
        assert!(Bearer::new("bad\ntoken").is_err());
    }
}
