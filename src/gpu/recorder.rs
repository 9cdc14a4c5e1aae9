//! The recorder: kernels append dispatches; `submit` encodes them all into one compute
//! pass, writes every dispatch's parameters with one upload into the device's reused
//! parameter buffer, and submits once.
//!
//! Bind groups are cached across submits, keyed by pipeline and bound buffers: a training
//! step binds the same buffers every time, so warm steps create none. The parameter block
//! is bound with a dynamic offset, which keeps each dispatch's place in the parameter
//! buffer out of the key.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::context::CachedPipeline;
use super::{Gpu, GpuError, Tensor};

/// How a kernel uses one of its storage bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    Read,
    Write,
}

/// A WGSL kernel: binding 0 is its uniform parameter block, bindings 1.. are storage
/// buffers in the order of `bindings`.
pub struct KernelSpec {
    pub name: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [Binding],
    /// The kernel checks every index itself (against sizes the host has checked), so its
    /// module is built without naga's runtime bounds checks where the device allows it
    /// (`Gpu::shader_checks` off). Only for kernels the reference tests cover at shapes
    /// that are not tile multiples.
    pub trusted: bool,
}

/// GPU time of one dispatch, from timestamp queries.
#[derive(Clone, Debug)]
pub struct Timing {
    pub label: &'static str,
    pub nanos: f64,
}

struct Dispatch {
    label: &'static str,
    pipeline: Arc<CachedPipeline>,
    buffers: Vec<Arc<wgpu::Buffer>>,
    params_offset: u64,
    params_size: u64,
    groups: [u32; 3],
}

/// A buffer-to-buffer copy between dispatches; it ends the compute pass before it.
struct BufferCopy {
    source: Arc<wgpu::Buffer>,
    source_offset: u64,
    target: Arc<wgpu::Buffer>,
    target_offset: u64,
    bytes: u64,
}

enum Command {
    Dispatch(Dispatch),
    Copy(BufferCopy),
}

pub struct Recorder<'g> {
    pub gpu: &'g Gpu,
    commands: Vec<Command>,
    dispatches: usize,
    params: Vec<u8>,
    /// What dispatches are labelled instead of their kernel's name (`labelled`).
    label: Option<&'static str>,
    /// Mixed precision: every product may round f32 operands to f16 (`round_products_to_f16`).
    f16_products: bool,
}

/// A bind group is found again by its pipeline, its parameter block's size and the
/// addresses of its buffers' `Arc`s (the entry holds a `Weak` of each, which keeps the
/// address from being reused while the entry lives).
#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    pipeline: usize,
    params_size: u64,
    buffers: Vec<usize>,
}

struct CachedBindGroup {
    group: wgpu::BindGroup,
    /// Keeps the key's addresses valid; an entry with a buffer whose tensors are all gone
    /// can never be used again and is dropped (`ParamsSlot::sweep`).
    buffers: Vec<Weak<wgpu::Buffer>>,
    _pipeline: Arc<CachedPipeline>,
}

/// The parameter buffer every submit reuses, and the bind groups that bind it: both
/// under one lock, because growing the buffer invalidates every cached bind group.
#[derive(Default)]
pub(crate) struct ParamsSlot {
    buffer: Option<wgpu::Buffer>,
    bind_groups: HashMap<BindKey, CachedBindGroup>,
}

