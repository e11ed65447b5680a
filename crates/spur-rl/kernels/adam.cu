__device__ __forceinline__ float next_moment(float m, float g, float keep, float take,
                                             float clip, int has_clip, int squared) {
    if (has_clip) g = __fadd_rn(__fmul_rn(g, clip), 0.0f);
    if (squared) g = __fmul_rn(g, g);
    return __fadd_rn(__fadd_rn(__fmul_rn(m, keep), 0.0f), __fadd_rn(__fmul_rn(g, take), 0.0f));
}

template <typename T>
__device__ void adam_moment(T* m, const float* g, float keep, float take, float clip,
                            int has_clip, int squared, long n) {
    const long i = (long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) return;
    st(m, i, next_moment(ld(m, i), g[i], keep, take, clip, has_clip, squared));
}

template <typename T>
__device__ void adam_weight(float* w, const T* m, const T* v, float decay, int has_decay,
                            float inv_bias2_sqrt, float eps, float step_size, long n) {
    const long i = (long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) return;
    float x = w[i];
    if (has_decay) x = __fadd_rn(__fmul_rn(x, decay), 0.0f);
    const float denom = __fadd_rn(__fadd_rn(__fmul_rn(__fsqrt_rn(ld(v, i)), inv_bias2_sqrt), 0.0f),
                                  eps);
    w[i] = __fsub_rn(x, __fadd_rn(__fmul_rn(__fdiv_rn(ld(m, i), denom), step_size), 0.0f));
}

#define INSTANTIATE(T, SUFFIX)                                                                extern "C" __global__ void adam_moment_##SUFFIX(T* m, const float* g, float keep, float take,                                                 float clip, int has_clip, int squared,                                                        long n) {                                         adam_moment(m, g, keep, take, clip, has_clip, squared, n);                               }                                                                                             extern "C" __global__ void adam_weight_##SUFFIX(float* w, const T* m, const T* v,                                                             float decay, int has_decay,                                                                   float inv_bias2_sqrt, float eps,                                                              float step_size, long n) {                        adam_weight(w, m, v, decay, has_decay, inv_bias2_sqrt, eps, step_size, n);                }
INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
