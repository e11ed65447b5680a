#define MAX_DIMS 8  // head dimensions per lane: head_dim <= 256
#define WARPS (THREADS / 32)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// The warp's item and lane; false past the last item.
__device__ __forceinline__ bool warp_item(long items, long* item, int* lane) {
    *item = (long)blockIdx.x * WARPS + threadIdx.x / 32;
    *lane = threadIdx.x % 32;
    return *item < items;
}

// A warp's query: its lane, position i and item, and where its q row, its key/value head's
// keys and values, and its output row start (q [b, heads, t, hd], k and v [b, kv, t, hd], out
// and its gradient [b, t, heads, hd]).
struct Query {
    int lane, i;
    long item, q, kv, out;
};

// The warp's query; false past the last one.
__device__ __forceinline__ bool warp_query(long items, int heads, int kv_heads, int t, int hd,
                                           Query* w) {
    if (!warp_item(items, &w->item, &w->lane)) return false;
    w->i = w->item % t;
    const int h = (w->item / t) % heads, kvh = h / (heads / kv_heads);
    const long row = w->item / ((long)t * heads);
    w->q = ((row * heads + h) * t + w->i) * hd;
    w->kv = (row * kv_heads + kvh) * (long)t * hd;
    w->out = ((row * t + w->i) * heads + h) * hd;
    return true;
}

// start[i]: where position i's sequence starts.
template <typename T>
__device__ void attention_forward(const T* q, const T* k, const T* v, T* out,
                                  const unsigned int* start, int heads, int kv_heads, int t,
                                  int hd, float scale, long items) {
    Query w;
    if (!warp_query(items, heads, kv_heads, t, hd, &w)) return;
    const int lane = w.lane, i = w.i;
    const T* qi = q + w.q;
    const T* kb = k + w.kv;
    const T* vb = v + w.kv;
    float qd[MAX_DIMS], acc[MAX_DIMS];
    int n = 0;
    for (int d = lane; d < hd; d += 32) { qd[n] = ld(qi, d); acc[n] = 0.0f; n++; }
    float m = NEG_INF, l = 0.0f;
    for (int j = start[i]; j <= i; j++) {
        float s = 0.0f;
        int c = 0;
        for (int d = lane; d < hd; d += 32) s += qd[c++] * ld(kb, (long)j * hd + d);
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float keep = expf(m - m_new), p = expf(s - m_new);
        l = l * keep + p;
        c = 0;
        for (int d = lane; d < hd; d += 32) { acc[c] = acc[c] * keep + p * ld(vb, (long)j * hd + d); c++; }
        m = m_new;
    }
    T* o = out + w.out;
    int c = 0;
    for (int d = lane; d < hd; d += 32) st(o, d, acc[c++] / l);
}

// stats[2 * item] = the query's log-sum-exp of its scaled scores, stats[2 * item + 1] = its
// output's dot product with the output's gradient.
template <typename T>
__device__ void attention_stats(const T* q, const T* k, const T* out, const T* grad,
                                float* stats, const unsigned int* start, int heads,
                                int kv_heads, int t, int hd, float scale, long items) {
    Query w;
    if (!warp_query(items, heads, kv_heads, t, hd, &w)) return;
    const int lane = w.lane, i = w.i;
    const T* qi = q + w.q;
    const T* kb = k + w.kv;
    float m = NEG_INF, l = 0.0f;
    for (int j = start[i]; j <= i; j++) {
        float s = 0.0f;
        for (int d = lane; d < hd; d += 32) s += ld(qi, d) * ld(kb, (long)j * hd + d);
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        l = l * expf(m - m_new) + expf(s - m_new);
        m = m_new;
    }
    const long o = w.out;
    float dot = 0.0f;
    for (int d = lane; d < hd; d += 32) dot += ld(out, o + d) * ld(grad, o + d);
    dot = warp_sum(dot);
    if (lane == 0) { stats[2 * w.item] = m + logf(l); stats[2 * w.item + 1] = dot; }
}

// dq_i = scale · Σ_j p_ij (dP_ij − D_i) k_j, dP_ij = dO_i · v_j.
template <typename T>
__device__ void attention_grad_q(const T* q, const T* k, const T* v, const T* grad,
                                 const float* stats, T* dq, const unsigned int* start,
                                 int heads, int kv_heads, int t, int hd, float scale,
                                 long items) {
    Query w;
    if (!warp_query(items, heads, kv_heads, t, hd, &w)) return;
    const int lane = w.lane, i = w.i;
    const T* qi = q + w.q;
    const T* kb = k + w.kv;
    const T* vb = v + w.kv;
    const T* gi = grad + w.out;
    const float lse = stats[2 * w.item], big_d = stats[2 * w.item + 1];
    float acc[MAX_DIMS];
    for (int c = 0; c < MAX_DIMS; c++) acc[c] = 0.0f;
    for (int j = start[i]; j <= i; j++) {
        float s = 0.0f, dp = 0.0f;
        for (int d = lane; d < hd; d += 32) {
            s += ld(qi, d) * ld(kb, (long)j * hd + d);
            dp += ld(gi, d) * ld(vb, (long)j * hd + d);
        }
        s = warp_sum(s) * scale;
        dp = warp_sum(dp);
        const float ds = expf(s - lse) * (dp - big_d);
        int c = 0;
        for (int d = lane; d < hd; d += 32) acc[c++] += ds * ld(kb, (long)j * hd + d);
    }
    T* o = dq + w.q;
    int c = 0;
    for (int d = lane; d < hd; d += 32) st(o, d, acc[c++] * scale);
}

