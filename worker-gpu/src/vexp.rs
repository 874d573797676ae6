//! `e^x` over many values at once, for softmax-shaped work: attention scores and a
//! vocabulary's logits. With AVX2 and FMA, Cephes' `expf` eight lanes at a time (relative
//! error under 4·10⁻⁷ against `f32::exp`); elsewhere `f32::exp`.

/// Writes `e^((x − max)·scale)` for every `x` of `xs` into `out` (as long as `xs`) and returns
/// their sum. `max` must be at least every `x` and `scale` positive: every exponent is ≤ 0.
pub fn exp_shifted(xs: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f32 {
    assert_eq!(xs.len(), out.len(), "one output per input");
    #[cfg(target_arch = "x86_64")]
    if crate::qmatrix::avx2_fma() {
        // SAFETY: `avx2::exp_shifted` only requires the CPU features just checked at run time.
        #[allow(unsafe_code)]
        unsafe {
            return avx2::exp_shifted(xs, max, scale, out);
        }
    }
    let mut sum = 0f32;
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = ((x - max) * scale).exp();
        sum += *o;
    }
    sum
}

/// `Σ e^(x − max)` over `xs` (`max` at least every `x`): a log-softmax's normalizer, with no
/// term kept.
pub fn sum_exp_shifted(xs: &[f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::qmatrix::avx2_fma() {
        // SAFETY: as above.
        #[allow(unsafe_code)]
        unsafe {
            return avx2::sum_exp_shifted(xs, max);
        }
    }
    xs.iter().map(|&x| (x - max).exp()).sum()
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// `e^x` in every lane for `x ≤ 0`: Cephes' `expf` (range reduction by ln 2, degree-5
    /// polynomial; relative error under 2·10⁻⁷); below −87.3, where `e^x` leaves the normal
    /// floats, 0.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp(x: __m256) -> __m256 {
        let live = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.336_55));
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.336_55));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // x − n·ln 2 in two steps, the first exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e_r = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(_mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n)), live)
    }

    /// The sum of a vector's lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn lane_sum(v: __m256) -> f32 {
        bytemuck::cast::<__m256, [f32; 8]>(v).iter().sum()
    }

    /// Eight lanes from `xs`, lanes past its end at −∞ (so `e^x` = 0 there).
    #[target_feature(enable = "avx2,fma")]
    fn padded(xs: &[f32]) -> __m256 {
        let mut lanes = [f32::NEG_INFINITY; 8];
        lanes[..xs.len()].copy_from_slice(xs);
        bytemuck::cast(lanes)
    }

    /// [`super::exp_shifted`], eight values at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted(xs: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f32 {
        let (max, scale) = (_mm256_set1_ps(max), _mm256_set1_ps(scale));
        let term = |x: __m256| exp(_mm256_mul_ps(_mm256_sub_ps(x, max), scale));
        let mut sum = _mm256_setzero_ps();
        let mut inputs = xs.chunks_exact(8);
        let mut outputs = out.chunks_exact_mut(8);
        for (x, o) in (&mut inputs).zip(&mut outputs) {
            let e = term(bytemuck::cast(<[f32; 8]>::try_from(x).expect("eight")));
            sum = _mm256_add_ps(sum, e);
            o.copy_from_slice(&bytemuck::cast::<__m256, [f32; 8]>(e));
        }
        let tail = inputs.remainder();
        if !tail.is_empty() {
            let e = term(padded(tail));
            sum = _mm256_add_ps(sum, e);
            outputs
                .into_remainder()
                .copy_from_slice(&bytemuck::cast::<__m256, [f32; 8]>(e)[..tail.len()]);
        }
        lane_sum(sum)
    }

    /// [`super::sum_exp_shifted`], eight values at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_exp_shifted(xs: &[f32], max: f32) -> f32 {
        let max = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        let mut inputs = xs.chunks_exact(8);
        for x in &mut inputs {
            let x = bytemuck::cast(<[f32; 8]>::try_from(x).expect("eight"));
            sum = _mm256_add_ps(sum, exp(_mm256_sub_ps(x, max)));
        }
        let tail = inputs.remainder();
        if !tail.is_empty() {
            sum = _mm256_add_ps(sum, exp(_mm256_sub_ps(padded(tail), max)));
        }
        lane_sum(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_exp_matches_the_scalar_one_where_softmax_uses_it() {
        use std::arch::x86_64::_mm256_loadu_ps;
        if !crate::qmatrix::avx2_fma() {
            return;
        }
        let xs: Vec<f32> = (0..=120_000).map(|i| -(i as f32) / 1000.0).collect();
        for chunk in xs.chunks_exact(8) {
            // SAFETY: the CPU features `avx2::exp` needs were checked above; `chunk` holds 8.
            #[allow(unsafe_code)]
            let got: [f32; 8] =
                unsafe { bytemuck::cast(avx2::exp(_mm256_loadu_ps(chunk.as_ptr()))) };
            for (&x, &e) in chunk.iter().zip(&got) {
                if x < -87.336_55 {
                    assert_eq!(e, 0.0, "e^{x}");
                } else {
                    let want = x.exp();
                    assert!((e - want).abs() <= 4e-7 * want, "e^{x}: {e} vs {want}");
                }
            }
        }
    }

    #[test]
    fn shifted_exponentials_and_their_sums_agree_with_the_scalar_definition() {
        // 8 · 6 + 5: whole vectors and a tail.
        let xs: Vec<f32> = (0..53)
            .map(|i| ((i * 37) % 23) as f32 * 0.7 - 9.0)
            .collect();
        let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let scale = 1.0 / 0.7;
        let mut out = vec![0.0; xs.len()];
        let sum = exp_shifted(&xs, max, scale, &mut out);
        let mut want_sum = 0.0;
        for (&x, &e) in xs.iter().zip(&out) {
            let want = ((x - max) * scale).exp();
            want_sum += want;
            assert!(
                (e - want).abs() <= 4e-7 * want.max(1e-30),
                "{x}: {e} vs {want}"
            );
        }
        assert!(
            (sum - want_sum).abs() <= 1e-5 * want_sum,
            "{sum} vs {want_sum}"
        );
        let plain = sum_exp_shifted(&xs, max);
        let want: f32 = xs.iter().map(|&x| (x - max).exp()).sum();
        assert!((plain - want).abs() <= 1e-5 * want, "{plain} vs {want}");
    }
}
