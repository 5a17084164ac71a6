import os

# Triton kernels run on the CPU through the interpreter; it is chosen when a kernel is
# defined, so it must be set before any test imports one.
if os.environ.get("CUDA_VISIBLE_DEVICES", "") == "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# under pytest-xdist each worker takes one core: two workers of two threads on a 2-core
# machine would only contend
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
