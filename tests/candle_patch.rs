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
    // `len` elements of `base` from `start`, shaped `shape`, broadcast to `to`.
    let view = |start: usize, len: usize, shape: &[usize], to: &[usize]| {
        let t = base.narrow(0, start, len).unwrap().reshape(shape).unwrap();
        t.broadcast_as(to).unwrap()
    };
    let scalar = Tensor::new(7.5f32, &dev).unwrap();
    // [2, 3] transposed (strides 1, 2), two inner dims of size 1 to broadcast.
    let transposed = base
        .narrow(0, 0, 6)
        .unwrap()
        .reshape((3, 2))
        .unwrap()
        .t()
        .unwrap();
    let transposed = transposed.unsqueeze(2).unwrap().unsqueeze(3).unwrap();
    let empty = Tensor::zeros((0, 1), DType::F32, &dev).unwrap();
    let cases: Vec<(&str, Tensor)> = vec![
        (
            "scalar over [4, 3, 5]",
            scalar.broadcast_as((4, 3, 5)).unwrap(),
        ),
        ("column [3, 1] over [3, 4]", view(0, 3, &[3, 1], &[3, 4])),
        (
            "row [1, 4] over [3, 4], inner dim not broadcast",
            view(0, 4, &[1, 4], &[3, 4]),
        ),
        (
            "transposed [2, 3, 1, 1] over [2, 3, 4, 5]",
            transposed.broadcast_as((2, 3, 4, 5)).unwrap(),
        ),
        ("offset [4, 1] over [4, 6]", view(5, 4, &[4, 1], &[4, 6])),
        (
            "middle [2, 1, 3] over [2, 5, 3]",
            view(0, 6, &[2, 1, 3], &[2, 5, 3]),
        ),
        ("empty outer dim", empty.broadcast_as((0, 5)).unwrap()),
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
fn the_gradient_of_a_scaled_sum_reaches_its_input_as_the_scale() {
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
