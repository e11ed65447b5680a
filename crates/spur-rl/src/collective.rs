//! Summing across the workers of a data-parallel update.
//!
//! Each worker holds a full copy of the policy and trains on its share of every mini-batch's
//! micro-batches; before each optimizer update the workers sum their gradients and step
//! statistics, so that every copy applies the same update. [`Collective`] is that one operation;
//! [`Solo`] is the single worker (no communication), [`ThreadGroup`] runs the workers as threads
//! of one process (what CPU tests use), and with the `nccl` feature `NcclGroup` sums on the GPUs
//! with NCCL.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// An all-reduce (sum) over the workers of one data-parallel update.
///
/// Every worker makes the same calls in the same order with tensors of the same shapes and
/// dtypes, and each gets the same result. A worker that leaves the group (its thread ends, or it
/// fails) makes the others' pending and later calls fail instead of waiting forever.
pub trait Collective: Send + Sync {
    /// This worker's index, `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces each tensor by its element-wise sum over the workers.
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()>;
    /// The same for host scalars (losses, token counts, failure flags).
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
}

/// The single worker: sums over one worker are the values themselves.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// Workers that are threads of this process, summing through shared memory. The sum runs in
/// rank order on every worker, so all of them get bit-identical results.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    turn: Condvar,
}

struct State {
    /// Each worker's contribution to the reduction in progress.
    slots: Vec<Option<Vec<Vec<f64>>>>,
    /// Workers that have arrived at the current barrier.
    arrived: usize,
    /// Barriers passed; a waiter leaves when it changes.
    generation: u64,
    /// The first worker that left the group, if one did.
    gone: Option<usize>,
}

