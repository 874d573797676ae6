//! The engines' own prefix-cache counters, scraped from Prometheus `/metrics` endpoints before
//! and after the run: the hit rate the engines saw, independent of what the HTTP API reports.

use anyhow::Context as _;

/// Prompt tokens served from the prefix cache.
pub const HIT_TOKENS: &str = "switchyard_engine_prefix_hit_tokens_total";
/// Prompt tokens looked up in the prefix cache.
pub const LOOKUP_TOKENS: &str = "switchyard_engine_prefix_lookup_tokens_total";

/// The two counters summed over every series and endpoint; `None` where no endpoint exposes
/// the metric.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PrefixCounters {
    pub hit_tokens: Option<f64>,
    pub lookup_tokens: Option<f64>,
}

/// Sum of every sample of `name` (any labels) in a Prometheus text exposition.
pub fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `name 1` or `name{labels} 1`, not `name_bucket…`.
        let value = if let Some(after) = rest.strip_prefix('{') {
            match after.rfind('}') {
                Some(end) => &after[end + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue;
        };
        // `value [timestamp]`
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// Scrapes every URL and sums the counters.
pub async fn scrape(client: &reqwest::Client, urls: &[String]) -> anyhow::Result<PrefixCounters> {
    let mut total = PrefixCounters::default();
    for url in urls {
        let text = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("reading {url}"))?;
        total.hit_tokens = add(total.hit_tokens, sum_metric(&text, HIT_TOKENS));
        total.lookup_tokens = add(total.lookup_tokens, sum_metric(&text, LOOKUP_TOKENS));
    }
    Ok(total)
}

/// What the run added to the counters: (hit tokens, lookup tokens), when both are known.
pub fn delta(before: PrefixCounters, after: PrefixCounters) -> Option<(f64, f64)> {
    Some((
        after.hit_tokens? - before.hit_tokens.unwrap_or(0.0),
        after.lookup_tokens? - before.lookup_tokens.unwrap_or(0.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_and_ignores_other_names() {
        let text = "# HELP switchyard_engine_prefix_hit_tokens_total hits\n\
            # TYPE switchyard_engine_prefix_hit_tokens_total counter\n\
            switchyard_engine_prefix_hit_tokens_total{worker=\"a\"} 96\n\
            switchyard_engine_prefix_hit_tokens_total{worker=\"b\",x=\"}\"} 32 1700000000\n\
            switchyard_engine_prefix_hit_tokens_total_created 1.7e9\n\
            switchyard_engine_prefix_lookup_tokens_total 400\n";
        assert_eq!(sum_metric(text, HIT_TOKENS), Some(128.0));
        assert_eq!(sum_metric(text, LOOKUP_TOKENS), Some(400.0));
        assert_eq!(sum_metric(text, "absent_total"), None);
    }

    #[test]
    fn delta_needs_the_after_values() {
        let before = PrefixCounters {
            hit_tokens: Some(10.0),
            lookup_tokens: Some(100.0),
        };
        let after = PrefixCounters {
            hit_tokens: Some(60.0),
            lookup_tokens: Some(300.0),
        };
        assert_eq!(delta(before, after), Some((50.0, 200.0)));
        assert_eq!(delta(before, PrefixCounters::default()), None);
        // A counter that first appears during the run starts from zero.
        assert_eq!(delta(PrefixCounters::default(), after), Some((60.0, 300.0)));
    }
}
