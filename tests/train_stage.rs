//! The train stage end to end at library level, configured from pipeline YAML and run
//! with a real stage context: it learns (train and validation loss fall by a margin, on a
//! patterned corpus with prompt masking and on real text with the real tokenizer), a run
//! stopped and resumed from its checkpoints ends in the same adapter bytes as one that
//! was never stopped, and a diverging run stops with a clear error and keeps its last
//! good checkpoint.

mod train_util;

use taper::formats::checkpoint::Checkpoint;
use taper::formats::native;
use taper::formats::{read_adapter, AdapterFormat};
use taper::stages::{StageError, StageEvent, StopReason};
use train_util::{run, text_rows, Report, Row, Workspace};

/// Rows counting up from a seeded start in 10..100 (`t+1` follows `t`), the first
/// `prompt` tokens masked out of the loss.
fn counting_rows(n: usize, len: usize, prompt: usize, seed: u64) -> Vec<Row> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = 10 + (x >> 33) % 90;
            let ids: Vec<u32> = (0..len as u64)
                .map(|i| (10 + (start - 10 + i) % 90) as u32)
                .collect();
            let mask = (0..len).map(|i| i >= prompt).collect();
            (ids, mask)
        })
        .collect()
}

fn first_last(r: &Report, name: &str) -> (f64, f64) {
    let m = r.metric(name);
    assert!(m.len() >= 2, "{name}: {m:?}");
    (m[0].1, m[m.len() - 1].1)
}

fn read_bytes(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join(native::WEIGHTS)).unwrap(),
        std::fs::read(dir.join("adapter_config.json")).unwrap(),
    )
}

#[test]
fn learns_a_patterned_corpus_and_writes_a_native_adapter() {
    let ws = Workspace::new(&counting_rows(64, 24, 4, 1), &counting_rows(16, 24, 4, 2));
    let staging = ws.staging("train");
    let with = "base_model: models/base\n\
                data: {train: tokens/train, valid: tokens/valid}\n\
                lora: {r: 8, alpha: 16, targets: [all-linear]}\n\
                optimizer: {lr: 1e-2}\n\
                schedule: {warmup_steps: 5, decay: cosine, min_lr_ratio: 0.5}\n\
                batch_size: 8\nmax_steps: 80\neval_every: 40\ncheckpoint_every: 0\ndevice: cpu\n";
    let (result, report) = run(&ws, &staging, with, |_, _| {});
    result.unwrap();
    let (train0, train1) = first_last(&report, "train/loss");
    let (valid0, valid1) = first_last(&report, "eval/loss");
    eprintln!(
        "patterned corpus: train loss {train0:.3} -> {train1:.3}, valid {valid0:.3} -> {valid1:.3}"
    );
    assert!(train0 - train1 > 1.0, "train loss {train0} -> {train1}");
    assert!(valid0 - valid1 > 1.0, "valid loss {valid0} -> {valid1}");
    assert_eq!(report.metric("train/lr").len(), 80);
    assert!(report
        .metric("train/grad_norm")
        .iter()
        .all(|(_, g)| g.is_finite()));
    assert!(report
        .metric("train/tokens_per_s")
        .iter()
        .all(|(_, t)| *t > 0.0));
    assert!(report.events.iter().any(|e| matches!(
        e,
        StageEvent::Progress {
            done: 80,
            total: Some(80),
            ..
        }
    )));

    let out = staging.join("adapters/run");
    let adapter = read_adapter(&out).unwrap();
    assert_eq!(adapter.format, AdapterFormat::Native);
    assert_eq!(adapter.modules.len(), 2 * 7);
    let raw = native::read(&out).unwrap();
    let base = Checkpoint::open(&ws.path().join("models/base")).unwrap();
    assert_eq!(raw.base, Some(base.identity().unwrap()));
    let config_hash =
        blake3::hash(&std::fs::read(ws.path().join("models/base/config.json")).unwrap());
    assert_eq!(
        raw.base.as_ref().unwrap().config_hash,
        config_hash.to_hex().to_string()
    );
    let info = raw.training.expect("a training record");
    assert_eq!(info["steps"], 80);
    assert_eq!(info["config"]["optimizer"]["lr"], 1e-2);
    assert!(
        !staging.join("checkpoints").exists()
            || std::fs::read_dir(staging.join("checkpoints"))
                .unwrap()
                .count()
                == 0
    );
}

