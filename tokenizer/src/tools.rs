//! Tool calling for models whose chat template has no tool format of its own (SmolLM2 and most
//! small models): the tools go into a system message, the model answers in one generic
//! (Hermes-style) format that many models were trained on, and generated text is split into
//! plain text and call pieces as it streams.
//!
//! The answer format, enforced by an engine that decodes under [`output_grammar`]:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! one or more such blocks separated by `"\n"`. With [`ToolChoice::Auto`] the model may instead
//! answer in plain text that does not start with `<tool_call>`.
//!
//! No engine dependency here: the router renders prompts with [`plain_messages`] (through
//! [`crate::GgufTokenizer::encode_chat_tools`]) exactly as the engine would.

use serde_json::Value;

use crate::ChatMessage;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// The arguments' JSON Schema (an object schema; `{"type":"object"}` when none).
    pub parameters: Value,
}

/// How the model may use the tools.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// Answer in text or call tools, as the model sees fit.
    #[default]
    Auto,
    /// Answer in text only.
    None,
    /// Call at least one tool.
    Required,
    /// Call this tool (and no other).
    Function(String),
}

/// The tools of one request and how they may be used.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolSet {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    /// At most one call in the turn (OpenAI's `parallel_tool_calls: false`).
    pub single_call: bool,
}

impl ToolSet {
    /// Whether the answer is constrained to the tool format at all.
    pub fn callable(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// The tools the model may call under the choice (one for [`ToolChoice::Function`]).
    fn offered(&self) -> Vec<&ToolSpec> {
        match &self.choice {
            ToolChoice::None => Vec::new(),
            ToolChoice::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            ToolChoice::Auto | ToolChoice::Required => self.tools.iter().collect(),
        }
    }
}

/// One call of a tool in a conversation's history.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCallText {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A chat message that may carry tool calls (an assistant turn) or a tool's result (role
/// `"tool"`, answering call `tool_call_id`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolTurn {
    pub role: String,
    pub content: String,
    pub tool_calls: Vec<ToolCallText>,
    pub tool_call_id: String,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const RESPONSE_OPEN: &str = "<tool_response>";
const RESPONSE_CLOSE: &str = "</tool_response>";

/// The text that starts a call of `name`, up to its arguments: fixed, so the grammar forces it
/// and the parser knows the call's name as soon as it is spelt.
fn call_head(name: &str) -> String {
    format!(
        "{OPEN}\n{{\"name\": {}, \"arguments\": ",
        Value::String(name.to_string())
    )
}

/// A call exactly as the model is asked to write it.
fn call_text(name: &str, arguments: &str) -> String {
    let arguments = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    format!("{}{arguments}}}\n{CLOSE}", call_head(name))
}

/// The system message text that tells the model about the tools and the answer format.
fn tools_prompt(tools: &ToolSet) -> String {
    let mut out = String::from(
        "# Tools\n\nYou can call functions to help answer the user. Their signatures, one JSON \
         object per line, are inside <tools></tools>:\n<tools>\n",
    );
    for tool in &tools.tools {
        let signature = serde_json::json!({
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            }
        });
        out.push_str(&signature.to_string());
        out.push('\n');
    }
    out.push_str(
        "</tools>\n\nTo call a function, write its name and a JSON object of arguments inside \
         <tool_call></tool_call>, like this:\n<tool_call>\n{\"name\": \"function name\", \
         \"arguments\": {\"argument name\": \"value\"}}\n</tool_call>\n",
    );
    let many = if tools.single_call {
        "exactly one function"
    } else {
        "one or more functions, one <tool_call> block each"
    };
    let rule = match &tools.choice {
        ToolChoice::Function(name) => format!("You must call the function `{name}`."),
        ToolChoice::Required => format!("You must call {many}."),
        _ if tools.single_call => {
            "Either answer the user directly in plain text, or call at most one function.".into()
        }
        _ => "Either answer the user directly in plain text, or call one or more functions, one \
              <tool_call> block each."
            .into(),
    };
    out.push_str(&rule);
    out
}

