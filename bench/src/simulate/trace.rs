//! Request traces: the Azure LLM inference CSV format (`TIMESTAMP,ContextTokens,GeneratedTokens`)
//! and the Mooncake JSON-lines format (`timestamp` ms, `input_length`, `output_length`,
//! `hash_ids`). Any file in either format is accepted by path; the format is detected from its
//! first line. Arrival times are made relative to the file's first request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use switchyard_policy::document::LaneName;

/// Tokens per Mooncake prompt block (`hash_ids` entry).
pub const BLOCK_TOKENS: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trace {path}, line {line}: {reason}")]
    Format {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("trace {0}: no requests")]
    Empty(PathBuf),
    #[error(
        "--trace {0:?}: unknown role (expected latency-critical=<path> or cost-sensitive=<path>)"
    )]
    Role(String),
}

/// One request of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// Milliseconds since the trace's first request.
    pub arrival_ms: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// Prefix-chained prompt block hashes (Mooncake); empty when the trace has none.
    pub hash_ids: Arc<[u64]>,
}

/// A trace file and the lane its requests belong to (`None`: the classifier decides).
#[derive(Debug, Clone)]
pub struct TraceSpec {
    pub role: Option<LaneName>,
    pub path: PathBuf,
}

impl std::str::FromStr for TraceSpec {
    type Err = TraceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((role, path)) = s.split_once('=') {
            let role = match role {
                "latency-critical" => LaneName::LatencyCritical,
                "cost-sensitive" => LaneName::CostSensitive,
                _ => return Err(TraceError::Role(s.to_string())),
            };
            return Ok(Self {
                role: Some(role),
                path: path.into(),
            });
        }
        Ok(Self {
            role: None,
            path: s.into(),
        })
    }
}

/// Reads a trace file in either format.
pub fn load(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut requests = if first.trim_start().starts_with('{') {
        parse_mooncake(path, &text)?
    } else {
        parse_azure(path, &text)?
    };
    if requests.is_empty() {
        return Err(TraceError::Empty(path.to_path_buf()));
    }
    requests.sort_by(|a, b| a.arrival_ms.total_cmp(&b.arrival_ms));
    let start = requests[0].arrival_ms;
    for r in &mut requests {
        r.arrival_ms -= start;
    }
    Ok(requests)
}

fn format_error(path: &Path, line: usize, reason: impl Into<String>) -> TraceError {
    TraceError::Format {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn parse_azure(path: &Path, text: &str) -> Result<Vec<TraceRequest>, TraceError> {
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().unwrap_or((0, ""));
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let column = |name: &str| {
        columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| format_error(path, 1, format!("header has no {name} column")))
    };
    let (t, ctx, gen_col) = (
        column("TIMESTAMP")?,
        column("ContextTokens")?,
        column("GeneratedTokens")?,
    );
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let field = |c: usize| {
            fields
                .get(c)
                .copied()
                .ok_or_else(|| format_error(path, i + 1, format!("missing column {}", c + 1)))
        };
        let number = |c: usize, name: &str| -> Result<u32, TraceError> {
            let v = field(c)?;
            v.parse::<u32>().map_err(|_| {
                format_error(path, i + 1, format!("{name}: {v:?} is not a token count"))
            })
        };
        out.push(TraceRequest {
            arrival_ms: parse_timestamp_ms(field(t)?).ok_or_else(|| {
                format_error(
                    path,
                    i + 1,
                    format!("TIMESTAMP: cannot parse {:?}", fields[t]),
                )
            })?,
            prompt_tokens: number(ctx, "ContextTokens")?.max(1),
            output_tokens: number(gen_col, "GeneratedTokens")?.max(1),
            hash_ids: Arc::from(Vec::new()),
        });
    }
    Ok(out)
}

/// `2023-11-16 18:17:03.9799600` → milliseconds since an arbitrary epoch (days counted from
/// the civil calendar, so traces crossing midnight or month ends stay ordered).
pub fn parse_timestamp_ms(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    Some(((days as f64 * 24.0 + h) * 60.0 + min) * 60_000.0 + sec * 1000.0)
}

#[derive(serde::Deserialize)]
struct MooncakeRow {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

fn parse_mooncake(path: &Path, text: &str) -> Result<Vec<TraceRequest>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: MooncakeRow =
            serde_json::from_str(line).map_err(|e| format_error(path, i + 1, e.to_string()))?;
        out.push(TraceRequest {
            arrival_ms: row.timestamp,
            prompt_tokens: row.input_length.max(1),
            output_tokens: row.output_length.max(1),
            hash_ids: Arc::from(row.hash_ids),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_both_formats_relative_to_the_first_request() {
        let mut azure = tempfile::NamedTempFile::new().unwrap();
        writeln!(azure, "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:04.0319600,3180,0").unwrap();
        let rows = load(azure.path()).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            (rows[1].arrival_ms - 52.0).abs() < 1e-6,
            "{}",
            rows[1].arrival_ms
        );
        assert_eq!((rows[0].prompt_tokens, rows[1].output_tokens), (4808, 1));

        let mut moon = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            moon,
            r#"{{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]}}"#
        )
        .unwrap();
        writeln!(
            moon,
            r#"{{"timestamp": 2, "input_length": 10, "output_length": 4, "hash_ids": [0]}}"#
        )
        .unwrap();
        let rows = load(moon.path()).unwrap();
        assert_eq!(rows[0].arrival_ms, 0.0);
        assert_eq!(rows[1].arrival_ms, 3.0);
        assert_eq!(&*rows[1].hash_ids, &[0, 1]);
    }

    #[test]
    fn timestamps_cross_midnight_and_month_ends() {
        let a = parse_timestamp_ms("2023-11-30 23:59:59.5").unwrap();
        let b = parse_timestamp_ms("2023-12-01 00:00:00.5").unwrap();
        assert!((b - a - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn bad_lines_name_the_line_and_field() {
        let mut azure = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            azure,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,x,10"
        )
        .unwrap();
        let err = load(azure.path()).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("ContextTokens"),
            "{err}"
        );
        assert!("fast=x".parse::<TraceSpec>().is_err());
    }
}
