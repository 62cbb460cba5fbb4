"""``ftpeft demo``: fine-tune a pretrained sentence encoder with LoRA end to end.

The demo builds a Hugging Face model on the ``meta`` device, plans LoRA on
its spec and loads the real weights from safetensors. It then trains only the
adapters with ``torch.func.grad`` on bundled paraphrase pairs, reports
held-out retrieval before and after, and merges and saves. See ``docs/demo.md``.
"""

from .command import main

__all__ = ["main"]
