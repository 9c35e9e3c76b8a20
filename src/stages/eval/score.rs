//! Scoring rows: the mean next-token cross-entropy over the targets the loss masks mark,
//! and its exponential, the perplexity.
//!
//! Rows are batched in order of length (fewer pad positions), right-padded with id 0.
//! Right padding needs no attention mask under a causal model: a real position never
//! sees a later one, so pad keys are invisible to every query that counts. Per-token
//! losses are summed in f64, so the result does not depend on how rows are batched
//! beyond float rounding of the forward itself.

use candle_core::{DType, Device, Tensor, D};

use super::data::Row;
use crate::model::Llama;

/// Loss over a set of rows.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Score {
    /// Mean token loss (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Targets counted.
    pub tokens: u64,
    /// Rows with at least one target.
    pub rows: u64,
}

/// Scores `rows` through `model`, `batch_size` rows per forward pass. `each_batch` is
/// called with the number of rows done after every batch; an error from it stops.
pub fn score<E>(
    model: &Llama,
    rows: &[Row],
    batch_size: usize,
    mut each_batch: impl FnMut(usize) -> Result<(), E>,
) -> Result<Score, ScoreError<E>> {
    let vocab = model.config().vocab_size;
    for (i, r) in rows.iter().enumerate() {
        if r.input_ids.len() != r.loss_mask.len() {
            return Err(ScoreError::Input(format!(
                "row {i}: {} input_ids but {} loss_mask values",
                r.input_ids.len(),
                r.loss_mask.len()
            )));
        }
        if let Some(t) = r.input_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ScoreError::Input(format!(
                "row {i}: token id {t} is outside the model's vocabulary (size {vocab})"
            )));
        }
    }
    let mut order: Vec<&Row> = rows
        .iter()
        .filter(|r| super::data::target_count(r) > 0)
        .collect();
    order.sort_by_key(|r| r.input_ids.len());
    let batches: Vec<&[&Row]> = order.chunks(batch_size.max(1)).collect();
    let block = logit_rows(vocab);
    let workers = side_by_side(model, batches.len());
    let results = if workers > 1 {
        score_side_by_side(model, &batches, block, workers, each_batch)?
    } else {
        let mut results = Vec::with_capacity(batches.len());
        let mut done = 0usize;
        for batch in &batches {
            results.push(
                batch_nll(model, batch, block).map_err(|e| ScoreError::Model(e.to_string()))?,
            );
            done += batch.len();
            each_batch(done).map_err(ScoreError::Stopped)?;
        }
        results
    };
    // Summed in batch order, whichever way the batches ran.
    let (mut sum, mut tokens) = (0.0f64, 0u64);
    for (s, n) in results {
        sum += s;
        tokens += n;
    }
    if tokens == 0 {
        return Err(ScoreError::Input(
            "no row has a target token to score (every loss_mask is false, or rows have \
             fewer than 2 tokens)"
                .into(),
        ));
    }
    let loss = sum / tokens as f64;
    Ok(Score {
        loss,
        perplexity: loss.exp(),
        tokens,
        rows: order.len() as u64,
    })
}

/// How many batches [`score`] runs side by side: on the CPU in f32, where every kernel
/// of the forward is taper's own, one per thread of the caller's rayon pool (at most one
/// per batch); elsewhere one (candle's kernels for bf16 and f16 on the CPU share a
/// process-wide pool of their own).
///
/// Each batch then runs on its share of the threads, one where there are as many
/// batches as threads. Splitting every product and kernel of one forward over the
/// threads, as a single batch must, leaves them waiting on each other at every op's end
/// and packs each product's input once per thread; whole batches side by side do
/// neither (BENCHMARKS.md, "Session 9").
fn side_by_side(model: &Llama, batches: usize) -> usize {
    if model.device().is_cpu() && model.dtype() == DType::F32 {
        rayon::current_num_threads().min(batches).max(1)
    } else {
        1
    }
}

