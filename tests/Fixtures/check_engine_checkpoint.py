#!/usr/bin/env python3
"""The PyTorch side of the reverse interop check: a checkpoint the engine wrote loads into the
peer, and the peer's prediction equals the engine's.

    /usr/bin/python3 tests/Fixtures/check_engine_checkpoint.py ../shared/reference DIR [predict's --channels C --size S --classes K]

DIR holds what the C# test EngineCheckpointLoadsIntoPeer writes (it runs this script itself
when PyTorch is installed): weights.safetensors (engine weights, the model's names only),
input.safetensors (x, t) and engine-eps.safetensors (the engine's output). Exits 1 on mismatch.
"""
import os, subprocess, sys

ref, d = sys.argv[1], sys.argv[2]
sys.path.insert(0, ref)
from torch_unet import load_safetensors

out = os.path.join(d, "peer-eps.safetensors")
subprocess.run([sys.executable, os.path.join(ref, "torch_unet.py"), "predict", "--preset", "tiny",
                "--weights", os.path.join(d, "weights.safetensors"),
                "--input", os.path.join(d, "input.safetensors"), "--out", out] + sys.argv[3:], check=True)
peer = load_safetensors(out)["eps"]
engine = load_safetensors(os.path.join(d, "engine-eps.safetensors"))["eps"]
diff = (peer - engine).abs().max().item()
print("max |peer - engine| = %.3g" % diff)
sys.exit(0 if diff <= 1e-4 else 1)
