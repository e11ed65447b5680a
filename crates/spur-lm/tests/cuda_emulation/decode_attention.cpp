// The decode attention's kernel (kernels/decode_attention.cu) on the CPU; see shim.h.
#include "shim.h"
#include "prelude.cuh"
#include "decode_attention.cu"

int main(int argc, char** argv) {
    if (argc != 3 || std::string(argv[2]) != "decode") return 2;
    const Io io(argv[1]);
    const auto q = io.read<float>("q"), k = io.read<float>("k"), v = io.read<float>("v");
    const auto pk = io.read<float>("pk"), pv = io.read<float>("pv");
    const auto meta = io.read<unsigned>("meta");
    const int b = io.param("b"), heads = io.param("heads"), kv_heads = io.param("kv_heads");
    const int hd = io.param("hd"), len = io.param("len"), width = io.param("width");
    const float scale = io.param("scale");
    const int columns = width + len;
    // Contiguous [b, heads, 1, hd], [b, kv, len, hd] and [prompts, kv, width, hd].
    const long qs0 = (long)heads * hd, qs1 = hd;
    const long ks0 = (long)kv_heads * len * hd, ks1 = (long)len * hd, ks2 = hd;
    const long ps0 = (long)kv_heads * width * hd, ps1 = (long)width * hd, ps2 = hd;
    std::vector<float> scratch((long)b * heads * columns), out((long)b * heads * hd);
    launch(decode_attention_f32, b * kv_heads, 1, THREADS, q.data(), qs0, qs1, k.data(),
           v.data(), ks0, ks1, ks2, pk.data(), pv.data(), ps0, ps1, ps2, meta.data(),
           scratch.data(), out.data(), heads, kv_heads, hd, len, width, columns, scale);
    io.write("out", out);
    return 0;
}
