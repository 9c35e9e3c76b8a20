//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use candle_core::{ModuleT, Tensor};

use super::config::ModelConfig;
use super::error::ModelError;
use super::lora::LoraLinear;
use super::weights::Weights;

/// Gate, up and down projections, each a frozen linear that can carry LoRA.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
}

impl Mlp {
    pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: LoraLinear::load(&w.pp("gate_proj"), h, i, bias)?,
            up_proj: LoraLinear::load(&w.pp("up_proj"), h, i, bias)?,
            down_proj: LoraLinear::load(&w.pp("down_proj"), i, h, bias)?,
        })
    }

    /// The three linears, in checkpoint order.
    pub fn linears_mut(&mut self) -> [&mut LoraLinear; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }

    pub fn linears(&self) -> [&LoraLinear; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

impl ModuleT for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward_t(x, train)?;
        let up = self.up_proj.forward_t(x, train)?;
        self.down_proj
            .forward_t(&super::fused::swiglu(&gate, &up)?, train)
    }
}
