//! Span fields in the text log format show each field once, with its latest value.
//!
//! `tracing_subscriber`'s text formatter appends a span's fields each time one is recorded, so a
//! field recorded twice (a request's `reason` once classified, then once placed) is printed
//! twice on every line logged inside the span. [`LatestSpanFields`], a layer above the `fmt`
//! layer, rewrites the span's formatted fields after each record: one `name=value` per field, in
//! the order first recorded, each with its last value. (The JSON format merges fields by itself.)

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The layer; add it after (above) a `fmt` layer using [`DefaultFields`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LatestSpanFields;

/// A span's fields as formatted, `(name, "name=value")`, in the order first recorded.
#[derive(Debug, Default)]
struct Segments(Vec<(&'static str, String)>);

/// Formats each field on its own with the `fmt` layer's visitor (same quoting, same colours).
struct SegmentVisitor<'a> {
    formatted: &'a mut FormattedFields<DefaultFields>,
    segments: &'a mut Segments,
}

impl SegmentVisitor<'_> {
    fn segment(&mut self, field: &Field, visit: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let start = self.formatted.fields.len();
        visit(&mut DefaultVisitor::new(self.formatted.as_writer(), true));
        let text = self.formatted.fields[start..].to_string();
        self.formatted.fields.truncate(start);
        if text.is_empty() {
            return;
        }
        match self
            .segments
            .0
            .iter_mut()
            .find(|(name, _)| *name == field.name())
        {
            Some((_, current)) => *current = text,
            None => self.segments.0.push((field.name(), text)),
        }
    }
}

impl Visit for SegmentVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.segment(field, |v| v.record_f64(field, value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.segment(field, |v| v.record_i64(field, value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.segment(field, |v| v.record_u64(field, value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.segment(field, |v| v.record_bool(field, value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.segment(field, |v| v.record_str(field, value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.segment(field, |v| v.record_error(field, value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.segment(field, |v| v.record_debug(field, value));
    }
}

impl LatestSpanFields {
    fn rewrite<S, R: RecordFields>(&self, id: &Id, ctx: &Context<'_, S>, values: &R)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let mut segments = extensions.remove::<Segments>().unwrap_or_default();
        let Some(formatted) = extensions.get_mut::<FormattedFields<DefaultFields>>() else {
            return;
        };
        values.record(&mut SegmentVisitor {
            formatted,
            segments: &mut segments,
        });
        let mut joined = String::with_capacity(formatted.fields.len());
        for (i, (_, text)) in segments.0.iter().enumerate() {
            if i > 0 {
                joined.push(' ');
            }
            joined.push_str(text);
        }
        formatted.fields = joined;
        extensions.insert(segments);
    }
}

impl<S> Layer<S> for LatestSpanFields
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        // The `fmt` layer below has formatted the fields already; start over field by field.
        if let Some(span) = ctx.span(id)
            && let Some(formatted) = span
                .extensions_mut()
                .get_mut::<FormattedFields<DefaultFields>>()
        {
            formatted.fields.clear();
        }
        self.rewrite(id, &ctx, attrs);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        self.rewrite(id, &ctx, values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::capture::CapturedLogs;
    use tracing::field::Empty;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn a_field_recorded_again_is_printed_once_with_its_latest_value() {
        let captured = CapturedLogs::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .with_ansi(false),
            )
            .with(LatestSpanFields);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("req", id = "r-1", lane = Empty, n = Empty);
            span.record("lane", "batch");
            span.record("n", 1);
            span.record("lane", "interactive");
            span.record("n", 2);
            span.in_scope(|| tracing::info!(extra = %"x y", "accepted"));
        });
        let text = captured.text();
        assert!(
            text.contains(r#"req{id="r-1" lane="interactive" n=2}"#),
            "{text}"
        );
        assert_eq!(text.matches("lane=").count(), 1, "{text}");
        assert!(text.contains("accepted extra=x y"), "{text}");
    }
}
