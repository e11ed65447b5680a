// meta[row] = (own pad, prompt row, prompt pad). Scores of the block's n_rep heads go to
// scratch rows of `columns` floats.
template <typename T>
__device__ void decode_attention(const T* q, long qs0, long qs1,
                                 const T* k, const T* v, long ks0, long ks1, long ks2,
                                 const T* pk, const T* pv, long ps0, long ps1, long ps2,
                                 const unsigned int* meta, float* scratch, T* out,
                                 int heads, int kv_heads, int hd, int len, int width,
                                 int columns, float scale) {
    __shared__ float shared[33];
    const int row = blockIdx.x / kv_heads, kvh = blockIdx.x % kv_heads;
    const int n_rep = heads / kv_heads;
    const int pad = meta[3 * row], prow = meta[3 * row + 1], ppad = meta[3 * row + 2];
    const int np = width > ppad ? width - ppad : 0;
    const int n = np + (len > pad ? len - pad : 0);
    float* sc = scratch + ((long)row * heads + kvh * n_rep) * columns;
    for (int j = threadIdx.x; j < n; j += THREADS) {
        const T* key = j < np ? pk + prow * ps0 + kvh * ps1 + (long)(ppad + j) * ps2
                              : k + row * ks0 + kvh * ks1 + (long)(pad + j - np) * ks2;
        for (int r = 0; r < n_rep; r++) {
            const T* qr = q + row * qs0 + (long)(kvh * n_rep + r) * qs1;
            float s = 0.0f;
            for (int d = 0; d < hd; d++) s += ld(qr, d) * ld(key, d);
            sc[(long)r * columns + j] = s * scale;
        }
    }
    __syncthreads();
    for (int r = 0; r < n_rep; r++) {
        float* s = sc + (long)r * columns;
        float m = NEG_INF;
        for (int j = threadIdx.x; j < n; j += THREADS) m = fmaxf(m, s[j]);
        m = block_max(m, shared);
        float total = 0.0f;
        for (int j = threadIdx.x; j < n; j += THREADS) {
            const float e = expf(s[j] - m);
            s[j] = e;
            total += e;
        }
        total = block_sum(total, shared);
        const float inv = 1.0f / total;
        for (int j = threadIdx.x; j < n; j += THREADS) s[j] *= inv;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n_rep * hd; i += THREADS) {
        const int r = i / hd, d = i % hd;
        const float* p = sc + (long)r * columns;
        float acc = 0.0f;
        for (int j = 0; j < n; j++) {
            const T* value = j < np ? pv + prow * ps0 + kvh * ps1 + (long)(ppad + j) * ps2
                                    : v + row * ks0 + kvh * ks1 + (long)(pad + j - np) * ks2;
            acc += p[j] * ld(value, d);
        }
        st(out, ((long)row * heads + kvh * n_rep + r) * hd + d, acc);
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                 \
extern "C" __global__ void decode_attention_##SUFFIX(                                          \
    const T* q, long qs0, long qs1, const T* k, const T* v, long ks0, long ks1, long ks2,      \
    const T* pk, const T* pv, long ps0, long ps1, long ps2, const unsigned int* meta,          \
    float* scratch, T* out, int heads, int kv_heads, int hd, int len, int width, int columns,  \
    float scale) {                                                                             \
    decode_attention(q, qs0, qs1, k, v, ks0, ks1, ks2, pk, pv, ps0, ps1, ps2, meta, scratch,   \
                     out, heads, kv_heads, hd, len, width, columns, scale);                    \
}
INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
