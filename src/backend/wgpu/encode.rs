//! Recording work: buffers, the pending command encoder, the per-batch
//! uniform arena for kernel parameters, and the flush / read-back that
//! ends a batch. Ops are encoded one compute pass each into the pending
//! encoder; the batch is submitted once, when a download needs it or when
//! it reaches [`MAX_BATCH_OPS`].
//!
//! Device timing (when the device has `TIMESTAMP_QUERY`): between
//! [`Recorder::begin_timing`] and [`Recorder::end_timing`], the first
//! compute pass writes a timestamp at its start (query 0) and every pass
//! writes one at its end (query 1; wgpu resets a pass's queries just before
//! it, so the last pass's value is what remains). The span covers every
//! kernel recorded in between, by any caller, across batches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::device::Context;
use super::err;
use super::kernels::{KernelKey, Kernels};
use crate::error::Result;

/// Ops recorded before the batch is submitted without being asked.
pub const MAX_BATCH_OPS: usize = 256;
/// Bytes of one op's parameters in the uniform arena (and its alignment).
const PARAM_SLOT: u64 = 256;

/// Usage of every activation / weight buffer.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Bytes of freed activation buffers kept for reuse.
const POOL_BYTES: u64 = 512 << 20;

/// Freed activation buffers by size, reused as the outputs of later ops.
///
/// Reuse is safe because a buffer comes back only when its tensor is
/// dropped: every op that reads it was recorded before any op that will
/// write it again, and the queue runs them in that order (wgpu puts the
/// barriers in). Uploads never take pooled buffers: their bytes are written
/// at creation, which would not wait for earlier recorded reads.
#[derive(Default)]
pub struct Pool {
    free: Mutex<(HashMap<u64, Vec<wgpu::Buffer>>, u64)>,
}

impl Pool {
    fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut g = self.free.lock().ok()?;
        let buf = g.0.get_mut(&size)?.pop()?;
        g.1 -= size;
        Some(buf)
    }

    fn give(&self, buf: wgpu::Buffer) {
        if let Ok(mut g) = self.free.lock() {
            let size = buf.size();
            if g.1 + size <= POOL_BYTES {
                g.1 += size;
                g.0.entry(size).or_default().push(buf);
            }
        }
    }
}

/// A device buffer that goes back to its [`Pool`] when dropped.
pub struct Pooled {
    buf: Option<wgpu::Buffer>,
    pool: Arc<Pool>,
}