/// The batches' `(loss sum, targets)`, in order, computed by `workers` threads that each
/// take the next batch not yet taken and run it in a rayon pool of its own with its
/// share of the caller's threads (one thread when there are at least as many batches
/// as threads), so every kernel of that forward stays on those. `each_batch` runs on
/// the calling thread as results come in; once it or a batch fails, no further batch
/// is started.
fn score_side_by_side<E>(
    model: &Llama,
    batches: &[&[&Row]],
    block: usize,
    workers: usize,
    mut each_batch: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<(f64, u64)>, ScoreError<E>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut results: Vec<Option<(f64, u64)>> = vec![None; batches.len()];
    let mut failure: Option<ScoreError<E>> = None;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = rayon::current_num_threads().max(workers);
        for w in 0..workers {
            let share = threads / workers + usize::from(w < threads % workers);
            let (tx, next, stop) = (tx.clone(), &next, &stop);
            scope.spawn(move || {
                let work = || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) || i >= batches.len() {
                        break;
                    }
                    let r = batch_nll(model, batches[i], block).map_err(|e| e.to_string());
                    if tx.send((i, r)).is_err() {
                        break;
                    }
                };
                match rayon::ThreadPoolBuilder::new().num_threads(share).build() {
                    Ok(pool) => pool.install(work),
                    Err(e) => {
                        let _ =
                            tx.send((usize::MAX, Err(format!("starting a scoring thread: {e}"))));
                    }
                }
            });
        }
        drop(tx);
        let mut done = 0usize;
        for (i, r) in rx {
            if failure.is_some() {
                continue;
            }
            match r {
                Ok(v) => {
                    results[i] = Some(v);
                    done += batches[i].len();
                    if let Err(e) = each_batch(done) {
                        failure = Some(ScoreError::Stopped(e));
                    }
                }
                Err(m) => failure = Some(ScoreError::Model(m)),
            }
            if failure.is_some() {
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    results
        .into_iter()
        .map(|r| r.ok_or_else(|| ScoreError::Model("a batch was not scored".into())))
        .collect()
}

/// Why scoring failed.
#[derive(Debug)]
pub enum ScoreError<E> {
    /// The rows cannot be scored by this model.
    Input(String),
    /// A tensor operation failed.
    Model(String),
    /// The callback asked to stop.
    Stopped(E),
}

/// Summed loss and target count of one batch. Every position is scored, the last of
/// each row against a dummy target with weight 0: narrowing the logits to `len - 1`
/// positions would copy the whole block.
fn batch_nll(model: &Llama, batch: &[&Row], block: usize) -> candle_core::Result<(f64, u64)> {
    let device = model.device();
    let len = batch.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    let b = batch.len();
    let mut ids = vec![0u32; b * len];
    let mut targets = vec![0u32; b * len];
    let mut weights = vec![0f32; b * len];
    let mut count = 0u64;
    for (r, row) in batch.iter().enumerate() {
        let n = row.input_ids.len();
        ids[r * len..r * len + n].copy_from_slice(&row.input_ids);
        if n > 1 {
            targets[r * len..r * len + n - 1].copy_from_slice(&row.input_ids[1..]);
        }
        for (i, &m) in row.loss_mask.iter().enumerate().skip(1) {
            if m {
                weights[r * len + i - 1] = 1.0;
                count += 1;
            }
        }
    }
    let ids = Tensor::from_vec(ids, (b, len), device)?;
    let targets = Tensor::from_vec(targets, (1, b * len), device)?;
    let hidden = model.forward_hidden(&ids, None, false)?;
    let hidden = hidden.reshape((1, b * len, hidden.dim(2)?))?;
    // The logits `block` positions at a time: `[b, len, vocab]` at once would be
    // gigabytes for a 150k vocabulary, and a fresh mapping (page faults) for any size.
    let block = block.max(1);
    let mut parts = Vec::with_capacity((b * len).div_ceil(block));
    for r0 in (0..b * len).step_by(block) {
        let n = block.min(b * len - r0);
        let logits = model.logits(&hidden.narrow(1, r0, n)?)?;
        parts.push(token_nll(&logits, &targets.narrow(1, r0, n)?)?);
    }
    let nll = Tensor::cat(&parts, 1)?
        .reshape((b, len))?
        .to_dtype(DType::F32)?;
    let w = Tensor::from_vec(weights, (b, len), &Device::Cpu)?.to_device(device)?;
    // A position of weight 0 adds nothing, whatever its loss (0 * inf would be NaN).
    let nll = w.ne(0f32)?.where_cond(&nll, &nll.zeros_like()?)?;
    let sum = (nll * w)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok((sum, count))
}

/// Positions whose logits are taken at once: about 4M logits (16 MB in f32), and at
/// least 64 positions, so that the LM head's product stays wide enough to be efficient.
fn logit_rows(vocab: usize) -> usize {
    ((1usize << 22) / vocab.max(1)).max(64)
}

/// `-log softmax(logits)[target]` per position: logits `[b, s, v]`, targets `[b, s]`
/// (u32); computed in f32 (f64 for f64 logits). Returns `[b, s]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = logits.to_dtype(dtype)?;
    if crate::model::fused_cpu::usable_cross_entropy(&logits.flatten_to(1)?) {
        // One pass a row on the CPU (max, exp-sum, pick), without the shifted copy.
        let (b, s, v) = logits.dims3()?;
        let (picked, _) = crate::model::fused_cpu::cross_entropy_forward(
            &logits.reshape((b * s, v))?,
            &targets.flatten_all()?,
        )?;
        return picked.neg()?.reshape((b, s));
    }
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    (lse - picked)?.squeeze(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_taken_in_blocks_score_as_the_whole_forward() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let model = crate::model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let rows: Vec<Row> = [9usize, 6, 9]
            .iter()
            .enumerate()
            .map(|(r, &n)| Row {
                input_ids: (0..n as u32)
                    .map(|i| (i * 37 + r as u32 * 11) % 200 + 3)
                    .collect(),
                loss_mask: (0..n).map(|i| i % 4 != 1).collect(),
            })
            .collect();
        let batch: Vec<&Row> = rows.iter().collect();
        // The reference: one forward's logits, the masked targets' losses summed.
        let (b, len) = (batch.len(), 9);
        let mut ids = vec![0u32; b * len];
        for (r, row) in batch.iter().enumerate() {
            ids[r * len..r * len + row.input_ids.len()].copy_from_slice(&row.input_ids);
        }
        let ids = Tensor::from_vec(ids, (b, len), &Device::Cpu).unwrap();
        let logits = model.forward(&ids, None, false).unwrap();
        let mut want = 0f64;
        for (r, row) in batch.iter().enumerate() {
            for i in 1..row.input_ids.len() {
                if row.loss_mask[i] {
                    let l = logits.get(r).unwrap().get(i - 1).unwrap();
                    let l = l.to_vec1::<f32>().unwrap();
                    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let lse = m + l.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                    want += lse - l[row.input_ids[i] as usize] as f64;
                }
            }
        }
        // Blocks of 1, 4 (not dividing 27 positions), 27 and more than all.
        for block in [1, 4, 27, 1000] {
            let (sum, count) = batch_nll(&model, &batch, block).unwrap();
            assert_eq!(count, 15, "block {block}");
            assert!(
                (sum - want).abs() < 1e-4 * want,
                "block {block}: {sum} vs {want}"
            );
        }
    }

    /// Rows of the tiny Llama's vocabulary, of varied lengths and masks.
    fn tiny_rows(n: usize) -> Vec<Row> {
        (0..n)
            .map(|r| {
                let len = 5 + (r * 7) % 11;
                Row {
                    input_ids: (0..len as u32)
                        .map(|i| (i * 37 + r as u32 * 11) % 200 + 3)
                        .collect(),
                    loss_mask: (0..len).map(|i| (i + r) % 5 != 1).collect(),
                }
            })
            .collect()
    }

    #[test]
    fn batches_side_by_side_score_exactly_as_one_after_another() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let model = crate::model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        let run = |rows: &[Row], threads: usize| {
            pool(threads).install(|| {
                let batches = rows.len().div_ceil(2);
                assert_eq!(side_by_side(&model, batches), threads.min(batches));
                let mut seen = Vec::new();
                let s = score(&model, rows, 2, |done| {
                    seen.push(done);
                    Ok::<_, ()>(())
                })
                .unwrap();
                (s, seen)
            })
        };
        // 9 rows in batches of 2: 5 batches over 2 or 3 threads, one thread each.
        let rows = tiny_rows(9);
        let (one, seen) = run(&rows, 1);
        assert_eq!(seen, [2, 4, 6, 8, 9]);
        for threads in [2, 3] {
            let (s, seen) = run(&rows, threads);
            // The same floats: each batch's forward is the same work whatever threads
            // it runs on, and the sums are taken in batch order.
            assert_eq!(s, one, "{threads} threads");
            assert_eq!(seen.len(), 5);
            assert_eq!(seen.last(), Some(&9));
        }
        // 2 batches over 5 threads: 3 and 2 threads each.
        let rows = tiny_rows(4);
        let (one, _) = run(&rows, 1);
        assert_eq!(run(&rows, 5).0, one);
    }

    #[test]
    fn a_stop_from_the_callback_ends_scoring_side_by_side() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let model = crate::model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let rows = tiny_rows(12);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut calls = 0;
        let r = pool.install(|| {
            score(&model, &rows, 1, |_| {
                calls += 1;
                Err("stop")
            })
        });
        assert!(matches!(r, Err(ScoreError::Stopped("stop"))));
        // The first result stops it: no more than the batches already running finish.
        assert_eq!(calls, 1);
    }

    #[test]
    fn nll_is_minus_log_softmax_of_the_target() {
        let logits = Tensor::new(&[[[0f32, (3f32).ln()], [1.0, 1.0]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[1u32, 0]], &Device::Cpu).unwrap();
        let nll = token_nll(&logits, &targets)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((nll[0][0] - (-(0.75f32).ln())).abs() < 1e-6);
        assert!((nll[0][1] - 2f32.ln()).abs() < 1e-6);
    }
}
