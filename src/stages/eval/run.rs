//! One attempt of an eval stage: score the rows with the adapter (and the base alone),
//! report the metrics, check the gates, generate the samples (with `compare_base`, also
//! from the base alone), write the report.
//!
//! The gates are checked before the samples: a failed gate fails the stage at once, and
//! the executor publishes nothing (the metrics are in the ledger already).

use super::config::{EvalConfig, SamplesConfig};
use super::data::read_rows;
use super::gates::{self, Metrics};
use super::report::{Report, Sample};
use super::score::{score, Score, ScoreError};
use crate::formats;
use crate::model::{
    attach_adapter, generate, load_model, parse_compute_dtype, DeviceChoice, GenerateOptions,
    Llama, TextTokenizer,
};
use crate::stages::context::{StageContext, StageError, StageEvent};

/// Runs the eval stage.
pub fn run(cfg: &EvalConfig, ctx: &StageContext<'_>) -> Result<(), StageError> {
    let failed = |m: String| StageError::Failed(m);
    let device = cfg
        .device
        .parse::<DeviceChoice>()
        .map_err(failed)?
        .open()
        .map_err(|e| failed(e.to_string()))?;
    let dtype = parse_compute_dtype(&cfg.dtype).map_err(|e| failed(e.to_string()))?;

    let rows = read_rows(&ctx.workspace.join(&cfg.data)).map_err(failed)?;
    let base_dir = ctx.workspace.join(&cfg.base_model);
    let mut base = load_model(&base_dir, dtype, &device).map_err(|e| failed(e.to_string()))?;
    // Inference only: the weights packed (or transposed) speed up the CPU forward.
    base.store_for_inference()
        .map_err(|e| failed(e.to_string()))?;
    let adapted = match &cfg.adapter {
        Some(dir) => {
            let adapter = formats::read_adapter(&ctx.workspace.join(dir))
                .map_err(|e| failed(e.to_string()))?;
            let mut model = base.clone();
            attach_adapter(&mut model, &adapter, None).map_err(|e| failed(e.to_string()))?;
            Some(model)
        }
        None => None,
    };
    let model = adapted.as_ref().unwrap_or(&base);

    let scoring = std::time::Instant::now();
    let eval = score_rows(ctx, model, &rows, cfg.batch_size, "eval")?;
    // Throughput of the scoring alone (no load): a ledger metric only, so the report
    // stays a function of its inputs.
    let tokens_per_s = eval.tokens as f64 / scoring.elapsed().as_secs_f64().max(1e-9);
    let base_score = match (cfg.compare_base, &adapted) {
        (false, _) => None,
        (true, Some(_)) => Some(score_rows(ctx, &base, &rows, cfg.batch_size, "base")?),
        (true, None) => Some(eval),
    };
    let improvement = base_score.map(|b| (b.loss - eval.loss) / b.loss);

    ctx.metric(0, "eval/loss", eval.loss);
    ctx.metric(0, "eval/perplexity", eval.perplexity);
    ctx.metric(0, "eval/tokens", eval.tokens as f64);
    ctx.metric(0, "eval/rows", eval.rows as f64);
    ctx.metric(0, "eval/tokens_per_s", tokens_per_s);
    if let Some(b) = base_score {
        ctx.metric(0, "eval/base_loss", b.loss);
        ctx.metric(0, "eval/base_perplexity", b.perplexity);
    }
    if let Some(i) = improvement {
        ctx.metric(0, "eval/improvement", i);
    }
    ctx.emit(StageEvent::Log(summary(&eval, base_score.as_ref())));

    let metrics = Metrics {
        eval_loss: eval.loss,
        perplexity: eval.perplexity,
        base_loss: base_score.map(|b| b.loss),
        base_perplexity: base_score.map(|b| b.perplexity),
        improvement_over_base: improvement,
    };
    let gate_results = gates::check(&cfg.gates, &metrics);
    let failures: Vec<String> = gate_results
        .iter()
        .filter_map(|g| g.message.clone())
        .collect();
    if !failures.is_empty() {
        return Err(StageError::Gate(failures.join("; ")));
    }

    let adapter_samples = match &cfg.samples {
        Some(s) => samples(ctx, s, model, &base_dir, "")?,
        None => Vec::new(),
    };
    // The same prompts through the base alone: what the adapter changed.
    let base_samples = match (&cfg.samples, cfg.compare_base && adapted.is_some()) {
        (Some(s), true) => samples(ctx, s, &base, &base_dir, "base ")?,
        _ => Vec::new(),
    };
    let report = Report {
        base_model: cfg.base_model.clone(),
        adapter: cfg.adapter.clone(),
        data: cfg.data.clone(),
        eval,
        base: base_score,
        improvement_over_base: improvement,
        gates: gate_results,
        passed: true,
        samples: adapter_samples,
        base_samples,
    };
    report.write(&ctx.staged(&cfg.report)).map_err(failed)
}

