//! The keys and values a decoding batch attends to, with each prompt held once.
//!
//! GRPO samples a group of 16 completions per prompt. Copying the prompt's keys and values into
//! every row of the group would hold the prompt 16 times (a quarter of the cache at the paper's
//! 1,024 prompt and 3,072 response tokens). Here a batch's rows each continue one of its
//! *prompts*, held once as rows of their own, and each row holds only the positions it
//! generated. Attention reads the row's prompt columns, then its own: the same columns, in the
//! same order, as a row holding both.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Keys and values of past positions for a batch of sequences.
///
/// A row's positions are its prompt's, if it continues one (see [`KvCache::continuing`]), then
/// its own. Its own are left-padded: row `i` holds nothing in columns `0..pad[i]`, and every row
/// writes its next position at column `len`, so one decode step serves rows of different
/// lengths.
pub struct KvCache {
    /// Per layer, keys and values [rows, kv_heads, capacity, head_dim].
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    pub(crate) len: usize,
    capacity: usize,
    pub(crate) pad: Vec<usize>,
    pub(crate) prompts: Option<Box<SharedPrompts>>,
}

/// The prompts a batch's rows continue, one row each.
pub(crate) struct SharedPrompts {
    /// One row per prompt, left-padded to a common width, with no prompts of its own.
    pub(crate) cache: KvCache,
    /// The caller's key of each prompt, by which a new row finds a prompt already held.
    keys: Vec<usize>,
    /// The prompt each row of the batch continues.
    pub(crate) of_row: Vec<usize>,
    /// `of_row` on the cache's device, to gather prompt rows for candle's composite attention.
    pub(crate) index: Tensor,
}

impl SharedPrompts {
    fn new(keys: Vec<usize>, cache: KvCache, of_row: Vec<usize>) -> Result<Self> {
        let index = row_index(&of_row, &cache)?;
        Ok(SharedPrompts {
            cache,
            keys,
            of_row,
            index,
        })
    }

    /// Drops the prompts no row continues, row `restarting` (if any) not counted; the caller
    /// then calls [`SharedPrompts::reindex`].
    fn prune(&mut self, restarting: Option<usize>) -> Result<()> {
        let continues = |p: usize| {
            (self.of_row.iter().enumerate()).any(|(r, &q)| q == p && Some(r) != restarting)
        };
        let used: Vec<usize> = (0..self.keys.len()).filter(|&p| continues(p)).collect();
        if used.len() < self.keys.len() {
            self.cache.retain_rows(&used)?;
            self.keys = used.iter().map(|&p| self.keys[p]).collect();
            for p in self.of_row.iter_mut() {
                // The restarting row's old prompt may be gone; it is about to be reassigned.
                *p = used.iter().position(|u| u == p).unwrap_or(0);
            }
        }
        Ok(())
    }

    /// Rebuilds `index` from `of_row`.
    fn reindex(&mut self) -> Result<()> {
        self.index = row_index(&self.of_row, &self.cache)?;
        Ok(())
    }

    /// Makes row `r` continue prompt `key`, adding `prompt` (a single-row cache) if it is not
    /// held, and dropping a prompt no row continues any longer.
    fn restart(&mut self, r: usize, key: usize, prompt: &KvCache) -> Result<()> {
        if let Some(p) = self.keys.iter().position(|&k| k == key) {
            self.of_row[r] = p;
            self.prune(None)?;
        } else {
            self.prune(Some(r))?;
            let held: Vec<KvCache> = (0..self.keys.len())
                .map(|p| self.cache.row(p))
                .collect::<Result<_>>()?;
            let mut rows: Vec<&KvCache> = held.iter().collect();
            rows.push(prompt);
            self.cache = KvCache::stack(&rows, 0)?;
            self.keys.push(key);
            self.of_row[r] = self.keys.len() - 1;
        }
        self.reindex()
    }
}

fn row_index(of_row: &[usize], cache: &KvCache) -> Result<Tensor> {
    let device = cache.layers[0].0.device();
    let index: Vec<u32> = of_row.iter().map(|&p| p as u32).collect();
    Ok(Tensor::new(index, device)?)
}

