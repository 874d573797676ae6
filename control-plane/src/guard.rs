//! The dashboard's guard against cross-site requests and DNS rebinding, applied to every HTTP
//! request before any handler runs, whether or not admin tokens are configured.
//!
//! - **Host.** A browser tricked by DNS rebinding (a name the attacker controls, re-pointed at
//!   127.0.0.1) sends that name as `Host`. Only IP literals, `localhost` and the names given
//!   with `--dashboard-allowed-hosts` are served; anything else is 403 for every request, reads
//!   included.
//! - **Writes** (any method but GET/HEAD/OPTIONS) must look like the dashboard's own `fetch`:
//!   `content-type: application/json` and the custom header `x-switchyard-csrf` (a page on
//!   another origin can send neither without a CORS preflight, which this server never
//!   grants), and, when the browser says where the request comes from — `Origin`, else
//!   `Sec-Fetch-Site`, else `Referer` — it must be this dashboard's origin. Clients that are
//!   not browsers (curl, scripts) send none of those and only need the two headers.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, body::Body};
use serde_json::json;

/// The custom header every dashboard write carries (any non-empty value).
pub const CSRF_HEADER: &str = "x-switchyard-csrf";

/// Which `Host` names the dashboard answers to, besides IP literals and `localhost`.
#[derive(Debug, Clone, Default)]
pub struct HostAllowlist {
    /// Lower-cased names without port.
    names: Vec<String>,
    /// The dashboard is served over TLS: its own origin is `https://<host>`.
    https: bool,
}

impl HostAllowlist {
    pub fn new(names: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        Self {
            names: names
                .into_iter()
                .map(|n| n.as_ref().trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect(),
            https: false,
        }
    }

    /// The same names, for a dashboard served over TLS (or not).
    pub fn served_over_tls(mut self, https: bool) -> Self {
        self.https = https;
        self
    }

    /// Whether the dashboard is served over TLS.
    pub fn https(&self) -> bool {
        self.https
    }

    /// Whether `host` (a `Host` header value, port optional) names this dashboard. IP
    /// literals are always accepted: rebinding needs a DNS name.
    fn allows(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || self.names.contains(&name)
    }
}

/// The name part of a `Host` value: `[::1]:8090` → `::1`, `example:80` → `example`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

fn forbidden(message: String) -> Response {
    (StatusCode::FORBIDDEN, Json(json!({ "error": message }))).into_response()
}

/// `scheme://host[:port]` of a URL (`Referer`), lower-cased.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    Some(format!("{scheme}://{authority}").to_ascii_lowercase())
}

fn header(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Why a write does not come from the dashboard's own page, if it does not.
fn write_refusal(headers: &HeaderMap, host: Option<&str>, https: bool) -> Option<String> {
    let scheme = if https { "https" } else { "http" };
    let own = host.map(|h| format!("{scheme}://{h}").to_ascii_lowercase());
    let own_text = own.as_deref().unwrap_or("this dashboard's address");
    if let Some(origin) = header(headers, header::ORIGIN) {
        if Some(origin.to_ascii_lowercase()) != own {
            return Some(format!(
                "cross-origin request refused: origin {origin:?} is not this dashboard ({own_text}); \
                 open the dashboard itself, or call the API without a browser"
            ));
        }
    } else if let Some(site) = header(headers, "sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return Some(format!(
                "cross-site request refused (sec-fetch-site: {site}); open the dashboard itself \
                 ({own_text}), or call the API without a browser"
            ));
        }
    } else if let Some(referer) = header(headers, header::REFERER)
        && origin_of(referer) != own
    {
        return Some(format!(
            "cross-origin request refused: referer {referer:?} is not a page of this dashboard \
             ({own_text})"
        ));
    }
    let json = header(headers, header::CONTENT_TYPE).is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json {
        return Some(
            "write refused: send `content-type: application/json` (the dashboard's API accepts \
             no form or text bodies)"
                .to_string(),
        );
    }
    if header(headers, CSRF_HEADER).is_none_or(|v| v.trim().is_empty()) {
        return Some(format!(
            "write refused: send the header `{CSRF_HEADER}: 1` (it proves the request does not come \
             from another site's page)"
        ));
    }
    None
}

/// The middleware: refuses foreign hosts, and writes that may come from another site.
pub async fn guard(
    State(hosts): State<HostAllowlist>,
    request: Request<Body>,
    next: Next,
) -> Response {
    let headers = request.headers();
    // HTTP/2 carries the host in the URI's authority instead of a Host header.
    let host = header(headers, header::HOST)
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    if let Some(host) = &host
        && !hosts.allows(host)
    {
        return forbidden(format!(
            "host {host:?} is not a name of this dashboard; open it by IP address or localhost, or \
             start the control plane with --dashboard-allowed-hosts {}",
            host_name(host)
        ));
    }
    let read = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !read && let Some(message) = write_refusal(headers, host.as_deref(), hosts.https) {
        return forbidden(message);
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_matched_without_port_and_case() {
        let hosts = HostAllowlist::new(["Ops.Example.test", " "]);
        for ok in [
            "127.0.0.1:8090",
            "[::1]:8090",
            "[::1]",
            "localhost",
            "LOCALHOST:1",
            "ops.example.test:8090",
            "10.0.0.7",
        ] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for refused in [
            "attacker.example",
            "attacker.example:8090",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!hosts.allows(refused), "{refused}");
        }
    }

    #[test]
    fn referer_origins() {
        assert_eq!(
            origin_of("http://127.0.0.1:8090/a?b#c").as_deref(),
            Some("http://127.0.0.1:8090")
        );
        assert_eq!(origin_of("nonsense"), None);
    }

    #[test]
    fn over_tls_the_dashboards_own_origin_is_https() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers.insert(CSRF_HEADER, "1".parse().unwrap());
        headers.insert(header::ORIGIN, "https://127.0.0.1:8090".parse().unwrap());
        let host = Some("127.0.0.1:8090");
        assert_eq!(write_refusal(&headers, host, true), None);
        // The same page served over plain HTTP is another origin.
        assert!(write_refusal(&headers, host, false).is_some());
        headers.insert(header::ORIGIN, "http://127.0.0.1:8090".parse().unwrap());
        assert!(write_refusal(&headers, host, true).is_some());
        assert_eq!(write_refusal(&headers, host, false), None);
    }
}
