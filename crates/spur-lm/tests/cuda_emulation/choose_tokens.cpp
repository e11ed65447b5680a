// The token choice's kernel (kernels/choose_tokens.cu) on the CPU; see shim.h.
#include "shim.h"
#include "prelude.cuh"
#include "choose_tokens.cu"

int main(int argc, char** argv) {
    if (argc != 3 || std::string(argv[2]) != "choose") return 2;
    const Io io(argv[1]);
    const auto logits = io.read<float>("logits");
    const auto rows = io.read<double>("rows");
    const int vocab = io.param("vocab");
    const int n = logits.size() / vocab;
    std::vector<float> out(2 * n);
    launch(choose_tokens, n, 1, THREADS, logits.data(), rows.data(), out.data(), vocab);
    io.write("out", out);
    return 0;
}
