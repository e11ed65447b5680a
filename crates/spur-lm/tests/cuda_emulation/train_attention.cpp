// The packed causal attention's kernels (kernels/train_attention.cu) on the CPU; see shim.h.
#include "shim.h"
#include "prelude.cuh"
#include "train_attention.cu"

int main(int argc, char** argv) {
    if (argc != 3 || std::string(argv[2]) != "attention") return 2;
    const Io io(argv[1]);
    const auto q = io.read<float>("q"), k = io.read<float>("k"), v = io.read<float>("v");
    const auto g = io.read<float>("g");
    const auto start = io.read<unsigned>("start");
    const int heads = io.param("heads"), kv_heads = io.param("kv_heads"), t = io.param("t");
    const int hd = io.param("hd");
    const float scale = 1.0f / std::sqrt((float)hd);
    const long q_items = q.size() / hd, kv_items = k.size() / hd;
    const int warps = THREADS / 32;
    auto grid = [&](long items) { return (unsigned)((items + warps - 1) / warps); };
    std::vector<float> out(q.size()), stats(2 * q_items), dq(q.size()), dk(k.size()),
        dv(v.size());
    launch(attention_forward_f32, grid(q_items), 1, THREADS, q.data(), k.data(), v.data(),
           out.data(), start.data(), heads, kv_heads, t, hd, scale, q_items);
    launch(attention_stats_f32, grid(q_items), 1, THREADS, q.data(), k.data(), out.data(),
           g.data(), stats.data(), start.data(), heads, kv_heads, t, hd, scale, q_items);
    launch(attention_grad_q_f32, grid(q_items), 1, THREADS, q.data(), k.data(), v.data(),
           g.data(), stats.data(), dq.data(), start.data(), heads, kv_heads, t, hd, scale,
           q_items);
    launch(attention_grad_kv_f32, grid(kv_items), 1, THREADS, q.data(), k.data(), v.data(),
           g.data(), stats.data(), dk.data(), dv.data(), start.data(), heads, kv_heads, t, hd,
           scale, kv_items);
    io.write("out", out);
    io.write("dq", dq);
    io.write("dk", dk);
    io.write("dv", dv);
    return 0;
}
