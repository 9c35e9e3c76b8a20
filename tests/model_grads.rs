//! The backward pass: LoRA gradients of the causal LM loss equal finite differences (f64,
//! through attention softmax, RMSNorm and rope on every projection type), match
//! PyTorch + PEFT on the fixture batch, and never reach a base weight.

mod model_util;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use model_util::{fixture, input_ids, rel_diff};
use taper::formats::read_adapter;
use taper::model::lora_config::LORA_TARGETS;
use taper::model::{
    attach_adapter, causal_lm_loss, ids_tensor, init_lora, load_model, lora_a_name, lora_b_name,
    Llama, LoraConfig, Targets,
};

fn var(varmap: &VarMap, name: &str) -> Var {
    varmap
        .data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no var {name}"))
        .clone()
}

fn loss(model: &Llama, ids: &Tensor) -> Tensor {
    causal_lm_loss(&model.forward(ids, None, false).unwrap(), ids, None).unwrap()
}

fn assert_no_base_gradient(model: &Llama, grads: &candle_core::backprop::GradStore) {
    for linear in model.linears() {
        let weight = linear
            .base()
            .weight()
            .expect("the fixture's weights are too small for panels, so it keeps them");
        assert!(
            grads.get(weight).is_none(),
            "{} got a gradient",
            linear.name()
        );
    }
    for tensor in model.frozen_tensors() {
        assert!(
            grads.get(tensor).is_none(),
            "a frozen tensor got a gradient"
        );
    }
}

#[test]
fn lora_gradients_match_finite_differences_on_every_projection() {
    let dev = Device::Cpu;
    let mut model = load_model(&fixture("tiny-llama"), DType::F64, &dev).unwrap();
    let mut cfg = LoraConfig::new(4, 8.0);
    cfg.targets = Targets::AllLinear;
    let varmap = VarMap::new();
    let modules = init_lora(&mut model, &cfg, 7, &varmap).unwrap();
    assert_eq!(modules.len(), 2 * LORA_TARGETS.len());
    // B starts at zero, which makes every A gradient zero; give B values first.
    for module in modules.iter() {
        let b = var(&varmap, &lora_b_name(module));
        let values = Tensor::randn(0f64, 0.2, b.shape(), &dev).unwrap();
        b.set(&values).unwrap();
    }
    let ids = ids_tensor(&input_ids(), 512, &dev).unwrap();
    let grads = loss(&model, &ids).backward().unwrap();
    assert_no_base_gradient(&model, &grads);

    let h = 1e-5;
    let mut checked = 0;
    for (t, target) in LORA_TARGETS.iter().enumerate() {
        let module = modules
            .iter()
            .filter(|m| m.ends_with(target))
            .nth(t % 2)
            .unwrap();
        for name in [lora_a_name(module), lora_b_name(module)] {
            let v = var(&varmap, &name);
            let analytic = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let analytic = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let original = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let n = original.len();
            for idx in [0, n / 3, n - 1] {
                let at = |delta: f64| {
                    let mut values = original.clone();
                    values[idx] += delta;
                    v.set(&Tensor::from_vec(values, v.shape(), &dev).unwrap())
                        .unwrap();
                    loss(&model, &ids).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                v.set(&Tensor::from_vec(original.clone(), v.shape(), &dev).unwrap())
                    .unwrap();
                let a = analytic[idx];
                let err = (numeric - a).abs();
                assert!(
                    err <= 1e-9 + 1e-6 * a.abs(),
                    "{name}[{idx}]: analytic {a:e}, finite difference {numeric:e}"
                );
                assert!(
                    a.abs() > 1e-7,
                    "{name}[{idx}]: gradient {a:e} too small to test anything"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, LORA_TARGETS.len() * 2 * 3);
}

/// `grad.<peft key>` tensors and the loss of `expected/grads_llama.safetensors`.
fn pytorch_reference() -> (f64, std::collections::HashMap<String, Tensor>) {
    let path = fixture("expected/grads_llama.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let loss: f64 = metadata.metadata().as_ref().unwrap()["loss"]
        .parse()
        .unwrap();
    (
        loss,
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap(),
    )
}

#[test]
fn loss_and_lora_gradients_match_pytorch_peft() {
    let dev = Device::Cpu;
    let mut model = load_model(&fixture("tiny-llama"), DType::F32, &dev).unwrap();
    let adapter = read_adapter(&fixture("peft-adapter-llama")).unwrap();
    let varmap = VarMap::new();
    attach_adapter(&mut model, &adapter, Some(&varmap)).unwrap();
    let ids = ids_tensor(&input_ids(), 512, &dev).unwrap();
    let loss = loss(&model, &ids);
    let (want_loss, reference) = pytorch_reference();
    let got_loss = loss.to_scalar::<f32>().unwrap() as f64;
    let rel = (got_loss - want_loss).abs() / want_loss.abs();
    eprintln!("loss {got_loss} vs torch {want_loss}: relative diff {rel:e}");
    assert!(rel <= 1e-5, "loss {got_loss} vs {want_loss}");

    let grads = loss.backward().unwrap();
    assert_no_base_gradient(&model, &grads);
    let vars = varmap.data().lock().unwrap().clone();
    assert_eq!(vars.len(), 8);
    let mut worst = 0f64;
    for (name, v) in vars {
        let want = &reference[&format!("grad.base_model.model.{name}")];
        let got = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let rel = rel_diff(got, want);
        worst = worst.max(rel);
        assert!(
            rel <= 1e-5,
            "{name}: max |got - want| / max |want| = {rel:e}"
        );
    }
    eprintln!("worst gradient relative diff vs torch: {worst:e}");
}

#[test]
fn lora_init_is_pefts_default_and_deterministic_per_seed() {
    let dev = Device::Cpu;
    let init = |seed: u64| {
        let mut model = load_model(&fixture("tiny-llama"), DType::F32, &dev).unwrap();
        let mut cfg = LoraConfig::new(8, 16.0);
        cfg.targets = Targets::parse(&["q_proj", "down_proj"]).unwrap();
        cfg.layers = taper::model::LayerSelection::List(vec![1]);
        let varmap = VarMap::new();
        let modules = init_lora(&mut model, &cfg, seed, &varmap).unwrap();
        assert_eq!(
            modules,
            [
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.mlp.down_proj"
            ]
        );
        let a = var(&varmap, "model.layers.1.mlp.down_proj.lora_A.weight");
        let b = var(&varmap, "model.layers.1.mlp.down_proj.lora_B.weight");
        assert_eq!((a.dims(), b.dims()), (&[8, 128][..], &[64, 8][..]));
        assert_eq!(varmap.all_vars().len(), 4);
        (
            a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b.as_tensor().clone(),
        )
    };
    let (a1, b1) = init(42);
    let (a2, _) = init(42);
    let (a3, _) = init(43);
    assert_eq!(a1, a2, "same seed, same weights");
    assert_ne!(a1, a3, "different seed, different weights");
    // kaiming_uniform_(a=sqrt(5)) on [r, in]: uniform in ±1/sqrt(in), in = 128 here.
    let bound = 1.0 / 128f32.sqrt();
    assert!(a1.iter().all(|v| v.abs() <= bound));
    assert!(
        a1.iter().any(|v| v.abs() > 0.9 * bound),
        "values should fill the range"
    );
    assert_eq!(
        b1.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}