impl KvCache {
    /// An empty cache of `layers` layers for `batch` rows, with room for `capacity` positions.
    pub(crate) fn empty(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<KvCache> {
        let shape = (batch, kv_heads, capacity, head_dim);
        let layers = (0..layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            pad: vec![0; batch],
            prompts: None,
        })
    }

    /// A batch in which row i continues the prompt `rows[i].1`, a single-row cache (a prefill),
    /// with room for `extra` new positions per row. Rows whose keys `rows[i].0` are equal
    /// continue the same prompt and read one copy of it, whatever their number.
    pub fn continuing(rows: &[(usize, &KvCache)], extra: usize) -> Result<KvCache> {
        let (_, first) = rows
            .first()
            .ok_or_else(|| Error::Request("a batch needs at least one row".into()))?;
        let mut keys = Vec::new();
        let mut prompts = Vec::new();
        let mut of_row = Vec::with_capacity(rows.len());
        for &(key, prompt) in rows {
            let p = match keys.iter().position(|&k| k == key) {
                Some(p) => p,
                None => {
                    keys.push(key);
                    prompts.push(prompt);
                    keys.len() - 1
                }
            };
            of_row.push(p);
        }
        let prompts = KvCache::stack(&prompts, 0)?;
        let (_, kv_heads, _, head_dim) = first.layers[0].0.dims4()?;
        let own = KvCache::empty(
            first.layers.len(),
            rows.len(),
            kv_heads,
            head_dim,
            extra,
            first.layers[0].0.dtype(),
            first.layers[0].0.device(),
        )?;
        Ok(KvCache {
            prompts: Some(Box::new(SharedPrompts::new(keys, prompts, of_row)?)),
            ..own
        })
    }

    /// Number of rows (sequences).
    pub fn batch_size(&self) -> usize {
        self.pad.len()
    }

    /// Number of the rows' own columns written so far (padding included; prompts not).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions held for row `row`: its prompt's and its own.
    pub fn row_len(&self, row: usize) -> usize {
        let prompt = self
            .prompts
            .as_ref()
            .map_or(0, |s| s.cache.row_len(s.of_row[row]));
        prompt + self.len - self.pad[row]
    }

    /// How many prompts the rows continue, each held once.
    pub fn prompt_count(&self) -> usize {
        self.prompts.as_ref().map_or(0, |s| s.keys.len())
    }

