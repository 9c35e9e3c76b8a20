//! AdamW with decoupled weight decay, exactly PyTorch's `torch.optim.AdamW` update, with
//! its moments and step count open so a checkpoint can save and restore them (candle's
//! `AdamW` keeps them private).
//!
//! For step `t` (1-based), gradient `g`, learning rate `lr`:
//! `p ← p · (1 - lr·wd)`; `m ← β1·m + (1-β1)·g`; `v ← β2·v + (1-β2)·g²`;
//! `p ← p - (lr / (1-β1^t)) · m / (sqrt(v) / sqrt(1-β2^t) + eps)`.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

/// AdamW hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The optimizer over named parameters, in a fixed (sorted) order.
pub struct AdamW {
    params: AdamWParams,
    /// Updates done so far.
    step: u64,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments for every var; `vars` are sorted by name.
    pub fn new(mut vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            step: 0,
            vars,
            m,
            v,
        })
    }

    /// The parameters, sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Updates done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with `grads` (same order as [`Self::vars`]).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            )
        }
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2_sqrt = (1.0 - p.beta2.powi(t)).sqrt();
        for (i, g) in grads.iter().enumerate() {
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let var = &self.vars[i].1;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + p.eps)?;
            let update = ((&m / denom)? * (lr / bc1))?;
            var.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors: `adamw.m.<name>`, `adamw.v.<name>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("adamw.m.{name}"), self.m[i].clone()));
            out.push((format!("adamw.v.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restores the moments and step count saved by [`Self::state_tensors`].
    pub fn load_state(&mut self, step: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adamw.{kind}.{name}");
                let Some(t) = tensors.get(&key) else {
                    candle_core::bail!("no {key} in the checkpoint")
                };
                if t.dims() != var.dims() {
                    candle_core::bail!("{key} has shape {:?}, expected {:?}", t.dims(), var.dims())
                }
                *slot = t.to_device(var.device())?.to_dtype(var.dtype())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The PyTorch update written out in scalars, for two steps.
    #[test]
    fn matches_the_scalar_formula() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &dev).unwrap()).unwrap();
        let params = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], params).unwrap();
        let grads = [[0.5f64, -0.25], [0.1, 0.3]];
        let (mut p, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        let lr = 0.01;
        for (t, g) in grads.iter().enumerate() {
            opt.step(&[Tensor::new(g, &dev).unwrap()], lr).unwrap();
            let t = t as i32 + 1;
            for j in 0..2 {
                p[j] *= 1.0 - lr * 0.1;
                m[j] = 0.9 * m[j] + 0.1 * g[j];
                v[j] = 0.999 * v[j] + 0.001 * g[j] * g[j];
                let denom = v[j].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                p[j] -= lr / (1.0 - 0.9f64.powi(t)) * m[j] / denom;
            }
        }
        let got = w.as_tensor().to_vec1::<f64>().unwrap();
        for j in 0..2 {
            assert!((got[j] - p[j]).abs() < 1e-14, "{got:?} vs {p:?}");
        }
        // Saving and restoring the state continues the same trajectory.
        let saved: HashMap<_, _> = opt.state_tensors().into_iter().collect();
        let w2 = Var::from_tensor(w.as_tensor()).unwrap();
        let mut opt2 = AdamW::new(vec![("w".into(), w2.clone())], params).unwrap();
        opt2.load_state(opt.step_count(), &saved).unwrap();
        let g = Tensor::new(&[0.2f64, 0.2], &dev).unwrap();
        opt.step(std::slice::from_ref(&g), lr).unwrap();
        opt2.step(&[g], lr).unwrap();
        assert_eq!(
            w.as_tensor().to_vec1::<f64>().unwrap(),
            w2.as_tensor().to_vec1::<f64>().unwrap()
        );
    }
}