impl ParamsSlot {
    /// The parameter buffer, at least `needed` bytes.
    fn buffer(&mut self, gpu: &Gpu, needed: u64) -> &wgpu::Buffer {
        if self.buffer.as_ref().is_none_or(|b| b.size() < needed) {
            self.bind_groups.clear();
            // Grow in powers of two so a slowly growing step recreates it only a few times.
            self.buffer = Some(gpu.create_buffer(&wgpu::BufferDescriptor {
                label: Some("dispatch params"),
                size: needed.next_power_of_two(),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        self.buffer.as_ref().expect("made above")
    }

    /// Drops the bind groups of buffers whose tensors are gone.
    fn sweep(&mut self) {
        self.bind_groups.retain(|_, entry| entry.buffers.iter().all(|b| b.strong_count() > 0));
    }

    /// The cached bind group for `dispatch`, made on first use.
    fn bind_group(&mut self, gpu: &Gpu, dispatch: &Dispatch) -> &wgpu::BindGroup {
        let key = BindKey {
            pipeline: Arc::as_ptr(&dispatch.pipeline) as usize,
            params_size: dispatch.params_size,
            buffers: dispatch.buffers.iter().map(|b| Arc::as_ptr(b) as usize).collect(),
        };
        let params = self.buffer.as_ref().expect("the params buffer exists before binding");
        let entry = self.bind_groups.entry(key).or_insert_with(|| CachedBindGroup {
            group: create_bind_group(gpu, params, dispatch),
            buffers: dispatch.buffers.iter().map(Arc::downgrade).collect(),
            _pipeline: dispatch.pipeline.clone(),
        });
        &entry.group
    }
}

impl Gpu {
    /// Pipelines compiled so far (each kernel variant once).
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    /// The compiled pipeline for a kernel; `defines` (WGSL `const` lines) select a variant.
    pub(crate) fn pipeline(&self, spec: &KernelSpec, defines: &str) -> Result<Arc<CachedPipeline>, GpuError> {
        let trusted = spec.trusted && !self.shader_checks();
        let key = (spec.name, format!("{}:{trusted}:{defines}", spec.entry));
        if let Some(found) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(found.clone());
        }
        let compiled = Arc::new(self.compile(spec, defines, trusted)?);
        self.pipelines.lock().unwrap().insert(key, compiled.clone());
        Ok(compiled)
    }

    fn compile(&self, spec: &KernelSpec, defines: &str, trusted: bool) -> Result<CachedPipeline, GpuError> {
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: None,
            },
            count: None,
        }];
        for (index, access) in spec.bindings.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: index as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: *access == Binding::Read },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        // Validation errors become our errors instead of wgpu's default panic.
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let source = format!("{defines}\n{}", spec.source);
        let descriptor = wgpu::ShaderModuleDescriptor {
            label: Some(spec.name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let module = if trusted {
            // SAFETY: a trusted kernel bounds every buffer index by sizes the host checked
            // against the bound tensors (KernelSpec::trusted), and its loops are bounded.
            unsafe {
                self.device.create_shader_module_trusted(descriptor, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            self.device.create_shader_module(descriptor)
        };
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(spec.name),
            entries: &entries,
        });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(spec.name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(spec.name),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(spec.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(error) = pollster::block_on(scope.pop()) {
            let op = format!("compiling kernel {}::{}", spec.name, spec.entry);
            return Err(GpuError::Device { op, message: error.to_string() });
        }
        Ok(CachedPipeline { pipeline, layout })
    }

    /// Bind groups the recorder holds for reuse (entries of dropped tensors go at the
    /// next submit).
    pub fn bind_groups_cached(&self) -> usize {
        self.params.lock().unwrap().bind_groups.len()
    }

    pub fn recorder(&self) -> Recorder<'_> {
        Recorder {
            gpu: self,
            commands: Vec::new(),
            dispatches: 0,
            params: Vec::new(),
            label: None,
            f16_products: false,
        }
    }
}

/// Splits `workgroups` over x and y so that no dimension exceeds the adapter's limit;
/// kernels rebuild the linear index as `wid.x + wid.y * num_workgroups.x`.
pub fn spread(gpu: &Gpu, workgroups: u32) -> [u32; 3] {
    let max = gpu.limits.max_compute_workgroups_per_dimension.max(1);
    if workgroups <= max {
        return [workgroups.max(1), 1, 1];
    }
    let rows = workgroups.div_ceil(max);
    [workgroups.div_ceil(rows), rows, 1]
}

impl Recorder<'_> {
    /// Lets every product recorded from now on round f32 operands to f16 (f32 sums), as
    /// PyTorch's AMP autocast does for all its matmuls: where the adapter has cooperative
    /// matrices, the tuner then also measures them for the products whose operands are
    /// stored f32 (task modules, the pooler). Mixed precision's steps turn it on.
    pub fn round_products_to_f16(&mut self, on: bool) {
        self.f16_products = on;
    }

    pub fn rounds_products_to_f16(&self) -> bool {
        self.f16_products
    }

    /// Runs `record` with every dispatch it appends timed under `label` instead of its
    /// kernel's name: the unfused attention's products are attention's time, not matmul's.
    pub fn labelled<T>(&mut self, label: &'static str, record: impl FnOnce(&mut Self) -> T) -> T {
        let outer = self.label.replace(label);
        let result = record(self);
        self.label = outer;
        result
    }

    /// Appends one dispatch of `spec` over `tensors` (in binding order) with `params`.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        spec: &KernelSpec,
        defines: &str,
        params: &P,
        tensors: &[&Tensor],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        if tensors.len() != spec.bindings.len() {
            return Err(GpuError::Shape {
                op: spec.name.into(),
                detail: format!("kernel takes {} buffers, got {}", spec.bindings.len(), tensors.len()),
            });
        }
        let max = self.gpu.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(GpuError::Shape {
                op: spec.name.into(),
                detail: format!("dispatch {groups:?} exceeds {max} workgroups per dimension"),
            });
        }
        if groups.contains(&0) {
            return Ok(()); // nothing to compute
        }
        let pipeline = self.gpu.pipeline(spec, defines)?;
        let align = self.gpu.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let params_offset = self.params.len().div_ceil(align) * align;
        if params_offset > u32::MAX as usize {
            let detail = format!("over {} bytes of dispatch parameters in one submit", u32::MAX);
            return Err(GpuError::Shape { op: spec.name.into(), detail });
        }
        let bytes = bytemuck::bytes_of(params);
        self.params.resize(params_offset, 0);
        self.params.extend_from_slice(bytes);
        // Uniform blocks are sized in multiples of 16 bytes.
        let params_size = bytes.len().div_ceil(16).max(1) * 16;
        self.params.resize(params_offset + params_size, 0);
        self.commands.push(Command::Dispatch(Dispatch {
            label: self.label.unwrap_or(spec.name),
            pipeline,
            buffers: tensors.iter().map(|t| t.buffer.clone()).collect(),
            params_offset: params_offset as u64,
            params_size: params_size as u64,
            groups,
        }));
        self.dispatches += 1;
        Ok(())
    }

    /// Appends a copy of `count` elements from `source[source_at..]` to `target[target_at..]`,
    /// ordered after the dispatches before it and before those after it. Both tensors hold
    /// the same element type; offsets and length are whole 4-byte words (any f32 range).
    pub fn copy(
        &mut self,
        source: &Tensor,
        source_at: usize,
        target: &Tensor,
        target_at: usize,
        count: usize,
    ) -> Result<(), GpuError> {
        let error = |detail: String| Err(GpuError::Shape { op: "copy".into(), detail });
        let what = format!(
            "{count} elements from '{}' at {source_at} to '{}' at {target_at}",
            source.name, target.name
        );
        let fits = |t: &Tensor, at: usize| at.checked_add(count).is_some_and(|end| end <= t.len());
        if !fits(source, source_at) || !fits(target, target_at) {
            return error(format!("{what} run past an end ({} and {} elements)", source.len(), target.len()));
        }
        if source.dtype != target.dtype {
            return error(format!("{what}: {:?} into {:?}", source.dtype, target.dtype));
        }
        if Arc::ptr_eq(&source.buffer, &target.buffer) {
            return error(format!("{what}: one buffer"));
        }
        let size = source.dtype.size();
        let (source_offset, target_offset, bytes) = (size * source_at, size * target_at, size * count);
        if (source_offset | target_offset | bytes) % 4 != 0 {
            return error(format!("{what}: offsets and length must be whole 4-byte words"));
        }
        if count > 0 {
            self.commands.push(Command::Copy(BufferCopy {
                source: source.buffer.clone(),
                source_offset: source_offset as u64,
                target: target.buffer.clone(),
                target_offset: target_offset as u64,
                bytes: bytes as u64,
            }));
        }
        Ok(())
    }

    /// Dispatches recorded so far (copies not counted).
    pub fn len(&self) -> usize {
        self.dispatches
    }

    pub fn is_empty(&self) -> bool {
        self.dispatches == 0
    }

    /// Encodes every dispatch into one pass (one per run of dispatches between copies) and
    /// submits once.
    pub fn submit(self) -> Result<(), GpuError> {
        self.encode_and_submit(false).map(|_| ())
    }

    /// Like `submit`, then waits and returns each dispatch's GPU time. Needs
    /// TIMESTAMP_QUERY_INSIDE_PASSES; without it the list is empty.
    pub fn submit_timed(self) -> Result<Vec<Timing>, GpuError> {
        self.encode_and_submit(true)
    }

    /// Runs of consecutive dispatches: each becomes one compute pass.
    fn passes(&self) -> u32 {
        let mut passes = 0;
        let mut in_pass = false;
        for command in &self.commands {
            let dispatch = matches!(command, Command::Dispatch(_));
            passes += (dispatch && !in_pass) as u32;
            in_pass = dispatch;
        }
        passes
    }

    fn encode_and_submit(self, timed: bool) -> Result<Vec<Timing>, GpuError> {
        self.encode_and_submit_indexed(timed).map(|(timings, _)| timings)
    }

    /// Indices into `tensors`, ordered by the last command that binds or copies each (those
    /// no command uses first): the order in which the recorded work finishes with them.
    pub fn finish_order(&self, tensors: &[&Tensor]) -> Vec<usize> {
        let last = self.last_uses();
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| last.get(&Arc::as_ptr(&tensors[i].buffer)).map_or(0, |&at| at + 1));
        order
    }

    /// Per buffer, the index of the last command that binds or copies it.
    fn last_uses(&self) -> HashMap<*const wgpu::Buffer, usize> {
        let mut last = HashMap::new();
        for (at, command) in self.commands.iter().enumerate() {
            let buffers: Vec<&Arc<wgpu::Buffer>> = match command {
                Command::Dispatch(d) => d.buffers.iter().collect(),
                Command::Copy(c) => vec![&c.source, &c.target],
            };
            for buffer in buffers {
                last.insert(Arc::as_ptr(buffer), at);
            }
        }
        last
    }

    /// Submits the recording in parts so that the host can read each group of f32 tensors
    /// as soon as the GPU is done with it, while the GPU runs the rest: the part for group
    /// k ends after the last command using any of its tensors (groups taken in that order)
    /// and copies them, packed, into a readback buffer. One `Readback` per group, in order.
    pub fn submit_in_parts(self, groups: &[Vec<&Tensor>]) -> Result<Vec<Readback>, GpuError> {
        let mut readbacks: Vec<Option<Readback>> = (0..groups.len()).map(|_| None).collect();
        self.submit_parts_with(groups, &mut |g, readback| readbacks[g] = Some(readback))?;
        Ok(readbacks.into_iter().flatten().collect())
    }

    /// `submit_in_parts`, handing each group's `Readback` (its index, the readback) to
    /// `submitted` as soon as its part is submitted: another thread can read and reduce
    /// it while this one submits the rest (which matters where a submit runs the work
    /// before it returns, as on lavapipe).
    pub fn submit_parts_with(
        mut self,
        groups: &[Vec<&Tensor>],
        submitted: &mut dyn FnMut(usize, Readback),
    ) -> Result<(), GpuError> {
        let last = self.last_uses();
        let end = |group: &Vec<&Tensor>| {
            group
                .iter()
                .filter_map(|t| last.get(&Arc::as_ptr(&t.buffer)))
                .map(|&at| at + 1)
                .max()
                .unwrap_or(0)
        };
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&g| end(&groups[g]));
        let mut rest = std::mem::take(&mut self.commands);
        let mut done = 0; // commands of `rest` submitted (drained) so far
        for g in order {
            let mut part: Vec<Command> = rest.drain(..end(&groups[g]).saturating_sub(done)).collect();
            done += part.len();
            let bytes: u64 = groups[g].iter().map(|t| t.bytes()).sum();
            let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
            let buffer = Arc::new(self.gpu.take_buffer("readback", usage, bytes.max(4)));
            let mut at = 0;
            for tensor in &groups[g] {
                let copy = BufferCopy {
                    source: tensor.buffer.clone(),
                    source_offset: 0,
                    target: buffer.clone(),
                    target_offset: at,
                    bytes: tensor.bytes(),
                };
                part.push(Command::Copy(copy));
                at += tensor.bytes();
            }
            let (_, index) = self.part(part).encode_and_submit_indexed(false)?;
            submitted(g, Readback::new(buffer, bytes, index));
        }
        self.part(rest).encode_and_submit_indexed(false)?;
        Ok(())
    }

    /// A recorder of some of this one's commands, with its whole parameter block (whose
    /// offsets they hold).
    fn part(&self, commands: Vec<Command>) -> Recorder<'_> {
        let dispatches = commands.iter().filter(|c| matches!(c, Command::Dispatch(_))).count();
        let params = self.params.clone();
        Recorder { gpu: self.gpu, commands, dispatches, params, label: None, f16_products: self.f16_products }
    }

    fn encode_and_submit_indexed(
        self,
        timed: bool,
    ) -> Result<(Vec<Timing>, Option<wgpu::SubmissionIndex>), GpuError> {
        if self.commands.is_empty() {
            return Ok((Vec::new(), None));
        }
        let started = Instant::now();
        let gpu = self.gpu;
        let timed =
            timed && gpu.has(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
        // One params buffer serves every submit. Rewriting it for this submit while an
        // earlier one may still be running is safe: queue.write_buffer is ordered with
        // submits on the queue (it lands after all work submitted before it and before the
        // next submit), and the lock keeps each write and its submit together.
        let mut slot = gpu.params.lock().unwrap();
        slot.sweep();
        let params = slot.buffer(gpu, self.params.len() as u64).clone();
        gpu.queue.write_buffer(&params, 0, &self.params);
        // A timestamp opens each pass and follows each dispatch.
        let queries = timed.then(|| Queries::new(gpu, self.dispatches as u32 + self.passes()));
        let mut spans = Vec::new(); // (label, timestamp before, timestamp after)

        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let mut commands = self.commands.iter().peekable();
        let mut next_query = 0;
        while commands.peek().is_some() {
            while let Some(Command::Copy(c)) = commands.next_if(|c| matches!(c, Command::Copy(_))) {
                encoder.copy_buffer_to_buffer(
                    &c.source,
                    c.source_offset,
                    &c.target,
                    c.target_offset,
                    c.bytes,
                );
            }
            if commands.peek().is_none() {
                break;
            }
            let mut pass = encoder.begin_compute_pass(&Default::default());
            if let Some(q) = &queries {
                pass.write_timestamp(&q.set, next_query);
                next_query += 1;
            }
            while let Some(Command::Dispatch(d)) = commands.next_if(|c| matches!(c, Command::Dispatch(_))) {
                pass.set_pipeline(&d.pipeline.pipeline);
                pass.set_bind_group(0, slot.bind_group(gpu, d), &[d.params_offset as u32]);
                let [x, y, z] = d.groups;
                pass.dispatch_workgroups(x, y, z);
                if let Some(q) = &queries {
                    pass.write_timestamp(&q.set, next_query);
                    spans.push((d.label, next_query as usize - 1, next_query as usize));
                    next_query += 1;
                }
            }
        }
        if let Some(q) = &queries {
            q.resolve(&mut encoder);
        }
        let index = gpu.submit([encoder.finish()]);
        drop(slot);
        gpu.count_encoding(started.elapsed());
        let timings = match queries {
            None => Vec::new(),
            Some(q) => {
                let ticks = q.read(gpu)?;
                let period = gpu.queue.get_timestamp_period() as f64;
                let nanos =
                    |start: usize, end: usize| ticks[end].saturating_sub(ticks[start]) as f64 * period;
                spans
                    .into_iter()
                    .map(|(label, start, end)| Timing { label, nanos: nanos(start, end) })
                    .collect()
            }
        };
        Ok((timings, Some(index)))
    }
}

