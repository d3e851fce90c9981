import os

os.environ.setdefault("FASTUNLEARN_KERNELS", "torch")