/// The chat for a template without tool support: the tools and the answer format in a system
/// message (merged into a leading system message if there is one), assistant calls written in
/// the exact output format, tool results as user turns wrapped in
/// `<tool_response>…</tool_response>` (consecutive results merged in one turn). With
/// [`ToolChoice::None`] or no tools: the messages unchanged (tool turns still converted so the
/// history renders).
pub fn plain_messages(turns: &[ToolTurn], tools: &ToolSet) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(turns.len() + 1);
    let mut rest = turns;
    if tools.callable() {
        let prompt = tools_prompt(tools);
        let content = match turns.first() {
            Some(first) if first.role == "system" => {
                rest = &turns[1..];
                if first.content.is_empty() {
                    prompt
                } else {
                    format!("{}\n\n{prompt}", first.content)
                }
            }
            _ => prompt,
        };
        out.push(ChatMessage {
            role: "system".into(),
            content,
        });
    }
    // Whether the last message pushed holds tool results (the next result joins it).
    let mut in_results = false;
    for turn in rest {
        if turn.role == "tool" {
            let wrapped = format!("{RESPONSE_OPEN}\n{}\n{RESPONSE_CLOSE}", turn.content);
            match out.last_mut() {
                Some(last) if in_results => {
                    last.content.push('\n');
                    last.content.push_str(&wrapped);
                }
                _ => out.push(ChatMessage {
                    role: "user".into(),
                    content: wrapped,
                }),
            }
            in_results = true;
            continue;
        }
        in_results = false;
        let mut content = turn.content.clone();
        for call in &turn.tool_calls {
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&call_text(&call.name, &call.arguments));
        }
        out.push(ChatMessage {
            role: turn.role.clone(),
            content,
        });
    }
    out
}

/// A Lark string literal of `text` (Lark's strings take JSON's escapes).
fn lark_literal(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

/// The JSON schema `%json` gets for a tool's arguments: the tool's own, laid out the way the
/// model is shown calls (`", "` and `": "`, no other whitespace), so it cannot pad its answer
/// with whitespace forever and its output reads like the examples.
fn arguments_schema(parameters: &Value) -> Value {
    let mut schema = match parameters {
        Value::Object(_) => parameters.clone(),
        _ => serde_json::json!({"type": "object"}),
    };
    if let Value::Object(map) = &mut schema {
        map.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    schema
}

/// The grammar rule names of tool `i`'s call and arguments.
fn rule_names(i: usize) -> (String, String) {
    (format!("call_{i}"), format!("args_{i}"))
}

/// The Lark grammar (llguidance's dialect) the answer must follow; `None` when unconstrained
/// ([`ToolChoice::None`], no tools, or a [`ToolChoice::Function`] naming no offered tool).
///
/// Rules `args_{i}` hold tool `i`'s schema (its index in `tools.tools`), so an engine whose
/// grammar library refuses the grammar can compile [`arguments_grammar`] per tool to name
/// the one at fault.
pub fn output_grammar(tools: &ToolSet) -> Option<String> {
    let offered = tools.offered();
    if offered.is_empty() {
        return None;
    }
    let mut calls = Vec::new();
    let mut rules = String::new();
    for (i, tool) in tools.tools.iter().enumerate() {
        if !offered.iter().any(|t| std::ptr::eq(*t, tool)) {
            continue;
        }
        let (call, args) = rule_names(i);
        rules.push_str(&format!(
            "{call}: {} {args} {}\n{args}: %json {}\n",
            lark_literal(&call_head(&tool.name)),
            lark_literal(&format!("}}\n{CLOSE}")),
            arguments_schema(&tool.parameters)
        ));
        calls.push(call);
    }
    let calls_rule = if tools.single_call {
        "calls: call\n".to_string()
    } else {
        format!("calls: call ({} call)*\n", lark_literal("\n"))
    };
    let start = match tools.choice {
        // A text answer: anything at all, as long as it does not start like a call (then it
        // must be one). `(?s)` lets it span lines.
        ToolChoice::Auto => format!(
            "start: TEXT | calls\nTEXT: /(?s:.+)/ & ~/(?s:{}.*)/\n",
            regex_escape(OPEN)
        ),
        _ => "start: calls\n".to_string(),
    };
    Some(format!(
        "%llguidance {{}}\n{start}{calls_rule}call: {}\n{rules}",
        calls.join(" | ")
    ))
}

/// A grammar whose only answer is a JSON value following tool `tool`'s parameters schema (the
/// same `%json` the full grammar uses), to find which tool a refused grammar trips on.
pub fn arguments_grammar(tool: &ToolSpec) -> String {
    format!("start: %json {}\n", arguments_schema(&tool.parameters))
}

/// A grammar whose only answer is a JSON value following `schema` (an object schema; anything
/// else stands for any object): a structured answer (`response_format`). Unlike a call's
/// arguments it may be laid out as the model likes — small models write JSON answers
/// pretty-printed, and held to one line they lose their way (SmolLM2-135M closed a string
/// with `}` and rambled on inside it) — but between two tokens of JSON there is at most one
/// space, or one line break and an indent of up to 20 (llama.cpp's rule): a freer layout let
/// SmolLM2 spend its tokens on blank lines.
pub fn json_grammar(schema: &Value) -> String {
    let mut schema = match schema {
        Value::Object(_) => schema.clone(),
        _ => serde_json::json!({"type": "object"}),
    };
    bound_integers(&mut schema);
    if let Value::Object(map) = &mut schema {
        map.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": true,
                "whitespace_pattern": "(\\x20|\\x0A[\\x20\\x09]{0,20})",
            }),
        );
    }
    format!("start: %json {schema}\n")
}

