//! Putting LoRA branches on a loaded model: fresh ones for training (PEFT's default
//! init from a seeded RNG) or those of a stored [`Adapter`], frozen for inference or as
//! trainable `Var`s to resume from.
//!
//! Trainable tensors live in a candle `VarMap` under the module path plus
//! `.lora_A.weight` / `.lora_B.weight`, i.e. PEFT's key without `base_model.model.`.
//! Base weights are never `Var`s.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

use super::error::{CandleContext, ModelError};
use super::llama::Llama;
use super::lora::LoraBranch;
use super::lora_config::LoraConfig;
use crate::formats::Adapter;

/// The `VarMap` name of `module`'s A matrix.
pub fn lora_a_name(module: &str) -> String {
    format!("{module}.lora_A.weight")
}

/// The `VarMap` name of `module`'s B matrix.
pub fn lora_b_name(module: &str) -> String {
    format!("{module}.lora_B.weight")
}

/// The dtype LoRA weights are kept and computed in: f64 for an f64 model, f32 otherwise
/// (PEFT keeps adapters in f32 under a half-precision base).
pub fn lora_dtype(model_dtype: DType) -> DType {
    if model_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Attaches fresh trainable LoRA to every projection `cfg` selects and registers A/B in
/// `varmap`. A is uniform in `±1/sqrt(in)` (PEFT's `kaiming_uniform_(a=sqrt(5))`), B is
/// zero, drawn from one RNG seeded with `seed` in checkpoint order, so a seed always
/// gives the same weights. Returns the adapted module names.
pub fn init_lora(
    model: &mut Llama,
    cfg: &LoraConfig,
    seed: u64,
    varmap: &VarMap,
) -> Result<Vec<String>, ModelError> {
    cfg.validate()?;
    let dtype = lora_dtype(model.dtype());
    let device = model.device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut names = Vec::new();
    for linear in model.linears_mut() {
        let name = linear.name().to_string();
        if !cfg.selects(&name) {
            continue;
        }
        let r = cfg.rank_for(&name);
        let (in_dim, out_dim) = linear.dims();
        let bound = 1.0 / (in_dim as f64).sqrt();
        let values: Vec<f64> = (0..r * in_dim)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(values, (r, in_dim), &device)
            .and_then(|t| t.to_dtype(dtype))
            .ctx(|| format!("initialising {}", lora_a_name(&name)))?;
        let b = Tensor::zeros((out_dim, r), dtype, &device)
            .ctx(|| format!("initialising {}", lora_b_name(&name)))?;
        let (a, b) = register(varmap, &name, &a, &b)?;
        linear.set_lora(Some(LoraBranch {
            a,
            b,
            scale: cfg.scale_for(&name),
            dropout: cfg.dropout,
        }))?;
        names.push(name);
    }
    if names.is_empty() {
        return Err(ModelError::InvalidInput {
            what: "lora.targets".into(),
            message: format!(
                "no projection of the model matches targets {:?} and layers {:?}",
                cfg.targets.names(),
                cfg.layers
            ),
        });
    }
    Ok(names)
}

/// Attaches a stored adapter, unmerged. With `trainable`, its A/B become `Var`s in that
/// map (to continue training); otherwise they are plain tensors.
pub fn attach_adapter(
    model: &mut Llama,
    adapter: &Adapter,
    trainable: Option<&VarMap>,
) -> Result<(), ModelError> {
    let dtype = lora_dtype(model.dtype());
    let device = model.device().clone();
    let mut linears: HashMap<String, _> = model
        .linears_mut()
        .map(|l| (l.name().to_string(), l))
        .collect();
    for (module, weights) in &adapter.modules {
        let Some(linear) = linears.get_mut(module) else {
            return Err(ModelError::AdapterMismatch {
                module: module.clone(),
                message: "the model has no such projection".into(),
            });
        };
        let convert = |t: &Tensor| t.to_device(&device).and_then(|t| t.to_dtype(dtype));
        let a =
            convert(&weights.a).ctx(|| format!("moving {} to the device", lora_a_name(module)))?;
        let b =
            convert(&weights.b).ctx(|| format!("moving {} to the device", lora_b_name(module)))?;
        let (a, b) = match trainable {
            Some(varmap) => register(varmap, module, &a, &b)?,
            None => (a, b),
        };
        linear.set_lora(Some(LoraBranch {
            a,
            b,
            scale: weights.scale,
            dropout: adapter.config.dropout,
        }))?;
    }
    Ok(())
}

/// Creates `Var`s for A and B in `varmap`; returns their tensors (same ids).
fn register(
    varmap: &VarMap,
    module: &str,
    a: &Tensor,
    b: &Tensor,
) -> Result<(Tensor, Tensor), ModelError> {
    let va = Var::from_tensor(a).ctx(|| lora_a_name(module))?;
    let vb = Var::from_tensor(b).ctx(|| lora_b_name(module))?;
    let (ta, tb) = (va.as_tensor().clone(), vb.as_tensor().clone());
    let mut data = varmap
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    data.insert(lora_a_name(module), va);
    data.insert(lora_b_name(module), vb);
    Ok((ta, tb))
}