    /// Row `r` alone, as a single-row cache of its own columns (copied, unpadded).
    fn row(&self, r: usize) -> Result<KvCache> {
        let (pad, n) = (self.pad[r], self.len - self.pad[r]);
        let layers = (self.layers.iter())
            .map(|(k, v)| {
                Ok((
                    k.narrow(0, r, 1)?.narrow(2, pad, n)?,
                    v.narrow(0, r, 1)?.narrow(2, pad, n)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            len: n,
            capacity: n,
            pad: vec![0],
            prompts: None,
        })
    }

    /// Stacks single-row caches without prompts into one left-padded batch with room for
    /// `extra` more columns.
    fn stack(rows: &[&KvCache], extra: usize) -> Result<KvCache> {
        let first = rows
            .first()
            .ok_or_else(|| Error::Request("cannot stack an empty list of caches".into()))?;
        if let Some(bad) = rows
            .iter()
            .find(|c| c.batch_size() != 1 || c.prompts.is_some())
        {
            return Err(Error::Request(format!(
                "a prompt must be a single-row cache of its own, not {} rows{}",
                bad.batch_size(),
                if bad.prompts.is_some() {
                    " continuing prompts"
                } else {
                    ""
                }
            )));
        }
        let width = rows.iter().map(|c| c.len).max().unwrap_or(0);
        let capacity = width + extra;
        let mut layers = Vec::with_capacity(first.layers.len());
        for layer in 0..first.layers.len() {
            let mut ks = Vec::with_capacity(rows.len());
            let mut vs = Vec::with_capacity(rows.len());
            for cache in rows {
                let (k, v) = &cache.layers[layer];
                let left = width - cache.len;
                ks.push(pad_columns(&k.narrow(2, 0, cache.len)?, left, capacity)?);
                vs.push(pad_columns(&v.narrow(2, 0, cache.len)?, left, capacity)?);
            }
            layers.push((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
        }
        let pad = rows.iter().map(|c| width - c.len + c.pad[0]).collect();
        Ok(KvCache {
            layers,
            len: width,
            capacity,
            pad,
            prompts: None,
        })
    }

    /// Makes room for at least `additional` more columns: first by dropping the leading
    /// columns every row pads (rows that left, or joined after others), then by growing the
    /// buffers geometrically. So a batch whose rows come and go stays about as wide as its
    /// longest row.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        if self.len + additional > self.capacity {
            self.trim_left()?;
        }
        let needed = self.len + additional;
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = needed.max(self.capacity + self.capacity / 2);
        for (k, v) in self.layers.iter_mut() {
            *k = pad_columns(&k.narrow(2, 0, self.len)?, 0, capacity)?;
            *v = pad_columns(&v.narrow(2, 0, self.len)?, 0, capacity)?;
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Restarts row `r` as a continuation of the prompt `prompt` (a single-row cache) with key
    /// `key`, as [`KvCache::continuing`] keys them (continuous batching: a waiting sequence
    /// takes the row of a finished one). Nothing is copied unless the prompt is new to the
    /// batch, which then adds one row to the prompts.
    pub fn restart_row(&mut self, r: usize, key: usize, prompt: &KvCache) -> Result<()> {
        let Some(shared) = self.prompts.as_mut() else {
            return Err(Error::Request(
                "only a batch that continues prompts can restart a row".into(),
            ));
        };
        if r >= self.pad.len() || prompt.layers.len() != self.layers.len() {
            return Err(Error::Request(format!(
                "cannot restart row {r} of a {}-row batch of {} layers from a {}-layer prompt",
                self.pad.len(),
                self.layers.len(),
                prompt.layers.len()
            )));
        }
        shared.restart(r, key, prompt)?;
        // The row's own columns are all padding from now on.
        self.pad[r] = self.len;
        Ok(())
    }

    /// Drops the leading columns that every row pads. Positions do not move (each row's
    /// length is kept), so decoding goes on as before; [`KvCache::reserve`] does it when the
    /// buffers are full, which is when the copy it costs buys room.
    pub fn trim_left(&mut self) -> Result<()> {
        let drop = self.pad.iter().copied().min().unwrap_or(0);
        if drop == 0 {
            return Ok(());
        }
        let keep = self.len - drop;
        for (k, v) in self.layers.iter_mut() {
            *k = pad_columns(&k.narrow(2, drop, keep)?, 0, self.capacity)?;
            *v = pad_columns(&v.narrow(2, drop, keep)?, 0, self.capacity)?;
        }
        self.pad.iter_mut().for_each(|p| *p -= drop);
        self.len = keep;
        Ok(())
    }

    /// Keeps only the given rows, in that order (drops finished sequences from a batch), and
    /// the prompts they continue.
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        let device = self.layers[0].0.device().clone();
        let index = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &device)?;
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(&index, 0)?;
            *v = v.index_select(&index, 0)?;
        }
        self.pad = rows.iter().map(|&r| self.pad[r]).collect();
        if let Some(shared) = self.prompts.as_mut() {
            shared.of_row = rows.iter().map(|&r| shared.of_row[r]).collect();
            shared.prune(None)?;
            shared.reindex()?;
        }
        Ok(())
    }
}

/// `x` ([1, kv, n, d]) shifted right by `left` zero columns inside a buffer of `capacity` columns.
fn pad_columns(x: &Tensor, left: usize, capacity: usize) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    let mut parts = Vec::with_capacity(3);
    if left > 0 {
        parts.push(Tensor::zeros((b, h, left, d), x.dtype(), x.device())?);
    }
    parts.push(x.clone());
    if capacity > left + n {
        parts.push(Tensor::zeros(
            (b, h, capacity - left - n, d),
            x.dtype(),
            x.device(),
        )?);
    }
    Ok(Tensor::cat(&parts, 2)?.contiguous()?)
}