/// One group of tensors of `Recorder::submit_in_parts`, on its way back to the host.
pub struct Readback {
    buffer: Arc<wgpu::Buffer>,
    bytes: u64,
    index: wgpu::SubmissionIndex,
    /// Set (from wgpu's callback) once the part that fills the buffer has run.
    done: Arc<std::sync::atomic::AtomicBool>,
    mapped: std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
}

impl Readback {
    fn new(buffer: Arc<wgpu::Buffer>, bytes: u64, index: Option<wgpu::SubmissionIndex>) -> Readback {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sender, mapped) = std::sync::mpsc::channel();
        let flag = done.clone();
        buffer.slice(..).map_async(wgpu::MapMode::Read, move |result| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = sender.send(result);
        });
        let index = index.expect("a part with a copy is submitted");
        Readback { buffer, bytes, index, done, mapped }
    }

    /// Whether the part that fills it has run, without waiting.
    pub fn is_ready(&self, gpu: &Gpu) -> bool {
        let _ = gpu.device.poll(wgpu::PollType::Poll);
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits for the part that fills it (not for the parts after) and returns its floats.
    pub fn wait(self, gpu: &Gpu) -> Result<Vec<f32>, GpuError> {
        let error = |message: String| GpuError::Device { op: "reading back gradients".into(), message };
        let wait = wgpu::PollType::Wait { submission_index: Some(self.index.clone()), timeout: None };
        gpu.device.poll(wait).map_err(|e| error(e.to_string()))?;
        self.mapped.recv().map_err(|e| error(e.to_string()))?.map_err(|e| error(e.to_string()))?;
        let slice = self.buffer.slice(..);
        let view = slice.get_mapped_range().map_err(|e| error(e.to_string()))?;
        let out = bytemuck::cast_slice::<u8, f32>(&view[..self.bytes as usize]).to_vec();
        drop(view);
        self.buffer.unmap();
        if let Ok(buffer) = Arc::try_unwrap(self.buffer) {
            gpu.give_back(buffer);
        }
        Ok(out)
    }
}

