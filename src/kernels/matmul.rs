//! Batched matmul with transposes and fused epilogues: shaders/matmul.wgsl.
//!
//! The tile configuration is chosen per adapter by measuring the candidates once per
//! shape class on a proxy of the shape (same N and K, fewer rows), and cached on disk.

use std::time::Instant;

use super::to_u32;
use crate::gpu::{Binding, Gpu, GpuError, KernelSpec, Recorder, Tensor, tuning_enabled};

const MATMUL: KernelSpec = KernelSpec {
    name: "matmul",
    source: concat!(include_str!("../../shaders/gelu.wgsl"), include_str!("../../shaders/matmul.wgsl")),
    entry: "matmul",
    bindings: &[Binding::Read, Binding::Read, Binding::Read, Binding::Write, Binding::Write],
};

/// A workgroup tile BM×BN stepping BK along K, each invocation computing TM×TN outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub tm: u32,
    pub tn: u32,
}

impl Tile {
    pub const fn new(bm: u32, bn: u32, bk: u32, tm: u32, tn: u32) -> Tile {
        Tile { bm, bn, bk, tm, tn }
    }

    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Workgroup memory the two staged tiles take.
    pub fn shared_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + self.bn)
    }

    fn name(&self) -> String {
        format!("{}x{}x{}/{}x{}", self.bm, self.bn, self.bk, self.tm, self.tn)
    }

    fn parse(name: &str) -> Option<Tile> {
        CANDIDATES.iter().map(|(t, _)| *t).find(|t| t.name() == name)
    }
}

/// What the tuner chooses from; the first is the default when tuning is off. GPUs get
/// register tiles of up to 64 outputs per invocation (more spills their registers); CPU
/// adapters (lavapipe), where an invocation is a SIMD lane with a large register file
/// behind it, run fastest with 128 or 256 outputs per invocation (16 GFLOP/s against 7
/// for 8×4 on Mesa 25, 2 cores). The measurement decides among them.
pub const CANDIDATES: &[(Tile, Adapters)] = &[
    (Tile::new(64, 64, 16, 8, 4), Adapters::All),
    (Tile::new(32, 32, 16, 4, 4), Adapters::All),
    (Tile::new(128, 64, 16, 8, 8), Adapters::Gpu),
    (Tile::new(128, 128, 8, 8, 8), Adapters::Gpu),
    (Tile::new(256, 128, 8, 16, 16), Adapters::Cpu),
    (Tile::new(256, 128, 8, 16, 8), Adapters::Cpu),
];

/// Which adapters a candidate tile is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adapters {
    All,
    Gpu,
    Cpu,
}

/// What happens to each output element after the product.
#[derive(Clone, Copy)]
pub enum Epilogue<'t> {
    /// C = A·B
    None,
    /// C = A·B + bias[N]
    Bias(&'t Tensor),
    /// pre = A·B + bias; C = GELU(pre). `pre` [M, N] is what the backward needs.
    BiasGelu { bias: &'t Tensor, pre: &'t Tensor },
    /// C += A·B (gradient accumulation)
    Accumulate,
}

impl Epilogue<'_> {
    fn code(&self) -> u32 {
        match self {
            Epilogue::None => 0,
            Epilogue::Bias(_) => 1,
            Epilogue::BiasGelu { .. } => 2,
            Epilogue::Accumulate => 3,
        }
    }
}

/// The shape of C[b] = op(A[b])·op(B[b]): M×K times K×N. Row strides default to the
/// packed layout; offsets and batch strides are in elements.
#[derive(Clone, Copy, Debug, Default)]
pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    /// A is stored [K, M] instead of [M, K].
    pub trans_a: bool,
    /// B is stored [N, K] instead of [K, N].
    pub trans_b: bool,
    pub lda: Option<usize>,
    pub ldb: Option<usize>,
    pub ldc: Option<usize>,
    pub offset_a: usize,
    pub offset_b: usize,
    pub offset_c: usize,
    pub stride_a: Option<usize>,
    pub stride_b: Option<usize>,
    pub stride_c: Option<usize>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    pad0: u32,
    offset_a: u32,
    offset_b: u32,
    offset_c: u32,
    pad1: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    pad2: u32,
}

