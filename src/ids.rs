//! Identifiers shared by the layers.

/// An engine request: one sequence being generated (a chat request with `n = 3` is three).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// A vocabulary index.
pub type TokenId = u32;
