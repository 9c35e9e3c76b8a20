//! The train stage's run: load the base model and the token shards, attach fresh LoRA,
//! resume from the newest checkpoint in the staging area if there is one, step until
//! `max_steps` with metrics, evals and checkpoints on the way, then write the adapter.

use std::path::Path;
use std::time::Instant;

use candle_core::Var;
use candle_nn::VarMap;

use super::checkpoint::{self, TrainState};
use super::config::{FrozenWeights, TrainConfig};
use super::data::{make_batch, read_split, Batch, Cursor, Row, Split};
use super::optimizer::AdamWParams;
use super::rng::Rng;
use super::schedule::lr_at;
use super::step::{StepFailure, Trainer};
use crate::formats::checkpoint::Checkpoint;
use crate::formats::native;
use crate::formats::raw_adapter::RawAdapter;
use crate::formats::{Adapter, AdapterFormat, AdapterModule};
use crate::model::{init_lora, load_model, lora_a_name, lora_b_name};
use crate::stages::context::{StageContext, StageError, StageEvent, StopReason};

/// The dropout stream tag of [`Rng::new`].
const DROPOUT_STREAM: u64 = 2;

fn failed(msg: impl std::fmt::Display) -> StageError {
    StageError::Failed(format!("train: {msg}"))
}

