"""The PyTorch side of the throughput comparison: a nanoGPT-shaped GPT, fp32, timed per step.

Not part of lmjax and not installed by `make`: run it with a CPU build of torch in a
separate environment (BUILD_NOTES used torch 2.13.0+cpu), on the same machine and
interleaved with `benchmarks/train_throughput.py`, because a shared VM's speed
drifts by tens of percent within minutes.

  python benchmarks/pytorch_reference.py --layers=6 --heads=6 --d_model=384 --seq_len=256 \
      --batch=16 --dropout=0.2 --attn_dropout=0.2 --seconds=30

The model is nanoGPT's: learned positions, pre-LayerNorm blocks without biases, one
fused QKV projection, `scaled_dot_product_attention` (causal, `dropout_p` on the
attention probabilities as nanoGPT passes it), exact GELU MLP of width 4*d, dropout
on the embeddings and both residual branches, tied head, AdamW and norm clipping.
Prints the median and the best of ~5-step windows.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  def __init__(self, d_model, heads, dropout, attn_dropout):
    super().__init__()
    self.heads, self.dropout, self.attn_dropout = heads, dropout, attn_dropout
    self.ln1, self.ln2 = nn.LayerNorm(d_model, bias=False), nn.LayerNorm(d_model, bias=False)
    self.qkv, self.proj = nn.Linear(d_model, 3 * d_model, bias=False), nn.Linear(d_model, d_model, bias=False)
    self.fc, self.out = (
      nn.Linear(d_model, 4 * d_model, bias=False),
      nn.Linear(4 * d_model, d_model, bias=False),
    )

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = (
      z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, dim=2)
    )
    y = F.scaled_dot_product_attention(
      q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
    )
    x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)), self.dropout, self.training)
    return x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), self.dropout, self.training)


class GPT(nn.Module):
  def __init__(self, args):
    super().__init__()
    self.dropout = args.dropout
    self.wte, self.wpe = nn.Embedding(args.vocab, args.d_model), nn.Embedding(args.seq_len, args.d_model)
    self.blocks = nn.ModuleList(
      Block(args.d_model, args.heads, args.dropout, args.attn_dropout) for _ in range(args.layers)
    )
    self.ln = nn.LayerNorm(args.d_model, bias=False)
    self.head = nn.Linear(args.d_model, args.vocab, bias=False)
    self.head.weight = self.wte.weight

  def forward(self, idx, targets):
    x = F.dropout(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])), self.dropout, self.training)
    for block in self.blocks:
      x = block(x)
    logits = self.head(self.ln(x))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in [
    ("layers", 4),
    ("heads", 4),
    ("d_model", 128),
    ("seq_len", 64),
    ("batch", 12),
    ("vocab", 78),
    ("threads", 2),
  ]:
    parser.add_argument(f"--{name}", type=int, default=default)
  for name, default in [("dropout", 0.0), ("attn_dropout", 0.0), ("seconds", 10.0)]:
    parser.add_argument(f"--{name}", type=float, default=default)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = GPT(args)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
  idx, targets = (torch.randint(0, args.vocab, (args.batch, args.seq_len)) for _ in range(2))

  def step():
    model(idx, targets).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  for _ in range(3):
    step()
  steps_per_window = 5 if args.seq_len >= 256 else 20
  windows_ms, start = [], time.perf_counter()
  while time.perf_counter() - start < args.seconds:
    t = time.perf_counter()
    for _ in range(steps_per_window):
      step()
    windows_ms.append((time.perf_counter() - t) / steps_per_window * 1e3)
  median = sorted(windows_ms)[len(windows_ms) // 2]
  print(
    f"torch {torch.__version__} {vars(args)}: median {median:.1f} ms/step "
    f"({args.batch * args.seq_len / median * 1e3:.0f} tokens/s), best window {min(windows_ms):.1f} ms"
  )


if __name__ == "__main__":
  main()
