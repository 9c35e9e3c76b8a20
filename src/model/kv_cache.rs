//! The key/value cache of incremental decoding: per layer, the keys (after rope) and
//! values of every position seen so far, `[batch, kv_heads, seq, head_dim]`.
//!
//! New positions are appended with `Tensor::cat` along the sequence axis. That copies the
//! cache once per step, which is a few megabytes for a small model and far cheaper than
//! the weights a decoding step reads; a preallocated ring can replace it without changing
//! the interface.

use candle_core::{Result, Tensor};

/// Keys and values of one attention layer.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Appends `k`, `v` `[batch, kv_heads, new, head_dim]` and returns the whole cached
    /// keys and values, new positions included.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.kv {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.kv
            .as_ref()
            .and_then(|(k, _)| k.dims().get(2).copied())
            .unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cache of a whole model: one [`LayerCache`] per decoder layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
        }
    }

    /// Positions cached (the position of the next token fed in).
    pub fn seq_len(&self) -> usize {
        self.layers.first().map(LayerCache::len).unwrap_or(0)
    }

    /// The cache of layer `i`.
    pub fn layer_mut(&mut self, i: usize) -> Option<&mut LayerCache> {
        self.layers.get_mut(i)
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = LayerCache::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn appends_along_the_sequence_axis() {
        let mut c = LayerCache::default();
        assert!(c.is_empty());
        let a = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::ones((1, 2, 1, 4), DType::F32, &Device::Cpu).unwrap();
        c.append(&a, &a).unwrap();
        let (k, _) = c.append(&b, &b).unwrap();
        assert_eq!(k.dims(), [1, 2, 4, 4]);
        assert_eq!(c.len(), 4);
        let last: f32 = k
            .narrow(2, 3, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(last, 8.0);
    }
}