/// The largest integer a JSON number holds exactly in the doubles most parsers read it into
/// (2^53 − 1, JavaScript's `Number.MAX_SAFE_INTEGER`).
const SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Gives every `integer` in `schema` without its own bounds the range of a safe integer, as
/// llama.cpp's grammars bound integers to 16 digits: unbounded, a small model may write digits
/// until `max_tokens` (SmolLM2-135M wrote a population of `1111…`), and no parser reads such a
/// number exactly anyway.
fn bound_integers(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let integer = match map.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(types)) => types.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer {
                if !map.contains_key("maximum") && !map.contains_key("exclusiveMaximum") {
                    map.insert("maximum".into(), Value::from(SAFE_INTEGER));
                }
                if !map.contains_key("minimum") && !map.contains_key("exclusiveMinimum") {
                    map.insert("minimum".into(), Value::from(-SAFE_INTEGER));
                }
            }
            // Sub-schemas sit under many keywords (properties, items, anyOf, $defs, …):
            // every nested object is visited, and only those typed `integer` change — but not
            // values the answer must equal or that only document it.
            for (key, value) in map.iter_mut() {
                if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                    bound_integers(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        // Only the regex syntax's own metacharacters: an escaped `<` is a word boundary.
        if "\\.+*?()|[]{}^$#&-~/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A piece of generated text, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Plain text for the answer's content.
    Text(String),
    /// A piece of call `index`: its first piece carries `id` and `name` (and possibly the
    /// first argument text), later ones only fragments of `arguments` (empty `id`, `name`).
    Call {
        index: u32,
        id: String,
        name: String,
        arguments: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing decided yet: held text is a prefix of `<tool_call>`.
    Start,
    /// A text answer: everything from here on is text.
    Text,
    /// Inside `<tool_call>`, up to the end of the call's name: held until it parses.
    Head,
    /// After the name, up to the arguments (`, "arguments": `).
    Keys,
    /// Inside the arguments JSON.
    Args,
    /// After the arguments: the call's closing `}` and `</tool_call>`.
    Tail,
    /// After a call: whitespace is held, and a prefix of `<tool_call>`.
    Between,
}

/// Turns generated text into text pieces and tool-call pieces, incrementally.
///
/// Deterministic in the text alone (however it is cut into pushes): a generation resumed on
/// another worker pushes the text already delivered (the resumed tokens' text) and discards
/// what that returns, then goes on pushing new text; call indices and ids continue where the
/// first worker's left off, given the same `id_prefix`.
///
/// Calls are recognised where the grammar allows them: at the start of the answer and after a
/// call. An answer that starts any other way is text to its end.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    id_prefix: String,
    state: State,
    /// Text received and not yet given out (its meaning is still open).
    held: String,
    /// Calls started so far.
    calls: u32,
    /// In `Args`: nesting depth of `{`/`[`, whether inside a string, and whether the previous
    /// char was a backslash inside a string.
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl ToolCallParser {
    /// A parser whose call ids are `call_{id_prefix}{index}`: the engine passes something
    /// unique to the request (and the same for all its workers, so a resumed generation gives
    /// the same ids).
    pub fn new(tools: &ToolSet, id_prefix: &str) -> Self {
        // The tool set does not change how text is read: calls of unknown tools are still
        // reported (an unconstrained model may make them; the client decides).
        let _ = tools;
        Self {
            id_prefix: id_prefix.to_string(),
            state: State::Start,
            held: String::new(),
            calls: 0,
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }

    /// Whether any call has started.
    pub fn called(&self) -> bool {
        self.calls > 0
    }

    /// The pieces `text` completes; pieces of the same kind (text, or the same call) are
    /// merged, so a push returns at most one piece per call it touches.
    pub fn push(&mut self, text: &str) -> Vec<Parsed> {
        let mut out = Vec::new();
        for c in text.chars() {
            self.step(c, &mut out);
        }
        self.flush_partial(&mut out);
        out
    }

    /// The end of the generation: held text comes out as what it can only be now (a
    /// truncated call's arguments stay that call's).
    pub fn finish(&mut self) -> Vec<Parsed> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Start | State::Text => emit_text(&mut out, &held),
            // After calls, what is held is the start of another `<tool_call>` the end of the
            // generation cut short (found from outside: `max_tokens` ending a third call
            // gave two calls and a text block `<tool_call`): it is no answer text.
            State::Args => self.emit_args(&mut out, &held),
            State::Head | State::Keys | State::Tail | State::Between => {}
        }
        self.state = State::Text;
        out
    }

    /// Gives out what is already certain mid-push: a text answer's text and a call's
    /// argument text (held only while it could be whitespace before the call's end).
    fn flush_partial(&mut self, out: &mut Vec<Parsed>) {
        match self.state {
            State::Text => {
                let held = std::mem::take(&mut self.held);
                emit_text(out, &held);
            }
            State::Args if !self.held.is_empty() => {
                // Trailing whitespace at depth 0 might precede the wrapper's `}`: hold it.
                let keep = if self.depth == 0 && !self.in_string {
                    self.held.len() - self.held.trim_end().len()
                } else {
                    0
                };
                let cut = self.held.len() - keep;
                let part: String = self.held.drain(..cut).collect();
                self.emit_args(out, &part);
            }
            _ => {}
        }
    }

    fn emit_args(&self, out: &mut Vec<Parsed>, text: &str) {
        if text.is_empty() {
            return;
        }
        let index = self.calls - 1;
        if let Some(Parsed::Call {
            index: last,
            arguments,
            ..
        }) = out.last_mut()
            && *last == index
        {
            arguments.push_str(text);
            return;
        }
        out.push(Parsed::Call {
            index,
            id: String::new(),
            name: String::new(),
            arguments: text.to_string(),
        });
    }

    fn step(&mut self, c: char, out: &mut Vec<Parsed>) {
        match self.state {
            State::Text => self.held.push(c),
            State::Start | State::Between => {
                if self.state == State::Between && self.held.is_empty() && c.is_whitespace() {
                    // Separators between calls are the format's, not the answer's.
                    return;
                }
                self.held.push(c);
                if self.held == OPEN {
                    self.held.clear();
                    self.state = State::Head;
                } else if !OPEN.starts_with(self.held.as_str()) {
                    self.state = State::Text;
                }
            }
            State::Head => {
                self.held.push(c);
                match parse_head(&self.held) {
                    Head::Incomplete => {}
                    Head::Name(name, rest) => {
                        let index = self.calls;
                        self.calls += 1;
                        self.held = rest;
                        self.state = State::Keys;
                        out.push(Parsed::Call {
                            index,
                            id: format!("call_{}{index}", self.id_prefix),
                            name,
                            arguments: String::new(),
                        });
                        self.after_keys(out);
                    }
                    Head::Invalid => {
                        // Not the format after all: what was read is text.
                        let held = std::mem::take(&mut self.held);
                        self.state = State::Text;
                        self.held = format!("{OPEN}{held}");
                    }
                }
            }
            State::Keys => {
                self.held.push(c);
                self.after_keys(out);
            }
            State::Args => self.args_char(c, out),
            State::Tail => {
                self.held.push(c);
                let rest = self.held.trim_start();
                if rest == CLOSE {
                    self.held.clear();
                    self.state = State::Between;
                } else if !CLOSE.starts_with(rest) {
                    let held = std::mem::take(&mut self.held);
                    self.state = State::Text;
                    self.held = held;
                }
            }
        }
    }

    /// In `Keys`: moves on to the arguments once the held text is `, "arguments": `.
    fn after_keys(&mut self, out: &mut Vec<Parsed>) {
        match match_tokens(&self.held, &[",", "\"arguments\"", ":"]) {
            Match::Incomplete => {}
            Match::Done(rest) => {
                let rest = rest.to_string();
                self.held.clear();
                self.state = State::Args;
                self.depth = 0;
                self.in_string = false;
                self.escaped = false;
                // Text pushed in one piece can go on into the arguments.
                for c in rest.chars() {
                    self.step(c, out);
                }
            }
            Match::Invalid => {
                // The call was reported by name; what follows is not its arguments.
                self.state = State::Text;
            }
        }
    }

    fn args_char(&mut self, c: char, out: &mut Vec<Parsed>) {
        if self.in_string {
            self.held.push(c);
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
            }
            return;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' if self.depth > 0 => self.depth -= 1,
            '}' => {
                // The wrapper object's end: the arguments are complete.
                let args = std::mem::take(&mut self.held);
                self.emit_args(out, args.trim_end());
                self.state = State::Tail;
                return;
            }
            _ => {}
        }
        if self.held.is_empty() && self.depth == 0 && c.is_whitespace() {
            // Whitespace before the arguments is layout.
            return;
        }
        self.held.push(c);
    }
}

