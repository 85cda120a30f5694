//! The kernels against f32 products and against each other.

use super::*;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

/// All of `act` through one kernel family, `[rows, padded rows]`.
fn with_kernels(q: &QMatrix, k: &Kernels, act: &Activations) -> Vec<f32> {
    let padded = q.panels() * PANEL;
    let mut out = vec![0f32; act.out_rows.len() * padded];
    let ptr = Out {
        ptr: out.as_mut_ptr(),
        stride: padded,
    };
    // Odd first panels too, so that the pairing of panels is exercised.
    let panels = q.panels();
    for range in [0..1.min(panels), 1.min(panels)..panels] {
        unsafe { q.run(k, range, act, ptr) };
    }
    out
}

fn first_diff<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    a.iter().zip(b).position(|(a, b)| a != b)
}

/// Largest error against `x @ w.T` in f32, of one int8 term and of two, as a fraction of the
/// largest output: `[one, two]`.
fn check(q: &QMatrix, w: &Tensor, x: &Tensor, tolerance: [f32; 2]) -> Result<()> {
    let m = x.dim(0)?;
    let want = x.matmul(&w.t()?)?.to_vec2::<f32>()?;
    let scale = want.iter().flatten().fold(0f32, |a, v| a.max(v.abs()));
    // Both kinds of rows in one call, interleaved.
    let precise: Vec<bool> = (0..m).map(|i| i % 3 != 1).collect();
    let op = |x: &Tensor, precise_rows: &[bool]| {
        x.apply_op1_no_bwd(&QMatMul {
            weights: q,
            precise_rows,
        })?
        .to_vec2::<f32>()
    };
    let got = op(x, &precise)?;
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        let tolerance = tolerance[precise[i] as usize];
        assert!(
            err < tolerance * scale,
            "row {i}: max error {err} vs magnitude {scale}"
        );
    }
    // Each row computed alone equals that row computed among all, bit for bit.
    for i in [0, 1, 2, m - 1] {
        let alone = op(&x.narrow(0, i, 1)?.contiguous()?, &precise[i..=i])?;
        assert_eq!(alone[0], got[i], "row {i}");
    }
    // Every kernel this CPU runs agrees with the scalar one on every output, and its
    // quantizer gives the scalar one's codes, bit for bit.
    let x = x.flatten_all()?.to_vec1::<f32>()?;
    let kernels = candidates();
    let (_, reference) = kernels.last().expect("the scalar kernels");
    for terms in [1, 2] {
        let six_bit = matches!(q.codes, Codes::Q6(_));
        let act = |k: &Kernels| {
            Activations::new(&x, q.cols, (0..m).collect(), terms, k.quantize, six_bit)
        };
        let want_act = act(reference);
        let want = with_kernels(q, reference, &want_act);
        for (name, k) in &kernels {
            let own = act(k);
            assert_eq!(
                first_diff(&own.quants, &want_act.quants),
                None,
                "{name}: codes"
            );
            assert_eq!(
                first_diff(&own.scales, &want_act.scales),
                None,
                "{name}: scales"
            );
            let got = with_kernels(q, k, &want_act);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4 * b.abs().max(1.0),
                    "{name}, {terms} terms: output {i}: {a} vs scalar {b}"
                );
            }
        }
    }
    Ok(())
}

// 70 weight rows: four full panels and a padded one. 19 activation rows: every tile height
// and a remainder. 96 and 128 columns: odd and even block counts.

#[test]
fn int8_weights_match_f32_matmul_and_are_row_independent() -> Result<()> {
    let dev = Device::Cpu;
    for cols in [96, 128, 1600] {
        let w = Tensor::randn(0f32, 1., (70, cols), &dev)?;
        let x = Tensor::randn(0f32, 1., (if cols > 1000 { 100 } else { 19 }, cols), &dev)?;
        // Against the unquantized weights: their int8 rounding dominates.
        check(&QMatrix::from_tensor(&w)?, &w, &x, [0.02; 2])?;
    }
    Ok(())
}

