//! A batch's input file read as requests: one JSON object per line, `{"custom_id", "method":
//! "POST", "url", "body"}`, every `url` the batch's endpoint and every `custom_id` unique.
//! A file with any bad line fails the batch before a request runs, with an error per bad line
//! (OpenAI's behaviour), so a client fixes the file once rather than finding half of it ran.

use serde_json::{Value, json};

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub custom_id: String,
    /// The request body, as sent to the endpoint.
    pub body: String,
}

/// Errors reported at most: a file of 50 000 bad lines need not answer 50 000 of them.
const MAX_ERRORS: usize = 100;

/// The file's requests, or why it cannot run (each an OpenAI batch error object). `served`
/// says whether a model is served by the cluster now: a request naming one that is not fails
/// the batch here, so that one whose workers go away later waits for them rather than failing.
pub fn read(
    file: &[u8],
    endpoint: &str,
    max_requests: usize,
    served: &dyn Fn(&str) -> bool,
) -> Result<Vec<Line>, Vec<Value>> {
    let Ok(text) = std::str::from_utf8(file) else {
        return Err(vec![error(
            "invalid_file_encoding",
            "the file is not UTF-8 text; a batch file is JSONL: one JSON object per line",
            None,
            None,
        )]);
    };
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, text) in text.lines().enumerate() {
        let number = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        match line(text, endpoint, served) {
            Ok(line) if !seen.insert(line.custom_id.clone()) => errors.push(error(
                "duplicate_custom_id",
                &format!(
                    "custom_id {:?} is used by an earlier line; each request needs its own, \
                     to find its answer by",
                    line.custom_id
                ),
                Some("custom_id"),
                Some(number),
            )),
            Ok(line) => lines.push(line),
            Err((code, param, message)) => errors.push(error(code, &message, param, Some(number))),
        }
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if errors.is_empty() && lines.is_empty() {
        errors.push(error(
            "empty_file",
            "the file holds no requests; a batch file is JSONL: one JSON object per line",
            None,
            None,
        ));
    }
    if errors.is_empty() && lines.len() > max_requests {
        errors.push(error(
            "too_many_requests",
            &format!(
                "the file holds {} requests; a batch may hold at most {max_requests} (this \
                 router's --batch-max-requests): split it into several batches",
                lines.len()
            ),
            None,
            None,
        ));
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

type LineError = (&'static str, Option<&'static str>, String);

fn line(text: &str, endpoint: &str, served: &dyn Fn(&str) -> bool) -> Result<Line, LineError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        (
            "invalid_json_line",
            None,
            format!("the line is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut fields) = value else {
        return Err((
            "invalid_json_line",
            None,
            "the line is not a JSON object".into(),
        ));
    };
    let custom_id = match fields.remove("custom_id") {
        Some(Value::String(id)) if !id.is_empty() => id,
        Some(other) if !other.is_null() => {
            return Err((
                "invalid_custom_id",
                Some("custom_id"),
                format!("custom_id is {other}, must be a non-empty string"),
            ));
        }
        _ => {
            return Err((
                "missing_custom_id",
                Some("custom_id"),
                "the line has no custom_id: each request needs one, to find its answer by".into(),
            ));
        }
    };
    match fields.remove("method") {
        Some(Value::String(method)) if method == "POST" => {}
        other => {
            return Err((
                "invalid_method",
                Some("method"),
                format!("method is {}, must be \"POST\"", shown(other)),
            ));
        }
    }
    match fields.remove("url") {
        Some(Value::String(url)) if url == endpoint => {}
        other => {
            return Err((
                "mismatched_url",
                Some("url"),
                format!(
                    "url is {}, must be the batch's endpoint {endpoint:?}",
                    shown(other)
                ),
            ));
        }
    }
    let body = match fields.remove("body") {
        Some(Value::Object(body)) => body,
        other => {
            return Err((
                "invalid_body",
                Some("body"),
                format!(
                    "body is {}, must be the request's JSON object",
                    shown(other)
                ),
            ));
        }
    };
    for field in ["stream", "background"] {
        if body.get(field).is_some_and(|v| *v == Value::Bool(true)) {
            return Err((
                "invalid_body",
                Some("body"),
                format!(
                    "body.{field} is true; a batch request's answer is kept whole, send {field}: false"
                ),
            ));
        }
    }
    if let Some(Value::String(model)) = body.get("model")
        && !served(model)
    {
        return Err((
            "model_not_found",
            Some("body.model"),
            format!(
                "model {model:?} is not served by any worker of this cluster (GET /v1/models \
                 lists those that are)"
            ),
        ));
    }
    if let Some(field) = fields.keys().next() {
        return Err((
            "invalid_line",
            None,
            format!("the line has a field {field:?}; a line holds custom_id, method, url and body"),
        ));
    }
    Ok(Line {
        custom_id,
        body: Value::Object(body).to_string(),
    })
}

fn shown(value: Option<Value>) -> String {
    value.map_or_else(|| "missing".into(), |v| v.to_string())
}

fn error(code: &str, message: &str, param: Option<&str>, line: Option<usize>) -> Value {
    json!({"code": code, "message": message, "param": param, "line": line})
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "/v1/chat/completions";

    fn served(model: &str) -> bool {
        model == "m"
    }

    fn request(id: &str) -> String {
        json!({"custom_id": id, "method": "POST", "url": CHAT,
               "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}})
        .to_string()
    }

    #[test]
    fn a_good_file_is_its_requests_in_order() {
        let file = format!("{}\n\n{}\n", request("a"), request("b"));
        let lines = read(file.as_bytes(), CHAT, 10, &served).unwrap();
        assert_eq!(
            lines
                .iter()
                .map(|l| l.custom_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        let body: Value = serde_json::from_str(&lines[0].body).unwrap();
        assert_eq!(body["model"], "m");
    }

    #[test]
    fn every_bad_line_is_named_by_its_number_and_code() {
        let wrong_url = request("c").replace(CHAT, "/v1/completions");
        let streaming = json!({"custom_id": "d", "method": "POST", "url": CHAT,
                               "body": {"stream": true}})
        .to_string();
        let file = [
            request("a"),
            "not json".into(),
            request("a"),
            wrong_url,
            r#"{"method": "POST", "url": "/v1/chat/completions", "body": {}}"#.into(),
            streaming,
            r#"{"custom_id": "e", "method": "GET", "url": "/v1/chat/completions", "body": {}}"#
                .into(),
            request("f").replace(r#""model":"m""#, r#""model":"gone""#),
        ]
        .join("\n");
        let errors = read(file.as_bytes(), CHAT, 10, &served).unwrap_err();
        let found: Vec<(String, u64)> = errors
            .iter()
            .map(|e| {
                (
                    e["code"].as_str().unwrap().to_string(),
                    e["line"].as_u64().unwrap(),
                )
            })
            .collect();
        let expected = [
            ("invalid_json_line", 2),
            ("duplicate_custom_id", 3),
            ("mismatched_url", 4),
            ("missing_custom_id", 5),
            ("invalid_body", 6),
            ("invalid_method", 7),
            ("model_not_found", 8),
        ];
        assert_eq!(
            found,
            expected.map(|(c, l)| (c.to_string(), l)).to_vec(),
            "{errors:?}"
        );
    }

    #[test]
    fn an_empty_or_oversized_or_binary_file_is_refused_whole() {
        let code =
            |file: &[u8], max| read(file, CHAT, max, &served).unwrap_err()[0]["code"].clone();
        assert_eq!(code(b"\n\n", 10), "empty_file");
        let two = format!("{}\n{}", request("a"), request("b"));
        assert_eq!(code(two.as_bytes(), 1), "too_many_requests");
        assert_eq!(code(&[0xff, 0xfe], 10), "invalid_file_encoding");
    }
}
