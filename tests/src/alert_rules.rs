//! Checks the shipped Prometheus alerting rules (`deploy/prometheus/switchyard-alerts.yaml`)
//! against what the components really serve on `/metrics`: each expression parses as PromQL,
//! each metric selector selects at least one scraped series, and each label an aggregation
//! groups by (or a binary operation matches on) is a label of the series beneath it. A typo in
//! a metric name, a label or a label value would otherwise leave an alert silent for ever.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};
use serde::Deserialize;

/// Labels every series gets from the scrape itself, not from `/metrics`.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// The rule file, relative to the repository root.
pub const RULES: &str = "deploy/prometheus/switchyard-alerts.yaml";
/// The runbook the rules' `runbook` annotations point into.
pub const RUNBOOK: &str = "docs/runbook.md";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub groups: Vec<Group>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub alert: String,
    pub expr: String,
    #[serde(rename = "for")]
    pub for_: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The rule file as shipped.
pub fn load() -> anyhow::Result<RuleFile> {
    let path = repo_root().join(RULES);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    serde_norway::from_str(&text).with_context(|| format!("{RULES} is not a rule file"))
}

/// One series of a scrape: its metric name and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Series {
    fn label(&self, name: &str) -> &str {
        if name == "__name__" {
            return &self.name;
        }
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// The series of an OpenMetrics / Prometheus text exposition.
pub fn parse_exposition(text: &str) -> anyhow::Result<Vec<Series>> {
    let mut series = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(at) => line.split_at(at),
            None => bail!("a sample line without a value: {line:?}"),
        };
        let mut labels = BTreeMap::new();
        if let Some(mut rest) = rest.strip_prefix('{') {
            while !rest.starts_with('}') {
                let (label, after) = rest
                    .split_once("=\"")
                    .with_context(|| format!("a label without a value: {line:?}"))?;
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => bail!("a label value cut short: {line:?}"),
                        },
                        Some((at, '"')) => break at,
                        Some((_, c)) => value.push(c),
                        None => bail!("an unterminated label value: {line:?}"),
                    }
                };
                labels.insert(label.trim_start_matches(',').to_string(), value);
                rest = &after[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        series.push(Series {
            name: name.to_string(),
            labels,
        });
    }
    Ok(series)
}

/// What the check found about one rule.
#[derive(Debug, Default)]
pub struct Report {
    /// `alert: selector` of the selectors that select no scraped series (checked no further).
    pub unmatched: Vec<String>,
    /// Everything wrong: bad PromQL, grouping by a label the series do not have, annotations.
    pub errors: Vec<String>,
}

/// Checks every rule of `rules` against `series` (the union of the components' scrapes).
pub fn check(rules: &RuleFile, series: &[Series]) -> Report {
    let mut report = Report::default();
    for rule in rules.groups.iter().flat_map(|g| &g.rules) {
        match parser::parse(&rule.expr) {
            Ok(expr) => check_expr(&rule.alert, &expr, series, &mut report),
            Err(error) => report.errors.push(format!(
                "{}: the expression does not parse: {error}",
                rule.alert
            )),
        }
    }
    report
}

fn selects(selector: &VectorSelector, series: &Series) -> bool {
    selector
        .name
        .as_deref()
        .is_none_or(|name| name == series.name)
        && selector
            .matchers
            .matchers
            .iter()
            .all(|m| m.is_match(series.label(&m.name)))
}