fn emit_text(out: &mut Vec<Parsed>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Parsed::Text(last)) = out.last_mut() {
        last.push_str(text);
    } else {
        out.push(Parsed::Text(text.to_string()));
    }
}

/// How far text matches a sequence of JSON tokens (any whitespace before each).
enum Match<'a> {
    Incomplete,
    /// All matched; the text after them.
    Done(&'a str),
    Invalid,
}

fn match_tokens<'a>(mut rest: &'a str, tokens: &[&str]) -> Match<'a> {
    for token in tokens {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix(token) {
            rest = after;
        } else if token.starts_with(rest) {
            return Match::Incomplete;
        } else {
            return Match::Invalid;
        }
    }
    Match::Done(rest)
}

enum Head {
    Incomplete,
    /// The call's name is complete: it, and the text after its closing quote.
    Name(String, String),
    Invalid,
}

/// Parses `\n{"name": "NAME"` (any JSON whitespace between the parts): what the grammar
/// forces, read leniently so unconstrained text in the same shape parses too.
fn parse_head(text: &str) -> Head {
    let rest = match match_tokens(text, &["{", "\"name\"", ":", "\""]) {
        Match::Done(rest) => rest,
        Match::Incomplete => return Head::Incomplete,
        Match::Invalid => return Head::Invalid,
    };
    // The name string: its end is the first unescaped quote.
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            return match serde_json::from_str::<String>(&format!("\"{}", &rest[..=i])) {
                Ok(name) => Head::Name(name, rest[i + 1..].to_string()),
                Err(_) => Head::Invalid,
            };
        }
    }
    Head::Incomplete
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn integers_without_bounds_get_a_safe_integer_range_and_others_keep_theirs() {
        let mut schema = serde_json::json!({
            "type": "object",
            "properties": {
                "population": {"type": "integer"},
                "rank": {"type": ["integer", "null"], "minimum": 1},
                "ids": {"type": "array", "items": {"type": "integer", "exclusiveMaximum": 10}},
                "kind": {"const": {"type": "integer"}},
            },
        });
        bound_integers(&mut schema);
        let p = &schema["properties"];
        assert_eq!(p["population"]["maximum"], SAFE_INTEGER);
        assert_eq!(p["population"]["minimum"], -SAFE_INTEGER);
        assert_eq!(p["rank"]["minimum"], 1);
        assert_eq!(p["rank"]["maximum"], SAFE_INTEGER);
        assert_eq!(p["ids"]["items"].get("maximum"), None);
        assert_eq!(p["ids"]["items"]["minimum"], -SAFE_INTEGER);
        assert_eq!(p["kind"], serde_json::json!({"const": {"type": "integer"}}));
        let grammar = json_grammar(&schema);
        assert!(grammar.starts_with("start: %json {"), "{grammar}");
        assert!(grammar.contains("whitespace_pattern"), "{grammar}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> ToolSpec {
        ToolSpec {
            name: "get_weather".into(),
            description: "The weather in a city".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            }),
        }
    }

    fn time() -> ToolSpec {
        ToolSpec {
            name: "get_time".into(),
            description: "The time in a zone".into(),
            parameters: serde_json::json!({"type": "object"}),
        }
    }

    fn set(choice: ToolChoice, single_call: bool) -> ToolSet {
        ToolSet {
            tools: vec![weather(), time()],
            choice,
            single_call,
        }
    }

    /// A piece stream folded to what a client assembles: the text, and each call's id, name
    /// and arguments.
    fn assembled(pieces: &[Parsed]) -> (String, Vec<(String, String, String)>) {
        let mut text = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for p in pieces {
            match p {
                Parsed::Text(t) => text.push_str(t),
                Parsed::Call {
                    index,
                    id,
                    name,
                    arguments,
                } => {
                    let i = *index as usize;
                    if i == calls.len() {
                        assert!(
                            !id.is_empty() && !name.is_empty(),
                            "first piece names: {p:?}"
                        );
                        calls.push((id.clone(), name.clone(), String::new()));
                    } else {
                        assert!(id.is_empty() && name.is_empty(), "later piece: {p:?}");
                    }
                    calls[i].2.push_str(arguments);
                }
            }
        }
        (text, calls)
    }

    fn whole(text: &str) -> Vec<Parsed> {
        let mut p = ToolCallParser::new(&set(ToolChoice::Auto, false), "x");
        let mut out = p.push(text);
        out.extend(p.finish());
        out
    }

    fn char_by_char(text: &str) -> Vec<Parsed> {
        let mut p = ToolCallParser::new(&set(ToolChoice::Auto, false), "x");
        let mut out = Vec::new();
        let mut buf = [0u8; 4];
        for c in text.chars() {
            out.extend(p.push(c.encode_utf8(&mut buf)));
        }
        out.extend(p.finish());
        out
    }

    const TWO_CALLS: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris {x}\\\" }\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": [\"UTC\", {\"a\": 1}]}}\n</tool_call>";

    #[test]
    fn parallel_calls_parse_the_same_whole_and_char_by_char() {
        for parsed in [whole(TWO_CALLS), char_by_char(TWO_CALLS)] {
            let (text, calls) = assembled(&parsed);
            assert_eq!(text, "");
            assert_eq!(
                calls,
                [
                    (
                        "call_x0".to_string(),
                        "get_weather".to_string(),
                        "{\"city\": \"Paris {x}\\\" }\"}".to_string()
                    ),
                    (
                        "call_x1".to_string(),
                        "get_time".to_string(),
                        "{\"zone\": [\"UTC\", {\"a\": 1}]}".to_string()
                    ),
                ]
            );
        }
        // Whole, each call is one piece (merged header and arguments).
        assert_eq!(whole(TWO_CALLS).len(), 2);
    }

    #[test]
    fn a_text_answer_streams_at_once_and_may_mention_calls() {
        let answer = "It is sunny. <tool_call> is how I would call a tool.";
        for parsed in [whole(answer), char_by_char(answer)] {
            assert_eq!(assembled(&parsed), (answer.to_string(), vec![]));
        }
        let mut p = ToolCallParser::new(&set(ToolChoice::Auto, false), "");
        assert_eq!(p.push("It"), [Parsed::Text("It".into())]);
        assert_eq!(p.push(" is"), [Parsed::Text(" is".into())]);
        assert!(!p.called());
    }

    #[test]
    fn what_could_start_a_call_is_held_back() {
        let mut p = ToolCallParser::new(&set(ToolChoice::Auto, false), "");
        assert_eq!(p.push("<tool_"), []);
        assert_eq!(p.push("cat"), [Parsed::Text("<tool_cat".into())]);

        let mut p = ToolCallParser::new(&set(ToolChoice::Auto, false), "");
        assert_eq!(p.push("<tool_call>\n{\"name\": \"get_wea"), []);
        assert_eq!(
            p.push("ther\", \"argu"),
            [Parsed::Call {
                index: 0,
                id: "call_0".into(),
                name: "get_weather".into(),
                arguments: String::new()
            }]
        );
        assert!(p.called());
        assert_eq!(p.push("ments\": "), []);
        let args = |s: &str| Parsed::Call {
            index: 0,
            id: String::new(),
            name: String::new(),
            arguments: s.into(),
        };
        assert_eq!(p.push("{\"city\": \"Pa"), [args("{\"city\": \"Pa")]);
        // The arguments' own `}` goes out at once: depth says it is not the wrapper's.
        assert_eq!(p.push("ris\"}"), [args("ris\"}")]);
        assert_eq!(p.push("}\n</tool"), []);
        assert_eq!(p.push("_call>\n"), []);
        assert_eq!(p.finish(), []);

        // Truncated mid-call: the arguments so far stay the call's.
        let mut p = ToolCallParser::new(&set(ToolChoice::Auto, false), "");
        p.push("<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"a\": 1 ");
        assert_eq!(p.push("2"), [args("2")]);
        assert_eq!(p.finish(), []);
        // A held prefix of `<tool_call>` at the end is text after all...
        let mut p = ToolCallParser::new(&set(ToolChoice::Auto, false), "");
        assert_eq!(p.push("<tool"), []);
        assert_eq!(p.finish(), [Parsed::Text("<tool".into())]);
        // ...but after calls it is the next call, cut short: nothing.
        let mut p = ToolCallParser::new(&set(ToolChoice::Auto, false), "");
        let calls = p.push(&format!("{TWO_CALLS}\n<tool_cal"));
        assert_eq!(assembled(&calls).1.len(), 2);
        assert_eq!(p.finish(), []);
    }

    #[test]
    fn resuming_from_the_delivered_text_gives_the_rest_exactly() {
        let full = whole(TWO_CALLS);
        for cut in 0..TWO_CALLS.len() {
            if !TWO_CALLS.is_char_boundary(cut) {
                continue;
            }
            let mut first = ToolCallParser::new(&set(ToolChoice::Auto, false), "x");
            let mut delivered = first.push(&TWO_CALLS[..cut]);
            // Another worker: pushes the delivered text, discards, and goes on.
            let mut second = ToolCallParser::new(&set(ToolChoice::Auto, false), "x");
            let _ = second.push(&TWO_CALLS[..cut]);
            delivered.extend(second.push(&TWO_CALLS[cut..]));
            delivered.extend(second.finish());
            assert_eq!(assembled(&delivered), assembled(&full), "cut at {cut}");
        }
    }

    #[test]
    fn grammar_for_each_choice() {
        let auto = output_grammar(&set(ToolChoice::Auto, false)).unwrap();
        assert!(auto.contains("start: TEXT | calls\n"), "{auto}");
        assert!(auto.contains("TEXT: /(?s:.+)/ & ~/(?s:<tool_call>.*)/"));
        assert!(auto.contains("calls: call (\"\\n\" call)*\n"));
        assert!(auto.contains("call: call_0 | call_1\n"));
        assert!(auto.contains(
            "call_0: \"<tool_call>\\n{\\\"name\\\": \\\"get_weather\\\", \\\"arguments\\\": \" args_0 \"}\\n</tool_call>\"\n"
        ));
        assert!(auto.contains("args_0: %json {\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"],\"x-guidance\":{"));

        let required = output_grammar(&set(ToolChoice::Required, false)).unwrap();
        assert!(required.contains("start: calls\n") && !required.contains("TEXT"));
        let single = output_grammar(&set(ToolChoice::Required, true)).unwrap();
        assert!(single.contains("calls: call\n"), "{single}");
        let named = output_grammar(&set(ToolChoice::Function("get_time".into()), false)).unwrap();
        assert!(
            named.contains("call: call_1\n") && !named.contains("call_0"),
            "{named}"
        );

        assert_eq!(output_grammar(&set(ToolChoice::None, false)), None);
        assert_eq!(output_grammar(&ToolSet::default()), None);
        assert_eq!(
            output_grammar(&set(ToolChoice::Function("nope".into()), false)),
            None
        );
    }

    #[test]
    fn history_is_rewritten_into_plain_turns() {
        let turns = vec![
            ToolTurn {
                role: "system".into(),
                content: "Be brief.".into(),
                ..Default::default()
            },
            ToolTurn {
                role: "user".into(),
                content: "Weather in Paris and the time?".into(),
                ..Default::default()
            },
            ToolTurn {
                role: "assistant".into(),
                content: String::new(),
                tool_calls: vec![
                    ToolCallText {
                        id: "call_1".into(),
                        name: "get_weather".into(),
                        arguments: "{\"city\": \"Paris\"}".into(),
                    },
                    ToolCallText {
                        id: "call_2".into(),
                        name: "get_time".into(),
                        arguments: String::new(),
                    },
                ],
                tool_call_id: String::new(),
            },
            ToolTurn {
                role: "tool".into(),
                content: "sunny".into(),
                tool_call_id: "call_1".into(),
                ..Default::default()
            },
            ToolTurn {
                role: "tool".into(),
                content: "noon".into(),
                tool_call_id: "call_2".into(),
                ..Default::default()
            },
        ];
        let plain = plain_messages(&turns, &set(ToolChoice::Auto, false));
        assert_eq!(plain.len(), 4);
        assert_eq!(plain[0].role, "system");
        assert!(plain[0].content.starts_with("Be brief.\n\n# Tools\n"));
        assert!(plain[0].content.contains("\"name\":\"get_weather\""));
        assert_eq!(
            plain[2].content,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"
        );
        // The history's calls parse back as themselves.
        let (text, calls) = assembled(&whole(&plain[2].content));
        assert_eq!(text, "");
        assert_eq!(calls[0].2, "{\"city\": \"Paris\"}");
        assert_eq!(calls[1].2, "{}");
        assert_eq!(
            plain[3],
            ChatMessage {
                role: "user".into(),
                content: "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>".into()
            }
        );

        // No tools offered: the same turns, tool turns still converted, no tools prompt.
        let unchanged = plain_messages(&turns, &set(ToolChoice::None, false));
        assert_eq!(unchanged.len(), 4);
        assert_eq!(unchanged[0].content, "Be brief.");
        let only_user = &turns[1..2];
        assert_eq!(
            plain_messages(only_user, &ToolSet::default()),
            [ChatMessage {
                role: "user".into(),
                content: "Weather in Paris and the time?".into()
            }]
        );
    }
}