impl Matmul {
    /// C[M, N] = A[M, K] · B[K, N].
    pub fn new(m: usize, n: usize, k: usize) -> Matmul {
        Matmul { m, n, k, batch: 1, ..Default::default() }
    }

    pub fn trans_a(self) -> Matmul {
        Matmul { trans_a: true, ..self }
    }

    pub fn trans_b(self) -> Matmul {
        Matmul { trans_b: true, ..self }
    }

    /// `batch` products over consecutive packed matrices (or the strides set later).
    pub fn batched(self, batch: usize) -> Matmul {
        Matmul { batch, ..self }
    }

    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch.max(1) as f64
    }

    fn lda(&self) -> usize {
        self.lda.unwrap_or(if self.trans_a { self.m } else { self.k })
    }

    fn ldb(&self) -> usize {
        self.ldb.unwrap_or(if self.trans_b { self.k } else { self.n })
    }

    fn ldc(&self) -> usize {
        self.ldc.unwrap_or(self.n)
    }

    /// (rows, row stride, row length) of each stored operand.
    fn extents(&self) -> [(usize, usize, usize); 3] {
        let (a_rows, a_cols) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (b_rows, b_cols) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        [(a_rows, self.lda(), a_cols), (b_rows, self.ldb(), b_cols), (self.m, self.ldc(), self.n)]
    }

    /// Elements each operand must hold: offset + last batch + last row + row length.
    fn required(&self) -> [usize; 3] {
        let batch = self.batch.max(1);
        let strides = [self.stride_a, self.stride_b, self.stride_c];
        let offsets = [self.offset_a, self.offset_b, self.offset_c];
        let mut needed = [0; 3];
        for (i, (rows, ld, cols)) in self.extents().into_iter().enumerate() {
            let matrix = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols };
            let stride = strides[i].unwrap_or(rows * ld);
            needed[i] = if matrix == 0 { 0 } else { offsets[i] + (batch - 1) * stride + matrix };
        }
        needed
    }

    fn params(&self) -> Result<Params, GpuError> {
        let u = |what: &str, v: usize| to_u32("matmul", what, v);
        let [(a_rows, lda, _), (b_rows, ldb, _), (_, ldc, _)] = self.extents();
        Ok(Params {
            m: u("m", self.m)?,
            n: u("n", self.n)?,
            k: u("k", self.k)?,
            batch: u("batch", self.batch.max(1))?,
            lda: u("lda", lda)?,
            ldb: u("ldb", ldb)?,
            ldc: u("ldc", ldc)?,
            offset_a: u("offset_a", self.offset_a)?,
            offset_b: u("offset_b", self.offset_b)?,
            offset_c: u("offset_c", self.offset_c)?,
            stride_a: u("stride_a", self.stride_a.unwrap_or(a_rows * lda))?,
            stride_b: u("stride_b", self.stride_b.unwrap_or(b_rows * ldb))?,
            stride_c: u("stride_c", self.stride_c.unwrap_or(self.m * ldc))?,
            pad0: 0,
            pad1: 0,
            pad2: 0,
        })
    }

    fn check(&self, a: &Tensor, b: &Tensor, c: &Tensor, epilogue: &Epilogue) -> Result<(), GpuError> {
        let shape_error = |detail: String| GpuError::Shape { op: "matmul".into(), detail };
        let [(_, lda, a_cols), (_, ldb, b_cols), (_, ldc, c_cols)] = self.extents();
        if lda < a_cols || ldb < b_cols || ldc < c_cols {
            return Err(shape_error(format!(
                "row strides lda={lda} ldb={ldb} ldc={ldc} shorter than the rows ({a_cols}, {b_cols}, {c_cols})"
            )));
        }
        for (tensor, needed) in [a, b, c].into_iter().zip(self.required()) {
            if tensor.len() < needed {
                return Err(shape_error(format!(
                    "'{}' has {} elements ({:?}) but {}x{}x{} (batch {}, trans_a {}, trans_b {}) needs {needed}",
                    tensor.name,
                    tensor.len(),
                    tensor.shape,
                    self.m,
                    self.n,
                    self.k,
                    self.batch,
                    self.trans_a,
                    self.trans_b
                )));
            }
        }
        let packed = self.ldc == Some(self.n) || self.ldc.is_none();
        match epilogue {
            Epilogue::Bias(bias) | Epilogue::BiasGelu { bias, .. } if bias.len() != self.n => {
                Err(shape_error(format!("bias '{}' has {} elements, N = {}", bias.name, bias.len(), self.n)))
            }
            Epilogue::BiasGelu { pre, .. } if pre.len() != c.len() || !packed => Err(shape_error(format!(
                "pre-activation '{}' must match C '{}' ({} vs {} elements, packed rows)",
                pre.name,
                c.name,
                pre.len(),
                c.len()
            ))),
            _ => Ok(()),
        }
    }
}

