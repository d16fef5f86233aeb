"""File formats lorakit reads and writes, one module (one reader and one writer) per format.

* :mod:`lorakit.formats.peft`: PEFT's adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``,
  tensor keys under ``base_model.model.``), whatever the ``peft_type``.
* :mod:`lorakit.formats.peft_lora`: the ``peft_type: LORA`` config schema (rank, alpha, rsLoRA, per-module
  ``rank_pattern``/``alpha_pattern`` resolved exactly as PEFT resolves them) and plain-LoRA factor files.

These modules depend on nothing of lorakit but its errors, so every consumer (``io``, ``convert``, the server, the
mixtures) can call them without import cycles.
"""
