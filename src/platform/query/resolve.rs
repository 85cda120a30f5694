//! Resolving a parsed query against the loaded models.

use std::cmp::Ordering;

use chrono::NaiveDate;

use super::{Field, Op, Query, Ranker, Value};

impl Field {
    pub(super) fn value_of(self, c: &Candidate) -> Option<Value> {
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
    pub(super) fn accepts(self, ord: Ordering) -> bool {
        match self {
            Op::Lt => ord.is_lt(),
            Op::Gt => ord.is_gt(),
            Op::Eq => ord.is_eq(),
            Op::Le => ord.is_le(),
            Op::Ge => ord.is_ge(),
        }
    }
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

/// Input + output price, rounded to a millionth of a euro so that sums which differ only by
/// floating-point error (0.1 + 0.5 and 0.2 + 0.4) tie and the documented tie-breaks decide.
fn cost(c: &Candidate) -> Option<f64> {
    known(Some(((c.input_cost? + c.output_cost?) * 1e6).round() / 1e6))
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