/// The inner product of the staged tiles, unrolled over the register tile: every index
/// into `acc` and the fragments is a constant, which keeps them in registers even where a
/// compiler would not unroll nested loops (lavapipe spills dynamically indexed arrays).
/// Invocation x owns vec4 columns x, x + THREADS_X, …: neighbours read neighbours.
fn multiply_function(tile: Tile) -> String {
    let vn = tile.tn / 4;
    let mut body = String::new();
    for c in 0..4 {
        for v in 0..vn {
            body +=
                &format!("        let b{c}_{v} = tile_b[(4u * kq + {c}u) * BN4 + lx + {v}u * THREADS_X];\n");
        }
    }
    for i in 0..tile.tm {
        body += &format!("        let a{i} = tile_a[(row_base + {i}u) * BK4 + kq];\n");
        for v in 0..vn {
            body += &format!(
                "        acc[{i}][{v}] = fma(vec4(a{i}.w), b3_{v}, fma(vec4(a{i}.z), b2_{v}, \
                 fma(vec4(a{i}.y), b1_{v}, fma(vec4(a{i}.x), b0_{v}, acc[{i}][{v}]))));\n"
            );
        }
    }
    format!(
        "fn multiply_tiles(row_base: u32, lx: u32) {{\n    for (var kq = 0u; kq < BK4; kq++) {{\n{body}    }}\n}}\n"
    )
}

fn defines(tile: Tile, op: &Matmul, epilogue: u32) -> String {
    multiply_function(tile)
        + &format!(
            "const BM: u32 = {}u;\nconst BN: u32 = {}u;\nconst BK: u32 = {}u;\nconst TM: u32 = {}u;\n\
         const TN: u32 = {}u;\nconst TRANS_A: bool = {};\nconst TRANS_B: bool = {};\nconst EPILOGUE: u32 = {}u;\n",
            tile.bm, tile.bn, tile.bk, tile.tm, tile.tn, op.trans_a, op.trans_b, epilogue
        )
}

/// Tiles this adapter can run: invocations and workgroup memory within its limits.
pub fn usable_tiles(gpu: &Gpu) -> Vec<Tile> {
    let limits = &gpu.limits;
    let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    CANDIDATES
        .iter()
        .filter(|(_, on)| match on {
            Adapters::All => true,
            Adapters::Gpu => !cpu,
            Adapters::Cpu => cpu,
        })
        .map(|(tile, _)| *tile)
        .filter(|t| {
            t.tn % 4 == 0
                && t.bk % 4 == 0
                && t.threads() <= limits.max_compute_invocations_per_workgroup
                && t.bn / t.tn <= limits.max_compute_workgroup_size_x
                && t.bm / t.tm <= limits.max_compute_workgroup_size_y
                && t.shared_bytes() <= limits.max_compute_workgroup_storage_size
        })
        .collect()
}

/// C = op(A)·op(B) with `epilogue`, on the tile measured best for this shape class.
pub fn matmul(
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: &Matmul,
    epilogue: Epilogue,
) -> Result<(), GpuError> {
    op.check(a, b, c, &epilogue)?;
    let tile = choose_tile(rec.gpu, op)?;
    matmul_with_tile(rec, a, b, c, op, epilogue, tile)
}