#[test]
fn gguf_q4_1_blocks_match_their_dequantized_weights() -> Result<()> {
    let dev = Device::Cpu;
    for cols in [96, 128, 1600] {
        let w = Tensor::randn(0f32, 1., (70, cols), &dev)?;
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let q = QMatrix::from_q4_1(&qt.data()?, 70, cols)?;
        // Against the weights the blocks actually hold: only the activations' rounding
        // (two int8 terms) is left.
        check(
            &q,
            &qt.dequantize(&dev)?,
            &Tensor::randn(0f32, 1., (if cols > 1000 { 100 } else { 19 }, cols), &dev)?,
            [0.02, 2e-4],
        )?;
    }
    Ok(())
}

/// Q4_1 blocks' values, `d·q + m`, as a `[rows, cols]` tensor.
fn q4_1_values(bytes: &[u8], rows: usize, cols: usize) -> Result<Tensor> {
    let f16_at = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let values: Vec<f32> = bytes
        .chunks_exact(Q4_1_BYTES)
        .flat_map(|block| {
            let (d, m) = (f16_at(block), f16_at(&block[2..]));
            let codes = &block[4..];
            let lo = codes.iter().map(move |q| d * f32::from(q & 0xF) + m);
            let hi = codes.iter().map(move |q| d * f32::from(q >> 4) + m);
            lo.chain(hi).collect::<Vec<_>>()
        })
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu)
}

/// Q4_0 files keep 4 bits a weight: their blocks become Q4_1 blocks of exactly the same values,
/// which multiply as Q4_1 blocks do. Types without a kernel of their own are left to the int8
/// path.
#[test]
fn gguf_q4_0_blocks_keep_their_values() -> Result<()> {
    let dev = Device::Cpu;
    let (rows, cols) = (40, 512);
    for scale in [1f32, 1e-3] {
        let w = (Tensor::randn(0f32, 1., (rows, cols), &dev)? * f64::from(scale))?;
        let qt = QTensor::quantize(&w, GgmlDType::Q4_0)?;
        let bytes = qt.data()?;
        let blocks = gguf::q4_0_as_q4_1(&bytes).expect("scales that fit f16");
        let got = q4_1_values(&blocks, rows, cols)?;
        let err = (&got - &qt.dequantize(&dev)?)?.abs()?.max_all()?;
        assert_eq!(err.to_scalar::<f32>()?, 0., "at scale {scale}");
        let q = QMatrix::from_gguf_blocks(GgmlDType::Q4_0, &bytes, rows, cols)?.expect("4-bit");
        assert!(matches!(q.codes, Codes::Q4(_)));
        let x = Tensor::randn(0f32, 1., (19, cols), &dev)?;
        check(&q, &got, &x, [0.02, 2e-4])?;
    }
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q5K,
        GgmlDType::F16,
    ] {
        let qt = QTensor::quantize(&Tensor::randn(0f32, 1., (rows, cols), &dev)?, dtype)?;
        assert!(QMatrix::from_gguf_blocks(dtype, &qt.data()?, rows, cols)?.is_none());
    }
    Ok(())
}

/// Q4_K and Q6_K files keep their bits: panels of their own codes, sub-block scales (and
/// minimums) and super-block scales, which multiply as the file's values do (only the
/// activations' rounding is left), on every kernel this CPU has, for rows in one and two
/// terms, in tiles of every height.
#[test]
fn gguf_k_quant_blocks_match_their_dequantized_weights() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        // 70 rows: four panels and a padded one; 256 and 768 columns: one and three
        // super-blocks.
        for cols in [256, 768] {
            for scale in [1f32, 3e-3] {
                let w = (Tensor::randn(0f32, 1., (70, cols), &dev)? * f64::from(scale))?;
                let qt = QTensor::quantize(&w, dtype)?;
                let q = QMatrix::from_gguf_blocks(dtype, &qt.data()?, 70, cols)?
                    .expect("panels of its own");
                let bytes = match q.codes {
                    Codes::Q4K(_) => cols / 256 * Q4K_PANEL_SUPER,
                    Codes::Q6(_) => cols / 256 * Q6_PANEL_SUPER,
                    _ => panic!("{dtype:?} became another type"),
                };
                assert_eq!(q.bytes(), 5 * bytes);
                let x = Tensor::randn(0f32, 1., (19, cols), &dev)?;
                check(&q, &qt.dequantize(&dev)?, &x, [0.02, 2e-4])?;
            }
        }
        // Stacked as panels of their own too.
        let part = |rows| -> Result<QMatrix> {
            let w = Tensor::randn(0f32, 1., (rows, 512), &dev)?;
            let bytes = QTensor::quantize(&w, dtype)?.data()?.to_vec();
            Ok(QMatrix::from_gguf_blocks(dtype, &bytes, rows, 512)?.expect("K-quant"))
        };
        let (a, b) = (part(32)?, part(20)?);
        let both = QMatrix::concat_rows(&[&a, &b]).expect("two parts of one type");
        let x: Vec<f32> = (0..3 * 512)
            .map(|i| ((i * 37 % 101) as f32 - 50.) / 25.)
            .collect();
        let (got, want_a, want_b) = (
            both.matmul(&x, &[false; 3]),
            a.matmul(&x, &[false; 3]),
            b.matmul(&x, &[false; 3]),
        );
        for i in 0..3 {
            assert_eq!(got[i * 52..][..32], want_a[i * 32..][..32]);
            assert_eq!(got[i * 52 + 32..][..20], want_b[i * 20..][..20]);
        }
    }
    Ok(())
}

