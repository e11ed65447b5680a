#!/usr/bin/env bash
# Planning speed: spur vs Snakemake's dry run on the same graph shape
# (8 models × 7 rewards × 3 seeds, rollout → reward → update per step,
# an eval every 10 steps). STEPS scales the graph (300 = the paper's grid,
# ~156,000 nodes). Usage: scripts/bench-plan-vs-snakemake.sh [STEPS]
set -euo pipefail
steps=${1:-300}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
[ -n "${SPUR_BIN:-}" ] || cargo build --release --quiet --manifest-path "$root/Cargo.toml"
spur=${SPUR_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/spur}
if [ ! -x "$work/venv/bin/snakemake" ]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install --quiet snakemake
fi
"$spur" bench plan --write "$work/paper.yaml" --repeat 1 >/dev/null
sed -i "s/steps: 300/steps: $steps/" "$work/paper.yaml"
echo "== spur (parse + plan + cache scan), $steps steps"
/usr/bin/time -f "wall %e s, max RSS %M KB" "$spur" plan "$work/paper.yaml" --cache "$work/cache"

cat > "$work/Snakefile" <<SNAKE
M = ["m%d" % i for i in range(8)]
R = ["r%d" % i for i in range(7)]
S = [1, 2, 3]
STEPS = $steps
EVALS = sorted(set(list(range(10, STEPS + 1, 10)) + [STEPS]))
rule all:
    input:
        expand("out/{m}/{r}/{s}/update_{k}.txt", m=M, r=R, s=S, k=[STEPS]),
        expand("out/{m}/{r}/{s}/eval_{k}.txt", m=M, r=R, s=S, k=EVALS),
        expand("eval0/{m}.txt", m=M)
rule eval0:
    output: "eval0/{m}.txt"
    shell: "touch {output}"
def policy(w):
    k = int(w.k)
    return "init/%s.txt" % w.m if k == 1 else "out/%s/%s/%s/update_%d.txt" % (w.m, w.r, w.s, k - 1)
rule init:
    output: "init/{m}.txt"
    shell: "touch {output}"
rule rollout:
    input: policy
    output: "out/{m}/{r}/{s}/rollout_{k}.txt"
    shell: "touch {output}"
rule reward:
    input: "out/{m}/{r}/{s}/rollout_{k}.txt"
    output: "out/{m}/{r}/{s}/reward_{k}.txt"
    shell: "touch {output}"
rule update:
    input: "out/{m}/{r}/{s}/rollout_{k}.txt", "out/{m}/{r}/{s}/reward_{k}.txt", policy
    output: "out/{m}/{r}/{s}/update_{k}.txt"
    shell: "touch {output}"
rule eval:
    input: "out/{m}/{r}/{s}/update_{k}.txt"
    output: "out/{m}/{r}/{s}/eval_{k}.txt"
    shell: "touch {output}"
SNAKE
echo "== snakemake -n, $steps steps"
( cd "$work" && /usr/bin/time -f "wall %e s, max RSS %M KB" venv/bin/snakemake -n --quiet -c1 >/dev/null )
