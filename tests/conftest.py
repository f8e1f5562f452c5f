import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on
# before any kernel is defined. On a machine with a GPU they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch's AOTAutograd cache (on by default, shared under /tmp) keys a compiled graph's backward
# on its forward only: after a change to a custom op's backward (its schema, its formula) it
# hands back the old one. Tests compile afresh.
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