fn summary(eval: &Score, base: Option<&Score>) -> String {
    let mut s = format!(
        "eval loss {} (perplexity {}) over {} tokens in {} rows",
        gates::num(eval.loss),
        gates::num(eval.perplexity),
        eval.tokens,
        eval.rows
    );
    if let Some(b) = base {
        s.push_str(&format!(
            "; base loss {} (perplexity {})",
            gates::num(b.loss),
            gates::num(b.perplexity)
        ));
    }
    s
}

fn score_rows(
    ctx: &StageContext<'_>,
    model: &Llama,
    rows: &[super::data::Row],
    batch_size: usize,
    label: &str,
) -> Result<Score, StageError> {
    let total = rows.len() as u64;
    let each = |done: usize| {
        ctx.emit(StageEvent::Progress {
            done: done as u64,
            total: Some(total),
            unit: "rows".into(),
            message: format!("scoring {label}"),
        });
        ctx.check_cancelled()
    };
    score(model, rows, batch_size, each).map_err(|e| match e {
        ScoreError::Input(m) => StageError::Failed(format!("scoring the {label} model: {m}")),
        ScoreError::Model(m) => StageError::Failed(format!("scoring the {label} model: {m}")),
        ScoreError::Stopped(e) => e,
    })
}

fn samples(
    ctx: &StageContext<'_>,
    s: &SamplesConfig,
    model: &Llama,
    base_dir: &std::path::Path,
    label: &str,
) -> Result<Vec<Sample>, StageError> {
    let failed = |m: String| StageError::Failed(format!("samples: {m}"));
    let path = ctx.workspace.join(&s.prompts);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| failed(format!("{}: cannot read: {e}", s.prompts)))?;
    let prompts: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    let tokenizer = TextTokenizer::from_model_dir(base_dir).map_err(|e| failed(e.to_string()))?;
    let chat = s.chat.then_some(s.chat_template);
    let opts = GenerateOptions {
        max_new_tokens: s.max_new_tokens,
        sampling: s.sampling(),
        seed: s.seed,
        stop_tokens: tokenizer.stop_tokens(chat),
    };
    let mut out = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        ctx.check_cancelled()?;
        let ids = tokenizer
            .encode_prompt(prompt, chat)
            .map_err(|e| failed(e.to_string()))?;
        // Each prompt gets the configured seed, so a sample does not depend on the others.
        let g =
            generate(model, &ids, &opts).map_err(|e| failed(format!("prompt {}: {e}", i + 1)))?;
        out.push(Sample {
            prompt: prompt.to_string(),
            text: tokenizer
                .decode(&g.tokens)
                .map_err(|e| failed(e.to_string()))?,
            tokens: g.tokens.len(),
            stop: g.stop,
        });
        ctx.emit(StageEvent::Progress {
            done: i as u64 + 1,
            total: Some(prompts.len() as u64),
            unit: "samples".into(),
            message: format!("generating {label}samples"),
        });
    }
    Ok(out)
}
