//! The CPU's fused path, for f32 activations (the CPU's dtype): q rotated into a new tensor,
//! k rotated and v copied straight into their cache slots, converted to the caches' dtype once,
//! where candle's ops would take a dozen allocations and passes a layer (a copy of each view,
//! the rotations, the conversions, the scatter indices).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, DType, Device, InplaceOp1, Layout, Result, Storage, StorageRef, Tensor,
};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::RopeLayout;

/// An f32 `[tokens, heads, head_dim]` tensor read in place (a view of fused rows too): its
/// storage, first element and token and head strides (a head's values are consecutive).
struct View<'a> {
    storage: StorageRef<'a>,
    start: usize,
    token_stride: usize,
    head_stride: usize,
    heads: usize,
}

impl<'a> View<'a> {
    fn of(t: &'a Tensor) -> Option<Self> {
        let (storage, layout) = t.storage_and_layout();
        let (heads, stride) = (t.dims().get(1).copied()?, layout.stride());
        (t.dtype() == DType::F32
            && t.rank() == 3
            && t.device().is_cpu()
            && (stride[2] == 1 || t.dim(2).ok()? == 1))
            .then_some(Self {
                start: layout.start_offset(),
                token_stride: stride[0],
                head_stride: stride[1],
                heads,
                storage,
            })
    }

    fn data(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(data)) => data,
            _ => unreachable!("checked to be f32 on the CPU"),
        }
    }

    /// Token `t`'s head `h`.
    fn head<'d>(&self, data: &'d [f32], t: usize, h: usize, head_dim: usize) -> &'d [f32] {
        &data[self.start + t * self.token_stride + h * self.head_stride..][..head_dim]
    }
}

/// A contiguous tensor's elements on the CPU.
fn contiguous<'a, T: candle_core::WithDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> Option<&'a [T]> {
    let (from, to) = layout.contiguous_offsets()?;
    match storage {
        Storage::Cpu(cpu) => cpu.as_slice::<T>().ok().map(|s| &s[from..to]),
        _ => None,
    }
}

/// Everything the fused path reads: q, k and v in place, each token's angles and slot.
pub(super) struct Rows<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    tables: [StorageRef<'a>; 3],
    layouts: [Layout; 3],
    tokens: usize,
    head_dim: usize,
}

impl<'a> Rows<'a> {
    /// `None` where the fused path does not apply: other devices or dtypes, caches that are
    /// not packed or not alike.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn of(
        q: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        cos: &'a Tensor,
        sin: &'a Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        slots: &'a Tensor,
    ) -> Option<Self> {
        let on_cpu = [cos, sin, slots, k_cache, v_cache]
            .iter()
            .all(|t| t.device().is_cpu());
        let cache_ok =
            |c: &Tensor| c.rank() == 4 && c.is_contiguous() && c.dims()[2..] == k.dims()[1..];
        if !on_cpu
            || cos.dtype() != DType::F32
            || sin.dtype() != DType::F32
            || slots.dtype() != DType::U32
            || slots.dims() != [q.dim(0).ok()?]
            || k_cache.dtype() != v_cache.dtype()
            || !matches!(k_cache.dtype(), DType::F16 | DType::BF16 | DType::F32)
            || !cache_ok(k_cache)
            || !cache_ok(v_cache)
        {
            return None;
        }
        let (tokens, heads, head_dim) = q.dims3().ok()?;
        if heads == 0 || k.dim(1).ok()? == 0 || head_dim == 0 {
            return None;
        }
        let [(cs, cl), (ss, sl), (ps, pl)] = [cos, sin, slots].map(|t| t.storage_and_layout());
        let layouts = [cl.clone(), sl.clone(), pl.clone()];
        let rows = Self {
            q: View::of(q)?,
            k: View::of(k)?,
            v: View::of(v)?,
            tables: [cs, ss, ps],
            layouts,
            tokens,
            head_dim,
        };
        // The tables must be packed too.
        let (cos, sin) = rows.angles()?;
        contiguous::<u32>(&rows.tables[2], &rows.layouts[2])?;
        // A cache that an input is a view of would be written while it is read, and its write
        // lock would wait for the inputs' read locks forever: only an f32 cache can be one, and
        // such calls take candle's ops, which refuse it.
        let inputs = [rows.q.data(), rows.k.data(), rows.v.data(), cos, sin];
        let read = |cache: &Tensor| {
            let (storage, _) = cache.storage_and_layout();
            match &*storage {
                Storage::Cpu(CpuStorage::F32(data)) => {
                    let range = data.as_ptr_range();
                    inputs.iter().any(|i| range.contains(&i.as_ptr()))
                }
                _ => false,
            }
        };
        if read(k_cache) || read(v_cache) {
            return None;
        }
        Some(rows)
    }

    fn angles(&self) -> Option<(&[f32], &[f32])> {
        Some((
            contiguous::<f32>(&self.tables[0], &self.layouts[0])?,
            contiguous::<f32>(&self.tables[1], &self.layouts[1])?,
        ))
    }

    fn slots(&self) -> &[u32] {
        contiguous::<u32>(&self.tables[2], &self.layouts[2]).expect("checked by Rows::of")
    }

    pub(super) fn rotate_and_cache(
        &self,
        layout: RopeLayout,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<Tensor> {
        let (tokens, head_dim) = (self.tokens, self.head_dim);
        let row_len = self.k.heads * head_dim;
        let num_slots = k_cache.elem_count() / row_len.max(1);
        if let Some(&slot) = self.slots().iter().find(|&&s| s as usize >= num_slots) {
            bail!("rotary_and_cache: slot {slot} is past the {num_slots} of the cache");
        }
        k_cache.inplace_op1(&WriteRows {
            rows: self,
            from: &self.k,
            rotate: Some(layout),
        })?;
        v_cache.inplace_op1(&WriteRows {
            rows: self,
            from: &self.v,
            rotate: None,
        })?;
        let (cos, sin) = self.angles().expect("checked by Rows::of");
        let (q, data) = (&self.q, self.q.data());
        let mut out = vec![0f32; tokens * q.heads * head_dim];
        let half = head_dim / 2;
        for (t, token) in out.chunks_exact_mut(q.heads * head_dim).enumerate() {
            let (cos, sin) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            for (h, o) in token.chunks_exact_mut(head_dim).enumerate() {
                rotate_head(q.head(data, t, h, head_dim), cos, sin, layout, o);
            }
        }
        Tensor::from_vec(out, (tokens, q.heads, head_dim), &Device::Cpu)
    }
}

