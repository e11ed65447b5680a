"""A toy GRPO loop over response *styles*, run by spur's `command` stages.

Until the model stages land, the quickstart exercises spur's backbone with
this stand-in: the policy is a softmax over five response styles (code or
text reasoning, right or wrong answer, or no answer), with a prior that
favours code reasoning, as Qwen2.5-Math's does. Each step samples groups,
scores them with the arm's reward, and takes clipped-PPO/GRPO steps on the
logits. It is a miniature of the paper's mechanism, not a language model.
"""
import argparse
import json
import math
import os
import random

STYLES = ["code_right", "code_wrong", "text_right", "text_wrong", "no_answer"]
PRIOR = [1.2, 0.9, 0.3, 0.4, 0.2]


def softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def reward(kind, style, rng, gamma):
    boxed = style != "no_answer"
    right = style.endswith("right")
    if kind == "ground_truth":
        return float(right)
    if kind == "format":
        return float(boxed)
    if kind == "incorrect":  # graded against a wrong label: a wrong boxed answer
        return float(boxed and not right and rng.random() < 0.5)
    if kind == "random":
        return float(rng.random() < gamma)
    raise SystemExit(f"unknown reward kind {kind}")


def load(path):
    with open(os.path.join(path, "policy.json")) as f:
        return json.load(f)["logits"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["init", "step", "eval"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--policy", default="")
    ap.add_argument("--reward", default="ground_truth")
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    a = ap.parse_args()
    metrics = {}
    if a.cmd == "init":
        logits = list(PRIOR)
    else:
        logits = load(a.policy)
    if a.cmd == "step":
        rng = random.Random(a.seed * 100003 + a.step)
        old = softmax(logits)
        batch = []
        for _ in range(a.groups):
            idx = [rng.choices(range(len(STYLES)), weights=old)[0] for _ in range(a.samples)]
            r = [reward(a.reward, STYLES[i], rng, a.gamma) for i in idx]
            mean = sum(r) / len(r)
            std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
            batch += [(i, (x - mean) / (std + 1e-9)) for i, x in zip(idx, r)]
        clipped = 0
        for _ in range(4):  # several updates per rollout, so the ratio moves off 1
            p = softmax(logits)
            grad = [0.0] * len(logits)
            for i, adv in batch:
                ratio = p[i] / old[i]
                # PPO: no gradient where the clipped term is the minimum.
                if (adv > 0 and ratio > 1 + a.clip) or (adv < 0 and ratio < 1 - a.clip):
                    clipped += 1
                    continue
                for j in range(len(logits)):
                    grad[j] += adv * ratio * ((j == i) - p[j])
            logits = [z + a.lr * g / len(batch) for z, g in zip(logits, grad)]
        metrics = {"reward_mean": sum(1 for _ in batch) and sum(adv for _, adv in batch) / len(batch),
                   "clip_fraction": clipped / (4 * len(batch))}
    p = softmax(logits)
    metrics.update({
        "accuracy": p[0] + p[2],
        "code_frequency": p[0] + p[1],
        "answer_rate": 1 - p[4],
    })
    with open(os.path.join(a.out, "policy.json"), "w") as f:
        json.dump({"logits": logits}, f)
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(metrics, f)


if __name__ == "__main__":
    main()
