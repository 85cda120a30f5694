//! Incremental detokenization that never splits a UTF-8 character: a token that ends inside a
//! multi-byte character produces no text until the character is complete.

use tokenizers::Tokenizer;

use crate::ids::TokenId;

pub struct Detokenizer {
    ids: Vec<TokenId>,
    /// Start of the tokens decoded for context (so that leading spaces come out right).
    prefix_offset: usize,
    /// End of the tokens whose text has been emitted.
    read_offset: usize,
}

impl Detokenizer {
    /// Starts after `context` tokens (e.g. the last few prompt tokens), whose text is not emitted.
    pub fn new(context: &[TokenId]) -> Self {
        Self {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: TokenId) -> String {
        self.ids.push(token);
        let decode = |ids: &[TokenId]| tokenizer.decode(ids, true).unwrap_or_default();
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }
}