/// A Q4_0 scale whose `−8·d` overflows f16 is refused (and left to the int8 path), not turned
/// into infinities.
#[test]
fn q4_0_scales_past_f16_are_refused() {
    let mut block = vec![0u8; 18];
    block[..2].copy_from_slice(&half::f16::from_f32(9000.).to_le_bytes());
    assert!(gguf::q4_0_as_q4_1(&block).is_none());
    block[..2].copy_from_slice(&half::f16::from_f32(8000.).to_le_bytes());
    assert!(gguf::q4_0_as_q4_1(&block).is_some());
}

/// Stacked matrices multiply as their parts do, row for row and bit for bit; parts that
/// cannot be stacked (a panel cut short before the last, other widths or block types) are
/// refused.
#[test]
fn stacked_rows_match_their_parts() -> Result<()> {
    let dev = Device::Cpu;
    let cols = 128;
    let x = Tensor::randn(0f32, 1., (5, cols), &dev)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let precise = [true, false, true, false, false];
    let q4 = |rows| -> Result<QMatrix> {
        let w = Tensor::randn(0f32, 1., (rows, cols), &dev)?;
        QMatrix::from_q4_1(&QTensor::quantize(&w, GgmlDType::Q4_1)?.data()?, rows, cols)
    };
    let q8 = |rows| QMatrix::from_tensor(&Tensor::randn(0f32, 1., (rows, cols), &dev)?);
    for parts in [vec![q4(32)?, q4(48)?, q4(21)?], vec![q8(16)?, q8(37)?]] {
        let refs: Vec<&QMatrix> = parts.iter().collect();
        let stacked = QMatrix::concat_rows(&refs).expect("whole panels");
        let rows = stacked.rows();
        let got = stacked.matmul(&x, &precise);
        let mut first = 0;
        for part in &parts {
            let want = part.matmul(&x, &precise);
            for r in 0..5 {
                assert_eq!(
                    &got[r * rows + first..][..part.rows()],
                    &want[r * part.rows()..][..part.rows()]
                );
            }
            first += part.rows();
        }
    }
    assert!(QMatrix::concat_rows(&[&q4(21)?, &q4(32)?]).is_none());
    assert!(QMatrix::concat_rows(&[&q4(32)?, &q8(32)?]).is_none());
    let narrow = QMatrix::from_tensor(&Tensor::randn(0f32, 1., (16, 64), &dev)?)?;
    assert!(QMatrix::concat_rows(&[&q8(16)?, &narrow]).is_none());
    Ok(())
}

#[test]
fn extreme_int8_values_do_not_overflow() -> Result<()> {
    // Every weight and activation at +-127 (the largest products the kernels see).
    let dev = Device::Cpu;
    let cols = 256;
    let w: Vec<f32> = (0..32 * cols)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let w = Tensor::from_vec(w, (32, cols), &dev)?;
    let x = w.narrow(0, 0, 5)?.contiguous()?;
    check(&QMatrix::from_tensor(&w)?, &w, &x, [1e-5; 2])
}
