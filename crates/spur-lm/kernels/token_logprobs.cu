// max and Σ exp(x − max) of row x (every thread gets both).
template <typename T>
__device__ void stats(const T* x, int vocab, float* shared, float* max, float* sum) {
    float m = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += THREADS) m = fmaxf(m, ld(x, j));
    m = block_max(m, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += THREADS) s += __expf(ld(x, j) - m);
    *max = m;
    *sum = block_sum(s, shared);
}

template <typename T>
__device__ void token_logprob(const T* logits, const unsigned int* targets, float* out, int vocab) {
    __shared__ float shared[33];
    const T* x = logits + (long)blockIdx.x * vocab;
    float m, s;
    stats(x, vocab, shared, &m, &s);
    if (threadIdx.x == 0) out[blockIdx.x] = ld(x, targets[blockIdx.x]) - (m + logf(s));
}

template <typename T>
__device__ void token_logprob_grad(const T* logits, const unsigned int* targets,
                                   const float* grad, T* out, int vocab) {
    __shared__ float shared[33];
    const long row = (long)blockIdx.x * vocab;
    float m, s;
    stats(logits + row, vocab, shared, &m, &s);
    const float g = grad[blockIdx.x];
    const unsigned int t = targets[blockIdx.x];
    for (int j = threadIdx.x; j < vocab; j += THREADS) {
        float v = -g * (__expf(ld(logits, row + j) - m) / s);
        if ((unsigned int)j == t) v += g;
        st(out, row + j, v);
    }
}

template <typename T>
__device__ void row_entropy(const T* logits, float* out, int vocab) {
    __shared__ float shared[33];
    const T* x = logits + (long)blockIdx.x * vocab;
    float m, s;
    stats(x, vocab, shared, &m, &s);
    float w = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += THREADS) {
        float v = ld(x, j);
        w += __expf(v - m) * v;
    }
    w = block_sum(w, shared);
    if (threadIdx.x == 0) out[blockIdx.x] = logf(s) + m - w / s;
}

#define INSTANTIATE(T, SUFFIX)                                                               \
extern "C" __global__ void token_logprob_##SUFFIX(const T* l, const unsigned int* t,       \
                                                  float* o, int v) {                       \
    token_logprob(l, t, o, v);                                                             \
}                                                                                          \
extern "C" __global__ void token_logprob_grad_##SUFFIX(const T* l, const unsigned int* t,  \
                                                       const float* g, T* o, int v) {      \
    token_logprob_grad(l, t, g, o, v);                                                     \
}                                                                                          \
extern "C" __global__ void row_entropy_##SUFFIX(const T* l, float* o, int v) {             \
    row_entropy(l, o, v);                                                                  \
}
INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
