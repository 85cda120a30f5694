//! Virtual model queries: the `model` field of a request may pick a model by
//! `TAG[@RANKER][?COND[&COND...]]` instead of naming an id.
//!
//! [`parse`] turns the text into a [`Query`] (its `Display` is the canonical form), [`resolve`]
//! picks one of the catalog's models, and [`explain`] says for every model why it was kept or
//! dropped (what `GET /v1/models/resolve?query=` shows).
//!
//! ```
//! use candela::platform::query::{parse, Ranker};
//!
//! let q = parse("smollm @ latest ? context_size > 4k & params < 1e9").unwrap();
//! assert_eq!(q.ranker, Some(Ranker::Latest));
//! assert_eq!(q.to_string(), "smollm@latest?context_size>4000&params<1000000000");
//! let err = parse("llama@fastes").unwrap_err();
//! assert_eq!((err.offset, err.fragment.as_str()), (6, "fastes"));
//! ```

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, NaiveDate};

/// A parsed model query. `Display` writes the canonical form, which [`parse`] reads back to an
/// equal `Query` (numbers must be finite and non-negative, as `parse` makes them).
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// A catalog tag or a model id, matched case-insensitively against both.
    pub tag: String,
    /// `None` ranks by [`Ranker::Latest`].
    pub ranker: Option<Ranker>,
    /// Every one must hold for a model to match.
    pub conditions: Vec<Condition>,
}

/// One `FIELD OP VALUE` condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub field: Field,
    pub op: Op,
    pub value: Value,
}

/// The right-hand side of a condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Finite and non-negative when parsed; `7b`, `4k`, `1e9` and `0.5` are all numbers.
    Number(f64),
    /// Written `YYYY-MM-DD`.
    Date(NaiveDate),
}

/// Why a query did not parse: `fragment` is the offending text, found at byte `offset` of `input`
/// (so `input[offset..]` starts with `fragment`; it is empty only at the end of the input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model query {input:?}: {message} at offset {offset}")]
pub struct QueryError {
    pub input: String,
    pub message: String,
    pub offset: usize,
    pub fragment: String,
}

/// An enum of keywords with their spellings: `ALL`, `as_str` and `Display`.
macro_rules! keywords {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vdoc])* $variant,)* }

        impl $name {
            /// Every variant, in the order error messages list them.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keywords! {
    /// How the models that match a query are ordered; the first one serves the request.
    Ranker {
        /// Most measured tokens per second.
        Fastest = "fastest",
        /// Lowest input + output cost.
        Cheapest = "cheapest",
        /// Most parameters.
        Biggest = "biggest",
        /// Fewest parameters.
        Smallest = "smallest",
        /// Newest endpoint publication date.
        Latest = "latest",
    }
}

keywords! {
    /// A model property a condition can test: `EndpointPublicationDate` against a date, the
    /// others against a number.
    Field {
        ContextSize = "context_size",
        MaxTokens = "max_tokens",
        /// EUR per 1M input tokens.
        InputCost = "input_cost",
        Params = "params",
        EndpointPublicationDate = "endpoint_publication_date",
    }
}

keywords! {
    /// A comparison; `==` reads as `Eq` too.
    Op { Lt = "<", Gt = ">", Eq = "=", Le = "<=", Ge = ">=", }
}

impl Field {
    fn value_of(self, c: &Candidate) -> Option<Value> {
        let number = |n: u64| Some(Value::Number(n as f64));
        match self {
            Field::ContextSize => number(c.context_size),
            Field::MaxTokens => number(c.max_tokens),
            Field::Params => number(c.params),
            Field::InputCost => known(c.input_cost).map(Value::Number),
            Field::EndpointPublicationDate => c.published.map(Value::Date),
        }
    }
}

impl Op {
    fn accepts(self, ord: Ordering) -> bool {
        match self {
            Op::Lt => ord.is_lt(),
            Op::Gt => ord.is_gt(),
            Op::Eq => ord.is_eq(),
            Op::Le => ord.is_le(),
            Op::Ge => ord.is_ge(),
        }
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.tag)?;
        if let Some(ranker) = self.ranker {
            write!(f, "@{ranker}")?;
        }
        for (i, condition) in self.conditions.iter().enumerate() {
            write!(f, "{}{condition}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.field, self.op, self.value)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Both forms are the shortest text that parses back to the same f64; the exponent
            // keeps 1e300 from printing 301 digits.
            Value::Number(n) if *n == 0.0 || (1e-4..1e16).contains(&n.abs()) => write!(f, "{n}"),
            Value::Number(n) => write!(f, "{n:e}"),
            Value::Date(d) => write!(f, "{:04}-{:02}-{:02}", d.year(), d.month(), d.day()),
        }
    }
}

