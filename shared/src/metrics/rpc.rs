//! The per-RPC tower layer: `keel_grpc_server_requests_total` by method and
//! status code (counted when the call ends, streams included) and
//! `keel_grpc_server_handling_seconds`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http;

use super::enabled;

/// gRPC status code names, by number.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn code_name(value: Option<&http::HeaderValue>) -> Option<&'static str> {
    let value = value?;
    let n: usize = value.to_str().ok()?.trim().parse().ok()?;
    Some(CODES.get(n).copied().unwrap_or("UNKNOWN"))
}

/// Tower layer recording, for every gRPC call, `keel_grpc_server_requests_total
/// {method,code}` and `keel_grpc_server_handling_seconds{method}`. The code
/// comes from the `grpc-status` response header (trailers-only responses:
/// errors refused before or by a unary handler) or else from the trailers; a
/// call whose body is dropped before its trailers counts as CANCELLED.
/// Paths that are not a served method are labelled `unknown`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<RecordedBody<ResBody>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        RpcFuture {
            // Read only when metrics are on: no allocation per call otherwise.
            method: enabled().then(|| req.uri().path().to_string()),
            inner: Box::pin(self.inner.call(req)),
            start: Instant::now(),
        }
    }
}

pub struct RpcFuture<F> {
    inner: Pin<Box<F>>,
    method: Option<String>,
    start: Instant,
}

impl<F, B, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<RecordedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let result = ready!(this.inner.as_mut().poll(cx));
        let mut method = this.method.take().unwrap_or_default();
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                count(method, "INTERNAL");
                return Poll::Ready(Err(e));
            }
        };
        let header_code = code_name(response.headers().get("grpc-status"));
        if header_code == Some("UNIMPLEMENTED") {
            method = "unknown".into();
        }
        if enabled() {
            metrics::histogram!("keel_grpc_server_handling_seconds", "method" => method.clone())
                .record(this.start.elapsed().as_secs_f64());
        }
        let pending = match header_code {
            Some(code) => {
                count(method, code);
                None
            }
            None => Some(method),
        };
        Poll::Ready(Ok(response.map(|inner| RecordedBody { inner, pending })))
    }
}

fn count(method: String, code: &'static str) {
    if enabled() {
        metrics::counter!("keel_grpc_server_requests_total", "method" => method, "code" => code)
            .increment(1);
    }
}

/// A response body that counts its call once the trailers (or the end, or
/// a drop) show how it ended.
pub struct RecordedBody<B> {
    inner: B,
    /// The method, until the call is counted.
    pending: Option<String>,
}

impl<B> RecordedBody<B> {
    fn finish(&mut self, code: &'static str) {
        if let Some(method) = self.pending.take() {
            count(method, code);
        }
    }
}

impl<B> Drop for RecordedBody<B> {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

impl<B: Body + Unpin> Body for RecordedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    this.finish(code_name(trailers.get("grpc-status")).unwrap_or("UNKNOWN"));
                }
            }
            Some(Err(_)) => this.finish("INTERNAL"),
            None => this.finish("UNKNOWN"),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_named() {
        let v = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(code_name(Some(&v("0"))), Some("OK"));
        assert_eq!(code_name(Some(&v("3"))), Some("INVALID_ARGUMENT"));
        assert_eq!(code_name(Some(&v("16"))), Some("UNAUTHENTICATED"));
        assert_eq!(code_name(Some(&v("99"))), Some("UNKNOWN"));
        assert_eq!(code_name(Some(&v("x"))), None);
        assert_eq!(code_name(None), None);
    }
}
