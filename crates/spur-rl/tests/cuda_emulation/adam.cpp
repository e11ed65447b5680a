// Adam's in-place kernels (kernels/adam.cu) on the CPU, with f32 moments; see spur-lm's
// tests/cuda_emulation/shim.h.
#include "shim.h"
#include "prelude.cuh"
#include "adam.cu"

int main(int argc, char** argv) {
    if (argc != 3 || std::string(argv[2]) != "adam") return 2;
    const Io io(argv[1]);
    auto w = io.read<float>("w"), m = io.read<float>("m"), v = io.read<float>("v");
    const auto g = io.read<float>("g");
    const long n = w.size();
    const unsigned blocks = (n + THREADS - 1) / THREADS;
    const float clip = io.param("clip");
    const int has_clip = io.param("has_clip");
    launch(adam_moment_f32, blocks, 1, THREADS, m.data(), g.data(), (float)io.param("keep1"),
           (float)io.param("take1"), clip, has_clip, 0, n);
    launch(adam_moment_f32, blocks, 1, THREADS, v.data(), g.data(), (float)io.param("keep2"),
           (float)io.param("take2"), clip, has_clip, 1, n);
    launch(adam_weight_f32, blocks, 1, THREADS, w.data(), m.data(), v.data(),
           (float)io.param("decay"), (int)io.param("has_decay"),
           (float)io.param("inv_bias2_sqrt"), (float)io.param("eps"),
           (float)io.param("step_size"), n);
    io.write("w", w);
    io.write("m", m);
    io.write("v", v);
    return 0;
}
