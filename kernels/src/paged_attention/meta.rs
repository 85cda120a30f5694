//! A batch's attention layout, shared by all layers of one forward pass.

#[cfg(feature = "cuda")]
use std::sync::OnceLock;

use super::SeqAttention;

/// The sequences of one batch (host side) and, on CUDA, their device copy: built in one upload
/// by [`prepare_attention`](crate::prepare_attention) before the forward pass (or else by the
/// first layer's [`paged_attention`](crate::paged_attention) call), then reused by every layer.
/// Build one per forward pass.
#[derive(Debug)]
pub struct AttentionMeta {
    seqs: Vec<SeqAttention>,
    #[cfg(feature = "cuda")]
    device: OnceLock<super::plan::DeviceMeta>,
}

impl AttentionMeta {
    /// `seqs` in batch order: their query rows must cover the batch's rows back to back.
    pub fn new(seqs: Vec<SeqAttention>) -> Self {
        Self {
            seqs,
            #[cfg(feature = "cuda")]
            device: OnceLock::new(),
        }
    }

    pub fn seqs(&self) -> &[SeqAttention] {
        &self.seqs
    }

    /// The device copy, if one was built.
    #[cfg(feature = "cuda")]
    pub(super) fn device_cache(&self) -> &OnceLock<super::plan::DeviceMeta> {
        &self.device
    }
}
