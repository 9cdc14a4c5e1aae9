//! Batched matmul with transposes and fused epilogues: shaders/matmul.wgsl.
//!
//! On GPUs the tile configuration is chosen by measuring the candidates once per shape
//! class on a proxy of the shape (same N and K, fewer rows), and cached on disk. CPU
//! adapters, where every candidate costs seconds of pipeline compile, use a fixed rule:
//! the subgroup kernel (shaders/matmul_subgroup.wgsl) where they have subgroups, as
//! lavapipe does, else a CPU tile of the tiled kernel.

use std::time::Instant;

use super::{alias_lines, storage_aliases, to_u32};
use crate::contract::DropoutSpec;
use crate::gpu::{Binding, ElementType, Gpu, GpuError, KernelSpec, Recorder, Tensor, spread, tuning_enabled};

const MATMUL: KernelSpec = KernelSpec {
    name: "matmul",
    source: concat!(
        include_str!("../../shaders/gelu.wgsl"),
        include_str!("../../shaders/rng.wgsl"),
        include_str!("../../shaders/matmul_params.wgsl"),
        include_str!("../../shaders/matmul_io.wgsl"),
        include_str!("../../shaders/matmul.wgsl")
    ),
    entry: "matmul",
    bindings: &[Binding::Read, Binding::Read, Binding::Read, Binding::Write, Binding::Write],
    // Every load and store is bounded by m, n, k and the strides, which `Matmul::check`
    // holds to the tensors' lengths.
    trusted: true,
};

const MATMUL_COOP: KernelSpec = KernelSpec {
    name: "matmul_coop",
    source: concat!(
        include_str!("../../shaders/gelu.wgsl"),
        include_str!("../../shaders/rng.wgsl"),
        include_str!("../../shaders/matmul_params.wgsl"),
        include_str!("../../shaders/matmul_io.wgsl"),
        include_str!("../../shaders/matmul_coop.wgsl")
    ),
    entry: "matmul_coop",
    bindings: MATMUL.bindings,
    // Not yet run on an adapter with cooperative matrices: it keeps naga's checks until it is.
    trusted: false,
};

const MATMUL_SUBGROUP: KernelSpec = KernelSpec {
    name: "matmul_subgroup",
    source: concat!(
        include_str!("../../shaders/gelu.wgsl"),
        include_str!("../../shaders/rng.wgsl"),
        include_str!("../../shaders/matmul_params.wgsl"),
        include_str!("../../shaders/matmul_io.wgsl"),
        include_str!("../../shaders/matmul_subgroup.wgsl")
    ),
    entry: "matmul_subgroup",
    bindings: MATMUL.bindings,
    // Every load is clamped into the operands by m, n, k and the strides (held to the
    // tensors' lengths by `Matmul::check`); stores are bounded by m and n.
    trusted: true,
};

const MATMUL_PACK: KernelSpec = KernelSpec {
    name: "matmul_pack",
    source: concat!(
        include_str!("../../shaders/matmul_params.wgsl"),
        include_str!("../../shaders/matmul_pack.wgsl")
    ),
    entry: "matmul_pack",
    bindings: &[Binding::Read, Binding::Write],
    // Reads are bounded by the product's checked extents, writes by the packed length.
    trusted: true,
};

/// Rows of C one subgroup kernel workgroup computes: 8 measured best on lavapipe (Mesa 25,
/// AVX2 lanes of 8) at MiniLM's encoder shapes, 29–31 GFLOP/s against 20–28 for 4, 6, 12 or
/// 16 rows, whose broadcasts or spilled accumulators cost more than the loads they save.
const SUBGROUP_ROWS: u32 = 8;
/// The tuner's name for the subgroup kernel.
const SUBGROUP_NAME: &str = "subgroup/8";

/// The block of C one cooperative-matrix workgroup computes (BM = BN in the shader).
const COOP_BLOCK: usize = 32;
/// The tuner's name for the cooperative-matrix kernel.
const COOP_NAME: &str = "coop16x16x16-f16/32x32";

/// A workgroup tile BM×BN stepping BK along K, each invocation computing TM×TN outputs,
/// with 1 or 2 (double-buffered) stages of staged tiles in workgroup memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub tm: u32,
    pub tn: u32,
    pub stages: u32,
}

impl Tile {
    pub const fn new(bm: u32, bn: u32, bk: u32, tm: u32, tn: u32) -> Tile {
        Tile { bm, bn, bk, tm, tn, stages: 1 }
    }

    /// The same tile with two stages: the next K-tile is loaded while this one is
    /// multiplied, one barrier per step instead of two.
    pub const fn double_buffered(self) -> Tile {
        Tile { stages: 2, ..self }
    }

    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Workgroup memory the staged tiles take.
    pub fn shared_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + self.bn) * self.stages
    }

    fn name(&self) -> String {
        let stages = if self.stages == 2 { "/2" } else { "" };
        format!("{}x{}x{}/{}x{}{stages}", self.bm, self.bn, self.bk, self.tm, self.tn)
    }

    fn parse(name: &str) -> Option<Tile> {
        CANDIDATES.iter().map(|(t, _)| *t).find(|t| t.name() == name)
    }
}