/// The selectors under `expr`, in order.
fn selectors<'e>(expr: &'e Expr, out: &mut Vec<&'e VectorSelector>) {
    match expr {
        Expr::Aggregate(a) => {
            selectors(&a.expr, out);
            if let Some(param) = &a.param {
                selectors(param, out);
            }
        }
        Expr::Unary(u) => selectors(&u.expr, out),
        Expr::Binary(b) => {
            selectors(&b.lhs, out);
            selectors(&b.rhs, out);
        }
        Expr::Paren(p) => selectors(&p.expr, out),
        Expr::Subquery(s) => selectors(&s.expr, out),
        Expr::VectorSelector(v) => out.push(v),
        Expr::MatrixSelector(m) => out.push(&m.vs),
        Expr::Call(c) => c.args.args.iter().for_each(|a| selectors(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The label modifiers (`by`/`without`, `on`/`ignoring`) in `expr`, each with the operand
/// expressions whose series it names labels of.
fn modifiers<'e>(expr: &'e Expr, out: &mut Vec<(&'e LabelModifier, Vec<&'e Expr>)>) {
    match expr {
        Expr::Aggregate(a) => {
            if let Some(modifier) = &a.modifier {
                out.push((modifier, vec![&a.expr]));
            }
            modifiers(&a.expr, out);
        }
        Expr::Binary(b) => {
            if let Some(matching) = b.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                out.push((matching, vec![&b.lhs, &b.rhs]));
            }
            modifiers(&b.lhs, out);
            modifiers(&b.rhs, out);
        }
        Expr::Unary(u) => modifiers(&u.expr, out),
        Expr::Paren(p) => modifiers(&p.expr, out),
        Expr::Subquery(s) => modifiers(&s.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| modifiers(a, out)),
        _ => {}
    }
}

fn check_expr(alert: &str, expr: &Expr, series: &[Series], report: &mut Report) {
    let mut all = Vec::new();
    selectors(expr, &mut all);
    if all.is_empty() {
        report.errors.push(format!("{alert}: selects no metric"));
    }
    let mut unmatched = Vec::new();
    for selector in &all {
        if !series.iter().any(|s| selects(selector, s)) {
            unmatched.push(selector.to_string());
        }
    }
    if !unmatched.is_empty() {
        report
            .unmatched
            .extend(unmatched.iter().map(|s| format!("{alert}: {s}")));
        return;
    }
    let mut found = Vec::new();
    modifiers(expr, &mut found);
    for (modifier, operands) in found {
        for label in &modifier.labels().labels {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            // Each operand (both sides of a match) must have it.
            let known = operands.iter().all(|operand| {
                let mut beneath = Vec::new();
                selectors(operand, &mut beneath);
                beneath.iter().any(|selector| {
                    series
                        .iter()
                        .any(|s| selects(selector, s) && s.labels.contains_key(label))
                })
            });
            if !known {
                report.errors.push(format!(
                    "{alert}: `{label}` is no label of the series it groups or matches"
                ));
            }
        }
    }
}

/// The rules' own shape: a severity, a summary and a description, and a `runbook` annotation
/// naming a section of docs/runbook.md titled by the alert.
pub fn check_annotations(rules: &RuleFile) -> anyhow::Result<()> {
    let runbook = std::fs::read_to_string(repo_root().join(RUNBOOK))?;
    let mut names = std::collections::BTreeSet::new();
    for rule in rules.groups.iter().flat_map(|g| &g.rules) {
        let name = &rule.alert;
        ensure!(names.insert(name), "{name}: two alerts by that name");
        let severity = rule.labels.get("severity").map(String::as_str);
        ensure!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}, not critical or warning"
        );
        for key in ["summary", "description"] {
            ensure!(rule.annotations.contains_key(key), "{name}: no {key}");
        }
        let expected = format!("{RUNBOOK}#{}", name.to_lowercase());
        ensure!(
            rule.annotations.get("runbook") == Some(&expected),
            "{name}: runbook annotation {:?}, expected {expected:?}",
            rule.annotations.get("runbook")
        );
        ensure!(
            runbook.lines().any(|line| line == format!("## {name}")),
            "{RUNBOOK} has no section `## {name}`"
        );
        if let Some(duration) = &rule.for_ {
            ensure!(
                duration
                    .strip_suffix(['s', 'm', 'h'])
                    .is_some_and(|n| n.parse::<u32>().is_ok()),
                "{name}: `for: {duration}` is not a Prometheus duration"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exposition_parses_into_series_with_their_labels() {
        let text =
            "# TYPE a counter\na_total{lane=\"x\",reason=\"say \\\"hi\\\", ok\"} 1\nb 2\n# EOF\n";
        let series = parse_exposition(text).unwrap();
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].name, "a_total");
        assert_eq!(series[0].label("lane"), "x");
        assert_eq!(series[0].label("reason"), "say \"hi\", ok");
        assert_eq!(series[1].name, "b");
        assert!(series[1].labels.is_empty());
    }

    fn one_rule(expr: &str) -> RuleFile {
        RuleFile {
            groups: vec![Group {
                name: "g".into(),
                rules: vec![Rule {
                    alert: "A".into(),
                    expr: expr.into(),
                    for_: None,
                    labels: BTreeMap::new(),
                    annotations: BTreeMap::new(),
                }],
            }],
        }
    }

    #[test]
    fn typos_in_names_labels_and_values_are_found() {
        let series =
            parse_exposition("x_total{lane=\"fast\",pool=\"gpu\"} 0\ny{pool=\"gpu\"} 1\n").unwrap();
        let good = check(
            &one_rule("sum by (pool) (rate(x_total{lane=~\"fast|slow\"}[5m])) / on (pool) y"),
            &series,
        );
        assert!(
            good.unmatched.is_empty() && good.errors.is_empty(),
            "{good:?}"
        );

        for (expr, unmatched, error) in [
            ("rate(x_totl[5m])", true, ""),
            ("x_total{lane=\"fsat\"}", true, ""),
            ("sum by (pol) (x_total)", false, "`pol` is no label"),
            ("x_total / on (lane) y", false, "`lane` is no label"),
            ("sum by (instance) (x_total)", false, ""),
            ("rate(x_total[5m]", false, "does not parse"),
        ] {
            let report = check(&one_rule(expr), &series);
            assert_eq!(
                !report.unmatched.is_empty(),
                unmatched,
                "{expr}: {report:?}"
            );
            if error.is_empty() {
                assert!(report.errors.is_empty(), "{expr}: {report:?}");
            } else {
                assert!(
                    report.errors.iter().any(|e| e.contains(error)),
                    "{expr}: {report:?}"
                );
            }
        }
    }
}
