import os

import torch

# Triton kernels run in Triton's interpreter on CPU; the variable must be set before any @triton.jit module
# is imported, so it is set here, before pytest imports the test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
