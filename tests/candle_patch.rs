//! The patches in `vendor/candle-core` (vendor/README.md), checked through candle's
//! public API: copying a broadcast view to contiguous memory fills runs of one value.

use candle_core::{DType, Device, Tensor};

/// `t`'s elements in row-major order, read one by one through its layout.
fn walked(t: &Tensor) -> Vec<f32> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        panic!("expected a CPU tensor")
    };
    let data = s.as_slice::<f32>().unwrap();
    let (dims, stride) = (layout.dims(), layout.stride());
    let n: usize = dims.iter().product();
    (0..n)
        .map(|flat| {
            let (mut rest, mut at) = (flat, layout.start_offset());
            for (d, s) in dims.iter().zip(stride).rev() {
                at += (rest % d) * s;
                rest /= d;
            }
            data[at]
        })
        .collect()
}

#[test]
fn a_broadcast_view_copies_to_the_same_values_as_walking_its_layout() {
    let dev = Device::Cpu;
    let base = Tensor::arange(0f32, 12.0, &dev).unwrap();
    let cases: Vec<(&str, Tensor)> = vec![
        (
            "scalar over [4, 3, 5]",
            Tensor::new(7.5f32, &dev)
                .unwrap()
                .broadcast_as((4, 3, 5))
                .unwrap(),
        ),
        (
            "column [3, 1] over [3, 4]",
            base.narrow(0, 0, 3)
                .unwrap()
                .reshape((3, 1))
                .unwrap()
                .broadcast_as((3, 4))
                .unwrap(),
        ),
        (
            "row [1, 4] over [3, 4] (inner dim not broadcast)",
            base.narrow(0, 0, 4)
                .unwrap()
                .reshape((1, 4))
                .unwrap()
                .broadcast_as((3, 4))
                .unwrap(),
        ),
        (
            "transposed [2, 3] with two broadcast inner dims",
            base.narrow(0, 0, 6)
                .unwrap()
                .reshape((3, 2))
                .unwrap()
                .t()
                .unwrap()
                .unsqueeze(2)
                .unwrap()
                .unsqueeze(3)
                .unwrap()
                .broadcast_as((2, 3, 4, 5))
                .unwrap(),
        ),
        (
            "offset view [4, 1] over [4, 6]",
            base.narrow(0, 5, 4)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
                .broadcast_as((4, 6))
                .unwrap(),
        ),
        (
            "middle broadcast [2, 1, 3] over [2, 5, 3]",
            base.narrow(0, 0, 6)
                .unwrap()
                .reshape((2, 1, 3))
                .unwrap()
                .broadcast_as((2, 5, 3))
                .unwrap(),
        ),
        (
            "empty outer dim",
            Tensor::zeros((0, 1), DType::F32, &dev)
                .unwrap()
                .broadcast_as((0, 5))
                .unwrap(),
        ),
    ];
    for (name, view) in cases {
        let want = walked(&view);
        let got = view.contiguous().unwrap();
        assert!(got.is_contiguous(), "{name}");
        assert_eq!(got.dims(), view.dims(), "{name}");
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want,
            "{name}"
        );
    }
}

#[test]
fn the_gradient_of_a_sum_reaches_its_input_as_ones() {
    // A `sum`'s backward hands its input a broadcast of one value: the path patched above.
    let x = candle_core::Var::from_tensor(&Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let y = (x.as_tensor() * 3.0).unwrap().sum_all().unwrap();
    let grads = y.backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    assert_eq!(
        g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![3.0; 12]
    );
}