impl ThreadGroup {
    /// One handle per worker; hand handle `r` to the thread of rank `r`.
    pub fn new(world_size: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world: world_size,
            state: Mutex::new(State {
                slots: vec![None; world_size],
                arrived: 0,
                generation: 0,
                gone: None,
            }),
            turn: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Waits until every worker has called `barrier` as often as this one.
    fn barrier<'a>(&'a self, mut state: MutexGuard<'a, State>) -> Result<MutexGuard<'a, State>> {
        if let Some(gone) = state.gone {
            return Err(left(gone));
        }
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == self.shared.world {
            state.arrived = 0;
            state.generation += 1;
            self.shared.turn.notify_all();
            return Ok(state);
        }
        while state.generation == generation {
            if let Some(gone) = state.gone {
                return Err(left(gone));
            }
            state = self.shared.turn.wait(state).map_err(|_| poisoned())?;
        }
        Ok(state)
    }

    /// Sums `parts` (one flat buffer per tensor) over the workers.
    fn reduce(&self, parts: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>> {
        let mut state = self.shared.state.lock().map_err(|_| poisoned())?;
        state.slots[self.rank] = Some(parts);
        let state = self.barrier(state)?;
        let mut sum: Option<Vec<Vec<f64>>> = None;
        for (rank, slot) in state.slots.iter().enumerate() {
            let part = slot.as_ref().ok_or_else(|| left(rank))?;
            match &mut sum {
                None => sum = Some(part.clone()),
                Some(sum) => {
                    if sum.len() != part.len()
                        || sum.iter().zip(part).any(|(a, b)| a.len() != b.len())
                    {
                        return Err(Error::Collective(format!(
                            "worker {rank} reduced buffers of other sizes than worker 0"
                        )));
                    }
                    for (a, b) in sum.iter_mut().zip(part) {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
        // Nobody may overwrite a slot before every worker has read them all.
        let mut state = self.barrier(state)?;
        state.slots[self.rank] = None;
        Ok(sum.unwrap_or_default())
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        let parts = tensors
            .iter()
            .map(|t| Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?))
            .collect::<Result<Vec<_>>>()?;
        let sums = self.reduce(parts)?;
        for (t, sum) in tensors.iter_mut().zip(sums) {
            *t = Tensor::from_vec(sum, t.shape(), t.device())?.to_dtype(t.dtype())?;
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        let sum = self.reduce(vec![values.to_vec()])?;
        values.copy_from_slice(&sum[0]);
        Ok(())
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        let Ok(mut state) = self.shared.state.lock() else {
            return;
        };
        state.gone.get_or_insert(self.rank);
        self.shared.turn.notify_all();
    }
}

fn left(rank: usize) -> Error {
    Error::Collective(format!(
        "worker {rank} left the group (it failed or finished early); the update was not applied"
    ))
}

fn poisoned() -> Error {
    Error::Collective("a worker panicked while summing".into())
}

#[cfg(feature = "nccl")]
pub use nccl::NcclGroup;

#[cfg(feature = "nccl")]
mod nccl {
    //! NCCL over the GPUs of one process: one communicator per device, created together, each
    //! driven by the thread of its rank.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::cudarc::nccl::{Comm, NcclType, ReduceOp};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

    use super::Collective;
    use crate::{Error, Result};

    /// One worker's NCCL communicator; its sums run on the stream of the worker's device.
    pub struct NcclGroup {
        comm: Comm,
        device: Device,
    }

    // SAFETY: a handle is used by the one thread of its rank, and NCCL allows a communicator
    // to move between threads as long as its calls are not concurrent.
    unsafe impl Send for NcclGroup {}
    unsafe impl Sync for NcclGroup {}

    impl NcclGroup {
        /// One handle per CUDA device in `devices` (rank = position).
        pub fn new(devices: &[Device]) -> Result<Vec<NcclGroup>> {
            let streams = devices
                .iter()
                .map(|d| match d {
                    Device::Cuda(c) => Ok(c.cuda_stream()),
                    other => Err(Error::Collective(format!(
                        "NCCL needs CUDA devices, got {other:?}"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            let comms = Comm::from_devices(streams)
                .map_err(|e| Error::Collective(format!("creating NCCL communicators: {e:?}")))?;
            Ok(comms
                .into_iter()
                .zip(devices)
                .map(|(comm, device)| NcclGroup {
                    comm,
                    device: device.clone(),
                })
                .collect())
        }
    }

    /// The all-reduce as a candle op, so that it reads the tensor's own device buffer.
    struct AllReduce<'a>(&'a Comm);

    impl CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL sums CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            storage: &CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("NCCL sum of a strided tensor".into()))?;
            let storage = match storage.dtype() {
                DType::F32 => sum::<f32>(self.0, storage, start, end)?,
                DType::F64 => sum::<f64>(self.0, storage, start, end)?,
                other => candle_core::bail!("NCCL sum of {other:?} (convert to f32 first)"),
            };
            Ok((storage, layout.shape().clone()))
        }
    }

    fn sum<T>(
        comm: &Comm,
        storage: &CudaStorage,
        start: usize,
        end: usize,
    ) -> candle_core::Result<CudaStorage>
    where
        T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    {
        let device = storage.device.clone();
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        let mut dst = device.alloc_zeros::<T>(end - start)?;
        comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, device))
    }

    impl Collective for NcclGroup {
        fn rank(&self) -> usize {
            self.comm.rank()
        }
        fn world_size(&self) -> usize {
            self.comm.world_size()
        }
        /// Sums f64 as f64 and everything else in f32, so that bf16 gradients lose nothing more.
        fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
            for t in tensors.iter_mut() {
                let wide = if t.dtype() == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                let sum = t
                    .to_dtype(wide)?
                    .contiguous()?
                    .apply_op1_no_bwd(&AllReduce(&self.comm))?;
                *t = sum.to_dtype(t.dtype())?;
            }
            Ok(())
        }
        fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
            let mut t = [Tensor::from_slice(values, values.len(), &self.device)?];
            self.all_reduce_sum(&mut t)?;
            let sums = t[0].to_vec1::<f64>()?;
            values.copy_from_slice(&sums);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn threads_sum_in_rank_order_and_agree() {
        let group = ThreadGroup::new(3);
        let results: Vec<(Vec<f32>, Vec<f64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let mut t = [Tensor::new(&[r, 10.0 * r], &Device::Cpu).unwrap()];
                        g.all_reduce_sum(&mut t).unwrap();
                        let mut v = [g.rank() as f64, 1.0];
                        g.all_reduce_sum_f64(&mut v).unwrap();
                        (t[0].to_vec1::<f32>().unwrap(), v.to_vec())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (t, v) in results {
            assert_eq!(t, vec![3.0, 30.0]);
            assert_eq!(v, vec![3.0, 3.0]);
        }
    }

    #[test]
    fn a_worker_that_leaves_fails_the_others_instead_of_hanging() {
        let mut group = ThreadGroup::new(2);
        let quitter = group.pop().unwrap();
        let stayer = group.pop().unwrap();
        let waiting = std::thread::spawn(move || stayer.all_reduce_sum_f64(&mut [1.0]));
        drop(quitter);
        let err = waiting.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("worker 1 left"), "{err}");
    }
}