impl FromStr for Query {
    type Err = QueryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// Whether `model` should be read as a query rather than an id: it has an `@` or a `?`. A bare
/// tag is neither; the caller looks for that exact id first and else parses it as a tag query.
pub fn is_query(model: &str) -> bool {
    model.contains(['@', '?'])
}

/// Parses `TAG[@RANKER][?COND[&COND...]]`, with whitespace allowed around every token. Rankers,
/// fields and numbers' suffixes (`k`, `m`, `b`, `t`) are case-insensitive.
pub fn parse(s: &str) -> Result<Query, QueryError> {
    Parser { src: s, pos: 0 }.query()
}

/// Where a word ends besides whitespace: the query's punctuation.
fn is_word_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, '@' | '?' | '&' | '<' | '>' | '=' | '!')
}

fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

/// A cursor over the input; `pos` only ever stops on a char boundary.
struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn query(mut self) -> Result<Query, QueryError> {
        let (at, tag) = self.word();
        if tag.is_empty() {
            return Err(self.expected("a model tag or id", None));
        }
        if let Some((i, c)) = tag.char_indices().find(|&(_, c)| !is_tag_char(c)) {
            let message = format!("invalid character {c:?} in tag (allowed: A-Z a-z 0-9 _ . : -)");
            return Err(self.error(at + i, &c.to_string(), message));
        }
        let mut query = Query {
            tag: tag.to_string(),
            ranker: None,
            conditions: Vec::new(),
        };
        if let Some(at) = self.eat('@') {
            let (word_at, word) = self.word();
            if word.is_empty() {
                return Err(self.expected("a ranker", Some((at, "@"))));
            }
            let ranker = keyword("ranker", word, Ranker::ALL);
            query.ranker = Some(ranker.map_err(|m| self.error(word_at, word, m))?);
        }
        if let Some(at) = self.eat('?') {
            query.conditions = self.conditions(at)?;
        }
        self.skip_ws();
        let (rest, next) = (self.rest().trim_end(), self.peek().map(String::from));
        let message = match (next.as_deref(), query.ranker, query.conditions.is_empty()) {
            (None, ..) => return Ok(query),
            (Some("@"), Some(_), _) => "duplicated '@': a query has one ranker".to_string(),
            (Some("@"), None, _) => "the @ranker must come before the ?conditions".to_string(),
            (Some("?"), ..) => "duplicated '?': join conditions with '&'".to_string(),
            (_, None, true) => return Err(self.unexpected(rest, "'@', '?' or the end")),
            (_, Some(_), true) => return Err(self.unexpected(rest, "'?' or the end")),
            (_, _, false) => return Err(self.unexpected(rest, "'&' between conditions")),
        };
        Err(self.error(self.pos, next.as_deref().unwrap_or(""), message))
    }

    /// Conditions after the `?` at `at`, up to the first text that cannot continue them.
    fn conditions(&mut self, mut at: usize) -> Result<Vec<Condition>, QueryError> {
        let mut conditions = Vec::new();
        loop {
            self.skip_ws();
            if matches!(self.peek(), None | Some('&')) {
                let sep = if conditions.is_empty() { "?" } else { "&" };
                return Err(self.error(at, sep, format!("empty condition after '{sep}'")));
            }
            conditions.push(self.condition()?);
            match self.eat('&') {
                Some(next) => at = next,
                None => return Ok(conditions),
            }
        }
    }

    fn condition(&mut self) -> Result<Condition, QueryError> {
        let (field_at, name) = self.word();
        if name.is_empty() {
            return Err(self.expected("a field name", None));
        }
        let field =
            keyword("field", name, Field::ALL).map_err(|m| self.error(field_at, name, m))?;
        let (op_at, op_text) = self.token(|c| matches!(c, '<' | '>' | '=' | '!'));
        if op_text.is_empty() {
            return Err(self.expected("an operator (<, >, =, <=, >=)", Some((field_at, name))));
        }
        let spelled = if op_text == "==" { "=" } else { op_text };
        let op =
            keyword("operator", spelled, Op::ALL).map_err(|m| self.error(op_at, op_text, m))?;
        let (value_at, text) = self.word();
        if text.is_empty() {
            return Err(self.expected("a value", Some((op_at, op_text))));
        }
        let value = parse_value(field, text).map_err(|m| self.error(value_at, text, m))?;
        Ok(Condition { field, op, value })
    }

    fn rest(&self) -> &'a str {
        self.src.get(self.pos..).unwrap_or("")
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    /// Skips whitespace and consumes `c` if it comes next, returning its offset.
    fn eat(&mut self, c: char) -> Option<usize> {
        self.skip_ws();
        let at = self.pos;
        self.rest().starts_with(c).then(|| {
            self.pos += c.len_utf8();
            at
        })
    }

    /// Skips whitespace, then takes the longest run of chars that `keep` accepts, with its offset.
    fn token(&mut self, keep: impl Fn(char) -> bool) -> (usize, &'a str) {
        self.skip_ws();
        let rest = self.rest();
        let len = rest.find(|c| !keep(c)).unwrap_or(rest.len());
        let at = self.pos;
        self.pos += len;
        (at, rest.get(..len).unwrap_or(""))
    }

    fn word(&mut self) -> (usize, &'a str) {
        self.token(is_word_char)
    }

    /// The error for a missing `what`: at the unexpected char if there is one, else (at the end of
    /// the input) at `after`, the token that needed it.
    fn expected(&self, what: &str, after: Option<(usize, &str)>) -> QueryError {
        let after_text = after
            .map(|(_, t)| format!(" after {t:?}"))
            .unwrap_or_default();
        match (self.peek(), after) {
            (None, Some((at, token))) => {
                self.error(at, token, format!("missing {what}{after_text}"))
            }
            (None, None) => self.error(self.pos, "", format!("missing {what}")),
            (Some(c), _) => {
                let message = format!("expected {what}{after_text}, found {c:?}");
                self.error(self.pos, &c.to_string(), message)
            }
        }
    }

    fn unexpected(&self, rest: &str, expected: &str) -> QueryError {
        self.error(
            self.pos,
            rest,
            format!("unexpected {rest:?} (expected {expected})"),
        )
    }

    fn error(&self, offset: usize, fragment: &str, message: String) -> QueryError {
        QueryError {
            input: self.src.to_string(),
            message,
            offset,
            fragment: fragment.to_string(),
        }
    }
}

