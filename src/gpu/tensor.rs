//! A tensor is one GPU storage buffer with a shape, a name and an element type: 4-byte
//! elements (f32, or u32 ids and labels, which the kernels read as such) or f16 (2 bytes,
//! for kernels built with `shader-f16`). Buffers are rounded up to 4 bytes.

use std::sync::Arc;

use super::{Gpu, GpuError};

/// What a tensor's elements are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementType {
    /// f32, or u32 where a kernel says so (ids, labels, plans).
    F32,
    F16,
}

impl ElementType {
    pub fn size(self) -> usize {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 => 2,
        }
    }

    /// The WGSL scalar type of the storage.
    pub fn wgsl(self) -> &'static str {
        match self {
            ElementType::F32 => "f32",
            ElementType::F16 => "f16",
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    pub buffer: Arc<wgpu::Buffer>,
    pub shape: Vec<usize>,
    pub name: String,
    pub dtype: ElementType,
}

impl Tensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> u64 {
        (self.dtype.size() * self.len()) as u64
    }

    /// An error unless the elements are `dtype`: what every kernel checks of its operands.
    pub fn expect_type(&self, op: &str, dtype: ElementType) -> Result<(), GpuError> {
        if self.dtype == dtype {
            return Ok(());
        }
        let detail = format!("'{}' holds {:?} elements, the kernel reads {dtype:?}", self.name, self.dtype);
        Err(GpuError::Shape { op: op.to_string(), detail })
    }

    /// The leading elements of the same buffer seen with another (no larger) shape: kernels
    /// take their lengths from shapes, so a bucket's buffers serve smaller batches and
    /// fewer tensors without copies.
    pub fn view(&self, shape: &[usize]) -> Tensor {
        debug_assert!(shape.iter().product::<usize>() <= self.len(), "view {shape:?} of {:?}", self.shape);
        Tensor {
            buffer: self.buffer.clone(),
            shape: shape.to_vec(),
            name: self.name.clone(),
            dtype: self.dtype,
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?})", self.name, self.shape)
    }
}

impl Gpu {
    /// A zero-filled f32 tensor; an error naming it if it exceeds the adapter's limits.
    pub fn zeros(&self, name: &str, shape: &[usize]) -> Result<Tensor, GpuError> {
        self.zeros_of(name, shape, ElementType::F32)
    }

    /// A zero-filled tensor of `dtype` elements.
    pub fn zeros_of(&self, name: &str, shape: &[usize], dtype: ElementType) -> Result<Tensor, GpuError> {
        let elements: usize = shape.iter().product();
        let bytes = (dtype.size() * elements).next_multiple_of(4) as u64;
        self.check_size(name, bytes)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.create_buffer(&wgpu::BufferDescriptor {
            label: Some(name),
            // Bindings must not be empty: an empty tensor still owns one element.
            size: bytes.max(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Device { op: format!("allocating '{name}'"), message: error.to_string() });
        }
        Ok(Tensor { buffer: Arc::new(buffer), shape: shape.to_vec(), name: name.to_string(), dtype })
    }

    /// A tensor holding `data` (f32 or u32), checked against `shape`.
    pub fn upload<T: bytemuck::Pod>(
        &self,
        name: &str,
        shape: &[usize],
        data: &[T],
    ) -> Result<Tensor, GpuError> {
        let tensor = self.zeros(name, shape)?;
        self.write(&tensor, data)?;
        Ok(tensor)
    }

    /// An f16 tensor holding `data` rounded to the nearest f16 (ties to even).
    pub fn upload_f16(&self, name: &str, shape: &[usize], data: &[f32]) -> Result<Tensor, GpuError> {
        let tensor = self.zeros_of(name, shape, ElementType::F16)?;
        let bits: Vec<u16> = data.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        self.write(&tensor, &bits)?;
        Ok(tensor)
    }

    /// An f16 tensor's values, widened to f32 (waits for all submitted work).
    pub fn read_f16(&self, tensor: &Tensor) -> Result<Vec<f32>, GpuError> {
        let bits = self.read::<u16>(tensor)?;
        Ok(bits.into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect())
    }

    /// Overwrites a tensor's contents (ordered before the next submit).
    pub fn write<T: bytemuck::Pod>(&self, tensor: &Tensor, data: &[T]) -> Result<(), GpuError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if std::mem::size_of::<T>() != tensor.dtype.size() || bytes.len() as u64 != tensor.bytes() {
            return Err(GpuError::Shape {
                op: format!("write '{}'", tensor.name),
                detail: format!(
                    "shape {:?} holds {} bytes, data has {}",
                    tensor.shape,
                    tensor.bytes(),
                    bytes.len()
                ),
            });
        }
        // Copies move whole 4-byte words: an odd count of f16 is padded.
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4), 0);
        if !padded.is_empty() {
            self.queue.write_buffer(&tensor.buffer, 0, &padded);
        }
        Ok(())
    }

    /// Copies a tensor back to the host (waits for all submitted work).
    pub fn read<T: bytemuck::Pod>(&self, tensor: &Tensor) -> Result<Vec<T>, GpuError> {
        if std::mem::size_of::<T>() != tensor.dtype.size() {
            let detail = format!("{}-byte values from {:?} elements", std::mem::size_of::<T>(), tensor.dtype);
            return Err(GpuError::Shape { op: format!("reading '{}'", tensor.name), detail });
        }
        let exact = tensor.bytes();
        let bytes = exact.next_multiple_of(4);
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let staging = self.take_buffer("readback", usage, bytes);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&tensor.buffer, 0, &staging, 0, bytes);
        self.submit([encoder.finish()]);
        let slice = staging.slice(..);
        let (sender, receiver) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |result| {
            let _ = sender.send(result);
        });
        self.wait()?;
        let mapped = receiver.recv().map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()));
        let op = || format!("reading '{}'", tensor.name);
        mapped.map_err(|message| GpuError::Device { op: op(), message })?;
        let view =
            slice.get_mapped_range().map_err(|e| GpuError::Device { op: op(), message: e.to_string() })?;
        let out = bytemuck::cast_slice::<u8, T>(&view[..exact as usize]).to_vec();
        drop(view);
        staging.unmap();
        // Unmapped again, so the next read of this size may copy into it.
        self.give_back(staging);
        Ok(out)
    }

    fn check_size(&self, name: &str, bytes: u64) -> Result<(), GpuError> {
        let binding = self.limits.max_storage_buffer_binding_size;
        if bytes > binding {
            return Err(GpuError::TooBig {
                name: name.into(),
                bytes,
                what: "storage binding",
                limit: binding,
            });
        }
        if bytes > self.limits.max_buffer_size {
            let limit = self.limits.max_buffer_size;
            return Err(GpuError::TooBig { name: name.into(), bytes, what: "buffer", limit });
        }
        Ok(())
    }
}