// For key j of a kv head: dv_j = Σ p_ij dO_i, dk_j = scale · Σ p_ij (dP_ij − D_i) q_i, over the
// group's query heads and the queries of j's sequence from j on.
template <typename T>
__device__ void attention_grad_kv(const T* q, const T* k, const T* v, const T* grad,
                                  const float* stats, T* dk, T* dv, const unsigned int* start,
                                  int heads, int kv_heads, int t, int hd, float scale,
                                  long items) {
    long item; int lane;
    if (!warp_item(items, &item, &lane)) return;
    const int j = item % t, kvh = (item / t) % kv_heads;
    const long row = item / ((long)t * kv_heads);
    const int group = heads / kv_heads;
    const T* kj = k + ((row * kv_heads + kvh) * t + j) * hd;
    const T* vj = v + ((row * kv_heads + kvh) * t + j) * hd;
    float dk_acc[MAX_DIMS], dv_acc[MAX_DIMS];
    for (int c = 0; c < MAX_DIMS; c++) { dk_acc[c] = 0.0f; dv_acc[c] = 0.0f; }
    for (int r = 0; r < group; r++) {
        const int h = kvh * group + r;
        for (int i = j; i < t && start[i] == start[j]; i++) {
            const T* qi = q + ((row * heads + h) * t + i) * hd;
            const T* gi = grad + ((row * t + i) * heads + h) * hd;
            const long s_at = 2 * ((row * heads + h) * t + i);
            float s = 0.0f, dp = 0.0f;
            for (int d = lane; d < hd; d += 32) {
                s += ld(qi, d) * ld(kj, d);
                dp += ld(gi, d) * ld(vj, d);
            }
            s = warp_sum(s) * scale;
            dp = warp_sum(dp);
            const float p = expf(s - stats[s_at]);
            const float ds = p * (dp - stats[s_at + 1]);
            int c = 0;
            for (int d = lane; d < hd; d += 32) {
                dv_acc[c] += p * ld(gi, d);
                dk_acc[c] += ds * ld(qi, d);
                c++;
            }
        }
    }
    const long o = ((row * kv_heads + kvh) * t + j) * hd;
    int c = 0;
    for (int d = lane; d < hd; d += 32) {
        st(dk, o + d, dk_acc[c] * scale);
        st(dv, o + d, dv_acc[c]);
        c++;
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                 \
extern "C" __global__ void attention_forward_##SUFFIX(                                         \
    const T* q, const T* k, const T* v, T* out, const unsigned int* start, int heads,          \
    int kv_heads, int t, int hd, float scale, long items) {                                    \
    attention_forward(q, k, v, out, start, heads, kv_heads, t, hd, scale, items);              \
}                                                                                              \
extern "C" __global__ void attention_stats_##SUFFIX(                                           \
    const T* q, const T* k, const T* out, const T* grad, float* stats,                         \
    const unsigned int* start, int heads, int kv_heads, int t, int hd, float scale,            \
    long items) {                                                                              \
    attention_stats(q, k, out, grad, stats, start, heads, kv_heads, t, hd, scale, items);      \
}                                                                                              \
extern "C" __global__ void attention_grad_q_##SUFFIX(                                          \
    const T* q, const T* k, const T* v, const T* grad, const float* stats, T* dq,              \
    const unsigned int* start, int heads, int kv_heads, int t, int hd, float scale,            \
    long items) {                                                                              \
    attention_grad_q(q, k, v, grad, stats, dq, start, heads, kv_heads, t, hd, scale, items);   \
}                                                                                              \
extern "C" __global__ void attention_grad_kv_##SUFFIX(                                         \
    const T* q, const T* k, const T* v, const T* grad, const float* stats, T* dk, T* dv,       \
    const unsigned int* start, int heads, int kv_heads, int t, int hd, float scale,            \
    long items) {                                                                              \
    attention_grad_kv(q, k, v, grad, stats, dk, dv, start, heads, kv_heads, t, hd, scale,      \
                      items);                                                                  \
}
INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
