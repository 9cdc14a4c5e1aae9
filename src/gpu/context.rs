//! Adapter choice and the device, with its pipeline cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Tensor;

/// Everything that can go wrong between the host and the GPU, each naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found{0}. On Linux without a GPU install Mesa's lavapipe \
         (apt-get install mesa-vulkan-drivers libvulkan1); check with `pals devices`"
    )]
    NoAdapter(String),
    #[error("adapter '{query}' not found; `pals devices` lists: {available}")]
    AdapterNotFound { query: String, available: String },
    #[error("unknown backend '{0}': use vulkan, metal, dx12 or gl")]
    UnknownBackend(String),
    #[error("requesting a device from '{adapter}' failed: {message}")]
    RequestDevice { adapter: String, message: String },
    #[error(
        "tensor '{name}' needs {bytes} bytes but the adapter allows at most {limit} bytes \
         per {what}"
    )]
    TooBig { name: String, bytes: u64, what: &'static str, limit: u64 },
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: String, detail: String },
    #[error("GPU error in {op}: {message}")]
    Device { op: String, message: String },
}

/// Which adapter to use: the best one, an index into `pals devices`, or a name substring.
#[derive(Clone, Debug, Default)]
pub struct AdapterChoice {
    /// Index or case-insensitive name substring; `None` picks the best adapter.
    pub adapter: Option<String>,
    /// vulkan, metal, dx12 or gl; `None` allows all.
    pub backend: Option<String>,
}

impl AdapterChoice {
    /// The choice from `PALS_ADAPTER` and `PALS_BACKEND`.
    pub fn from_env() -> Self {
        let nonempty = |key: &str| std::env::var(key).ok().filter(|v| !v.trim().is_empty());
        Self { adapter: nonempty("PALS_ADAPTER"), backend: nonempty("PALS_BACKEND") }
    }

    fn backends(&self) -> Result<wgpu::Backends, GpuError> {
        let Some(name) = &self.backend else {
            return Ok(wgpu::Backends::all());
        };
        match name.to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => Ok(wgpu::Backends::VULKAN),
            "metal" => Ok(wgpu::Backends::METAL),
            "dx12" | "d3d12" => Ok(wgpu::Backends::DX12),
            "gl" | "gles" | "opengl" => Ok(wgpu::Backends::GL),
            other => Err(GpuError::UnknownBackend(other.to_string())),
        }
    }
}

/// The optional features we use when the adapter has them.
pub const OPTIONAL_FEATURES: &[(wgpu::Features, &str)] = &[
    (wgpu::Features::SHADER_F16, "shader-f16"),
    (wgpu::Features::SUBGROUP, "subgroup"),
    (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
    (wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES, "timestamp-inside-passes"),
    (wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX, "cooperative-matrix"),
];

/// One line per cooperative-matrix configuration the adapter reports (M×N×K, A/B and C
/// types), for `pals devices`; "none" when it has none (e.g. lavapipe).
pub fn cooperative_matrix_summary(adapter: &wgpu::Adapter) -> String {
    let configs = adapter.cooperative_matrix_properties();
    if configs.is_empty() {
        return "none".into();
    }
    let each: Vec<String> = configs
        .iter()
        .map(|c| format!("{}x{}x{} {:?}->{:?}", c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type))
        .collect();
    each.join(", ")
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle())
}

