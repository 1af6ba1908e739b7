#!/usr/bin/env python3
"""Makes the interop fixture the C# tests load (run from the repository root):

    /usr/bin/python3 tests/Fixtures/make_interop_fixture.py ../shared/reference

It builds the PyTorch peer's tiny U-Net (ch=16) with seed 0, nudges every GroupNorm weight and
bias away from 1 and 0 (so the test sees whether the affine terms are wired), draws x [3,1,28,28]
and fixed timesteps t, runs the peer's forward in float32 and writes, next to this script:
  tiny-weights.safetensors   the state dict, in the peer's names and layouts
  tiny-input.safetensors     x (F32) and t (I64), the peer's `predict` input format
  tiny-eps.safetensors       the peer's output eps
"""
import os, sys

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "../shared/reference")
import torch
from torch_unet import UNet, save_safetensors

here = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(0)
model = UNet(16)
with torch.no_grad():
    for name, p in model.named_parameters():
        if ".norm" in name or name.startswith("norm_out"):
            p.add_(0.2 * torch.randn_like(p))
x = torch.randn(3, 1, 28, 28)
t = torch.tensor([0, 137, 299], dtype=torch.long)
with torch.no_grad():
    eps = model(x, t)
save_safetensors(os.path.join(here, "tiny-weights.safetensors"), model.state_dict())
save_safetensors(os.path.join(here, "tiny-input.safetensors"), {"x": x, "t": t})
save_safetensors(os.path.join(here, "tiny-eps.safetensors"), {"eps": eps})
print("torch", torch.__version__, "eps mean %.6f std %.6f" % (eps.mean().item(), eps.std().item()))
