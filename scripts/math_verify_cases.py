#!/usr/bin/env python3
"""Builds crates/spur-math/tests/data/math_verify_cases.jsonl: the (gold, pred)
string pairs of math-verify's own test suite, each with the verdict that the
real library gives under its default settings:

    verify(parse(gold), parse(pred))

(LatexExtractionConfig() + ExprExtractionConfig(), float_rounding 6). The
verdict is the library's, not the test's expectation: some tests use other
extraction configs or flags, and spur's grader only implements the defaults.

    python3 -m venv ~/.cache/spur/mv-venv
    ~/.cache/spur/mv-venv/bin/pip install math-verify==0.9.0
    pip download --no-binary :all: --no-deps math-verify==0.9.0   # has tests/
    ~/.cache/spur/mv-venv/bin/python scripts/math_verify_cases.py \
        path/to/math_verify-0.9.0/tests > crates/spur-math/tests/data/math_verify_cases.jsonl

The pairs are read from every `pytest.mark.parametrize` list of tuples whose
first two items are string literals.
"""
import ast
import json
import sys
from pathlib import Path

from math_verify import parse, verify


def cases(test_dir: Path):
    for path in sorted(test_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize"):
                continue
            if len(node.args) < 2 or not isinstance(node.args[1], (ast.List, ast.Tuple)):
                continue
            for elt in node.args[1].elts:
                if not isinstance(elt, ast.Tuple) or len(elt.elts) < 2:
                    continue
                a, b = elt.elts[0], elt.elts[1]
                if all(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in (a, b)):
                    yield path.name, elt.lineno, a.value, b.value


def main():
    seen = set()
    for name, line, gold, pred in cases(Path(sys.argv[1])):
        if (gold, pred) in seen:
            continue
        seen.add((gold, pred))
        try:
            verdict = bool(verify(parse(gold), parse(pred)))
        except Exception:
            verdict = False
        print(json.dumps({"source": f"{name}:{line}", "gold": gold, "pred": pred,
                          "verdict": verdict}, ensure_ascii=False))


if __name__ == "__main__":
    main()