/// A few paragraphs of public-domain English (Lewis Carroll, 1865).
const TEXT: &str = "Alice was beginning to get very tired of sitting by her sister on the bank, \
and of having nothing to do: once or twice she had peeped into the book her sister was reading, \
but it had no pictures or conversations in it, and what is the use of a book, thought Alice, \
without pictures or conversations? So she was considering in her own mind (as well as she could, \
for the hot day made her feel very sleepy and stupid), whether the pleasure of making a \
daisy-chain would be worth the trouble of getting up and picking the daisies, when suddenly a \
White Rabbit with pink eyes ran close by her. There was nothing so very remarkable in that; nor \
did Alice think it so very much out of the way to hear the Rabbit say to itself, Oh dear! Oh \
dear! I shall be late! But when the Rabbit actually took a watch out of its waistcoat-pocket, and \
looked at it, and then hurried on, Alice started to her feet, for it flashed across her mind that \
she had never before seen a rabbit with either a waistcoat-pocket, or a watch to take out of it, \
and burning with curiosity, she ran across the field after it, and fortunately was just in time \
to see it pop down a large rabbit-hole under the hedge. In another moment down went Alice after \
it, never once considering how in the world she was to get out again. The rabbit-hole went \
straight on like a tunnel for some way, and then dipped suddenly down, so suddenly that Alice had \
not a moment to think about stopping herself before she found herself falling down a very deep \
well. Either the well was very deep, or she fell very slowly, for she had plenty of time as she \
went down to look about her and to wonder what was going to happen next. First, she tried to \
look down and make out what she was coming to, but it was too dark to see anything; then she \
looked at the sides of the well, and noticed that they were filled with cupboards and \
book-shelves; here and there she saw maps and pictures hung upon pegs. She took down a jar from \
one of the shelves as she passed; it was labelled ORANGE MARMALADE, but to her great \
disappointment it was empty: she did not like to drop the jar for fear of killing somebody \
underneath, so managed to put it into one of the cupboards as she fell past it.";

#[test]
fn learns_real_text_with_the_real_tokenizer() {
    let rows = text_rows(TEXT, 32);
    // Validation rows are the same passage cut at other boundaries (shifted by half a
    // row): a tiny random model cannot generalise to unseen English, but it can learn
    // this text, and that must show on rows it never saw as such.
    let train = rows;
    let halves = text_rows(TEXT, 16);
    let valid: Vec<Row> = halves[1..]
        .chunks(2)
        .step_by(3)
        .filter(|p| p.len() == 2)
        .map(|p| (p.iter().flat_map(|r| r.0.clone()).collect(), vec![true; 32]))
        .collect();
    assert!(
        train.len() >= 20 && valid.len() >= 5,
        "{} / {} rows",
        train.len(),
        valid.len()
    );
    let ws = Workspace::new(&train, &valid);
    let staging = ws.staging("train");
    let with = "base_model: models/base\n\
                data: {train: tokens/train, valid: tokens/valid}\n\
                lora: {r: 8, alpha: 16, dropout: 0.05, targets: [all-linear]}\n\
                optimizer: {lr: 1e-2, weight_decay: 0.01}\n\
                schedule: {warmup_steps: 5, decay: constant}\n\
                batch_size: 4\ngrad_accum: 2\nmax_steps: 160\neval_every: 40\ncheckpoint_every: 80\ndevice: cpu\n";
    let (result, report) = run(&ws, &staging, with, |_, _| {});
    result.unwrap();
    let (train0, train1) = first_last(&report, "train/loss");
    let (valid0, valid1) = first_last(&report, "eval/loss");
    eprintln!("real text: train loss {train0:.3} -> {train1:.3}, valid {valid0:.3} -> {valid1:.3}");
    assert!(train0 - train1 > 0.4, "train loss {train0} -> {train1}");
    assert!(valid0 - valid1 > 0.3, "valid loss {valid0} -> {valid1}");
}