impl Pooled {
    pub fn get(&self) -> &wgpu::Buffer {
        // Always Some until drop.
        self.buf
            .as_ref()
            .unwrap_or_else(|| unreachable!("a pooled buffer is taken only on drop"))
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

/// A buffer binding of a dispatch: `@binding(index)` and its buffer.
pub type Bind<'a> = (u32, &'a wgpu::Buffer);

struct Batch {
    encoder: Option<wgpu::CommandEncoder>,
    /// The uniform buffer holding this batch's parameters.
    arena: Option<wgpu::Buffer>,
    params: Vec<u8>,
    ops: usize,
    /// Compute passes stamped since `begin_timing` (`None`: not timing).
    timed_passes: Option<usize>,
}

/// The query set and resolve buffer of device timing.
struct Timer {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
}

/// The device, its kernels and the batch being recorded.
pub struct Recorder {
    pub ctx: Context,
    pub kernels: Kernels,
    pool: Arc<Pool>,
    slot: u64,
    batch: Mutex<Batch>,
    timer: Option<Timer>,
}

/// Workgroup counts `(x, y)` for `groups` workgroups: y > 1 only when x
/// would exceed the per-dimension limit. Shaders rebuild the linear index
/// as `wid.x + wid.y * nwg.x` and skip the overshoot.
pub fn grid(groups: u32, max_per_dim: u32) -> (u32, u32) {
    if groups <= max_per_dim {
        (groups.max(1), 1)
    } else {
        let y = groups.div_ceil(max_per_dim);
        (groups.div_ceil(y), y)
    }
}

/// Rounds a byte size up to 16 (so any buffer can be bound as vec4 arrays).
fn padded(bytes: u64) -> u64 {
    bytes.max(16).div_ceil(16) * 16
}

impl Recorder {
    pub fn new(ctx: Context) -> Self {
        let slot = PARAM_SLOT.max(ctx.limits.min_uniform_buffer_offset_alignment as u64);
        let timer = ctx.timestamps.then(|| Timer {
            queries: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("mbq timing"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("mbq timing resolve"),
                size: 2 * wgpu::QUERY_SIZE as u64,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
        });
        Recorder {
            timer,
            ctx,
            kernels: Kernels::default(),
            pool: Arc::default(),
            slot,
            batch: Mutex::new(Batch {
                encoder: None,
                arena: None,
                params: Vec::new(),
                ops: 0,
                timed_passes: None,
            }),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Batch>> {
        self.batch
            .lock()
            .map_err(|_| err("the command batch lock is poisoned"))
    }

    /// A device buffer of at least `bytes` (contents undefined until written).
    pub fn buffer(&self, bytes: u64, label: &str) -> Result<wgpu::Buffer> {
        let size = padded(bytes);
        if size > self.ctx.limits.max_buffer_size {
            return Err(err(format!(
                "{label}: a buffer of {size} bytes exceeds the device's max_buffer_size {}",
                self.ctx.limits.max_buffer_size
            )));
        }
        Ok(self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: STORAGE,
            mapped_at_creation: false,
        }))
    }

    /// An activation buffer of at least `bytes` from the pool (or new),
    /// contents undefined until an op writes it.
    pub fn output(&self, bytes: u64) -> Result<Pooled> {
        let size = padded(bytes);
        let buf = match self.pool.take(size) {
            Some(b) => b,
            None => self.buffer(size, "activation")?,
        };
        Ok(self.pooled(buf))
    }

    /// Hands `buf` to the pool when the result is dropped.
    pub fn pooled(&self, buf: wgpu::Buffer) -> Pooled {
        Pooled {
            buf: Some(buf),
            pool: self.pool.clone(),
        }
    }

    /// A device buffer holding `data` (written at creation, so it is in place
    /// before any op recorded after this call, whatever the batch).
    pub fn upload(&self, data: &[u8], label: &str) -> Result<wgpu::Buffer> {
        let size = padded(data.len() as u64);
        if size > self.ctx.limits.max_buffer_size {
            return Err(err(format!(
                "{label}: {size} bytes exceed the device's max_buffer_size {}",
                self.ctx.limits.max_buffer_size
            )));
        }
        let buf = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: STORAGE,
            mapped_at_creation: true,
        });
        {
            let mut view = buf
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| err(format!("{label}: mapping a new buffer: {e}")))?;
            // The rest (padding) is zero: wgpu zero-initialises new buffers.
            view.slice(..data.len()).copy_from_slice(data);
        }
        buf.unmap();
        Ok(buf)
    }

    /// Records one dispatch of `groups` workgroups of `key` with `binds` and
    /// the parameters `params` at `@binding(param_binding)`.
    pub fn dispatch(
        &self,
        key: &KernelKey,
        binds: &[Bind<'_>],
        param_binding: u32,
        params: &[u32],
        groups: u32,
    ) -> Result<()> {
        if groups == 0 {
            return Ok(());
        }
        let pipeline = self.kernels.get(&self.ctx.device, key)?;
        let label = key.label();
        let param_bytes: &[u8] = bytemuck::cast_slice(params);
        if param_bytes.len() as u64 > self.slot {
            return Err(err(format!("{label}: too many parameters")));
        }
        let mut b = self.lock()?;
        if b.ops >= MAX_BATCH_OPS {
            self.submit(&mut b)?;
        }
        let device = &self.ctx.device;
        self.open(&mut b);
        let offset = b.ops as u64 * self.slot;
        b.params.resize(offset as usize, 0);
        b.params.extend_from_slice(param_bytes);
        b.params.resize((offset + self.slot) as usize, 0);
        b.ops += 1;
        let Batch {
            encoder,
            arena,
            timed_passes,
            ..
        } = &mut *b;
        let (Some(encoder), Some(arena)) = (encoder.as_mut(), arena.as_ref()) else {
            return Err(err("internal: no open batch"));
        };
        let mut entries: Vec<wgpu::BindGroupEntry<'_>> = binds
            .iter()
            .map(|(i, buf)| wgpu::BindGroupEntry {
                binding: *i,
                resource: buf.as_entire_binding(),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: param_binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: arena,
                offset,
                size: wgpu::BufferSize::new(self.slot),
            }),
        });
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let (x, y) = grid(groups, self.ctx.limits.max_compute_workgroups_per_dimension);
        let timestamp_writes = match (&self.timer, timed_passes.as_mut()) {
            (Some(t), Some(n)) => {
                *n += 1;
                Some(wgpu::ComputePassTimestampWrites {
                    query_set: &t.queries,
                    beginning_of_pass_write_index: (*n == 1).then_some(0),
                    end_of_pass_write_index: Some(1),
                })
            }
            _ => None,
        };
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(&label),
            timestamp_writes,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        Ok(())
    }

    /// Records a buffer-to-buffer copy (offsets and size in bytes, multiples of 4).
    pub fn copy(
        &self,
        src: &wgpu::Buffer,
        src_off: u64,
        dst: &wgpu::Buffer,
        dst_off: u64,
        bytes: u64,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let mut b = self.lock()?;
        self.open(&mut b);
        if let Some(e) = b.encoder.as_mut() {
            e.copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
        }
        Ok(())
    }

    /// Starts device timing: false when the device has no timestamps.
    /// Restarts it when it is already running.
    pub fn begin_timing(&self) -> Result<bool> {
        if self.timer.is_none() {
            return Ok(false);
        }
        self.lock()?.timed_passes = Some(0);
        Ok(true)
    }

    /// Ends device timing: seconds from the start of the first compute
    /// pass recorded since `begin_timing` to the end of the last one
    /// (0 when none was). Submits everything and waits for the device.
    /// `None` when not timing.
    pub fn end_timing(&self) -> Result<Option<f64>> {
        let Some(t) = &self.timer else {
            return Ok(None);
        };
        let passes = {
            let mut b = self.lock()?;
            let Some(n) = b.timed_passes.take() else {
                return Ok(None);
            };
            if n > 0 {
                self.open(&mut b);
                if let Some(e) = b.encoder.as_mut() {
                    e.resolve_query_set(&t.queries, 0..2, &t.resolve, 0);
                }
            }
            n
        };
        if passes == 0 {
            return Ok(Some(0.0));
        }
        let bytes = self.read(&t.resolve, 2 * wgpu::QUERY_SIZE as u64)?;
        let tick = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        };
        let (start, end) = (tick(0), tick(1));
        let ticks = end.checked_sub(start).ok_or_else(|| {
            err(format!(
                "device timestamps went backwards ({start} then {end} over {passes} passes)"
            ))
        })?;
        let ns = ticks as f64 * self.ctx.queue.get_timestamp_period() as f64;
        Ok(Some(ns * 1e-9))
    }

    /// Nanoseconds per timestamp tick (`None` without timestamps).
    pub fn timestamp_period(&self) -> Option<f32> {
        self.timer
            .as_ref()
            .map(|_| self.ctx.queue.get_timestamp_period())
    }

    /// Starts a batch (encoder and parameter arena) unless one is open.
    fn open(&self, b: &mut Batch) {
        if b.encoder.is_some() {
            return;
        }
        let device = &self.ctx.device;
        b.encoder = Some(
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("mbq batch"),
            }),
        );
        b.arena = Some(device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("mbq params"),
            size: self.slot * MAX_BATCH_OPS as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }));
        b.params.clear();
        b.ops = 0;
    }

    /// Submits the recorded batch (if any).
    pub fn flush(&self) -> Result<()> {
        let mut b = self.lock()?;
        self.submit(&mut b)
    }

    fn submit(&self, b: &mut Batch) -> Result<()> {
        if let Some(encoder) = b.encoder.take() {
            if let Some(arena) = b.arena.take() {
                self.ctx.queue.write_buffer(&arena, 0, &b.params);
            }
            b.params.clear();
            b.ops = 0;
            self.ctx.queue.submit([encoder.finish()]);
        }
        // Reclaim finished work without waiting.
        let _ = self.ctx.device.poll(wgpu::PollType::Poll);
        self.ctx.take_errors("recording a batch of kernels")
    }

    /// Submits everything and reads `bytes` from the start of `src`.
    pub fn read(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let size = bytes.div_ceil(4) * 4;
        if size == 0 {
            return Ok(Vec::new());
        }
        let staging = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("mbq read-back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.copy(src, 0, &staging, 0, size)?;
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| err(format!("waiting for the device: {e}")))?;
        rx.recv()
            .map_err(|_| err("the read-back was never answered"))?
            .map_err(|e| err(format!("mapping the read-back buffer: {e}")))?;
        let out = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| err(format!("reading the read-back buffer: {e}")))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        self.ctx.take_errors("reading back a tensor")?;
        Ok(out)
    }
}
