// Runs spur's CUDA kernels on the CPU, so that their indexing and arithmetic are tested where
// there is no GPU. Each block runs alone; its threads are OS threads. `__syncthreads` is a
// barrier of the block's threads and a warp shuffle one of the warp's; a thread that returns
// leaves both barriers. `__shared__` variables are static: one copy, which the block that runs
// owns. Arithmetic is the host's f32 and f64 with no contraction (-ffp-contract=off), as the
// `_rn` intrinsics ask; `expf` and friends are the host's, so results agree with the GPU's to
// rounding, not to the bit.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;

struct Block {
    explicit Block(int threads) : block(threads), slots(threads) {
        for (int w = 0; w < threads / 32; w++) warps.emplace_back(new std::barrier<>(32));
    }
    std::barrier<> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> slots;
};
thread_local Block* current_block;
std::mutex atomic_lock;

inline void __syncthreads() { current_block->block.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const int t = threadIdx.x;
    auto& warp = *current_block->warps[t / 32];
    current_block->slots[t] = v;
    warp.arrive_and_wait();
    const float other = current_block->slots[t ^ offset];
    warp.arrive_and_wait();
    return other;
}
inline int atomicMin(int* p, int v) {
    std::lock_guard<std::mutex> guard(atomic_lock);
    const int old = *p;
    *p = std::min(old, v);
    return old;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float x) { return std::exp(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
using std::max;
using std::min;

// Runs `kernel` over grid (x, y) blocks of `threads` threads.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), unsigned grid_x, unsigned grid_y, int threads,
            Args... args) {
    for (unsigned by = 0; by < grid_y; by++) {
        for (unsigned bx = 0; bx < grid_x; bx++) {
            Block block(threads);
            std::vector<std::thread> pool;
            for (int t = 0; t < threads; t++) {
                pool.emplace_back([&, t] {
                    threadIdx.x = t;
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    current_block = &block;
                    kernel(args...);
                    block.warps[t / 32]->arrive_and_drop();
                    block.block.arrive_and_drop();
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}

// Inputs and outputs: raw little-endian arrays `DIR/NAME.bin`, scalars in `DIR/params.txt`
// ("name value" lines).
struct Io {
    std::string dir;
    std::map<std::string, double> params;
    explicit Io(const char* d) : dir(d) {
        std::ifstream in(dir + "/params.txt");
        std::string name;
        double value;
        while (in >> name >> value) params[name] = value;
    }
    double param(const char* name) const {
        auto it = params.find(name);
        if (it == params.end()) { std::fprintf(stderr, "no parameter %s\n", name); std::exit(2); }
        return it->second;
    }
    template <class T> std::vector<T> read(const std::string& name) const {
        std::ifstream in(dir + "/" + name + ".bin", std::ios::binary);
        if (!in) { std::fprintf(stderr, "no input %s\n", name.c_str()); std::exit(2); }
        std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
        std::vector<T> out(bytes.size() / sizeof(T));
        std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
        return out;
    }
    template <class T> void write(const std::string& name, const std::vector<T>& v) const {
        std::ofstream out(dir + "/" + name + ".bin", std::ios::binary);
        out.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
    }
};
