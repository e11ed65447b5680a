// Per row: (draw, temperature) in; (token, log-probability) out. Thread i owns the tokens of
// chunk i (consecutive ids); chunk sums are added in chunk order by thread 0.
extern "C" __global__ void choose_tokens(const float* logits, const double* rows, float* out,
                                         int vocab) {
    __shared__ float shared[33];
    __shared__ double sums[THREADS];
    __shared__ int found[2];
    __shared__ double found_acc;
    const float* x = logits + (long)blockIdx.x * vocab;
    const double draw = rows[2 * blockIdx.x], t = rows[2 * blockIdx.x + 1];
    float mf = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += THREADS) mf = fmaxf(mf, x[j]);
    mf = block_max(mf, shared);
    const double max = (double)mf;
    const int chunk = (vocab + THREADS - 1) / THREADS;
    const int lo = min((int)threadIdx.x * chunk, vocab), hi = min(lo + chunk, vocab);
    // Weights exp((x − max) / T) as the CPU computes them (greedy: T = 1 for the log-softmax).
    const double temp = t == 0.0 ? 1.0 : t;
    double s = 0.0;
    for (int j = lo; j < hi; j++) s += exp(((double)x[j] - max) / temp);
    sums[threadIdx.x] = s;
    if (threadIdx.x == 0) { found[0] = vocab; found[1] = THREADS; }
    __syncthreads();
    if (t == 0.0) {
        // Greedy: the first maximum, and the plain log-softmax.
        for (int j = lo; j < hi; j++) {
            if (x[j] == mf) { atomicMin(&found[0], j); break; }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double total = 0.0;
            for (int i = 0; i < THREADS; i++) total += sums[i];
            const int best = found[0] < vocab ? found[0] : 0;
            out[2 * blockIdx.x] = (float)best;
            out[2 * blockIdx.x + 1] = (float)((double)x[best] - max - log(total));
        }
        return;
    }
    if (threadIdx.x == 0) {
        double kept = 0.0;
        for (int i = 0; i < THREADS; i++) kept += sums[i];
        const double target = draw * kept;
        double acc = 0.0;
        int c = 0;
        while (c < THREADS && acc + sums[c] <= target) { acc += sums[c]; c++; }
        found[1] = c;
        found_acc = acc;
        sums[0] = kept;  // chunk 0's sum is no longer needed
    }
    __syncthreads();
    const double kept = sums[0];
    const int c = found[1];
    if (c == THREADS) {
        // Rounding left the target past the last weight: the last token, as on the CPU.
        if (threadIdx.x == 0) {
            const double w = exp(((double)x[vocab - 1] - max) / temp);
            out[2 * blockIdx.x] = (float)(vocab - 1);
            out[2 * blockIdx.x + 1] = (float)log(w / kept);
        }
        return;
    }
    if ((int)threadIdx.x == c) {
        const double target = draw * kept;
        double acc = found_acc;
        int chosen = hi - 1;
        double w = 0.0;
        for (int j = lo; j < hi; j++) {
            w = exp(((double)x[j] - max) / temp);
            acc += w;
            if (acc > target) { chosen = j; break; }
        }
        out[2 * blockIdx.x] = (float)chosen;
        out[2 * blockIdx.x + 1] = (float)log(w / kept);
    }
}