/// Discrete before integrated before virtual before CPU.
fn type_rank(kind: wgpu::DeviceType) -> u32 {
    match kind {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Every adapter, best first (the order `pals devices` shows and indices refer to).
pub fn list_adapters(backend: Option<&str>) -> Result<Vec<wgpu::Adapter>, GpuError> {
    let choice = AdapterChoice { adapter: None, backend: backend.map(str::to_string) };
    let mut adapters = pollster::block_on(instance().enumerate_adapters(choice.backends()?));
    // Stable sort: among equals, keep the backend order wgpu reports (Vulkan first).
    adapters.sort_by_key(|a| type_rank(a.get_info().device_type));
    Ok(adapters)
}

fn pick_adapter(choice: &AdapterChoice) -> Result<wgpu::Adapter, GpuError> {
    let mut adapters = list_adapters(choice.backend.as_deref())?;
    if adapters.is_empty() {
        let backend = choice.backend.as_ref().map(|b| format!(" for backend {b}"));
        return Err(GpuError::NoAdapter(backend.unwrap_or_default()));
    }
    let Some(query) = &choice.adapter else {
        let best = adapters.remove(0);
        if choice.backend.is_none() {
            warn_if_gl(&best.get_info());
        }
        return Ok(best);
    };
    let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
    let found = match query.trim().parse::<usize>() {
        Ok(index) => (index < adapters.len()).then_some(index),
        Err(_) => {
            let lower = query.to_lowercase();
            names.iter().position(|n| n.to_lowercase().contains(&lower))
        }
    };
    match found {
        Some(index) => Ok(adapters.remove(index)),
        None => Err(GpuError::AdapterNotFound {
            query: query.clone(),
            available: names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("[{i}] {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// wgpu falls back to OpenGL when no Vulkan, Metal or DX12 driver is found; our kernels
/// crawl there, so a user who did not ask for it should know why, and what to install.
fn warn_if_gl(info: &wgpu::AdapterInfo) {
    if info.backend == wgpu::Backend::Gl {
        eprintln!(
            "pals: warning: the only adapter found is OpenGL ('{}'): no Vulkan, Metal or DX12 \
             driver was found, and training will be very slow. On Linux install a Vulkan driver \
             (scripts/setup.sh does), or pass --backend gl to use OpenGL without this warning.",
            info.name
        );
    }
}

type PipelineKey = (&'static str, String);

/// A device and queue, the adapter's limits, and the cache of compiled pipelines.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// Cooperative-matrix configurations (empty unless the feature is enabled).
    pub cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    pub(crate) pipelines: Mutex<HashMap<PipelineKey, Arc<CachedPipeline>>>,
    /// Measured kernel choices for this adapter and driver.
    pub tune: super::TuneCache,
    /// The uniform buffer holding every dispatch's parameters, reused by each submit and
    /// recreated (larger) only when a submit needs more, with the cached bind groups.
    pub(crate) params: Mutex<super::recorder::ParamsSlot>,
    /// Small idle staging buffers (readback, timestamps), unmapped, found again by usage
    /// and size: see `take_buffer`.
    spare: Mutex<Vec<wgpu::Buffer>>,
    /// Scratch tensors kernels keep between calls (attention's score matrices), by name:
    /// see `workspace`.
    workspaces: Mutex<HashMap<(&'static str, usize), Tensor>>,
    counters: Counters,
    /// Whether trusted kernels keep naga's runtime bounds checks too (`PALS_SHADER_CHECKS=on`;
    /// `pals bench` switches it to measure what they cost).
    shader_checks: AtomicBool,
}

/// What the runtime did since the device opened, for `pals bench`.
#[derive(Default)]
struct Counters {
    buffers: AtomicU64,
    bytes: AtomicU64,
    submits: AtomicU64,
    bind_groups: AtomicU64,
    /// Host time the recorder spent encoding and submitting.
    encoding_nanos: AtomicU64,
}

/// Staging buffers up to this size are kept for reuse (losses, logits, timestamps); larger
/// ones (whole weight downloads) are dropped so the cache never holds much memory.
const SPARE_MAX_BYTES: u64 = 1 << 20;
/// At most this many idle buffers are kept; the oldest goes first.
const SPARE_MAX_COUNT: usize = 16;

pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

impl Gpu {
    /// Opens the chosen adapter with its own limits and the optional features it has.
    pub fn new(choice: &AdapterChoice) -> Result<Gpu, GpuError> {
        let adapter = pick_adapter(choice)?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let wanted = OPTIONAL_FEATURES.iter().fold(wgpu::Features::empty(), |f, (x, _)| f | *x);
        let features = adapter.features() & wanted;
        let cooperative = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        let cooperative_matrix =
            if cooperative { adapter.cooperative_matrix_properties() } else { Vec::new() };
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("pals"),
            required_features: features,
            required_limits: limits.clone(),
            // SAFETY: wgpu asks for this opt-in before it grants any EXPERIMENTAL_ feature.
            // The only one we request is the cooperative matrix, used solely by
            // matmul_coop.wgsl on configurations the adapter lists (see kernels::matmul).
            experimental_features: if cooperative {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&descriptor))
            .map_err(|e| GpuError::RequestDevice { adapter: info.name.clone(), message: e.to_string() })?;
        let identity = format!("{}-{:?}-{}-{}", info.name, info.backend, info.driver, info.driver_info);
        let tune = super::TuneCache::open(&identity);
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            cooperative_matrix,
            pipelines: Mutex::new(HashMap::new()),
            tune,
            params: Mutex::new(Default::default()),
            spare: Mutex::new(Vec::new()),
            workspaces: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            shader_checks: AtomicBool::new(std::env::var("PALS_SHADER_CHECKS").is_ok_and(|v| v == "on")),
        })
    }

    /// Whether kernels built from now on keep naga's runtime bounds checks even where they
    /// are trusted (`KernelSpec::trusted`) to bound their own indices.
    pub fn shader_checks(&self) -> bool {
        self.shader_checks.load(Ordering::Relaxed)
    }

    pub fn set_shader_checks(&self, on: bool) {
        self.shader_checks.store(on, Ordering::Relaxed);
    }

    /// The adapter chosen by `PALS_ADAPTER` / `PALS_BACKEND`, else the best one.
    pub fn from_env() -> Result<Gpu, GpuError> {
        Gpu::new(&AdapterChoice::from_env())
    }

    /// One line naming the adapter, for logs and benchmark reports.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, {} {})",
            self.info.name, self.info.backend, self.info.device_type, self.info.driver, self.info.driver_info
        )
    }

    pub fn has(&self, feature: wgpu::Features) -> bool {
        self.features.contains(feature)
    }

    /// Largest storage binding one tensor may have on this adapter.
    pub fn max_tensor_bytes(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// Waits until all submitted work is done.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::Device { op: "wait".into(), message: e.to_string() })
    }

    /// Creates a wgpu buffer, counted: every buffer the runtime makes goes through here.
    pub(crate) fn create_buffer(&self, descriptor: &wgpu::BufferDescriptor) -> wgpu::Buffer {
        self.counters.buffers.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(descriptor.size, Ordering::Relaxed);
        self.device.create_buffer(descriptor)
    }

    /// Creates a bind group, counted: the recorder caches them, so warm steps make none.
    pub(crate) fn create_bind_group(&self, descriptor: &wgpu::BindGroupDescriptor) -> wgpu::BindGroup {
        self.counters.bind_groups.fetch_add(1, Ordering::Relaxed);
        self.device.create_bind_group(descriptor)
    }

    pub(crate) fn count_encoding(&self, spent: std::time::Duration) {
        self.counters.encoding_nanos.fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Submits command buffers, counted.
    pub(crate) fn submit(
        &self,
        commands: impl IntoIterator<Item = wgpu::CommandBuffer>,
    ) -> wgpu::SubmissionIndex {
        self.counters.submits.fetch_add(1, Ordering::Relaxed);
        self.queue.submit(commands)
    }

    /// wgpu buffers created so far (tensors, dispatch parameters, staging): subtract two
    /// readings to see what a piece of work allocated.
    pub fn buffers_created(&self) -> u64 {
        self.counters.buffers.load(Ordering::Relaxed)
    }

    /// Bytes of the buffers created so far (buffers freed since are not subtracted).
    pub fn bytes_created(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }

    /// Bind groups created so far.
    pub fn bind_groups_created(&self) -> u64 {
        self.counters.bind_groups.load(Ordering::Relaxed)
    }

    /// Host seconds the recorder has spent encoding command buffers and submitting them
    /// (the rest of a step's host time is recording: the kernels' checks and dispatches).
    pub fn encoding_seconds(&self) -> f64 {
        self.counters.encoding_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Queue submits so far.
    pub fn submits(&self) -> u64 {
        self.counters.submits.load(Ordering::Relaxed)
    }

    /// An unmapped buffer of exactly `size` bytes and `usage`: a cached one when there is
    /// one, else a new one. Hand it back with `give_back` once it is unmapped again.
    pub(crate) fn take_buffer(&self, label: &str, usage: wgpu::BufferUsages, size: u64) -> wgpu::Buffer {
        let mut spare = self.spare.lock().unwrap();
        if let Some(index) = spare.iter().position(|b| b.usage() == usage && b.size() == size) {
            return spare.remove(index);
        }
        drop(spare);
        self.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Keeps a small buffer from `take_buffer` for the next caller. Only give back an
    /// unmapped buffer (a mapped one cannot be copied into): callers unmap first and, on
    /// an error half-way, drop the buffer instead.
    pub(crate) fn give_back(&self, buffer: wgpu::Buffer) {
        if buffer.size() > SPARE_MAX_BYTES {
            return;
        }
        let mut spare = self.spare.lock().unwrap();
        if spare.len() == SPARE_MAX_COUNT {
            spare.remove(0);
        }
        spare.push(buffer);
    }

    /// The workspace `name` with room for `len` f32 elements, viewed as `len` long: the one
    /// kept from an earlier call when it is large enough, else a new one that replaces it.
    /// Work recorded earlier still holds the old buffer; dispatches on the same workspace
    /// run in recording order, so kernels that reuse one in turn need no more.
    pub fn workspace(&self, name: &'static str, len: usize) -> Result<Tensor, GpuError> {
        let mut workspaces = self.workspaces.lock().unwrap();
        if let Some(kept) = workspaces.get(&(name, 0))
            && kept.len() >= len
        {
            return Ok(kept.view(&[len]));
        }
        let fresh = self.zeros(name, &[len])?;
        workspaces.insert((name, 0), fresh.clone());
        Ok(fresh)
    }

    /// Like `workspace`, but one buffer per power-of-two size class of `name`, never
    /// replaced: a product always gets the same buffer, so the bind groups of a first step
    /// serve every later one (a workspace that grew would be a new buffer, and its bind
    /// groups new ones, in the second step).
    pub fn workspace_class(&self, name: &'static str, len: usize) -> Result<Tensor, GpuError> {
        let class = len.max(1).next_power_of_two();
        let mut workspaces = self.workspaces.lock().unwrap();
        if let Some(kept) = workspaces.get(&(name, class)) {
            return Ok(kept.view(&[len]));
        }
        let fresh = self.zeros(name, &[class])?;
        workspaces.insert((name, class), fresh.clone());
        Ok(fresh.view(&[len]))
    }
}
