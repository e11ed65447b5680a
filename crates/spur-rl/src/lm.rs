//! spur-lm's transformer as a [`Policy`]: the sampler and the trainer share its `Var`s, so an
//! optimizer update is what the next rollout samples from.

use candle_core::{Device, Tensor, Var};
use spur_lm::Transformer;

use crate::policy::Policy;
use crate::{Error, Result};

impl Policy for Transformer {
    fn named_vars(&self) -> Vec<(String, Var)> {
        Transformer::named_vars(self)
    }

    fn forward_logits(&self, input_ids: &Tensor, start: usize) -> Result<Tensor> {
        self.forward_from(input_ids, start)
            .map_err(|e| Error::Policy(Box::new(e)))
    }

    fn device(&self) -> Device {
        Transformer::device(self).clone()
    }
}