/// Finds `word` among `all`, case-insensitively; the error message lists them.
fn keyword<K: Copy + fmt::Display>(what: &str, word: &str, all: &[K]) -> Result<K, String> {
    let found = all
        .iter()
        .find(|k| k.to_string().eq_ignore_ascii_case(word));
    let names = || all.iter().map(K::to_string).collect::<Vec<_>>().join(", ");
    found
        .copied()
        .ok_or_else(|| format!("unknown {what} {word:?} (expected one of {})", names()))
}

/// Reads `text` as the value `field` compares with; the error message says why it cannot be.
fn parse_value(field: Field, text: &str) -> Result<Value, String> {
    let takes_date = field == Field::EndpointPublicationDate;
    match (takes_date, parse_number(text), parse_date(text)) {
        (false, Some(n), _) => Ok(Value::Number(n)),
        (false, None, Some(_)) => Err(format!("type mismatch: {field} takes a number, not a date")),
        (false, None, None) => Err(format!(
            "bad number {text:?} (expected e.g. 8192, 0.5, 1e9, 7b)"
        )),
        (true, _, Some(Some(date))) => Ok(Value::Date(date)),
        (true, _, Some(None)) => Err(format!("bad date {text:?}: no such day")),
        (true, Some(_), None) => Err(format!("type mismatch: {field} takes a date, not a number")),
        (true, None, None) => Err(format!("bad date {text:?} (expected YYYY-MM-DD)")),
    }
}

/// `8192`, `0.5`, `1e9`, or a number with a `k`/`m`/`b`/`t` suffix (`7b` is 7e9). No sign, `inf`
/// or `NaN`: every field is a finite, non-negative quantity.
fn parse_number(text: &str) -> Option<f64> {
    if !text.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let scale = match text.as_bytes().last()?.to_ascii_lowercase() {
        b'k' => 1e3,
        b'm' => 1e6,
        b'b' => 1e9,
        b't' => 1e12,
        _ => 1.0,
    };
    let digits = if scale == 1.0 {
        text
    } else {
        text.get(..text.len() - 1)?
    };
    let n = digits.parse::<f64>().ok()? * scale;
    n.is_finite().then_some(n)
}

/// `None` unless `text` is shaped `YYYY-MM-DD`; then `Some(None)` if it names no day.
fn parse_date(text: &str) -> Option<Option<NaiveDate>> {
    let shaped = text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shaped {
        return None;
    }
    let part = |range: std::ops::Range<usize>| text.get(range)?.parse::<u32>().ok();
    let year = i32::try_from(part(0..4)?).ok()?;
    Some(NaiveDate::from_ymd_opt(year, part(5..7)?, part(8..10)?))
}

/// A model as [`resolve`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub id: &'a str,
    /// "chat", "completion", "embedding", ...: named in messages only.
    pub kind: &'a str,
    /// Whether this model can serve the endpoint being called.
    pub serves: bool,
    pub tags: &'a [String],
    pub context_size: u64,
    pub max_tokens: u64,
    pub params: u64,
    /// EUR per 1M tokens.
    pub input_cost: Option<f64>,
    pub output_cost: Option<f64>,
    pub published: Option<NaiveDate>,
    /// Measured speed; `None` if not measured.
    pub tokens_per_second: Option<f64>,
}

/// The model a query resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    /// Index of the chosen model in the candidates: `matched[0]`.
    pub index: usize,
    /// The ranker used: the query's, or [`Ranker::Latest`].
    pub ranker: Ranker,
    /// Every candidate that matched and serves the endpoint, best first.
    pub matched: Vec<usize>,
    /// Why each candidate was kept or dropped, in the candidates' order.
    pub explain: Vec<Explain>,
}

