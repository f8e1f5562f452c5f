import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on
# before any kernel is defined. On a machine with a GPU they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
