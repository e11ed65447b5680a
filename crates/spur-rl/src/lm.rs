//! spur-lm's transformer as a [`Policy`]: the sampler and the trainer share its `Var`s, so an
//! optimizer update is what the next rollout samples from.

use candle_core::{Device, Tensor, Var};
use spur_lm::{LayerTape, PackedSequences, TokenLogprobs, Transformer};

use crate::policy::{Backprop, Entropy, Policy};
use crate::{Error, Result};

impl Policy for Transformer {
    fn named_vars(&self) -> Vec<(String, Var)> {
        Transformer::named_vars(self)
    }

    fn forward_logits(&self, batch: &PackedSequences) -> Result<Tensor> {
        self.forward_packed(batch)
            .map_err(|e| Error::Policy(Box::new(e)))
    }

    fn scoring_logits(&self, batch: &PackedSequences) -> Result<Tensor> {
        self.forward_no_grad(batch)
            .map_err(|e| Error::Policy(Box::new(e)))
    }

    fn training_logits(&self, batch: &PackedSequences) -> Result<(Tensor, Backprop<'_>)> {
        let (logits, tape) = self
            .forward_for_gradient(batch)
            .map_err(|e| Error::Policy(Box::new(e)))?;
        Ok((logits, backprop(tape)))
    }

    fn scoring_token_logprobs(
        &self,
        batch: &PackedSequences,
        targets: &Tensor,
        temperature: f64,
        entropy: bool,
    ) -> Result<Option<TokenLogprobs>> {
        if !self.has_chunked_head() {
            return Ok(None);
        }
        self.token_logprobs_no_grad(batch, targets, temperature, entropy)
            .map(Some)
            .map_err(|e| Error::Policy(Box::new(e)))
    }

    fn training_token_logprobs(
        &self,
        batch: &PackedSequences,
        targets: &Tensor,
        temperature: f64,
        entropy: Entropy,
    ) -> Result<Option<(TokenLogprobs, Backprop<'_>)>> {
        if !self.has_chunked_head() {
            return Ok(None);
        }
        let (tokens, tape) = self
            .token_logprobs_for_gradient(batch, targets, temperature, entropy)
            .map_err(|e| Error::Policy(Box::new(e)))?;
        Ok(Some((tokens, backprop(tape))))
    }

    fn device(&self) -> Device {
        Transformer::device(self).clone()
    }
}

/// How to differentiate a training pass: its own graph, or the checkpointed layers' tape.
fn backprop(tape: Option<LayerTape<'_>>) -> Backprop<'_> {
    match tape {
        None => Backprop::Graph,
        Some(tape) => Backprop::Staged(Box::new(move |loss| {
            tape.backward(loss).map_err(|e| Error::Policy(Box::new(e)))
        })),
    }
}
