"""Generation runtimes: greedy decoding of Hugging Face causal LMs through a KV cache, behind one interface.

* :class:`TokenGenerator` (``base.py``): ``reset`` / ``prefill`` / ``decode``, with ``generate`` and
  ``time_generation`` on top (what the eval harness times), each token chosen by :func:`argmax_last`;
* :class:`LeanGenerator` (``lean.py``): a flat eager loop over a Llama-family model's own modules with a static
  bf16 KV cache and qcal's native elementwise and attention kernels (bf16, CPU); which models qualify is told by
  their structure (``family.py``, :func:`unsupported_reason`);
* :class:`StaticCacheGenerator` (``static_cache.py``): the model's own forward through a ``transformers``
  static cache, ``torch.compile``'d (any device);
* ``hf_attention.py``: the ``"qcal"`` Hugging Face attention (qcal's decode kernel for one-query steps) and
  :func:`resolve`, the rule for ``"auto"`` attention.
"""

from .base import TokenGenerator, argmax_last, greedy_steps
from .hf_attention import resolve, set_attention
from .lean import LeanGenerator, unsupported_reason
from .static_cache import StaticCacheGenerator

__all__ = ["TokenGenerator", "argmax_last", "greedy_steps", "LeanGenerator", "unsupported_reason",
           "StaticCacheGenerator", "set_attention", "resolve"]
