"""KV-cache policies on a real pretrained model (SmolLM2-135M, offline): generate under StreamingLLM and
H2O, see what the per-head cache holds, and compare with dense attention.

Run: .venv/bin/python examples/kv_policies.py
"""

import torch

import attnkit.hf as akhf
from attnkit.models import load_smollm2

torch.manual_seed(0)
model, tok = load_smollm2()
prompt = "Attention sinks are the first tokens of a sequence. " * 20 + "In one sentence, an attention sink is"
enc = tok(prompt, return_tensors="pt")
n = enc.input_ids.shape[1]

with torch.no_grad():
    dense = model.generate(**enc, max_new_tokens=12, do_sample=False)
    print(f"dense ({n} prompt tokens):", tok.decode(dense[0, n:]))
    for policy in (akhf.StreamingLLM(budget=64, sinks=4), akhf.KVCompress(akhf.H2O(), budget=64)):
        with akhf.applied(model, policy) as handle:
            cache = handle.new_cache()
            out = model.generate(**enc, past_key_values=cache, max_new_tokens=12, do_sample=False)
        mem = cache.memory()["kv"] / 2**20
        print(f"{policy.describe()}: {tok.decode(out[0, n:])!r}")
        print(
            f"  cache holds {cache.lengths()[0]} entries per KV head (layer 0) of {cache.get_seq_length()} seen,"
            f" {mem:.2f} MiB of keys and values"
        )