/// Runs one attempt of a train stage.
pub fn run(cfg: &TrainConfig, ctx: &StageContext<'_>) -> Result<(), StageError> {
    let settings = cfg.resolve().map_err(failed)?;
    let output = match ctx.stage.outputs.as_slice() {
        [one] => one.path.clone(),
        other => {
            return Err(failed(format!(
                "a train stage has exactly one output, the adapter folder; {} declared",
                other.len()
            )))
        }
    };
    let log = |m: String| ctx.emit(StageEvent::Log(m));
    let device = settings.device.open().map_err(failed)?;
    let base_dir = ctx.workspace.join(&cfg.base_model);
    let mut model = load_model(&base_dir, settings.dtype, &device).map_err(failed)?;
    let varmap = VarMap::new();
    let modules = init_lora(&mut model, &settings.lora, cfg.seed, &varmap).map_err(failed)?;
    if settings.frozen_weights == FrozenWeights::Fast {
        model
            .store_for_training()
            .map_err(|e| failed(format!("setting the model up for training: {e}")))?;
    }
    let vocab = model.config().vocab_size;

    let train = read_split(&ctx.workspace.join(&cfg.data.train), vocab).map_err(failed)?;
    if train.rows.is_empty() {
        return Err(failed(format!(
            "{}: no row has a target that counts toward the loss",
            cfg.data.train
        )));
    }
    let valid = match &cfg.data.valid {
        Some(v) => Some(read_split(&ctx.workspace.join(v), vocab).map_err(failed)?),
        None => None,
    };
    let total = cfg.total_steps(train.rows.len());
    log(format!(
        "train: {} rows ({} without targets dropped), {} LoRA modules, {} steps on {:?}",
        train.rows.len(),
        train.dropped,
        modules.len(),
        total,
        device
    ));

    let vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| failed("the LoRA variables are poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let adam = AdamWParams {
        beta1: cfg.optimizer.betas[0],
        beta2: cfg.optimizer.betas[1],
        eps: cfg.optimizer.eps,
        weight_decay: cfg.optimizer.weight_decay,
    };
    let rng = Rng::new(cfg.seed, DROPOUT_STREAM);
    let mut trainer =
        Trainer::new(model, vars, adam, settings.max_grad_norm, rng).map_err(failed)?;
    let mut cursor = Cursor::start(train.rows.len(), cfg.seed);
    let mut state = TrainState {
        step: 0,
        adam_step: 0,
        rng_state: trainer.rng.state,
        epoch: 0,
        position: 0,
        tokens_seen: 0,
        loss: f64::NAN,
        config: cfg.fingerprint(),
    };

    let root = ctx.staging.join(checkpoint::DIR);
    let (loaded, notes) = checkpoint::latest(&root, &state.config);
    notes.into_iter().for_each(&log);
    let mut last_checkpoint = None;
    if let Some(l) = loaded {
        restore(&mut trainer, &mut cursor, &l, train.rows.len()).map_err(failed)?;
        state = l.state;
        log(format!(
            "train: resuming from {}",
            checkpoint::name(state.step)
        ));
        last_checkpoint = Some(state.step);
    }
    let save = |trainer: &Trainer, state: &TrainState, cursor: &Cursor| {
        let mut tensors: Vec<_> = trainer
            .vars()
            .iter()
            .map(|(k, v)| (format!("lora.{k}"), v.as_tensor().clone()))
            .collect();
        tensors.extend(trainer.optimizer().state_tensors());
        checkpoint::save(&root, state, tensors, &cursor.order, cfg.keep_checkpoints)
            .map_err(|e| failed(format!("writing a checkpoint: {e}")))
    };

    if let (0, Some(v)) = (state.step, &valid) {
        let loss = eval(&trainer, v, cfg.batch_size, &device)?;
        ctx.metric(0, "eval/loss", loss);
        log(format!("step 0: eval loss {loss:.4}"));
    }
    let per_step = cfg.batch_size * cfg.grad_accum;
    while state.step < total {
        if let Some(reason) = ctx.cancel.reason() {
            if reason != StopReason::Kill && last_checkpoint != Some(state.step) {
                save(&trainer, &state, &cursor)?;
            }
            return Err(StageError::Stopped(reason));
        }
        let rows: Vec<&Row> = (0..per_step)
            .map(|_| &train.rows[cursor.next(cfg.seed)])
            .collect();
        let micro = batches(&rows, cfg.batch_size, &device)?;
        let lr = lr_at(cfg.optimizer.lr, &cfg.schedule, state.step, total);
        let started = Instant::now();
        let stats = match trainer.step(&micro, lr) {
            Ok(s) => s,
            Err(StepFailure::NonFinite { loss, grad_norm }) => {
                let kept = match last_checkpoint {
                    Some(s) => {
                        format!("the last good checkpoint, {}, is kept", checkpoint::name(s))
                    }
                    None => "no checkpoint was written yet".to_string(),
                };
                return Err(failed(format!(
                    "step {}: the loss is {loss} (gradient norm {grad_norm}); stopping \
                     before the update: {kept}. Lower optimizer.lr or check the data.",
                    state.step + 1
                )));
            }
            Err(StepFailure::Candle(e)) => {
                return Err(failed(format!("step {}: {e}", state.step + 1)))
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        state.step += 1;
        state.adam_step = trainer.optimizer().step_count();
        state.rng_state = trainer.rng.state;
        state.epoch = cursor.epoch;
        state.position = cursor.position;
        state.tokens_seen += stats.tokens as u64;
        state.loss = stats.loss;
        let step = state.step as i64;
        ctx.metric(step, "train/loss", stats.loss);
        ctx.metric(step, "train/lr", lr);
        ctx.metric(step, "train/grad_norm", stats.grad_norm);
        ctx.metric(
            step,
            "train/tokens_per_s",
            stats.tokens as f64 / seconds.max(1e-9),
        );
        ctx.emit(StageEvent::Progress {
            done: state.step,
            total: Some(total),
            unit: "steps".into(),
            message: format!("loss {:.4}", stats.loss),
        });
        let eval_now = (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every))
            || state.step == total;
        if let (true, Some(v)) = (eval_now, &valid) {
            let loss = eval(&trainer, v, cfg.batch_size, &device)?;
            ctx.metric(step, "eval/loss", loss);
            log(format!("step {}: eval loss {loss:.4}", state.step));
        }
        if cfg.checkpoint_every > 0
            && state.step.is_multiple_of(cfg.checkpoint_every)
            && state.step < total
        {
            save(&trainer, &state, &cursor)?;
            last_checkpoint = Some(state.step);
        }
    }

    let out_dir = ctx.staged(&output);
    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir)
            .map_err(|e| failed(format!("{}: {e}", out_dir.display())))?;
    }
    write_adapter(
        &trainer,
        cfg,
        &settings.lora,
        &base_dir,
        &out_dir,
        &state,
        train.rows.len(),
    )
}

