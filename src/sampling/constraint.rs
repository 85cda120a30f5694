//! A rule on which tokens may come next (structured output), as the engine sees it: in token
//! ids only. serving/ builds one from a JSON schema or a grammar; the engine asks it to mask each
//! row of logits before sampling and tells it the token that was chosen.

use crate::ids::TokenId;

/// What a constraint says after taking a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// More tokens may follow.
    Continue,
    /// The output is complete: generation ends here, as at a stop token.
    Done,
}

pub trait TokenConstraint: Send {
    /// Sets the logits of the tokens that may not come next to minus infinity. An error means
    /// the constraint cannot go on (no token is allowed, or the grammar failed).
    fn restrict(&mut self, logits: &mut [f32]) -> Result<(), String>;

    /// Records the token that was sampled.
    fn commit(&mut self, token: TokenId) -> Result<Progress, String>;
}

/// A constraint carried by an engine request (the request is `Debug`; a grammar is not).
pub struct Constraint(pub Box<dyn TokenConstraint>);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}