/// Like `matmul` on a given tile (tests run every candidate; the tuner measures them).
pub fn matmul_with_tile(
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: &Matmul,
    epilogue: Epilogue,
    tile: Tile,
) -> Result<(), GpuError> {
    op.check(a, b, c, &epilogue)?;
    let params = op.params()?;
    // Unused bindings still need a buffer: read-only slots alias A, the spare writable
    // slot aliases C (one usage of one buffer is not a conflict in wgpu).
    let (bias, pre) = match epilogue {
        Epilogue::Bias(bias) => (bias, c),
        Epilogue::BiasGelu { bias, pre } => (bias, pre),
        Epilogue::None | Epilogue::Accumulate => (a, c),
    };
    let groups = [
        to_u32("matmul", "column tiles", op.n.div_ceil(tile.bn as usize))?,
        to_u32("matmul", "row tiles", op.m.div_ceil(tile.bm as usize))?,
        params.batch,
    ];
    let defines = defines(tile, op, epilogue.code());
    rec.dispatch(&MATMUL, &defines, &params, &[a, b, bias, c, pre], groups)
}

/// The shape class: transposes and the size bucket (power of two) of each dimension.
fn shape_class(op: &Matmul) -> String {
    let bucket = |v: usize| v.max(1).next_power_of_two().trailing_zeros();
    format!(
        "matmul:ta{}:tb{}:m{}:n{}:k{}",
        op.trans_a as u8,
        op.trans_b as u8,
        bucket(op.m).min(9), // beyond 512 rows only the tile count changes
        bucket(op.n),
        bucket(op.k)
    )
}

fn choose_tile(gpu: &Gpu, op: &Matmul) -> Result<Tile, GpuError> {
    let tiles = usable_tiles(gpu);
    let Some(&default) = tiles.first() else {
        return Err(GpuError::Device { op: "matmul".into(), message: "no tile fits this adapter".into() });
    };
    let key = shape_class(op);
    if let Some(tile) = gpu.tune.get(&key).and_then(|name| Tile::parse(&name)) {
        return Ok(tile);
    }
    if !tuning_enabled() || tiles.len() == 1 {
        return Ok(default);
    }
    let proxy = Proxy::new(gpu, op)?;
    let names: Vec<String> = tiles.iter().map(Tile::name).collect();
    let chosen = gpu.tune.choose(&key, &names, |name| {
        let tile = Tile::parse(name).unwrap_or(default);
        proxy.seconds(gpu, tile).unwrap_or(f64::INFINITY)
    });
    Ok(Tile::parse(&chosen).unwrap_or(default))
}

/// A stand-in for a shape in its class: the same N and K, fewer rows, one batch, so that
/// measuring every candidate stays within about a second even on a CPU adapter.
struct Proxy {
    op: Matmul,
    a: Tensor,
    b: Tensor,
    c: Tensor,
}

impl Proxy {
    fn new(gpu: &Gpu, op: &Matmul) -> Result<Proxy, GpuError> {
        const PROXY_FLOPS: f64 = 1.2e8;
        let per_row = 2.0 * op.n.max(1) as f64 * op.k.max(1) as f64;
        // At least one full row of the tallest tile, so that no candidate is measured
        // on a mostly empty tile.
        let tallest = usable_tiles(gpu).iter().map(|t| t.bm as usize).max().unwrap_or(64);
        let rows = ((PROXY_FLOPS / per_row) as usize).clamp(tallest, tallest.max(1024)).min(op.m.max(1));
        let proxy = Matmul {
            m: rows,
            n: op.n,
            k: op.k,
            batch: 1,
            trans_a: op.trans_a,
            trans_b: op.trans_b,
            ..Default::default()
        };
        let [a_len, b_len, c_len] = proxy.required();
        Ok(Proxy {
            op: proxy,
            a: gpu.zeros("tune A", &[a_len])?,
            b: gpu.zeros("tune B", &[b_len])?,
            c: gpu.zeros("tune C", &[c_len])?,
        })
    }

    /// Seconds per product: one warm-up (compiles the pipeline), then one timed run.
    fn seconds(&self, gpu: &Gpu, tile: Tile) -> Result<f64, GpuError> {
        let run = || -> Result<f64, GpuError> {
            let started = Instant::now();
            let mut rec = gpu.recorder();
            matmul_with_tile(&mut rec, &self.a, &self.b, &self.c, &self.op, Epilogue::None, tile)?;
            rec.submit()?;
            gpu.wait()?;
            Ok(started.elapsed().as_secs_f64())
        };
        run()?;
        run()
    }
}
