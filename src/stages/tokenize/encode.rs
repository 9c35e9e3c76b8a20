//! Tokenizing one rendered example with the `tokenizers` crate: each piece on its own
//! (no special tokens added by the tokenizer's post-processor), then BOS/EOS around it, with
//! the loss mask aligned to the ids.
//!
//! # The loss mask
//!
//! `loss_mask[i]` is about the token `input_ids[i]` **as a target**: when true, the loss
//! includes predicting `input_ids[i]` from `input_ids[..i]` (the train stage computes
//! `logits[i-1]` against `input_ids[i]`). This is Hugging Face's convention for `labels`
//! (`labels[i] = input_ids[i]` where the mask is true, `-100` elsewhere; the shift happens
//! inside the loss). BOS is never a target (false). EOS is a target when the example's
//! last piece is: always for text and completions, and for a chat when its last message is
//! trained (an assistant turn, or any turn without `mask_prompt`).

use super::error::RecordProblem;
use super::template::Rendered;
use super::tokenizer::StageTokenizer;

/// Token ids and loss mask of one example; both have the same length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Encoded {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
}

/// Tokenizes `rendered` and adds the stage's BOS/EOS.
pub(crate) fn encode(tok: &StageTokenizer, rendered: &Rendered) -> Result<Encoded, RecordProblem> {
    let mut out = Encoded::default();
    if let Some(bos) = &tok.bos {
        out.ids.push(bos.id);
        out.mask.push(false);
    }
    for piece in &rendered.pieces {
        let before = out.ids.len();
        tok.words
            .encode(&piece.text, &mut out.ids)
            .map_err(|e| RecordProblem::Tokenizer {
                message: e.to_string(),
            })?;
        let added = out.ids.len() - before;
        out.mask.extend(std::iter::repeat_n(piece.trained, added));
    }
    if let Some(eos) = &tok.eos {
        out.ids.push(eos.id);
        out.mask.push(rendered.eos_trained);
    }
    Ok(out)
}