fn create_bind_group(gpu: &Gpu, params: &wgpu::Buffer, dispatch: &Dispatch) -> wgpu::BindGroup {
    // Offset 0 here; each dispatch's own offset is the dynamic offset given when binding.
    let mut entries = vec![wgpu::BindGroupEntry {
        binding: 0,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: params,
            offset: 0,
            size: wgpu::BufferSize::new(dispatch.params_size),
        }),
    }];
    for (index, buffer) in dispatch.buffers.iter().enumerate() {
        entries
            .push(wgpu::BindGroupEntry { binding: index as u32 + 1, resource: buffer.as_entire_binding() });
    }
    gpu.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(dispatch.label),
        layout: &dispatch.pipeline.layout,
        entries: &entries,
    })
}

struct Queries {
    set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    staging: wgpu::Buffer,
    count: u32,
}

impl Queries {
    fn new(gpu: &Gpu, count: u32) -> Queries {
        let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let size = 8 * count as u64;
        let resolve = wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC;
        let resolved = gpu.take_buffer("timestamps resolved", resolve, size);
        let readback = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let staging = gpu.take_buffer("timestamps readback", readback, size);
        Queries { set, resolved, staging, count }
    }

    fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.set, 0..self.count, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.staging, 0, 8 * self.count as u64);
    }

    /// The ticks; the buffers go back to the cache for the next timed submit.
    fn read(self, gpu: &Gpu) -> Result<Vec<u64>, GpuError> {
        let slice = self.staging.slice(..);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        gpu.wait()?;
        let view = slice
            .get_mapped_range()
            .map_err(|e| GpuError::Device { op: "reading timestamps".into(), message: e.to_string() })?;
        let ticks = bytemuck::cast_slice::<u8, u64>(&view).to_vec();
        drop(view);
        self.staging.unmap();
        gpu.give_back(self.staging);
        gpu.give_back(self.resolved);
        Ok(ticks)
    }
}
