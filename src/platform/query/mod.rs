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

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, NaiveDate};

mod resolve;
#[cfg(test)]
mod tests;

pub use resolve::{explain, resolve, Candidate, Explain, Resolution, ResolveError};

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

/// Whether `model` should be read as a query rather than an id: it has a character that no id
/// has (`@ ? & < > =`), so a malformed query gets a parse error rather than "no such model". A
/// bare tag has none; the caller looks for that id first and else parses it as a tag query.
pub fn is_query(model: &str) -> bool {
    model.contains(['@', '?', '&', '<', '>', '='])
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

/// The characters of a tag (and of a model id that a query can name).
pub fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '/')
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
