//! Stop strings over streamed text: text that might be the start of a stop string is held back
//! until it is known not to be, so a stop string is never emitted, even split across tokens.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    /// The stop string that was reached.
    pub matched: Option<String>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            matched: None,
        }
    }

    /// Feeds new text. Returns the text safe to emit, and whether a stop string was reached (in
    /// which case the returned text ends just before it).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.pending.push_str(text);
        if let Some((at, stop)) = self
            .stops
            .iter()
            .filter_map(|s| Some((self.pending.find(s.as_str())?, s)))
            .min_by_key(|&(at, _)| at)
        {
            let out = self.pending[..at].to_string();
            self.matched = Some(stop.clone());
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&n| s.is_char_boundary(n) && self.pending.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Text held back when generation ends without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_chunks_is_never_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        let mut out = String::new();
        for chunk in ["Hello E", "N", "D and more"] {
            let (text, stopped) = m.push(chunk);
            out.push_str(&text);
            if stopped {
                break;
            }
        }
        assert_eq!(out, "Hello ");
    }

    #[test]
    fn held_text_comes_out_when_it_cannot_be_a_stop() {
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("a\n"), ("a".to_string(), false));
        assert_eq!(m.push("b"), ("\nb".to_string(), false));
        assert_eq!(m.push("\n"), (String::new(), false));
        assert_eq!(m.flush(), "\n");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["c".into(), "ab".into()]);
        assert_eq!(m.push("xabc"), ("x".to_string(), true));
    }
}