/// Why one candidate was kept or dropped, e.g. `context_size 8192 is not > 100000` or
/// `rank 1 by latest (2024-11-01)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explain {
    pub id: String,
    pub outcome: String,
}

/// Why a query resolved to no model; `query` is its canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No model has the tag and meets every condition.
    #[error("No model matches the query {query:?}.")]
    NoMatch { query: String },
    /// Some do, but none can serve the endpoint; `kinds` are theirs, each once.
    #[error(
        "The query {query:?} matches only {} models, which cannot serve this endpoint.",
        join_and(.kinds)
    )]
    WrongType { query: String, kinds: Vec<String> },
}

/// Picks the model for `query`: the candidates that (1) have the tag among their tags or as their
/// id (case-insensitively), (2) meet every condition (a condition on an unknown value does not
/// hold) and (3) serve the endpoint, ordered by the ranker (`latest` by default):
///
/// - `fastest`: most tokens per second; unmeasured last.
/// - `cheapest`: least input + output cost; unknown (either part missing) last.
/// - `biggest` / `smallest`: most / fewest params.
/// - `latest`: newest publication date; unknown last.
///
/// NaN speeds and costs count as unknown. Ties go to the larger context_size, then to the id
/// that sorts first bytewise.
pub fn resolve(query: &Query, candidates: &[Candidate]) -> Result<Resolution, ResolveError> {
    let Evaluation {
        ranker,
        matching,
        matched,
        explain,
    } = evaluate(query, candidates);
    let Some(&index) = matched.first() else {
        let query = query.to_string();
        if matching.is_empty() {
            return Err(ResolveError::NoMatch { query });
        }
        let mut kinds: Vec<String> = Vec::new();
        for &i in &matching {
            if !kinds.iter().any(|k| k == candidates[i].kind) {
                kinds.push(candidates[i].kind.to_string());
            }
        }
        return Err(ResolveError::WrongType { query, kinds });
    };
    Ok(Resolution {
        index,
        ranker,
        matched,
        explain,
    })
}

/// For each candidate, in order, why [`resolve`] keeps or drops it; useful when it fails.
pub fn explain(query: &Query, candidates: &[Candidate]) -> Vec<Explain> {
    evaluate(query, candidates).explain
}

struct Evaluation {
    ranker: Ranker,
    /// Passed steps (1) and (2).
    matching: Vec<usize>,
    /// Passed (1) to (3), in rank order.
    matched: Vec<usize>,
    explain: Vec<Explain>,
}

fn evaluate(query: &Query, candidates: &[Candidate]) -> Evaluation {
    let ranker = query.ranker.unwrap_or(Ranker::Latest);
    let (mut matching, mut matched, mut explain) = (Vec::new(), Vec::new(), Vec::new());
    for (i, c) in candidates.iter().enumerate() {
        let outcome = match mismatch(query, c) {
            Some(why) => why,
            None if !c.serves => {
                matching.push(i);
                format!(
                    "is {} {} model; this endpoint needs another type",
                    article(c.kind),
                    c.kind
                )
            }
            None => {
                matching.push(i);
                matched.push(i);
                String::new() // filled in below, once the rank is known
            }
        };
        explain.push(Explain {
            id: c.id.to_string(),
            outcome,
        });
    }
    matched.sort_by(|&a, &b| compare(ranker, &candidates[a], &candidates[b]));
    for (rank, &i) in matched.iter().enumerate() {
        let c = &candidates[i];
        let tied = rank > 0 && rank_key(ranker, &candidates[matched[rank - 1]], c).is_eq();
        let tie = if tied {
            "; tied, so larger context_size, then id decide"
        } else {
            ""
        };
        let key = describe_key(ranker, c);
        explain[i].outcome = format!("rank {} by {ranker} ({key}{tie})", rank + 1);
    }
    Evaluation {
        ranker,
        matching,
        matched,
        explain,
    }
}

/// Why `c` fails steps (1) and (2), or `None` if it passes them.
fn mismatch(query: &Query, c: &Candidate) -> Option<String> {
    let tag = &query.tag;
    if !c.id.eq_ignore_ascii_case(tag) && !c.tags.iter().any(|t| t.eq_ignore_ascii_case(tag)) {
        return Some(format!(
            "tag `{tag}` not in tags [{}] and not the id",
            c.tags.join(", ")
        ));
    }
    query.conditions.iter().find_map(|cond| {
        let Some(have) = cond.field.value_of(c) else {
            return Some(format!("{} is unknown, so {cond} cannot hold", cond.field));
        };
        let ord = match (&have, &cond.value) {
            (Value::Number(have), Value::Number(want)) => have.partial_cmp(want),
            (Value::Date(have), Value::Date(want)) => Some(have.cmp(want)),
            _ => None, // a hand-built condition comparing a date with a number
        };
        let holds = ord.is_some_and(|o| cond.op.accepts(o));
        (!holds).then(|| format!("{} {have} is not {} {}", cond.field, cond.op, cond.value))
    })
}

