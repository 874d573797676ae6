//! Cross-origin requests to the HTTP doors, for clients that run in a browser (a chat page
//! calling `/v1/chat/completions` from its own origin; the SDKs' browser modes). Off unless
//! the operator names the origins (`--http-cors-origin`): a page the user merely visits must
//! not be able to use a cluster that has no API keys.
//!
//! An allowed origin's preflight is answered before authentication (browsers send no
//! credentials on it), and its requests may carry any header the SDKs send (`authorization`,
//! `x-api-key`, `anthropic-version`, `x-stainless-*`, …); the page may read the placement
//! headers and `retry-after`.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, Uri};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// Which origins' pages may call the HTTP doors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// None: no CORS headers, so browsers keep other origins' pages out.
    #[default]
    Off,
    /// Every origin (`*`).
    Any,
    /// Exactly these origins (`scheme://host[:port]`, as browsers send them).
    Listed(Vec<HeaderValue>),
}

/// How long a browser may reuse a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// Response headers a page may read: where its request ran, its id, when to retry.
const EXPOSED: [&str; 5] = [
    "x-request-id",
    "x-switchyard-lane",
    "x-switchyard-pool",
    "x-switchyard-worker",
    "retry-after",
];

impl CorsOrigins {
    /// The origins from `--http-cors-origin` values: `*` alone, or origins.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        if values.is_empty() {
            return Ok(Self::Off);
        }
        if values.iter().any(|v| v == "*") {
            return match values.len() {
                1 => Ok(Self::Any),
                _ => Err("`*` allows every origin: give it alone".into()),
            };
        }
        values
            .iter()
            .map(|value| origin(value))
            .collect::<Result<_, _>>()
            .map(Self::Listed)
    }

    /// The layer answering preflights and marking answers, or `None` when off.
    pub fn layer(&self) -> Option<CorsLayer> {
        let allowed = match self {
            Self::Off => return None,
            Self::Any => AllowOrigin::any(),
            Self::Listed(origins) => AllowOrigin::list(origins.iter().cloned()),
        };
        Some(
            CorsLayer::new()
                .allow_origin(allowed)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers(AllowHeaders::mirror_request())
                .expose_headers(EXPOSED.map(HeaderName::from_static))
                .max_age(PREFLIGHT_MAX_AGE),
        )
    }
}

/// One origin as a browser writes it in its `Origin` header: `http` or `https`, a host, an
/// optional port, and nothing after.
fn origin(value: &str) -> Result<HeaderValue, String> {
    let refused =
        |why: &str| format!("{value:?} is not an origin: {why} (e.g. https://chat.example.com)");
    let uri: Uri = value.parse().map_err(|_| refused("not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(refused("it must start with http:// or https://"));
    }
    match uri.authority() {
        Some(authority) if !authority.host().is_empty() && !authority.as_str().contains('@') => {}
        _ => return Err(refused("it names no host")),
    }
    if value.ends_with('/') || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(refused("an origin has no path"));
    }
    HeaderValue::from_str(value).map_err(|_| refused("not a header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(values: &[&str]) -> Result<CorsOrigins, String> {
        CorsOrigins::parse(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn origins_are_taken_as_browsers_send_them() {
        assert_eq!(parse(&[]), Ok(CorsOrigins::Off));
        assert_eq!(parse(&["*"]), Ok(CorsOrigins::Any));
        assert_eq!(
            parse(&["https://chat.example.com", "http://127.0.0.1:3000"]),
            Ok(CorsOrigins::Listed(vec![
                HeaderValue::from_static("https://chat.example.com"),
                HeaderValue::from_static("http://127.0.0.1:3000"),
            ]))
        );
    }

    #[test]
    fn what_is_not_an_origin_is_refused_saying_why() {
        for (value, why) in [
            ("https://chat.example.com/", "no path"),
            ("https://chat.example.com/app", "no path"),
            ("chat.example.com", "http://"),
            ("ftp://chat.example.com", "http://"),
            ("https://user@chat.example.com", "no host"),
            ("not a url", "not a URL"),
        ] {
            let error = parse(&[value]).expect_err(value);
            assert!(error.contains(why), "{value}: {error}");
        }
        assert!(parse(&["*", "https://a.example"]).is_err());
    }
}
