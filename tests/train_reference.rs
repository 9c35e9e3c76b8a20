//! One train step against PyTorch: taper's loss, LoRA gradients and first AdamW step on
//! the fixture batch equal `expected/grads_llama.safetensors` (torch 2.15 + peft 0.21.2)
//! to 1e-5 relative. Also: gradient accumulation averages over all targets of the step,
//! and a whole train step reaches every LoRA weight and no base weight.

mod model_util;
mod train_util;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use model_util::rel_diff as rel;
use taper::formats::read_adapter;
use taper::model::{attach_adapter, init_lora, load_model, read_input_ids, LoraConfig, Targets};
use taper::stages::train::data::{make_batch, Row};
use taper::stages::train::optimizer::AdamWParams;
use taper::stages::train::rng::Rng;
use taper::stages::train::step::Trainer;
use train_util::fixture;

fn reference() -> (f64, HashMap<String, Tensor>) {
    let path = fixture("expected/grads_llama.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let loss = meta.metadata().as_ref().unwrap()["loss"].parse().unwrap();
    (
        loss,
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap(),
    )
}

fn vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// tiny-llama with the PEFT fixture adapter as trainable weights.
fn peft_trainer(weight_decay: f64) -> (Trainer, Vec<(String, Var)>) {
    let dev = Device::Cpu;
    let mut model = load_model(&fixture("tiny-llama"), DType::F32, &dev).unwrap();
    let adapter = read_adapter(&fixture("peft-adapter-llama")).unwrap();
    let varmap = VarMap::new();
    attach_adapter(&mut model, &adapter, Some(&varmap)).unwrap();
    let v = vars(&varmap);
    let adam = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
    };
    let trainer = Trainer::new(model, v.clone(), adam, None, Rng::new(0, 0)).unwrap();
    (trainer, v)
}

fn fixture_rows() -> Vec<Row> {
    read_input_ids(&fixture("expected/input_ids.json"))
        .unwrap()
        .into_iter()
        .map(|ids| Row {
            loss_mask: vec![true; ids.len()],
            input_ids: ids,
        })
        .collect()
}

#[test]
fn loss_gradients_and_first_adamw_step_match_pytorch() {
    let (want_loss, reference) = reference();
    let (mut trainer, vars) = peft_trainer(0.01);
    let rows = fixture_rows();
    let batch = make_batch(&rows.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap();
    assert_eq!(batch.targets, 30);

    let (loss, grads) = trainer.gradients(std::slice::from_ref(&batch)).unwrap();
    let loss_rel = (loss - want_loss).abs() / want_loss;
    let mut worst_grad = 0f64;
    for ((name, _), g) in vars.iter().zip(&grads) {
        let r = rel(g, &reference[&format!("grad.base_model.model.{name}")]);
        assert!(r <= 1e-5, "{name}: gradient relative diff {r:e}");
        worst_grad = worst_grad.max(r);
    }

    let stats = trainer.step(std::slice::from_ref(&batch), 1e-2).unwrap();
    assert_eq!(stats.loss, loss, "the step's loss is the same computation");
    let mut worst_step = 0f64;
    for (name, var) in &vars {
        let want = &reference[&format!("adamw1.base_model.model.{name}")];
        let r = rel(var.as_tensor(), want);
        assert!(
            r <= 1e-5,
            "{name}: weights after one AdamW step, relative diff {r:e}"
        );
        worst_step = worst_step.max(r);
    }
    eprintln!(
        "vs torch: loss {loss} (rel {loss_rel:e}), worst gradient rel {worst_grad:e}, \
         worst weight after AdamW rel {worst_step:e}"
    );
    assert!(loss_rel <= 1e-5, "loss {loss} vs {want_loss}");
    // The step moved the weights by about lr: the comparison is not trivially passing.
    let (_, fresh) = peft_trainer(0.01);
    let moved = rel(vars[0].1.as_tensor(), fresh[0].1.as_tensor());
    assert!(
        moved > 1e-3,
        "AdamW step moved the weights by only {moved:e}"
    );
}

#[test]
fn accumulation_averages_over_every_target_of_the_step() {
    // Row 0 counts 5 targets, row 1 counts 15: a mean of the two micro-batch means would
    // weight row 0's tokens three times too much.
    let mut rows = fixture_rows();
    for m in rows[0].loss_mask.iter_mut().take(11) {
        *m = false;
    }
    let dev = Device::Cpu;
    let whole = make_batch(&[&rows[0], &rows[1]], &dev).unwrap();
    let micro = [
        make_batch(&[&rows[0]], &dev).unwrap(),
        make_batch(&[&rows[1]], &dev).unwrap(),
    ];
    assert_eq!((micro[0].targets, micro[1].targets), (5, 15));
    let (mut one, _) = peft_trainer(0.0);
    let (mut two, _) = peft_trainer(0.0);
    let (loss1, g1) = one.gradients(std::slice::from_ref(&whole)).unwrap();
    let (loss2, g2) = two.gradients(&micro).unwrap();
    assert!((loss1 - loss2).abs() <= 1e-6 * loss1, "{loss1} vs {loss2}");
    for (a, b) in g1.iter().zip(&g2) {
        let r = rel(b, a);
        assert!(r <= 1e-5, "accumulated gradient differs by {r:e}");
    }
    // And the mean of means is measurably different, so the test can fail.
    let (l0, _) = two.micro_backward(&micro[0], 0.5).unwrap();
    let (l1, _) = two.micro_backward(&micro[1], 0.5).unwrap();
    assert!(
        (l0 + l1 - loss1).abs() > 1e-3,
        "mean of means {} vs {loss1}",
        l0 + l1
    );
}

#[test]
fn a_train_step_reaches_every_lora_weight_and_no_base_weight() {
    let dev = Device::Cpu;
    let mut model = load_model(&fixture("tiny-llama"), DType::F32, &dev).unwrap();
    let mut cfg = LoraConfig::new(4, 8.0);
    cfg.targets = Targets::AllLinear;
    cfg.dropout = 0.1;
    let varmap = VarMap::new();
    init_lora(&mut model, &cfg, 3, &varmap).unwrap();
    let v = vars(&varmap);
    assert_eq!(v.len(), 2 * 7 * 2);
    let adam = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut trainer = Trainer::new(model, v.clone(), adam, Some(1.0), Rng::new(1, 2)).unwrap();
    let rows = fixture_rows();
    let batch = make_batch(&rows.iter().collect::<Vec<_>>(), &dev).unwrap();
    // B starts at zero; after one step every A and B is on the gradient's path.
    trainer.step(std::slice::from_ref(&batch), 1e-2).unwrap();
    let (_, grads) = trainer.micro_backward(&batch, 1.0).unwrap();
    for (name, var) in &v {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
    let model = trainer.model();
    for linear in model.linears() {
        let weight = linear
            .base()
            .weight()
            .expect("the fixture's weights are too small for panels, so it keeps them");
        assert!(
            grads.get(weight).is_none(),
            "{} base got a gradient",
            linear.name()
        );
    }
    for t in model.frozen_tensors() {
        assert!(grads.get(t).is_none(), "a frozen tensor got a gradient");
    }
}
