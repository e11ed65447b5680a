// The training ops' kernels (kernels/train_ops.cu) on the CPU; see shim.h.
#include "shim.h"
#include "prelude.cuh"
#include "train_ops.cu"

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    const Io io(argv[1]);
    const std::string scenario = argv[2];
    const int threads = THREADS;
    auto blocks = [&](long n) { return (unsigned)((n + threads - 1) / threads); };
    if (scenario == "rms_norm") {
        const auto x = io.read<float>("x"), w = io.read<float>("w"), g = io.read<float>("g");
        const int n = io.param("n"), block_rows = io.param("block_rows");
        const float eps = io.param("eps");
        const int rows = x.size() / n, row_blocks = (rows + block_rows - 1) / block_rows;
        std::vector<float> y(x.size()), dx(x.size()), r(rows), partial(row_blocks * n), dw(n);
        launch(rms_norm_f32, rows, 1, threads, x.data(), w.data(), y.data(), n, eps);
        launch(rms_norm_grad_input_f32, rows, 1, threads, x.data(), w.data(), g.data(),
               dx.data(), n, eps);
        launch(inv_rms_rows_f32, rows, 1, threads, x.data(), r.data(), n, eps);
        launch(rms_norm_grad_weight_partial_f32, blocks(n), row_blocks, threads, x.data(),
               g.data(), r.data(), partial.data(), n, (long)rows, block_rows);
        launch(sum_partials, blocks(n), 1, threads, partial.data(), dw.data(), n, row_blocks);
        io.write("y", y);
        io.write("dx", dx);
        io.write("dw", dw);
    } else if (scenario == "rope") {
        const auto x = io.read<float>("x"), c = io.read<float>("cos"), s = io.read<float>("sin");
        const auto g = io.read<float>("g");
        const int h = io.param("h"), t = io.param("t"), half = io.param("half");
        const int interleaved = io.param("interleaved");
        const long pairs = x.size() / 2;
        std::vector<float> y(x.size()), dx(x.size());
        launch(rope_f32, blocks(pairs), 1, threads, x.data(), c.data(), s.data(), y.data(), h, t,
               half, interleaved, 1.0f, pairs);
        launch(rope_f32, blocks(pairs), 1, threads, g.data(), c.data(), s.data(), dx.data(), h, t,
               half, interleaved, -1.0f, pairs);
        io.write("y", y);
        io.write("dx", dx);
    } else if (scenario == "swiglu") {
        const auto gate = io.read<float>("gate"), up = io.read<float>("up");
        const auto g = io.read<float>("g");
        const long n = gate.size();
        std::vector<float> y(n), grads(2 * n);
        launch(swiglu_f32, blocks(n), 1, threads, gate.data(), up.data(), y.data(), n);
        launch(swiglu_grad_f32, blocks(n), 1, threads, gate.data(), up.data(), g.data(),
               grads.data(), n);
        io.write("y", y);
        io.write("grads", grads);
    } else {
        return 2;
    }
    return 0;
}
