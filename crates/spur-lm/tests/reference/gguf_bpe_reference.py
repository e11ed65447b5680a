# Usage: python3 gguf_bpe_reference.py MODEL.gguf math500.jsonl  (needs: pip install gguf regex)
# Independent reference: llama.cpp's "smollm" pre-tokenizer + GPT-2 byte-level BPE, in Python.
import json, sys, regex
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
toks = r.fields['tokenizer.ggml.tokens'].contents()
types = r.fields['tokenizer.ggml.token_type'].contents()
merges = r.fields['tokenizer.ggml.merges'].contents()
vocab = {t: i for i, t in enumerate(toks)}
ranks = {tuple(m.split(' ', 1)): i for i, m in enumerate(merges)}
specials = [t for t, ty in zip(toks, types) if ty != 1]
bs = list(range(ord("!"), ord("~")+1)) + list(range(ord("¡"), ord("¬")+1)) + list(range(ord("®"), ord("ÿ")+1))
cs = bs[:]; n = 0
for b in range(256):
    if b not in bs: bs.append(b); cs.append(256+n); n += 1
b2u = {b: chr(c) for b, c in zip(bs, cs)}
pat1 = regex.compile(r"\p{N}")
pat2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
def bpe(word):
    parts = list(word)
    while len(parts) > 1:
        best = None
        for i in range(len(parts)-1):
            rk = ranks.get((parts[i], parts[i+1]))
            if rk is not None and (best is None or rk < best[0]): best = (rk, i)
        if best is None: break
        i = best[1]; parts = parts[:i] + [parts[i]+parts[i+1]] + parts[i+2:]
    return [vocab[p] for p in parts]
def split_regex(text, pat):
    out = []; last = 0
    for m in pat.finditer(text):
        if m.start() > last: out.append(text[last:m.start()])
        out.append(m.group()); last = m.end()
    if last < len(text): out.append(text[last:])
    return out
def encode(text):
    sp = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
    ids = []
    for seg in sp.split(text):
        if not seg: continue
        if seg in specials: ids.append(vocab[seg]); continue
        for piece in split_regex(seg, pat1):
            for w in pat2.findall(piece):
                ids += bpe(''.join(b2u[b] for b in w.encode('utf-8')))
    return ids
sysmsg = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
counts = []; allids = []
for line in open(sys.argv[2]):
    p = json.loads(line)["problem"]
    e = encode(sysmsg + "<|im_start|>user\n" + p + "<|im_end|>\n<|im_start|>assistant\n"); counts.append(len(e)); allids.append(e)
print("prompts:", len(counts), "tokens:", sum(counts), "111-token prompts:", [i for i, c in enumerate(counts) if c == 111])
print("problem 0:", allids[0])
