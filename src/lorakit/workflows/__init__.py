"""Workflows around an adapter's life, built on the same methods, procedures and trainer as ``lorakit train``.

One module per workflow, imported on demand (``from lorakit.workflows import temp_lora``):

* :mod:`.temp_lora`: Temp-Lora, a temporary LoRA trained on the text generated so far (long-text generation).
* :mod:`.transfer`: Trans-LoRA, nearly data-free transfer of an adapter to a new base model (``lorakit transfer``).

LS-LLaMA (label-supervised classification on decoder LMs) is a task kind (``head-classify``,
:mod:`lorakit.tasks.head`) rather than a workflow, so it trains through ``lorakit train`` directly.
"""
