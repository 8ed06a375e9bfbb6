//! [`ConnLayer`] (see the parent module's doc): tells each connection's
//! watchdog when its calls open and end, and refuses a request whose
//! metadata is over `server.max_header_bytes` alone.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::transport::server::TlsConnectInfo;
use tower::{Layer, Service};

use super::watchdog::{CallGuard, ConnInfo};

/// The server layer of [`Connections`]: see the module doc.
#[derive(Debug, Clone)]
pub struct ConnLayer {
    max_header_bytes: usize,
}

impl ConnLayer {
    pub(super) fn new(max_header_bytes: usize) -> Self {
        Self { max_header_bytes }
    }
}

impl<S> Layer<S> for ConnLayer {
    type Service = ConnService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnService {
            inner,
            max_header_bytes: self.max_header_bytes,
        }
    }
}

/// The service [`ConnLayer`] builds.
#[derive(Debug, Clone)]
pub struct ConnService<S> {
    inner: S,
    max_header_bytes: usize,
}

/// A request's metadata size as HTTP/2 counts it (RFC 9113 §6.5.2: each
/// field's name and value plus 32), pseudo-headers included.
fn header_list_size<B>(request: &http::Request<B>) -> usize {
    let pseudo = [":method", ":scheme", ":authority", ":path"];
    let uri = request.uri();
    let pseudo_values = request.method().as_str().len()
        + uri.scheme_str().map_or(0, str::len)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let pseudo_size: usize =
        pseudo.iter().map(|name| name.len() + 32).sum::<usize>() + pseudo_values;
    request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum::<usize>()
        + pseudo_size
}

impl<S> Service<http::Request<Body>> for ConnService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let extensions = request.extensions();
        let state = extensions
            .get::<ConnInfo>()
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<ConnInfo>>()
                    .map(TlsConnectInfo::get_ref)
            })
            .map(|info| info.state.clone());
        let guard = state.map(|state| state.call_started());
        let size = header_list_size(&request);
        if size > self.max_header_bytes {
            let max = self.max_header_bytes;
            tracing::debug!(size, max, path = %crate::excerpt(request.uri().path()), "request metadata over the limit");
            let status = tonic::Status::resource_exhausted(format!(
                "the request's metadata is {size} bytes, over this server's limit of {max} \
                 bytes (server.max_header_bytes); send less metadata"
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        // The inner service was made ready by `poll_ready`; take it and
        // leave a fresh clone (tower's usual pattern for boxed futures).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            Ok(match guard {
                Some(guard) => response.map(|body| Body::new(GuardedBody { body, guard })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call open until it ends.
struct GuardedBody {
    body: Body,
    #[allow(dead_code)] // held for its drop
    guard: CallGuard,
}

impl HttpBody for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
