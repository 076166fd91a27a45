#!/usr/bin/env bash
# The main job from a fresh clone: .venv, then a forward/backward smoke of a small muP model.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python - <<'PY'
import torch
from nanochat.gpt import GPT, GPTConfig
cfg = GPTConfig(n_layer=2, n_embd=256, n_head=4, n_kv_head=4, mup_base_width=64)
with torch.device("meta"):
    model = GPT(cfg)
model.to_empty(device="cpu")
model.init_weights()
model.mup_table(print_table=True)
opt = model.setup_optimizer()
x = torch.randint(0, cfg.vocab_size, (4, 64))
for step in range(10):
    loss = model(x, x)
    loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    print(f"step {step} loss {loss.item():.4f}")
PY