/// The rank order: the ranker's key, then larger context_size, then id. Total, even with NaN.
fn compare(ranker: Ranker, a: &Candidate, b: &Candidate) -> Ordering {
    rank_key(ranker, a, b)
        .then(b.context_size.cmp(&a.context_size))
        .then_with(|| a.id.cmp(b.id))
}

fn rank_key(ranker: Ranker, a: &Candidate, b: &Candidate) -> Ordering {
    match ranker {
        Ranker::Fastest => known_first(speed(a), speed(b), |x, y| y.total_cmp(&x)),
        Ranker::Cheapest => known_first(cost(a), cost(b), |x, y| x.total_cmp(&y)),
        Ranker::Biggest => b.params.cmp(&a.params),
        Ranker::Smallest => a.params.cmp(&b.params),
        Ranker::Latest => known_first(a.published, b.published, |x, y| y.cmp(&x)),
    }
}

/// Known values first, in `order`; unknown ones after them, equal to each other.
fn known_first<T>(a: Option<T>, b: Option<T>, order: impl FnOnce(T, T) -> Ordering) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => order(x, y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

fn describe_key(ranker: Ranker, c: &Candidate) -> String {
    match ranker {
        Ranker::Fastest => {
            speed(c).map_or("speed not measured".into(), |s| format!("{s:.1} tokens/s"))
        }
        Ranker::Cheapest => {
            cost(c).map_or("cost unknown".into(), |x| format!("{x} EUR per 1M tokens"))
        }
        Ranker::Biggest | Ranker::Smallest => format!("{} params", c.params),
        Ranker::Latest => c.published.map_or("publication date unknown".into(), |d| {
            Value::Date(d).to_string()
        }),
    }
}

fn known(x: Option<f64>) -> Option<f64> {
    x.filter(|x| !x.is_nan())
}

fn speed(c: &Candidate) -> Option<f64> {
    known(c.tokens_per_second)
}

fn cost(c: &Candidate) -> Option<f64> {
    known(Some(c.input_cost? + c.output_cost?))
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Field::*;
    use Op::*;
    use Ranker::*;

    fn q(tag: &str, ranker: Option<Ranker>, conditions: &[(Field, Op, Value)]) -> Query {
        let conditions = conditions.iter().map(|(field, op, value)| Condition {
            field: *field,
            op: *op,
            value: value.clone(),
        });
        Query {
            tag: tag.into(),
            ranker,
            conditions: conditions.collect(),
        }
    }

    fn n(x: f64) -> Value {
        Value::Number(x)
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("a valid test date")
    }

    #[test]
    #[rustfmt::skip]
    fn parses_valid_queries() {
        let cases = [
            ("chat@latest", q("chat", Some(Latest), &[])),
            ("huggingfacetb@smallest", q("huggingfacetb", Some(Smallest), &[])),
            ("llama@biggest?input_cost<0.5", q("llama", Some(Biggest), &[(InputCost, Lt, n(0.5))])),
            ("smollm@latest?context_size>4000&params<1e9",
             q("smollm", Some(Latest), &[(ContextSize, Gt, n(4e3)), (Params, Lt, n(1e9))])),
            ("embeddings@fastest", q("embeddings", Some(Fastest), &[])),
            ("mistral@latest?context_size > 100000", q("mistral", Some(Latest), &[(ContextSize, Gt, n(1e5))])),
            ("chat?endpoint_publication_date>=2024-01-01",
             q("chat", None, &[(EndpointPublicationDate, Ge, Value::Date(date(2024, 1, 1)))])),
            (" Llama-3.1:8b @ BIGGEST ? Params <= 7B & max_tokens == 4k&input_cost=.5m ",
             q("Llama-3.1:8b", Some(Biggest), &[(Params, Le, n(7e9)), (MaxTokens, Eq, n(4e3)), (InputCost, Eq, n(5e5))])),
            ("x?params<2t&context_size>1e-3", q("x", None, &[(Params, Lt, n(2e12)), (ContextSize, Gt, n(1e-3))])),
            ("smollm2-135m-instruct", q("smollm2-135m-instruct", None, &[])),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Ok(want.clone()), "{input}");
            assert_eq!(input.parse::<Query>(), Ok(want), "{input}");
        }
        let spaced = parse(" Llama-3.1:8b @ BIGGEST ? Params <= 7B & max_tokens == 4k&input_cost=.5m ");
        assert_eq!(spaced.map(|q| q.to_string()).as_deref(),
                   Ok("Llama-3.1:8b@biggest?params<=7000000000&max_tokens=4000&input_cost=500000"));
        assert_eq!(q("x", None, &[(Params, Gt, n(1e300)), (InputCost, Lt, n(1.5e-7))]).to_string(),
                   "x?params>1e300&input_cost<1.5e-7");
    }

    #[test]
    #[rustfmt::skip]
    fn rejects_invalid_queries_pointing_at_the_bad_part() {
        let date = "a?endpoint_publication_date>";
        let cases: &[(&str, usize, &str, &str)] = &[
            ("llama@fastes", 6, "fastes", "unknown ranker"),
            ("a?context_sise<5", 2, "context_sise", "unknown field \"context_sise\" (expected one of \
              context_size, max_tokens, input_cost, params, endpoint_publication_date)"),
            ("a?params<<5", 8, "<<", "unknown operator \"<<\" (expected one of <, >, =, <=, >=)"),
            ("a?params=>5", 8, "=>", "unknown operator"),
            ("a?params!=5", 8, "!=", "unknown operator"),
            ("a?params 5", 9, "5", "expected an operator"),
            ("a?params", 2, "params", "missing an operator"),
            ("a?params<", 8, "<", "missing a value after \"<\""),
            ("a?params<&max_tokens>1", 9, "&", "expected a value"),
            ("a?params<abc", 9, "abc", "bad number"),
            ("a?params<1_000", 9, "1_000", "bad number"),
            ("a?params<inf", 9, "inf", "bad number"),
            ("a?params<-1", 9, "-1", "bad number"),
            ("a?params<1e999", 9, "1e999", "bad number"),
            ("a?params<5é", 9, "5é", "bad number"),
            ("a?params<2024-01-01", 9, "2024-01-01", "type mismatch"),
            (&format!("{date}2024-13-01"), 28, "2024-13-01", "bad date"),
            (&format!("{date}2024-1-1"), 28, "2024-1-1", "bad date"),
            (&format!("{date}5"), 28, "5", "type mismatch"),
            ("", 0, "", "missing a model tag or id"),
            ("   ", 3, "", "missing a model tag or id"),
            ("@latest", 0, "@", "expected a model tag or id"),
            ("llamaé@latest", 5, "é", "invalid character"),
            ("日本", 0, "日", "invalid character"),
            ("a@", 1, "@", "missing a ranker"),
            ("a@?params<1", 2, "?", "expected a ranker"),
            ("a?", 1, "?", "empty condition after '?'"),
            ("a?&params<1", 1, "?", "empty condition"),
            ("a?params<1&", 10, "&", "empty condition after '&'"),
            ("a?params<1& &x", 10, "&", "empty condition"),
            ("a?<1", 2, "<", "expected a field name"),
            ("a??params<1", 2, "?", "expected a field name"),
            ("a@latest@biggest", 8, "@", "duplicated '@'"),
            ("a?params<1?max_tokens<2", 10, "?", "duplicated '?'"),
            ("a?params<1@latest", 10, "@", "must come before"),
            ("lla ma", 4, "ma", "unexpected \"ma\" (expected '@', '?' or the end)"),
            ("a@latest foo ", 9, "foo", "expected '?' or the end"),
            ("a?params<1 max_tokens<2", 11, "max_tokens<2", "expected '&' between conditions"),
        ];
        for &(input, offset, fragment, message) in cases {
            let err = parse(input).expect_err(input);
            assert_eq!((err.offset, err.fragment.as_str()), (offset, fragment), "{input}: {err}");
            assert!(err.message.contains(message), "{input}: {err}");
        }
        assert_eq!(parse("llama@fastes").map_err(|e| e.to_string()),
                   Err("invalid model query \"llama@fastes\": unknown ranker \"fastes\" (expected one of \
                        fastest, cheapest, biggest, smallest, latest) at offset 6".to_string()));
    }

    #[test]
    fn is_query_needs_at_or_question_mark() {
        assert!(is_query("chat@latest") && is_query("chat?params<1b"));
        assert!(!is_query("smollm2-135m-instruct"));
    }

    /// Any input: no panic; an error's fragment sits at its offset; an accepted query's canonical
    /// form parses back to it.
    fn check(s: &str) -> Result<(), TestCaseError> {
        match parse(s) {
            Ok(q) => prop_assert_eq!(parse(&q.to_string()), Ok(q)),
            Err(e) => {
                let at_offset = s
                    .get(e.offset..)
                    .is_some_and(|r| r.starts_with(&e.fragment));
                prop_assert!(at_offset, "{e:?}");
            }
        }
        Ok(())
    }

    fn arb_query() -> impl Strategy<Value = Query> {
        use proptest::num::f64::{NORMAL, POSITIVE, SUBNORMAL, ZERO};
        let number = prop_oneof![
            (0..1u64 << 40).prop_map(|n| n as f64),
            POSITIVE | NORMAL | SUBNORMAL | ZERO
        ];
        let day = (0..=9999, 1..=12u32, 1..=31u32)
            .prop_filter_map("a real day", |(y, m, d)| NaiveDate::from_ymd_opt(y, m, d));
        let field = proptest::sample::select(Field::ALL);
        let condition = (field, proptest::sample::select(Op::ALL), number, day).prop_map(
            |(field, op, x, d)| {
                let value = if field == EndpointPublicationDate {
                    Value::Date(d)
                } else {
                    n(x)
                };
                Condition { field, op, value }
            },
        );
        let ranker = proptest::option::of(proptest::sample::select(Ranker::ALL));
        (
            "[A-Za-z0-9_.:-]{1,16}",
            ranker,
            proptest::collection::vec(condition, 0..4),
        )
            .prop_map(|(tag, ranker, conditions)| Query {
                tag,
                ranker,
                conditions,
            })
    }

    /// The canonical form's tokens, to join with whitespace.
    fn tokens(q: &Query) -> Vec<String> {
        let mut tokens = vec![q.tag.clone()];
        if let Some(r) = q.ranker {
            tokens.extend(["@".to_string(), r.to_string()]);
        }
        for (i, c) in q.conditions.iter().enumerate() {
            let sep = if i == 0 { "?" } else { "&" };
            let condition = [c.field.to_string(), c.op.to_string(), c.value.to_string()];
            tokens.push(sep.into());
            tokens.extend(condition);
        }
        tokens
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(s in ".*") {
            check(&s)?;
        }

        #[test]
        fn never_panics_on_the_grammars_alphabet(s in "[a-zA-Z_@?&<>=! .0-9:é-]{0,40}") {
            check(&s)?;
        }

        #[test]
        fn never_panics_on_token_soup(parts in proptest::collection::vec(proptest::sample::select(&[
            "chat", "@", "latest", "fastes", "?", "&", "<", ">=", "==", "<<", " ", "context_size",
            "endpoint_publication_date", "params", "7b", "0.5", "1e9", "2024-02-30", "2024-01-01", "é",
        ][..]), 0..12)) {
            check(&parts.concat())?;
        }

        #[test]
        fn ranking_ignores_candidate_order(
            shuffled in Just(candidates("chat")).prop_shuffle(),
            ranker in proptest::sample::select(Ranker::ALL),
        ) {
            let query = q("chat", Some(ranker), &[]);
            let ids = |c: &[Candidate<'static>]| {
                resolve(&query, c).map(|r| r.matched.iter().map(|&i| c[i].id).collect::<Vec<_>>())
            };
            prop_assert_eq!(ids(&shuffled), ids(&candidates("chat")));
        }

        #[test]
        fn canonical_form_round_trips(q in arb_query()) {
            prop_assert_eq!(parse(&q.to_string()), Ok(q));
        }

        #[test]
        fn whitespace_between_tokens_changes_nothing(
            q in arb_query(),
            spaces in proptest::collection::vec("[ \t\r\n\u{a0}\u{3000}]{0,2}", 1..20),
        ) {
            let tokens = tokens(&q);
            let mut s = String::new();
            for (i, token) in tokens.iter().enumerate() {
                s.push_str(&spaces[i % spaces.len()]);
                s.push_str(token);
            }
            s.push_str(&spaces[tokens.len() % spaces.len()]);
            prop_assert_eq!(parse(&s), Ok(q));
        }
    }

    /// Seven models as an endpoint that serves `endpoint` models sees them.
    #[rustfmt::skip]
    fn candidates(endpoint: &str) -> Vec<Candidate<'static>> {
        let m = |id, kind: &'static str, tags: &[&str], context_size, max_tokens, params,
                 (input_cost, output_cost), published, tokens_per_second| Candidate {
            id, kind, serves: kind == endpoint, tags: Vec::leak(tags.iter().map(|t| t.to_string()).collect()),
            context_size, max_tokens, params, input_cost, output_cost, published, tokens_per_second,
        };
        let (nov, sep, jul) = (Some(date(2024, 11, 1)), Some(date(2024, 9, 25)), Some(date(2024, 7, 23)));
        vec![
            m("smollm2-360m", "chat", &["smollm", "chat"], 8192, 8192, 360_000_000, (Some(0.1), Some(0.2)), nov, Some(120.0)),
            m("smollm2-135m", "chat", &["smollm", "chat", "small"], 8192, 8192, 135_000_000, (Some(0.0), Some(0.0)), nov, Some(120.0)),
            m("llama-3.2-1b", "chat", &["llama", "chat"], 131072, 4096, 1_200_000_000, (Some(0.5), Some(1.0)), sep, None),
            m("llama-3.1-8b", "chat", &["llama", "chat"], 131072, 4096, 8_000_000_000, (None, Some(1.0)), jul, Some(30.0)),
            m("mistral-7b", "chat", &["mistral", "chat"], 32768, 32768, 7_200_000_000, (Some(0.2), Some(0.6)), None, Some(f64::NAN)),
            m("minilm-l6", "embedding", &["minilm", "embeddings", "small"], 512, 512, 22_000_000, (Some(0.0), Some(0.0)), Some(date(2021, 8, 30)), Some(900.0)),
            m("bge-small", "embedding", &["bge", "Embeddings"], 512, 512, 33_000_000, (Some(f64::NAN), Some(0.0)), None, None),
        ]
    }

    /// The ids `text` resolves to, best first, or the error message.
    fn resolve_ids(text: &str, endpoint: &str) -> Result<Vec<String>, String> {
        let candidates = candidates(endpoint);
        let query = parse(text).map_err(|e| e.to_string())?;
        let r = resolve(&query, &candidates).map_err(|e| e.to_string())?;
        assert_eq!(
            (r.index, r.ranker),
            (r.matched[0], query.ranker.unwrap_or(Latest))
        );
        assert_eq!(r.explain, explain(&query, &candidates));
        Ok(r.matched
            .iter()
            .map(|&i| candidates[i].id.to_string())
            .collect())
    }

    #[test]
    #[rustfmt::skip]
    fn resolves_by_tag_conditions_endpoint_and_ranker() {
        let (s360, s135, l1, l8, mis) = ("smollm2-360m", "smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "mistral-7b");
        let ok = |ids: &[&str]| Ok(ids.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let no_match = |q: &str| Err(format!("No model matches the query \"{q}\"."));
        let wrong = |q: &str, kinds: &str| Err(format!("The query \"{q}\" matches only {kinds} models, which cannot serve this endpoint."));
        let cases = [
            // Default ranker latest; same date and context_size, so the id decides; no date last.
            ("chat", "chat", ok(&[s135, s360, l1, l8, mis])),
            // A speed tie goes to the id; unmeasured (None, NaN) ones to the larger context_size.
            ("chat@fastest", "chat", ok(&[s135, s360, l8, l1, mis])),
            // llama-3.1-8b lacks an input cost: unknown, last.
            ("chat@cheapest", "chat", ok(&[s135, s360, mis, l1, l8])),
            ("chat@biggest", "chat", ok(&[l8, mis, l1, s360, s135])),
            ("chat@smallest", "chat", ok(&[s135, s360, l1, mis, l8])),
            ("LLAMA@BIGGEST", "chat", ok(&[l8, l1])),
            ("Llama-3.2-1B", "chat", ok(&[l1])),
            ("chat?context_size>8192", "chat", ok(&[l1, l8, mis])),
            ("chat?context_size>=131072", "chat", ok(&[l1, l8])),
            ("chat?context_size<8193&params<=135000000", "chat", ok(&[s135])),
            ("chat?max_tokens==8192", "chat", ok(&[s135, s360])),
            ("chat@cheapest?input_cost<0.3", "chat", ok(&[s135, s360, mis])),
            ("chat?endpoint_publication_date>=2024-09-25", "chat", ok(&[s135, s360, l1])),
            ("chat?endpoint_publication_date<2024-09-25", "chat", ok(&[l8])),
            ("chat?endpoint_publication_date=2024-09-25", "chat", ok(&[l1])),
            ("chat@fastest?params>1b", "chat", ok(&[l8, l1, mis])),
            ("embeddings@fastest", "embedding", ok(&["minilm-l6", "bge-small"])),
            // A NaN cost is unknown: bge-small ranks last and fails any cost condition.
            ("embeddings@cheapest", "embedding", ok(&["minilm-l6", "bge-small"])),
            ("embeddings?input_cost<1", "embedding", ok(&["minilm-l6"])),
            (" llama @ biggest ? input_cost < 0.5 ", "chat", no_match("llama@biggest?input_cost<0.5")),
            ("nosuch", "chat", no_match("nosuch")),
            ("embeddings@fastest", "chat", wrong("embeddings@fastest", "embedding")),
            ("small", "completion", wrong("small", "chat and embedding")),
        ];
        for (text, endpoint, want) in cases {
            assert_eq!(resolve_ids(text, endpoint), want, "{text} on a {endpoint} endpoint");
        }
    }

    #[test]
    #[rustfmt::skip]
    fn explains_every_candidate() {
        let candidates = candidates("chat");
        let outcomes = |text: &str| {
            let query = parse(text).expect("a valid test query");
            explain(&query, &candidates).into_iter().map(|e| format!("{}: {}", e.id, e.outcome)).collect::<Vec<_>>()
        };
        assert_eq!(outcomes("chat?context_size>8192&input_cost<=1"), [
            "smollm2-360m: context_size 8192 is not > 8192",
            "smollm2-135m: context_size 8192 is not > 8192",
            "llama-3.2-1b: rank 1 by latest (2024-09-25)",
            "llama-3.1-8b: input_cost is unknown, so input_cost<=1 cannot hold",
            "mistral-7b: rank 2 by latest (publication date unknown)",
            "minilm-l6: tag `chat` not in tags [minilm, embeddings, small] and not the id",
            "bge-small: tag `chat` not in tags [bge, Embeddings] and not the id",
        ]);
        let small = outcomes("small@fastest");
        assert_eq!(small[1], "smollm2-135m: rank 1 by fastest (120.0 tokens/s)");
        assert_eq!(small[5], "minilm-l6: is an embedding model; this endpoint needs another type");
        assert_eq!(outcomes("smollm@cheapest")[0], "smollm2-360m: rank 2 by cheapest (0.30000000000000004 EUR per 1M tokens)");
        assert_eq!(outcomes("smollm")[0], "smollm2-360m: rank 2 by latest (2024-11-01; tied, so larger context_size, then id decide)");
    }
}
