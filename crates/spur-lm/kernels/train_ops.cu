// 1 / sqrt(mean(x²) + eps) of a row of n, in every thread of the block.
template <typename T>
__device__ float inv_rms(const T* x, int n, float eps, float* shared) {
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += THREADS) { float v = ld(x, j); s += v * v; }
    s = block_sum(s, shared);
    return 1.0f / sqrtf(s / n + eps);
}

template <typename T>
__device__ void rms_norm(const T* x, const float* w, T* out, int n, float eps) {
    __shared__ float shared[33];
    const long row = (long)blockIdx.x * n;
    const float r = inv_rms(x + row, n, eps, shared);
    for (int j = threadIdx.x; j < n; j += THREADS) st(out, row + j, ld(x, row + j) * r * w[j]);
}

// dx = r·g⊙w − x · r³ · Σ(g⊙w⊙x) / n.
template <typename T>
__device__ void rms_norm_grad_input(const T* x, const float* w, const T* g, T* out, int n,
                                    float eps) {
    __shared__ float shared[33];
    const long row = (long)blockIdx.x * n;
    const float r = inv_rms(x + row, n, eps, shared);
    float dot = 0.0f;
    for (int j = threadIdx.x; j < n; j += THREADS) dot += ld(x, row + j) * ld(g, row + j) * w[j];
    dot = block_sum(dot, shared);
    const float c = r * r * r * dot / n;
    for (int j = threadIdx.x; j < n; j += THREADS) {
        st(out, row + j, r * ld(g, row + j) * w[j] - ld(x, row + j) * c);
    }
}

template <typename T>
__device__ void inv_rms_rows(const T* x, float* out, int n, float eps) {
    __shared__ float shared[33];
    const float r = inv_rms(x + (long)blockIdx.x * n, n, eps, shared);
    if (threadIdx.x == 0) out[blockIdx.x] = r;
}

// partial[block][j] = Σ over the block's rows of g·x·r, one thread per column j.
template <typename T>
__device__ void rms_norm_grad_weight_partial(const T* x, const T* g, const float* r,
                                             float* partial, int n, long rows, int block_rows) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= n) return;
    const long first = (long)blockIdx.y * block_rows;
    long last = first + block_rows;
    if (last > rows) last = rows;
    float s = 0.0f;
    for (long row = first; row < last; row++) s += ld(g, row * n + j) * ld(x, row * n + j) * r[row];
    partial[(long)blockIdx.y * n + j] = s;
}

template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* out, int h, int t, int half,
                     int interleaved, float sign, long pairs) {
    const long idx = (long)blockIdx.x * THREADS + threadIdx.x;
    if (idx >= pairs) return;
    const long row = idx / half;
    const int i = idx % half;
    // Row (batch, head, position) reads the table of (batch, position).
    const long table = (row / ((long)h * t) * t + row % t) * half;
    const long base = row * 2 * half;
    const long i1 = base + (interleaved ? 2 * i : i);
    const long i2 = base + (interleaved ? 2 * i + 1 : i + half);
    const float x1 = ld(x, i1), x2 = ld(x, i2);
    const float c = ld(cos, table + i), s = sign * ld(sin, table + i);
    st(out, i1, x1 * c - x2 * s);
    st(out, i2, x2 * c + x1 * s);
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, long n) {
    const long i = (long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) return;
    const float g = ld(gate, i);
    st(out, i, g * sigmoid(g) * ld(up, i));
}

// out[0..n] = d_gate, out[n..2n] = d_up.
template <typename T>
__device__ void swiglu_grad(const T* gate, const T* up, const T* dy, T* out, long n) {
    const long i = (long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) return;
    const float g = ld(gate, i), u = ld(up, i), d = ld(dy, i);
    const float s = sigmoid(g);
    st(out, n + i, d * g * s);
    st(out, i, d * u * s * (1.0f + g * (1.0f - s)));
}

#define INSTANTIATE(T, SUFFIX)                                                                 \
extern "C" __global__ void rms_norm_##SUFFIX(const T* x, const float* w, T* o, int n,        \
                                             float eps) {                                     \
    rms_norm(x, w, o, n, eps);                                                               \
}                                                                                            \
extern "C" __global__ void rms_norm_grad_input_##SUFFIX(const T* x, const float* w,          \
                                                        const T* g, T* o, int n, float eps) {\
    rms_norm_grad_input(x, w, g, o, n, eps);                                                 \
}                                                                                            \
extern "C" __global__ void inv_rms_rows_##SUFFIX(const T* x, float* o, int n, float eps) {   \
    inv_rms_rows(x, o, n, eps);                                                              \
}                                                                                            \
extern "C" __global__ void rms_norm_grad_weight_partial_##SUFFIX(                            \
    const T* x, const T* g, const float* r, float* p, int n, long rows, int block_rows) {    \
    rms_norm_grad_weight_partial(x, g, r, p, n, rows, block_rows);                           \
}                                                                                            \
extern "C" __global__ void rope_##SUFFIX(const T* x, const T* c, const T* s, T* o, int h,    \
                                         int t, int half, int interleaved, float sign,       \
                                         long pairs) {                                       \
    rope(x, c, s, o, h, t, half, interleaved, sign, pairs);                                  \
}                                                                                            \
extern "C" __global__ void swiglu_##SUFFIX(const T* g, const T* u, T* o, long n) {           \
    swiglu(g, u, o, n);                                                                      \
}                                                                                            \
extern "C" __global__ void swiglu_grad_##SUFFIX(const T* g, const T* u, const T* d, T* o,    \
                                                long n) {                                    \
    swiglu_grad(g, u, d, o, n);                                                              \
}
INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)

// Σ over the blocks, in order, of each column's partial sums.
extern "C" __global__ void sum_partials(const float* partial, float* out, int n, int blocks) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= n) return;
    float s = 0.0f;
    for (int b = 0; b < blocks; b++) s += partial[(long)b * n + j];
    out[j] = s;
}
