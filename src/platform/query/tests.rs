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
fn is_query_needs_a_character_no_id_has() {
    assert!(is_query("chat@latest") && is_query("chat?params<1b"));
    assert!(is_query("chat&context_size>1"));
    assert!(!is_query("smollm2-135m-instruct") && !is_query("org/model:v1.2"));
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
    let condition =
        (field, proptest::sample::select(Op::ALL), number, day).prop_map(|(field, op, x, d)| {
            let value = if field == EndpointPublicationDate {
                Value::Date(d)
            } else {
                n(x)
            };
            Condition { field, op, value }
        });
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
    assert_eq!(outcomes("smollm@cheapest")[0], "smollm2-360m: rank 2 by cheapest (0.3 EUR per 1M tokens)");
    assert_eq!(outcomes("smollm")[0], "smollm2-360m: rank 2 by latest (2024-11-01; tied, so larger context_size, then id decide)");
}
