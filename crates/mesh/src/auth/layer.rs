//! The server layer: authenticate every call (but health and reflection),
//! authorise it by its method path, verify the viewer it acts for, and
//! apply the per-viewer rate limit. Refusals are answered here, with a
//! status whose message says what to send instead.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use tonic::Status;

use super::policy::{self, ViewerRule};
use super::{AuthMode, Caller, RateLimits, Security, TokenKeys, VIEWER_HEADER};

/// Adds [`AuthService`] around a server's routes.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    check: Option<Arc<Check>>,
}

#[derive(Debug)]
struct Check {
    keys: TokenKeys,
    limits: Arc<RateLimits>,
}

impl AuthLayer {
    /// Enforces `security` when its mode says so; in dev mode the layer
    /// passes every call through untouched.
    pub fn new(security: &Security) -> Self {
        let check = match (security.mode(), security.keys()) {
            (AuthMode::Enforce, Some(keys)) => Some(Arc::new(Check {
                keys: keys.clone(),
                limits: Arc::new(RateLimits::new(security.config())),
            })),
            _ => None,
        };
        Self { check }
    }

    /// The limits' buckets, to be pruned now and then; `None` in dev mode.
    pub fn limits(&self) -> Option<Arc<RateLimits>> {
        self.check.as_ref().map(|check| check.limits.clone())
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            check: self.check.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    check: Option<Arc<Check>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(check) = &self.check {
            match check.admit(&request) {
                Ok(Some(caller)) => {
                    request.extensions_mut().insert(caller);
                }
                Ok(None) => {}
                Err(status) => {
                    tracing::debug!(
                        path = request.uri().path(),
                        code = ?status.code(),
                        reason = status.message(),
                        "call refused"
                    );
                    return Either::Left(std::future::ready(Ok(status.into_http())));
                }
            }
        }
        Either::Right(self.inner.call(request))
    }
}

impl Check {
    /// The caller of `request` if it may make this call (`None` for open
    /// services), else the status that refuses it.
    fn admit<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, Status> {
        let path = request.uri().path();
        if policy::is_open(path) {
            return Ok(None);
        }
        let claims = self.bearer(request)?;
        let Some(rule) = policy::rule_for(path) else {
            return Err(Status::permission_denied(format!(
                "{} has no access rule; no one may call it",
                crate::excerpt(path)
            )));
        };
        if !claims
            .roles
            .iter()
            .any(|role| rule.roles.contains(&role.as_str()))
        {
            return Err(Status::permission_denied(format!(
                "{} (roles {:?}) may not call {path}; it is allowed for the roles {:?}",
                crate::excerpt(&claims.sub),
                claims.roles,
                rule.roles
            )));
        }
        let viewer = match rule.viewer {
            ViewerRule::None => None,
            ViewerRule::Optional | ViewerRule::Required => self.viewer(request, rule.viewer)?,
        };
        if let (true, Some(viewer)) = (rule.viewer_facing, viewer) {
            self.limits.check_viewer(viewer)?;
        }
        Ok(Some(Caller {
            principal: claims.sub,
            roles: claims.roles,
            viewer,
            limits: self.limits.clone(),
        }))
    }

    fn bearer<B>(&self, request: &http::Request<B>) -> Result<super::Claims, Status> {
        let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "no credentials: send `authorization: Bearer <token>` with a token signed \
                 by this mesh's secret",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "the authorization header must be `Bearer <token>`; send \
                     `authorization: Bearer <token>`",
                )
            })?;
        self.keys.verify(token.trim()).map_err(|reason| {
            Status::unauthenticated(format!(
                "invalid credentials: {reason}; send `authorization: Bearer <token>` with a \
                 valid token"
            ))
        })
    }

    fn viewer<B>(
        &self,
        request: &http::Request<B>,
        rule: ViewerRule,
    ) -> Result<Option<u64>, Status> {
        let Some(value) = request.headers().get(VIEWER_HEADER) else {
            return match rule {
                ViewerRule::Required => Err(Status::unauthenticated(format!(
                    "this call acts for a viewer: send `{VIEWER_HEADER}: <viewer token>`"
                ))),
                _ => Ok(None),
            };
        };
        let invalid = |reason: &str| {
            Status::unauthenticated(format!("invalid viewer token in {VIEWER_HEADER}: {reason}"))
        };
        let token = value
            .to_str()
            .map_err(|_| invalid("not ASCII"))?
            .trim()
            .trim_start_matches("Bearer ");
        let claims = self.keys.verify(token).map_err(|reason| invalid(&reason))?;
        match claims.viewer {
            Some(viewer) if viewer != 0 => Ok(Some(viewer)),
            _ => Err(invalid("it names no viewer (claim `viewer`)")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tower::{Layer as _, ServiceExt as _};

    use super::*;
    use crate::auth::{AuthConfig, Claims, Secret};

    const SECRET: &str = "layer-test-secret-0123456789abcdefghijk";

    fn layer() -> AuthLayer {
        AuthLayer::new(
            &Security::from_config(&AuthConfig {
                mode: AuthMode::Enforce,
                token_secret: Some(Secret::new(SECRET)),
                ..AuthConfig::default()
            })
            .unwrap(),
        )
    }

    /// The grpc-status of a call to `path` through the layer (0: it reached
    /// the inner service).
    async fn status_of(layer: &AuthLayer, path: &str, roles: Option<&[&str]>) -> (i32, String) {
        let inner = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        });
        let mut request = http::Request::builder().uri(path);
        if let Some(roles) = roles {
            let keys = TokenKeys::new(&Secret::new(SECRET)).unwrap();
            let token = keys
                .mint(&Claims::new("tester", roles, Duration::from_secs(60)))
                .unwrap();
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = layer
            .layer(inner)
            .oneshot(request.body(()).unwrap())
            .await
            .unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        (
            header("grpc-status").parse().unwrap_or(0),
            header("grpc-message"),
        )
    }

    #[tokio::test]
    async fn methods_without_a_rule_are_refused_and_open_services_need_no_token() {
        let layer = layer();
        let (code, message) = status_of(
            &layer,
            "/livemesh.v1.NewService/NewMethod",
            Some(&["admin"]),
        )
        .await;
        assert_eq!(code, tonic::Code::PermissionDenied as i32, "{message}");
        assert!(message.contains("no%20access%20rule") || message.contains("no access rule"));
        let (code, _) = status_of(&layer, "/grpc.health.v1.Health/Check", None).await;
        assert_eq!(code, 0);
        let (code, _) = status_of(&layer, "/livemesh.v1.NewService/NewMethod", None).await;
        assert_eq!(code, tonic::Code::Unauthenticated as i32);
        let (code, _) = status_of(
            &layer,
            "/livemesh.v1.OngoingQueryService/GetRoom",
            Some(&["counter"]),
        )
        .await;
        assert_eq!(code, 0);
    }

    #[tokio::test]
    async fn dev_mode_passes_every_call_through() {
        let dev = AuthLayer::new(&Security::dev());
        let (code, _) = status_of(&dev, "/livemesh.v1.SettlementService/Reconcile", None).await;
        assert_eq!(code, 0);
    }
}
