//! The recorder: kernels append dispatches; `submit` encodes them all into one compute
//! pass, writes every dispatch's parameters with one upload into the device's reused
//! parameter buffer, and submits once.

use std::sync::Arc;

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

pub struct Recorder<'g> {
    pub gpu: &'g Gpu,
    dispatches: Vec<Dispatch>,
    params: Vec<u8>,
}

impl Gpu {
    /// The compiled pipeline for a kernel; `defines` (WGSL `const` lines) select a variant.
    pub(crate) fn pipeline(&self, spec: &KernelSpec, defines: &str) -> Result<Arc<CachedPipeline>, GpuError> {
        let key = (spec.name, format!("{}:{defines}", spec.entry));
        if let Some(found) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(found.clone());
        }
        let compiled = Arc::new(self.compile(spec, defines)?);
        self.pipelines.lock().unwrap().insert(key, compiled.clone());
        Ok(compiled)
    }

    fn compile(&self, spec: &KernelSpec, defines: &str) -> Result<CachedPipeline, GpuError> {
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
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
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(spec.name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
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

    pub fn recorder(&self) -> Recorder<'_> {
        Recorder { gpu: self, dispatches: Vec::new(), params: Vec::new() }
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
        let bytes = bytemuck::bytes_of(params);
        self.params.resize(params_offset, 0);
        self.params.extend_from_slice(bytes);
        // Uniform blocks are sized in multiples of 16 bytes.
        let params_size = bytes.len().div_ceil(16).max(1) * 16;
        self.params.resize(params_offset + params_size, 0);
        self.dispatches.push(Dispatch {
            label: spec.name,
            pipeline,
            buffers: tensors.iter().map(|t| t.buffer.clone()).collect(),
            params_offset: params_offset as u64,
            params_size: params_size as u64,
            groups,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.dispatches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dispatches.is_empty()
    }

    /// Encodes every dispatch into one pass and submits once.
    pub fn submit(self) -> Result<(), GpuError> {
        self.encode_and_submit(false).map(|_| ())
    }

    /// Like `submit`, then waits and returns each dispatch's GPU time. Needs
    /// TIMESTAMP_QUERY_INSIDE_PASSES; without it the list is empty.
    pub fn submit_timed(self) -> Result<Vec<Timing>, GpuError> {
        self.encode_and_submit(true)
    }

    fn encode_and_submit(self, timed: bool) -> Result<Vec<Timing>, GpuError> {
        if self.dispatches.is_empty() {
            return Ok(Vec::new());
        }
        let gpu = self.gpu;
        let timed =
            timed && gpu.has(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
        // One params buffer serves every submit. Rewriting it for this submit while an
        // earlier one may still be running is safe: queue.write_buffer is ordered with
        // submits on the queue (it lands after all work submitted before it and before the
        // next submit), and the lock keeps each write and its submit together.
        let mut params_slot = gpu.params.lock().unwrap();
        let needed = self.params.len() as u64;
        if params_slot.as_ref().is_none_or(|b| b.size() < needed) {
            // Grow in powers of two so a slowly growing step recreates it only a few times.
            *params_slot = Some(gpu.create_buffer(&wgpu::BufferDescriptor {
                label: Some("dispatch params"),
                size: needed.next_power_of_two(),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let params = params_slot.as_ref().expect("made above");
        gpu.queue.write_buffer(params, 0, &self.params);
        let bind_groups: Vec<wgpu::BindGroup> =
            self.dispatches.iter().map(|d| bind_group(gpu, params, d)).collect();
        let queries = timed.then(|| Queries::new(gpu, self.dispatches.len() as u32 + 1));

        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            if let Some(q) = &queries {
                pass.write_timestamp(&q.set, 0);
            }
            for (index, (dispatch, group)) in self.dispatches.iter().zip(&bind_groups).enumerate() {
                pass.set_pipeline(&dispatch.pipeline.pipeline);
                pass.set_bind_group(0, group, &[]);
                let [x, y, z] = dispatch.groups;
                pass.dispatch_workgroups(x, y, z);
                if let Some(q) = &queries {
                    pass.write_timestamp(&q.set, index as u32 + 1);
                }
            }
        }
        if let Some(q) = &queries {
            q.resolve(&mut encoder);
        }
        gpu.submit([encoder.finish()]);
        drop(params_slot);
        match queries {
            None => Ok(Vec::new()),
            Some(q) => {
                let ticks = q.read(gpu)?;
                let period = gpu.queue.get_timestamp_period() as f64;
                Ok(self
                    .dispatches
                    .iter()
                    .zip(ticks.windows(2))
                    .map(|(d, w)| Timing { label: d.label, nanos: w[1].saturating_sub(w[0]) as f64 * period })
                    .collect())
            }
        }
    }
}

fn bind_group(gpu: &Gpu, params: &wgpu::Buffer, dispatch: &Dispatch) -> wgpu::BindGroup {
    let mut entries = vec![wgpu::BindGroupEntry {
        binding: 0,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: params,
            offset: dispatch.params_offset,
            size: wgpu::BufferSize::new(dispatch.params_size),
        }),
    }];
    for (index, buffer) in dispatch.buffers.iter().enumerate() {
        entries
            .push(wgpu::BindGroupEntry { binding: index as u32 + 1, resource: buffer.as_entire_binding() });
    }
    gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
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