/// What the tuner chooses from on GPUs; the first is the default when tuning is off. GPUs
/// get register tiles of up to 64 outputs per invocation (more spills their registers):
/// the discrete-GPU tiles are 64–128 × 128 blocks of 8×8 per invocation with K-tiles of
/// 16–32, single or double-buffered (siboehm's kernel 9 reaches ~70% of peak this way).
/// CPU adapters take theirs by a fixed rule (`cpu_rule`), not by measuring.
pub const CANDIDATES: &[(Tile, Adapters)] = &[
    (Tile::new(64, 64, 16, 8, 4), Adapters::Gpu),
    (Tile::new(32, 32, 16, 4, 4), Adapters::Gpu),
    (Tile::new(128, 64, 16, 8, 8), Adapters::Gpu),
    (Tile::new(128, 128, 8, 8, 8), Adapters::Gpu),
    (Tile::new(128, 128, 16, 8, 8).double_buffered(), Adapters::Gpu),
    (Tile::new(64, 128, 16, 8, 8).double_buffered(), Adapters::Gpu),
    (Tile::new(128, 128, 32, 8, 8), Adapters::Gpu),
    (Tile::new(64, 128, 32, 8, 8).double_buffered(), Adapters::Gpu),
    (CPU_NARROW[0], Adapters::Cpu),
    (CPU_NARROW[1], Adapters::Cpu),
    (CPU_WIDE, Adapters::Cpu),
];

/// CPU adapters without subgroups (lavapipe has them and takes the subgroup kernel, 24–31
/// GFLOP/s), where an invocation is a SIMD lane with a large register file behind it, run
/// the tiled kernel fastest with 256 outputs per invocation: 15.9–20.2 GFLOP/s on three of
/// MiniLM's products against 12.9–14.8 for 16×8 and 14.4–16.0 for 128×128×16/16×16 (Mesa 25, 2
/// cores, `pals bench --tiles`). Its K-tile of 8 also compiles in a third of the time of
/// a K-tile of 16 (1.5 s against 4.3 s), since llvmpipe unrolls the whole K-tile.
const CPU_WIDE: Tile = Tile::new(256, 128, 8, 16, 16);
/// Products only 32 or 64 wide (attention's P·V and its gradients, per head) would leave
/// 3/4 or 1/2 of CPU_WIDE idle: they take the first of these as wide as they are.
const CPU_NARROW: [Tile; 2] = [Tile::new(128, 32, 8, 8, 16), Tile::new(128, 64, 8, 8, 16)];

