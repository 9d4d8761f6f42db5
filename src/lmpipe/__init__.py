"""lmpipe: a reproducible pipeline from a text corpus to a deployed, aligned language model."""

import logging as _logging

# transformers imports torchao when it is installed; on a CPU build torchao reports the CUDA
# kernels it cannot load, and torch warns about its pytree registrations, at WARNING level, on
# every import. Neither is actionable here, so they are raised to ERROR before anything imports.
# torch.onnx's exporter lists every torchvision op it skips (torchvision is not a dependency).
for _noisy in ("torchao", "torch.utils._pytree", "torch.onnx._internal.exporter._registration"):
    _logging.getLogger(_noisy).setLevel(_logging.ERROR)