#[test]
fn resume_after_a_kill_and_an_interrupt_is_bit_identical() {
    let ws = Workspace::new(&counting_rows(10, 20, 3, 5), &counting_rows(4, 20, 3, 6));
    let with = "base_model: models/base\n\
                data: {train: tokens/train, valid: tokens/valid}\n\
                lora: {r: 4, alpha: 8, dropout: 0.1, targets: [q_proj, v_proj, down_proj]}\n\
                optimizer: {lr: 5e-3, weight_decay: 0.01}\n\
                schedule: {warmup_steps: 3, decay: linear}\n\
                batch_size: 2\ngrad_accum: 2\nmax_steps: 12\neval_every: 5\n\
                checkpoint_every: 4\nkeep_checkpoints: 2\ndevice: cpu\n";
    let straight = ws.staging("straight");
    let (result, whole) = run(&ws, &straight, with, |_, _| {});
    result.unwrap();

    let stop_at = |at: i64, reason: StopReason| {
        move |e: &StageEvent, cancel: &taper::stages::CancelToken| {
            if let StageEvent::Metric { step, name, .. } = e {
                if *step == at && name == "train/loss" {
                    cancel.cancel(reason);
                }
            }
        }
    };
    let staging = ws.staging("stopped");
    // A kill after step 7 writes nothing more: the next attempt resumes from step 4.
    let (r1, first) = run(&ws, &staging, with, stop_at(7, StopReason::Kill));
    assert!(
        matches!(r1, Err(StageError::Stopped(StopReason::Kill))),
        "{r1:?}"
    );
    assert_eq!(first.metric("train/loss").len(), 7);
    // An interrupt after step 10 checkpoints step 10 on the way out.
    let (r2, second) = run(&ws, &staging, with, stop_at(10, StopReason::Interrupt));
    assert!(
        matches!(r2, Err(StageError::Stopped(StopReason::Interrupt))),
        "{r2:?}"
    );
    let logs = |r: &Report| -> Vec<String> {
        r.events
            .iter()
            .filter_map(|e| match e {
                StageEvent::Log(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    };
    assert!(
        logs(&second)
            .iter()
            .any(|l| l.contains("resuming from step-00000004")),
        "{:?}",
        logs(&second)
    );
    let (r3, third) = run(&ws, &staging, with, |_, _| {});
    r3.unwrap();
    assert!(
        logs(&third)
            .iter()
            .any(|l| l.contains("resuming from step-00000010")),
        "{:?}",
        logs(&third)
    );

    // Same losses at every step, bit for bit, and the same adapter bytes.
    let mut resumed: Vec<(i64, f64)> = first.metric("train/loss");
    resumed.retain(|(s, _)| *s <= 4);
    resumed.extend(
        second
            .metric("train/loss")
            .into_iter()
            .filter(|(s, _)| *s <= 10),
    );
    resumed.extend(third.metric("train/loss"));
    assert_eq!(resumed, whole.metric("train/loss"));
    assert_eq!(
        read_bytes(&staging.join("adapters/run")),
        read_bytes(&straight.join("adapters/run")),
        "adapter after kill + interrupt + resume differs from the uninterrupted one"
    );
    let kept: Vec<String> = std::fs::read_dir(staging.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 2, "keep_checkpoints: 2, got {kept:?}");
}

#[test]
fn a_seed_change_changes_the_adapter() {
    // Guards the bit-identity test against an adapter that never depends on anything.
    let ws = Workspace::new(&counting_rows(8, 12, 2, 5), &counting_rows(2, 12, 2, 6));
    let with = |seed: u64| {
        format!(
            "base_model: models/base\ndata: {{train: tokens/train}}\nlora: {{dropout: 0.1}}\n\
             optimizer: {{lr: 1e-2}}\nbatch_size: 2\nmax_steps: 3\nseed: {seed}\ndevice: cpu\n"
        )
    };
    let (a, b) = (ws.staging("a"), ws.staging("b"));
    run(&ws, &a, &with(1), |_, _| {}).0.unwrap();
    run(&ws, &b, &with(2), |_, _| {}).0.unwrap();
    assert_ne!(
        read_bytes(&a.join("adapters/run")).0,
        read_bytes(&b.join("adapters/run")).0
    );
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_good_checkpoint() {
    let ws = Workspace::new(&counting_rows(8, 16, 2, 5), &counting_rows(2, 16, 2, 6));
    let staging = ws.staging("train");
    let with = "base_model: models/base\ndata: {train: tokens/train}\n\
                lora: {targets: [all-linear]}\n\
                optimizer: {lr: 1e30}\nschedule: {decay: constant}\nmax_grad_norm: null\n\
                batch_size: 2\nmax_steps: 20\ncheckpoint_every: 1\nkeep_checkpoints: 3\ndevice: cpu\n";
    let (result, report) = run(&ws, &staging, with, |_, _| {});
    let Err(StageError::Failed(msg)) = result else {
        panic!("expected a failure, got {result:?}")
    };
    eprintln!("{msg}");
    let steps = report.metric("train/loss").len();
    assert!(
        msg.contains("the loss is") && msg.contains(&format!("step {}", steps + 1)),
        "{msg}"
    );
    assert!(steps >= 1, "the first step should still be finite");
    let last = format!("step-{steps:08}");
    assert!(msg.contains(&last), "{msg}");
    assert!(staging
        .join("checkpoints")
        .join(&last)
        .join("state.json")
        .is_file());
    assert!(!staging.join("adapters/run").exists());
}

#[test]
fn a_trained_adapter_migrates_to_peft_and_mlx_and_merges_into_its_base_only() {
    use taper::formats::{merge, migrate, MigrateFormat as F, MigrateOptions, Rounding};
    let ws = Workspace::new(&counting_rows(8, 12, 2, 5), &counting_rows(2, 12, 2, 6));
    let staging = ws.staging("train");
    let with = "base_model: models/base\ndata: {train: tokens/train}\n\
                lora: {r: 4, alpha: 8, targets: [q_proj, v_proj, o_proj]}\n\
                optimizer: {lr: 1e-2}\nbatch_size: 2\nmax_steps: 3\ndevice: cpu\n";
    run(&ws, &staging, with, |_, _| {}).0.unwrap();
    let trained = staging.join("adapters/run");
    let base = ws.path().join("models/base");
    let out = ws.path().join("out");
    let with_base = MigrateOptions {
        base: Some(base.clone()),
        dtype: None,
    };
    for (to, name) in [(F::Peft, "peft"), (F::Mlx, "mlx"), (F::Taper, "taper")] {
        migrate(F::Taper, to, &trained, &out.join(name), &with_base).unwrap();
    }
    // Same values whatever the format, and taper -> taper keeps the bytes.
    let native = read_adapter(&trained).unwrap();
    for name in ["peft", "mlx"] {
        let other = read_adapter(&out.join(name)).unwrap();
        assert_eq!(other.modules.len(), native.modules.len(), "{name}");
        for (module, m) in &native.modules {
            let o = &other.modules[module];
            assert_eq!(o.scale, m.scale, "{name} {module}");
            for (x, y) in [(&o.a, &m.a), (&o.b, &m.b)] {
                assert_eq!(
                    x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{name} {module}"
                );
            }
        }
    }
    assert_eq!(read_bytes(&out.join("taper")), read_bytes(&trained));

    let report = merge(
        &base,
        &trained,
        &out.join("merged"),
        Rounding::Peft,
        taper::formats::DEFAULT_SHARD_SIZE,
    )
    .unwrap();
    assert_eq!(report.merged, 2 * 3);
    taper::model::inspect(&out.join("merged")).unwrap();

    // Another base (the same architecture, other weights) is refused by its identity.
    let other = ws.path().join("models/other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(base.join("config.json"), other.join("config.json")).unwrap();
    std::fs::copy(
        train_util::fixture("peft-merged-llama").join("model.safetensors"),
        other.join("model.safetensors"),
    )
    .unwrap();
    let err = merge(
        &other,
        &trained,
        &out.join("wrong"),
        Rounding::Peft,
        taper::formats::DEFAULT_SHARD_SIZE,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("base_model") && err.contains("weights hash"),
        "{err}"
    );
    assert!(!out.join("wrong").exists());
}