/// Writes `from`'s rows (rotated first for keys) into a cache at their tokens' slots.
struct WriteRows<'r, 'a> {
    rows: &'r Rows<'a>,
    from: &'r View<'a>,
    rotate: Option<RopeLayout>,
}

impl WriteRows<'_, '_> {
    /// `convert` fills a cache row's head from f32 values.
    fn write<T: Copy>(&self, cache: &mut [T], convert: impl Fn(&mut [T], &[f32])) {
        let (head_dim, heads) = (self.rows.head_dim, self.from.heads);
        let half = head_dim / 2;
        let (data, slots) = (self.from.data(), self.rows.slots());
        let (cos, sin) = self.rows.angles().expect("checked by Rows::of");
        let mut rotated = vec![0f32; head_dim];
        for (t, &slot) in slots.iter().enumerate() {
            let dst = &mut cache[slot as usize * heads * head_dim..][..heads * head_dim];
            for (h, dst) in dst.chunks_exact_mut(head_dim).enumerate() {
                let mut src = self.from.head(data, t, h, head_dim);
                if let Some(layout) = self.rotate {
                    let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                    rotate_head(src, c, s, layout, &mut rotated);
                    src = &rotated;
                }
                convert(dst, src);
            }
        }
    }
}

impl InplaceOp1 for WriteRows<'_, '_> {
    fn name(&self) -> &'static str {
        "cpu-rotary-cache-write"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((from, to)) = layout.contiguous_offsets() else {
            bail!("rotary_and_cache: the cache is not contiguous");
        };
        match storage {
            // half's slice conversions use the CPU's conversion instructions where it has
            // them (F16C), rounding to nearest even as `from_f32` does.
            CpuStorage::F16(c) => self.write(&mut c[from..to], |d: &mut [f16], s| {
                d.convert_from_f32_slice(s)
            }),
            CpuStorage::BF16(c) => self.write(&mut c[from..to], |d: &mut [bf16], s| {
                d.convert_from_f32_slice(s)
            }),
            CpuStorage::F32(c) => self.write(&mut c[from..to], |d, s| d.copy_from_slice(s)),
            _ => bail!("rotary_and_cache: a {:?} cache", storage.dtype()),
        }
        Ok(())
    }
}

/// Rotates one head, `x`, by a token's `cos` and `sin` (`head_dim / 2` each) into `out`, in the
/// order of candle's CPU rope, so that results are the same bit for bit.
fn rotate_head(x: &[f32], cos: &[f32], sin: &[f32], layout: RopeLayout, out: &mut [f32]) {
    let half = cos.len();
    match layout {
        RopeLayout::HalfSplit => {
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = out.split_at_mut(half);
            for i in 0..half {
                o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                o2[i] = x1[i] * sin[i] + x2[i] * cos[i];
            }
        }
        RopeLayout::Interleaved => {
            for (i, (x, o)) in x.chunks_exact(2).zip(out.chunks_exact_mut(2)).enumerate() {
                o[0] = x[0] * cos[i] - x[1] * sin[i];
                o[1] = x[0] * sin[i] + x[1] * cos[i];
            }
        }
    }
}