/// Which kind of adapter a candidate tile is meant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adapters {
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
    /// C = Dropout(A·B + bias[N]): a sublayer's output straight from its product, the mask
    /// that of `elementwise::dropout` over C (element index row·N + col), so the separate
    /// pass over C is not needed. C is exactly M×N (one batch, packed rows).
    BiasDropout { bias: &'t Tensor, drop: DropoutSpec },
    /// C = (A·B) · GELU'(pre), elementwise: a GELU's input gradient straight from the
    /// product that gives its output gradient (`elementwise::gelu_backward` fused). `pre`
    /// [M, N] is the GELU's input, in C's element type.
    GeluBackward { pre: &'t Tensor },
}

impl Epilogue<'_> {
    fn code(&self) -> u32 {
        match self {
            Epilogue::None => 0,
            Epilogue::Bias(_) => 1,
            Epilogue::BiasGelu { .. } => 2,
            Epilogue::Accumulate => 3,
            Epilogue::BiasDropout { .. } => 4,
            Epilogue::GeluBackward { .. } => 5,
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
    /// Batches nested in two levels (attention: batch = b·heads + h); `None`: one level.
    pub inner: Option<InnerBatch>,
    /// The caller accepts operands rounded to f16 (mixed precision): lets the tuner also
    /// measure the cooperative-matrix kernel where the adapter has one.
    pub f16_operands: bool,
}

/// Batch z = outer·count + inner of a two-level batch: operand X of batch z starts at
/// offset_X + outer·stride_X + inner·inner_stride_X (strides in elements). Attention
/// addresses head h of sequence b in a [B, S, heads, D] tensor this way.
#[derive(Clone, Copy, Debug, Default)]
pub struct InnerBatch {
    pub count: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
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
    inner: u32,
    offset_a: u32,
    offset_b: u32,
    offset_c: u32,
    /// Epilogue::code: a parameter, so that one pipeline serves every epilogue.
    epilogue: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    pad2: u32,
    inner_stride_a: u32,
    inner_stride_b: u32,
    inner_stride_c: u32,
    pad3: u32,
    /// Epilogue::BiasDropout's mask (zeros otherwise): as elementwise.wgsl's dropout.
    drop_seed: u32,
    drop_stream: u32,
    drop_threshold: u32,
    drop_scale: f32,
    drop_first_index: u32,
    pad4: [u32; 3],
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

    /// Inner batches per outer one (1 without nesting).
    fn inner_count(&self) -> usize {
        self.inner.map_or(1, |inner| inner.count.max(1))
    }

    /// Elements each operand must hold: offset + last batch + last row + row length.
    fn required(&self) -> [usize; 3] {
        let inner_count = self.inner_count();
        let outer = self.batch.max(1).div_ceil(inner_count);
        let strides = [self.stride_a, self.stride_b, self.stride_c];
        let inner = self.inner.unwrap_or_default();
        let inner_strides = [inner.stride_a, inner.stride_b, inner.stride_c];
        let offsets = [self.offset_a, self.offset_b, self.offset_c];
        let mut needed = [0; 3];
        for (i, (rows, ld, cols)) in self.extents().into_iter().enumerate() {
            let matrix = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols };
            let stride = strides[i].unwrap_or(rows * ld);
            let last = (outer - 1) * stride + (inner_count - 1) * inner_strides[i];
            needed[i] = if matrix == 0 { 0 } else { offsets[i] + last + matrix };
        }
        needed
    }

    fn params(&self, epilogue: &Epilogue) -> Result<Params, GpuError> {
        let u = |what: &str, v: usize| to_u32("matmul", what, v);
        let [(a_rows, lda, _), (b_rows, ldb, _), (_, ldc, _)] = self.extents();
        let inner = self.inner.unwrap_or_default();
        let drop = match *epilogue {
            Epilogue::BiasDropout { drop, .. } => drop,
            _ => DropoutSpec::NONE,
        };
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
            inner: u("inner batches", self.inner_count())?,
            inner_stride_a: u("inner stride_a", inner.stride_a)?,
            inner_stride_b: u("inner stride_b", inner.stride_b)?,
            inner_stride_c: u("inner stride_c", inner.stride_c)?,
            epilogue: epilogue.code(),
            pad2: 0,
            pad3: 0,
            drop_seed: drop.seed,
            drop_stream: drop.stream,
            drop_threshold: drop.threshold(),
            drop_scale: drop.scale(),
            drop_first_index: drop.first_index(self.m * self.n),
            pad4: [0; 3],
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
        if !self.batch.max(1).is_multiple_of(self.inner_count()) {
            return Err(shape_error(format!(
                "batch {} is not a multiple of the {} inner batches",
                self.batch,
                self.inner_count()
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
        if let Epilogue::Bias(bias) | Epilogue::BiasGelu { bias, .. } | Epilogue::BiasDropout { bias, .. } =
            epilogue
        {
            bias.expect_type("matmul", ElementType::F32)?;
        }
        if let Epilogue::BiasGelu { pre, .. } | Epilogue::GeluBackward { pre } = epilogue {
            pre.expect_type("matmul", c.dtype)?;
        }
        match epilogue {
            Epilogue::Bias(bias) | Epilogue::BiasGelu { bias, .. } | Epilogue::BiasDropout { bias, .. }
                if bias.len() != self.n =>
            {
                Err(shape_error(format!("bias '{}' has {} elements, N = {}", bias.name, bias.len(), self.n)))
            }
            Epilogue::BiasGelu { pre, .. } | Epilogue::GeluBackward { pre }
                if pre.len() != c.len() || !packed =>
            {
                Err(shape_error(format!(
                    "pre-activation '{}' must match C '{}' ({} vs {} elements, packed rows)",
                    pre.name,
                    c.name,
                    pre.len(),
                    c.len()
                )))
            }
            Epilogue::BiasDropout { .. } if !packed || self.batch > 1 || c.len() != self.m * self.n => {
                Err(shape_error(format!(
                    "dropout epilogue: C '{}' ({} elements) must be exactly the {}x{} product, one batch of packed rows",
                    c.name,
                    c.len(),
                    self.m,
                    self.n
                )))
            }
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
    // Stage offsets into the (possibly double-buffered) staged tiles.
    let mut body = String::from("        let oa = stage * BM * BK4;\n        let ob = stage * BK * BN4;\n");
    for c in 0..4 {
        for v in 0..vn {
            body += &format!(
                "        let b{c}_{v} = tile_b[ob + (4u * kq + {c}u) * BN4 + lx + {v}u * THREADS_X];\n"
            );
        }
    }
    for i in 0..tile.tm {
        body += &format!("        let a{i} = tile_a[oa + (row_base + {i}u) * BK4 + kq];\n");
        for v in 0..vn {
            body += &format!(
                "        acc[{i}][{v}] = fma(vec4(a{i}.w), b3_{v}, fma(vec4(a{i}.z), b2_{v}, \
                 fma(vec4(a{i}.y), b1_{v}, fma(vec4(a{i}.x), b0_{v}, acc[{i}][{v}]))));\n"
            );
        }
    }
    format!(
        "fn multiply_tiles(row_base: u32, lx: u32, stage: u32) {{\n    for (var kq = 0u; kq < BK4; kq++) {{\n{body}    }}\n}}\n"
    )
}

fn defines(tile: Tile, op: &Matmul, types: &str) -> String {
    types.to_string()
        + "alias A_ELEMENT = A_TYPE;\nalias B_ELEMENT = B_TYPE;\n"
        + &multiply_function(tile)
        + &format!(
            "const BM: u32 = {}u;\nconst BN: u32 = {}u;\nconst BK: u32 = {}u;\nconst TM: u32 = {}u;\n\
         const TN: u32 = {}u;\nconst STAGES: u32 = {}u;\nconst TRANS_A: bool = {};\nconst TRANS_B: bool = {};\n",
            tile.bm, tile.bn, tile.bk, tile.tm, tile.tn, tile.stages, op.trans_a, op.trans_b
        )
}

/// Tiles meant for this adapter's kind (GPU or CPU) that fit its limits.
pub fn usable_tiles(gpu: &Gpu) -> Vec<Tile> {
    let kind = if is_cpu(gpu) { Adapters::Cpu } else { Adapters::Gpu };
    let meant = CANDIDATES.iter().filter(|(_, on)| *on == kind).map(|(tile, _)| *tile).collect();
    fitting(gpu, meant)
}

fn is_cpu(gpu: &Gpu) -> bool {
    gpu.info.device_type == wgpu::DeviceType::Cpu
}

/// The kernel a CPU adapter uses for `op`, without measuring: there every candidate is a
/// pipeline compile of seconds per transpose form (llvmpipe compiles at first dispatch,
/// one pipeline at a time), which made tuning alone 21 s of a MiniLM run's first step.
/// The subgroup kernel where the adapter has subgroups (1.3–1.7× CPU_WIDE at MiniLM's
/// encoder shapes on lavapipe, B repacking included), else CPU_WIDE, which measured fastest
/// of the tiles on each encoder shape measured. `None` on GPUs, or where the adapter's
/// limits rule the tile out (then the tuner measures what fits).
pub fn cpu_rule(gpu: &Gpu, op: &Matmul) -> Option<Kernel> {
    if !is_cpu(gpu) {
        return None;
    }
    if subgroup_unavailable(gpu).is_none() {
        return Some(Kernel::Subgroup);
    }
    let tile = CPU_NARROW.into_iter().find(|t| op.n <= t.bn as usize).unwrap_or(CPU_WIDE);
    usable_tiles(gpu).contains(&tile).then_some(Kernel::Tiled(tile))
}

/// Every candidate this adapter can run, whatever kind it is meant for: what the tests
/// check against the reference (lavapipe runs the discrete-GPU tiles too).
pub fn runnable_tiles(gpu: &Gpu) -> Vec<Tile> {
    fitting(gpu, CANDIDATES.iter().map(|(tile, _)| *tile).collect())
}

/// The tiles whose invocations and workgroup memory are within the adapter's limits.
fn fitting(gpu: &Gpu, tiles: Vec<Tile>) -> Vec<Tile> {
    let limits = &gpu.limits;
    tiles
        .into_iter()
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

/// Which kernel computes a product: the tiled f32 kernel on a tile, cooperative matrices, or
/// the subgroup kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Tiled(Tile),
    Coop,
    /// Subgroup broadcasts, no workgroup memory (matmul_subgroup.wgsl): CPU adapters.
    Subgroup,
}

impl Kernel {
    pub fn name(&self) -> String {
        match self {
            Kernel::Tiled(tile) => tile.name(),
            Kernel::Coop => COOP_NAME.into(),
            Kernel::Subgroup => SUBGROUP_NAME.into(),
        }
    }

    fn parse(name: &str) -> Option<Kernel> {
        match name {
            COOP_NAME => Some(Kernel::Coop),
            SUBGROUP_NAME => Some(Kernel::Subgroup),
            _ => Tile::parse(name).map(Kernel::Tiled),
        }
    }
}

/// Every kernel this adapter can run that multiplies the operands as stored (every tile,
/// whatever kind of adapter it is meant for, and the subgroup kernel where it runs): what
/// the tests check against the f32 reference. Cooperative matrices, which round operands
/// to f16, are checked on their own.
pub fn f32_kernels(gpu: &Gpu) -> Vec<Kernel> {
    let mut kernels: Vec<Kernel> = runnable_tiles(gpu).into_iter().map(Kernel::Tiled).collect();
    if subgroup_unavailable(gpu).is_none() {
        kernels.push(Kernel::Subgroup);
    }
    kernels
}

/// C = op(A)·op(B) with `epilogue`, on the kernel chosen for this shape class. A, B and C
/// may each be f32 or f16 (f32 sums). An operand in f16 storage means the caller accepts
/// operands rounded to f16, so where the adapter has cooperative matrices (tensor cores)
/// they are measured too (mixed precision's products); elsewhere such a product takes the
/// tile the f32 form was measured best with.
pub fn matmul(
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: &Matmul,
    epilogue: Epilogue,
) -> Result<(), GpuError> {
    op.check(a, b, c, &epilogue)?;
    let kernel = kernel_for(rec, a, b, op)?;
    matmul_with(rec, a, b, c, op, epilogue, kernel)
}

/// Like `matmul` on a given kernel (tests run every one; the tuner measures them).
pub fn matmul_with(
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: &Matmul,
    epilogue: Epilogue,
    kernel: Kernel,
) -> Result<(), GpuError> {
    match kernel {
        Kernel::Tiled(tile) => matmul_with_tile(rec, a, b, c, op, epilogue, tile),
        Kernel::Coop => matmul_coop(rec, a, b, c, op, epilogue),
        Kernel::Subgroup => matmul_subgroup(rec, a, b, c, op, epilogue),
    }
}

/// The kernel `matmul` runs `op` on with these operands: f16 storage of A or B, the op's
/// own `f16_operands` or the recorder's [`Recorder::round_products_to_f16`] let the tuner
/// measure cooperative matrices too, where the adapter has them.
pub fn kernel_for(rec: &Recorder, a: &Tensor, b: &Tensor, op: &Matmul) -> Result<Kernel, GpuError> {
    let f16_inputs = a.dtype == ElementType::F16 || b.dtype == ElementType::F16;
    let rounding = op.f16_operands || f16_inputs || rec.rounds_products_to_f16();
    let coop = coop_unavailable(rec.gpu).is_none();
    choose_kernel(rec.gpu, &Matmul { f16_operands: rounding && coop, ..*op })
}

/// Why the cooperative-matrix kernel cannot run on this adapter; `None` when it can: the
/// feature, a 16×16×16 f16 → f32 configuration, shader-f16 and one fixed subgroup size
/// (the kernel's workgroup is exactly one subgroup).
pub fn coop_unavailable(gpu: &Gpu) -> Option<String> {
    use wgpu::CooperativeScalarType::{F16, F32};
    if !gpu.has(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        return Some(format!("'{}' has no EXPERIMENTAL_COOPERATIVE_MATRIX feature", gpu.info.name));
    }
    let has_config = gpu
        .cooperative_matrix
        .iter()
        .any(|c| (c.m_size, c.n_size, c.k_size) == (16, 16, 16) && c.ab_type == F16 && c.cr_type == F32);
    if !has_config {
        return Some(format!("'{}' lists no 16x16x16 f16->f32 cooperative matrix", gpu.info.name));
    }
    if !gpu.has(wgpu::Features::SHADER_F16) {
        return Some(format!("'{}' has no shader-f16", gpu.info.name));
    }
    let (min, max) = (gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
    if min != max || min == 0 {
        return Some(format!(
            "'{}' has subgroups of {min} to {max} invocations, not one size",
            gpu.info.name
        ));
    }
    None
}

/// The cooperative-matrix kernel's whole source as the device compiles it: the enables
/// (which must open the module), the constants, then the shader. Public so that a test can
/// validate it with naga on adapters that cannot run it.
/// `types`: the storage of A, B and C.
pub fn coop_source(subgroup: u32, op: &Matmul, types: [ElementType; 3]) -> String {
    coop_defines(subgroup, op, types) + "\n" + MATMUL_COOP.source
}

fn coop_defines(subgroup: u32, op: &Matmul, [a, b, c]: [ElementType; 3]) -> String {
    format!(
        "enable f16;\nenable wgpu_cooperative_matrix;\n{}alias A_ELEMENT = A_TYPE;\nalias B_ELEMENT = B_TYPE;\nconst SUBGROUP: u32 = {subgroup}u;\n\
         const TRANS_A: bool = {};\nconst TRANS_B: bool = {};\n",
        alias_lines(&[("A_TYPE", a), ("B_TYPE", b), ("C_TYPE", c)]),
        op.trans_a,
        op.trans_b
    )
}

/// C = op(A)·op(B) with `epilogue` on cooperative matrices (tensor cores): operands rounded
/// to f16 (or read from f16 storage), f32 accumulation; C f32 or f16. An error naming the
/// reason where the adapter cannot run it.
pub fn matmul_coop(
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: &Matmul,
    epilogue: Epilogue,
) -> Result<(), GpuError> {
    check_runnable(op, [a, b, c], &epilogue, "matmul_coop", coop_unavailable(rec.gpu))?;
    let params = op.params(&epilogue)?;
    let (bias, pre) = epilogue_buffers(a, c, &epilogue);
    let groups = [
        to_u32("matmul_coop", "column blocks", op.n.div_ceil(COOP_BLOCK))?,
        to_u32("matmul_coop", "row blocks", op.m.div_ceil(COOP_BLOCK))?,
        params.batch,
    ];
    let defines = coop_defines(rec.gpu.info.subgroup_min_size, op, [a.dtype, b.dtype, c.dtype]);
    rec.dispatch(&MATMUL_COOP, &defines, &params, &[a, b, bias, c, pre], groups)
}

/// The operands' checks, then an error naming `kernel` and `unavailable`, the reason the
/// adapter cannot run it, if there is one.
fn check_runnable(
    op: &Matmul,
    [a, b, c]: [&Tensor; 3],
    epilogue: &Epilogue,
    kernel: &str,
    unavailable: Option<String>,
) -> Result<(), GpuError> {
    op.check(a, b, c, epilogue)?;
    match unavailable {
        Some(reason) => Err(GpuError::Device { op: kernel.into(), message: reason }),
        None => Ok(()),
    }
}

/// Unused bindings still need a buffer: read-only slots alias A, the spare writable slot
/// aliases C (one usage of one buffer is not a conflict in wgpu).
fn epilogue_buffers<'t>(a: &'t Tensor, c: &'t Tensor, epilogue: &Epilogue<'t>) -> (&'t Tensor, &'t Tensor) {
    match *epilogue {
        Epilogue::Bias(bias) | Epilogue::BiasDropout { bias, .. } => (bias, c),
        Epilogue::BiasGelu { bias, pre } => (bias, pre),
        Epilogue::GeluBackward { pre } => (a, pre),
        Epilogue::None | Epilogue::Accumulate => (a, c),
    }
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
    let types = [("A_TYPE", a.dtype), ("B_TYPE", b.dtype), ("C_TYPE", c.dtype)];
    let storage = storage_aliases("matmul", rec.gpu, &types)?;
    let params = op.params(&epilogue)?;
    let (bias, pre) = epilogue_buffers(a, c, &epilogue);
    let groups = [
        to_u32("matmul", "column tiles", op.n.div_ceil(tile.bn as usize))?,
        to_u32("matmul", "row tiles", op.m.div_ceil(tile.bm as usize))?,
        params.batch,
    ];
    let defines = defines(tile, op, &storage);
    rec.dispatch(&MATMUL, &defines, &params, &[a, b, bias, c, pre], groups)
}

/// Why the subgroup kernel cannot run on this adapter; `None` when it can: a CPU adapter
/// (on GPUs the tiles and cooperative matrices are measured instead), subgroup operations,
/// and one fixed subgroup size (the kernel's workgroup is exactly one subgroup).
pub fn subgroup_unavailable(gpu: &Gpu) -> Option<String> {
    subgroup_kernel_unavailable(&gpu.info, gpu.features)
}

/// `subgroup_unavailable` for an adapter not opened yet (`pals devices`): its info and the
/// features it offers.
pub fn subgroup_kernel_unavailable(info: &wgpu::AdapterInfo, features: wgpu::Features) -> Option<String> {
    let name = &info.name;
    if info.device_type != wgpu::DeviceType::Cpu {
        return Some(format!("'{name}' is not a CPU adapter (the subgroup kernel is lavapipe's)"));
    }
    if !features.contains(wgpu::Features::SUBGROUP) {
        return Some(format!("'{name}' has no subgroup operations"));
    }
    let (min, max) = (info.subgroup_min_size, info.subgroup_max_size);
    if min != max || !(4..=64).contains(&min) {
        return Some(format!(
            "'{name}' has subgroups of {min} to {max} invocations, not one size of 4 to 64"
        ));
    }
    None
}

/// How an adapter's products are computed, for `pals devices`.
pub fn kernel_summary(info: &wgpu::AdapterInfo, features: wgpu::Features) -> String {
    if info.device_type != wgpu::DeviceType::Cpu {
        return "tiles measured per shape class (and cooperative matrices in mixed precision, where listed)"
            .into();
    }
    match subgroup_kernel_unavailable(info, features) {
        None => format!("subgroup kernel ({} lanes), by a fixed rule", info.subgroup_min_size),
        Some(why) => format!("CPU tiles by a fixed rule (no subgroup kernel: {why})"),
    }
}

/// The subgroup kernel's multiplies of one chunk of k, unrolled: every index into `acc`
/// and every broadcast lane is a constant (see matmul_subgroup.wgsl). `multiply_chunk`
/// reads a whole chunk as it is; `multiply_tail` clamps and zeroes past K; `store_rows`
/// writes the rows inside C. `a_vec4`: A (transposed) read four rows at a time (A_VEC4).
fn chunk_functions(subgroup: u32, a_vec4: bool) -> String {
    const LANES: [&str; 4] = ["x", "y", "z", "w"];
    let mut functions = String::new();
    for tail in [false, true] {
        // What each lane loads of A: a scalar per row, or a vec4 per four rows.
        let mut body = String::new();
        for i in 0..if a_vec4 { SUBGROUP_ROWS.div_ceil(4) } else { SUBGROUP_ROWS } {
            body += &match (a_vec4, tail) {
                (false, false) => format!("    let a{i} = f32(a[a_at[{i}] + a_offset(k0 + lane)]);\n"),
                (false, true) => format!("    let a{i} = tail_a({i}u, k0 + lane);\n"),
                (true, false) => {
                    format!("    let a{i} = vec4<f32>(a[a_at[{i}] + (k0 + lane) * (p.lda / 4u)]);\n")
                }
                (true, true) => format!("    let a{i} = tail_aq({i}u, k0 + lane);\n"),
            };
        }
        // Row i of A at k0 + kk, in every lane.
        let value = |i: u32, kk: u32| match a_vec4 {
            false => format!("subgroupBroadcast(a{i}, {kk}u)"),
            true => format!("subgroupBroadcast(a{}.{}, {kk}u)", i / 4, LANES[i as usize % 4]),
        };
        for kk in 0..subgroup {
            body += &if tail {
                format!("    let b{kk} = tail_b(b_at, k0 + {kk}u);\n")
            } else {
                format!("    let b{kk} = vec4<f32>(b[b_at + {kk}u * (p.ldb / 4u)]);\n")
            };
            for i in 0..SUBGROUP_ROWS {
                body += &format!("    acc[{i}] = fma(vec4({}), b{kk}, acc[{i}]);\n", value(i, kk));
            }
        }
        let name = if tail { "multiply_tail" } else { "multiply_chunk" };
        functions += &format!("fn {name}(k0: u32, lane: u32, b_at: u32) {{\n{body}}}\n");
    }
    let mut stores = String::new();
    for i in 0..SUBGROUP_ROWS {
        stores += &format!(
            "    if (row0 + {i}u < p.m) {{ store_quad(base_c + (row0 + {i}u) * p.ldc, col, acc[{i}]); }}\n"
        );
    }
    functions + &format!("fn store_rows(base_c: u32, row0: u32, col: u32) {{\n{stores}}}\n")
}

/// Whether the subgroup kernel reads `op`'s A four rows at a time: A transposed (stored
/// [K, M], as a weight gradient's), with M, lda, offset and batch strides whole vec4s.
/// Untransposed A stays scalar: four values of k per lane would hold 4 · ROWS registers
/// of A through a chunk beside the accumulators, and measured 0.6× the scalar path.
pub fn subgroup_reads_a_as_vec4(op: &Matmul) -> bool {
    op.trans_a && op.m > 0 && in_vec4s(op, Operand::A, op.m)
}

/// Whether the subgroup kernel can read `op`'s B as it is stored: not transposed, and every
/// row a whole number of aligned vec4s. Otherwise it reads a repacked copy.
pub fn subgroup_reads_b_in_place(op: &Matmul) -> bool {
    !op.trans_b && in_vec4s(op, Operand::B, op.n)
}

#[derive(Clone, Copy)]
enum Operand {
    A,
    B,
}

/// Whether `operand` of `op` is addressed in whole vec4s: its row stride, offset and batch
/// strides, and `along`, the extent read four values at a time.
fn in_vec4s(op: &Matmul, operand: Operand, along: usize) -> bool {
    let [(a_rows, lda, _), (b_rows, ldb, _), _] = op.extents();
    let inner = op.inner.unwrap_or_default();
    let (ld, offset, stride, inner) = match operand {
        Operand::A => (lda, op.offset_a, op.stride_a.unwrap_or(a_rows * lda), inner.stride_a),
        Operand::B => (ldb, op.offset_b, op.stride_b.unwrap_or(b_rows * ldb), inner.stride_b),
    };
    [along, ld, offset, stride, inner].iter().all(|v| v % 4 == 0)
}

/// C = op(A)·op(B) with `epilogue` on subgroup broadcasts (CPU adapters; an error naming
/// the reason elsewhere). A transposed or unaligned B is first repacked into a workspace
/// (matmul_pack.wgsl), one more pass over B.
pub fn matmul_subgroup(
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: &Matmul,
    epilogue: Epilogue,
) -> Result<(), GpuError> {
    check_runnable(op, [a, b, c], &epilogue, "matmul_subgroup", subgroup_unavailable(rec.gpu))?;
    if subgroup_reads_b_in_place(op) {
        return subgroup_product(rec, a, b, c, op, epilogue);
    }
    let (packed, packed_op) = pack_b(rec, b, op)?;
    subgroup_product(rec, a, &packed, c, &packed_op, epilogue)
}

/// Whether matmul_pack.wgsl moves `op`'s B in 4 × 4 blocks (BLOCKS) where the subgroup
/// kernel repacks it: transposed, with K, ldb, offset and batch strides whole vec4s.
pub fn subgroup_packs_b_in_blocks(op: &Matmul) -> bool {
    op.trans_b && in_vec4s(op, Operand::B, op.k)
}

/// B repacked as matmul_pack.wgsl describes, and `op` reading it there.
fn pack_b(rec: &mut Recorder, b: &Tensor, op: &Matmul) -> Result<(Tensor, Matmul), GpuError> {
    let ldp = op.n.div_ceil(4) * 4;
    let matrix = op.k * ldp;
    let len = op.batch.max(1) * matrix;
    let packed = rec.gpu.workspace_class("matmul.packed_b", len.max(4))?;
    let blocks = subgroup_packs_b_in_blocks(op);
    let b_element = if blocks { "vec4<B_TYPE>" } else { "B_TYPE" };
    let defines = storage_aliases("matmul_pack", rec.gpu, &[("B_TYPE", b.dtype)])?
        + &format!(
            "alias B_ELEMENT = {b_element};\nconst TRANS_B: bool = {};\nconst BLOCKS: bool = {blocks};\n",
            op.trans_b
        );
    let params = op.params(&Epilogue::None)?;
    let items = len / 4 / if blocks { 4 } else { 1 };
    let groups = spread(rec.gpu, to_u32("matmul_pack", "packed vec4s", items)?.div_ceil(64));
    rec.dispatch(&MATMUL_PACK, &defines, &params, &[b, &packed], groups)?;
    let inner_count = op.inner_count();
    let packed_op = Matmul {
        trans_b: false,
        ldb: Some(ldp),
        offset_b: 0,
        stride_b: Some(inner_count * matrix),
        inner: op.inner.map(|inner| InnerBatch { stride_b: matrix, ..inner }),
        ..*op
    };
    Ok((packed, packed_op))
}

/// The subgroup kernel on a B it reads as vec4s.
fn subgroup_product(
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: &Matmul,
    epilogue: Epilogue,
) -> Result<(), GpuError> {
    op.check(a, b, c, &epilogue)?;
    let subgroup = rec.gpu.info.subgroup_min_size;
    let a_vec4 = subgroup_reads_a_as_vec4(op);
    let types = [("A_TYPE", a.dtype), ("B_TYPE", b.dtype), ("C_TYPE", c.dtype)];
    let a_element = if a_vec4 { "vec4<A_TYPE>" } else { "A_TYPE" };
    let defines = storage_aliases("matmul_subgroup", rec.gpu, &types)?
        + &format!(
            "alias A_ELEMENT = {a_element};\nalias B_ELEMENT = vec4<B_TYPE>;\nconst SUBGROUP: u32 = {subgroup}u;\n\
             const ROWS: u32 = {SUBGROUP_ROWS}u;\nconst TRANS_A: bool = {};\nconst A_VEC4: bool = {a_vec4};\n",
            op.trans_a
        )
        + &chunk_functions(subgroup, a_vec4);
    let params = op.params(&epilogue)?;
    let (bias, pre) = epilogue_buffers(a, c, &epilogue);
    let groups = [
        to_u32("matmul_subgroup", "column blocks", op.n.div_ceil(4 * subgroup as usize))?,
        to_u32("matmul_subgroup", "row blocks", op.m.div_ceil(SUBGROUP_ROWS as usize))?,
        params.batch,
    ];
    rec.dispatch(&MATMUL_SUBGROUP, &defines, &params, &[a, b, bias, c, pre], groups)
}

/// The shape class: transposes, whether f16 operands are allowed and the size bucket
/// (power of two) of each dimension.
fn shape_class(op: &Matmul) -> String {
    let bucket = |v: usize| v.max(1).next_power_of_two().trailing_zeros();
    format!(
        "matmul:ta{}:tb{}:m{}:n{}:k{}{}",
        op.trans_a as u8,
        op.trans_b as u8,
        bucket(op.m).min(9), // beyond 512 rows only the tile count changes
        bucket(op.n),
        bucket(op.k),
        if op.f16_operands { ":f16" } else { "" }
    )
}

/// The kernels the tuner measures for `op` on this adapter, the default first.
fn candidates(gpu: &Gpu, op: &Matmul) -> Vec<Kernel> {
    let mut kernels: Vec<Kernel> = usable_tiles(gpu).into_iter().map(Kernel::Tiled).collect();
    if op.f16_operands && coop_unavailable(gpu).is_none() {
        kernels.push(Kernel::Coop);
    }
    kernels
}

/// The kernel `matmul` runs `op` on: the CPU rule's tile, or on GPUs the one measured best
/// for its shape class (measured now, the first time a class is seen).
pub fn choose_kernel(gpu: &Gpu, op: &Matmul) -> Result<Kernel, GpuError> {
    if let Some(kernel) = cpu_rule(gpu, op) {
        return Ok(kernel);
    }
    let kernels = candidates(gpu, op);
    let Some(&default) = kernels.first() else {
        return Err(GpuError::Device { op: "matmul".into(), message: "no tile fits this adapter".into() });
    };
    let key = shape_class(op);
    let found = gpu.tune.get(&key).and_then(|name| Kernel::parse(&name));
    if let Some(kernel) = found.filter(|k| kernels.contains(k)) {
        return Ok(kernel);
    }
    if !tuning_enabled() || kernels.len() == 1 {
        return Ok(default);
    }
    let proxy = Proxy::new(gpu, op)?;
    let names: Vec<String> = kernels.iter().map(Kernel::name).collect();
    let chosen = gpu.tune.choose(&key, &names, |name| {
        let kernel = Kernel::parse(name).unwrap_or(default);
        proxy.seconds(gpu, kernel).unwrap_or(f64::INFINITY)
    });
    Ok(Kernel::parse(&chosen).unwrap_or(default))
}

/// A stand-in for a shape in its class: the same N and K, fewer rows and batches, so that
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
        // Small batched products (attention's, per head) keep enough of their batch to
        // give every tile its real number of workgroups.
        let batch = ((PROXY_FLOPS / (per_row * rows as f64)) as usize).clamp(1, op.batch.max(1));
        let proxy = Matmul {
            m: rows,
            n: op.n,
            k: op.k,
            batch,
            trans_a: op.trans_a,
            trans_b: op.trans_b,
            f16_operands: op.f16_operands,
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
    fn seconds(&self, gpu: &Gpu, kernel: Kernel) -> Result<f64, GpuError> {
        let run = || -> Result<f64, GpuError> {
            let started = Instant::now();
            let mut rec = gpu.recorder();
            let (a, b, c, op) = (&self.a, &self.b, &self.c, &self.op);
            matmul_with(&mut rec, a, b, c, op, Epilogue::None, kernel)?;
            rec.submit()?;
            gpu.wait()?;
            Ok(started.elapsed().as_secs_f64())
        };
        run()?;
        run()
    }
}