fn batches(
    rows: &[&Row],
    batch_size: usize,
    device: &candle_core::Device,
) -> Result<Vec<Batch>, StageError> {
    rows.chunks(batch_size)
        .map(|c| make_batch(c, device))
        .collect::<candle_core::Result<_>>()
        .map_err(failed)
}

fn eval(
    trainer: &Trainer,
    split: &Split,
    batch_size: usize,
    device: &candle_core::Device,
) -> Result<f64, StageError> {
    let rows: Vec<&Row> = split.rows.iter().collect();
    let b = batches(&rows, batch_size, device)?;
    trainer
        .eval_loss(&b)
        .map_err(|e| failed(format!("eval: {e}")))
}

fn restore(
    trainer: &mut Trainer,
    cursor: &mut Cursor,
    l: &checkpoint::Loaded,
    rows: usize,
) -> Result<(), String> {
    let bad = |m: String| format!("{}: {m}", l.dir.display());
    for (name, var) in trainer.vars() {
        let key = format!("lora.{name}");
        let t = l
            .tensors
            .get(&key)
            .ok_or_else(|| bad(format!("no tensor {key}")))?;
        let t = t
            .to_device(var.device())
            .and_then(|t| t.to_dtype(var.dtype()))
            .map_err(|e| bad(e.to_string()))?;
        var.set(&t).map_err(|e| bad(format!("{key}: {e}")))?;
    }
    trainer
        .optimizer_mut()
        .load_state(l.state.adam_step, &l.tensors)
        .map_err(|e| bad(e.to_string()))?;
    trainer.rng.state = l.state.rng_state;
    if l.order.len() != rows {
        return Err(bad(format!(
            "the saved data order covers {} rows, the training set has {rows}",
            l.order.len()
        )));
    }
    *cursor = Cursor {
        epoch: l.state.epoch,
        position: l.state.position,
        order: l.order.clone(),
    };
    Ok(())
}

fn write_adapter(
    trainer: &Trainer,
    cfg: &TrainConfig,
    lora: &crate::model::LoraConfig,
    base_dir: &Path,
    out_dir: &Path,
    state: &TrainState,
    rows: usize,
) -> Result<(), StageError> {
    let vars: std::collections::HashMap<&str, &Var> = trainer
        .vars()
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let mut modules = std::collections::BTreeMap::new();
    for linear in trainer.model().linears() {
        let name = linear.name();
        let (Some(a), Some(b)) = (
            vars.get(lora_a_name(name).as_str()),
            vars.get(lora_b_name(name).as_str()),
        ) else {
            continue;
        };
        modules.insert(
            name.to_string(),
            AdapterModule {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: lora.scale_for(name),
            },
        );
    }
    let adapter = Adapter {
        format: AdapterFormat::Native,
        config: lora.clone(),
        modules,
    };
    // The base identity hashes tensors in name order, so it holds whatever the sharding;
    // migrate and merge check it against the base they are given.
    let base = Checkpoint::open(base_dir)
        .and_then(|c| c.identity())
        .map_err(failed)?;
    let training = serde_json::json!({
        "config": cfg,
        "dtype": cfg.dtype.to_ascii_lowercase(),
        "steps": state.step,
        "train_rows": rows,
        "tokens_seen": state.tokens_seen,
    });
    let raw = RawAdapter::from_adapter(&adapter, Some(base), Some(training)).map_err(failed)?;
    native::write(&raw, out_dir).map_err(failed)
}
